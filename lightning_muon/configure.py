"""``configure_muon``: the one line a LightningModule's ``configure_optimizers`` needs.

Example:
    >>> import lightning as L
    >>> from torch import nn
    >>> class LitMLP(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    ...     def configure_optimizers(self):
    ...         return configure_muon(self, lr=0.02, adjust_lr="original", adamw_lr=3e-4,
    ...                               warmup_steps=100, schedule="cosine", max_steps=1000)
    >>> config = LitMLP().configure_optimizers()
    >>> [g["name"] for g in config["optimizer"].param_groups], config["lr_scheduler"]["interval"]
    (['muon', 'adamw', 'adamw_no_decay'], 'step')
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .optim.muon import Muon
from .routing import RoutingRules, muon_param_groups
from .validation import check_choice, check_number, check_positive_int

__all__ = ["configure_muon", "muon_optimizer", "lr_lambda", "SCHEDULES"]

#: Values of ``schedule``: the LR multiplier after the warmup (constant, or a decay to ``min_lr_ratio``).
SCHEDULES = ("constant", "cosine", "linear")
#: The keywords of :func:`configure_muon` that are routing options (the fields of :class:`RoutingRules`).
ROUTING_OPTIONS = frozenset(f.name for f in dataclasses.fields(RoutingRules))


def lr_lambda(
    schedule: str, warmup_steps: int, max_steps: int | None, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of every group's initial lr at optimizer step ``step`` (for ``LambdaLR``).

    Linear warmup from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps``, then constant, or a
    cosine / linear decay to ``min_lr_ratio`` at ``max_steps``.

    Example:
        >>> f = lr_lambda("cosine", warmup_steps=10, max_steps=110)
        >>> round(f(10), 3), round(f(60), 3), round(f(110), 3)
        (1.0, 0.5, 0.0)
    """
    check_choice(schedule, "schedule", "configure_muon", SCHEDULES)
    check_positive_int(warmup_steps, "warmup_steps", "configure_muon", minimum=0)
    check_number(min_lr_ratio, "min_lr_ratio", "configure_muon", low=0, high=1)
    if schedule != "constant" and (max_steps is None or max_steps <= warmup_steps):
        raise ValueError(
            f"configure_muon: schedule={schedule!r} needs max_steps > warmup_steps "
            f"(got max_steps={max_steps!r}, warmup_steps={warmup_steps})"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return factor


def _is_lightning_module(module: nn.Module) -> bool:
    """Whether ``module`` is a LightningModule (checked by class name: this module imports no Lightning)."""
    return any(cls.__name__ == "LightningModule" for cls in type(module).__mro__)


def muon_optimizer(
    module: nn.Module,
    *,
    lr: float = 1e-3,
    optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer] | None = None,
    warmup_steps: int = 0,
    max_steps: int | None = None,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    rules: RoutingRules | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR | None]:
    """:func:`configure_muon` for a plain PyTorch loop: ``(optimizer, scheduler)``, the scheduler
    None with the default constant schedule and no warmup. Same arguments; call
    ``scheduler.step()`` after each ``optimizer.step()``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> optimizer, scheduler = muon_optimizer(model, lr=0.02, warmup_steps=10, schedule="cosine", max_steps=100)
        >>> loss = model(torch.randn(16, 8)).square().mean()
        >>> loss.backward(); optimizer.step(); scheduler.step()
        >>> type(optimizer).__name__, round(optimizer.param_groups[0]["lr"], 4)
        ('Muon', 0.0036)
    """
    routing = {k: kwargs.pop(k) for k in list(kwargs) if k in ROUTING_OPTIONS}
    muon_kwargs = kwargs
    if schedule != "constant" and max_steps is None:
        trainer = getattr(module, "_trainer", None)
        if trainer is None:
            raise ValueError(
                f"configure_muon: schedule={schedule!r} needs max_steps (the number of optimizer steps the "
                "schedule spans), or a module attached to a Trainer; pass max_steps=<total optimizer steps>"
            )
        max_steps = int(trainer.estimated_stepping_batches)
    factor = lr_lambda(schedule, warmup_steps, max_steps, min_lr_ratio)
    groups = muon_param_groups(module, rules, verbose=verbose, **routing)
    if optimizer is None:
        opt: torch.optim.Optimizer = Muon(groups, lr=lr, **muon_kwargs)
    else:
        if muon_kwargs:
            raise ValueError(
                f"configure_muon: {sorted(muon_kwargs)} cannot be combined with optimizer=...; "
                "set them on the optimizer callable instead, e.g. optimizer=functools.partial(Muon, momentum=0.9)"
            )
        opt = optimizer(groups)
    if schedule == "constant" and warmup_steps == 0:
        return opt, None
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def configure_muon(
    module: nn.Module,
    *,
    lr: float = 1e-3,
    optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer] | None = None,
    warmup_steps: int = 0,
    max_steps: int | None = None,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    rules: RoutingRules | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> torch.optim.Optimizer | dict[str, Any]:
    """Build a :class:`Muon` over ``module`` and return what ``configure_optimizers`` returns.

    Params are routed by :func:`lightning_muon.muon_param_groups` (groups ``muon``, ``adamw``,
    ``adamw_no_decay``, named so LearningRateMonitor logs them apart). With the default constant
    schedule and no warmup the optimizer itself is returned; otherwise Lightning's
    ``{"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR, "interval": "step"}}``, which a
    plain PyTorch loop cannot step: there use :func:`muon_optimizer` (same arguments, returns
    ``(optimizer, scheduler)``); for a plain ``nn.Module`` this function warns and says so.
    ``max_steps=None`` with a decaying schedule uses ``module.trainer.estimated_stepping_batches``.

    Args:
        optimizer: an optimizer factory taking param groups, e.g. the ``OptimizerCallable`` that
            LightningCLI injects into a module's ``__init__``; default ``Muon(groups, lr=lr, **kwargs)``.
        rules: the routing options (:class:`lightning_muon.RoutingRules`).
        verbose: print the routing table (each parameter, its group and why).
        **kwargs: fields of :class:`~lightning_muon.RoutingRules` (``adamw_names``, ``split_qkv``,
            ``matrix_rules``, ...), replacing those of ``rules``, and other :class:`Muon` arguments
            (``momentum``, ``adjust_lr``, ``adamw_lr``, ...).
    """
    opt, scheduler = muon_optimizer(
        module,
        lr=lr,
        optimizer=optimizer,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
        rules=rules,
        verbose=verbose,
        **kwargs,
    )
    if scheduler is None:
        return opt
    if not _is_lightning_module(module):
        warnings.warn(
            f"configure_muon returns Lightning's {{'optimizer': ..., 'lr_scheduler': ...}} dict here "
            f"(schedule={schedule!r}, warmup_steps={warmup_steps} need an LR scheduler), and "
            f"{type(module).__name__} is a plain nn.Module: a plain PyTorch loop cannot call .step() on "
            "that dict. Use `optimizer, scheduler = lightning_muon.muon_optimizer(model, ...)` with the "
            "same arguments, and call scheduler.step() after each optimizer.step().",
            stacklevel=2,
        )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
