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

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .optimizer import Muon
from .routing import DEFAULT_EMBEDDING_NAMES, DEFAULT_HEAD_NAMES, muon_param_groups

__all__ = ["configure_muon", "lr_lambda", "SCHEDULES"]

SCHEDULES = ("constant", "cosine", "linear")


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
    if schedule not in SCHEDULES:
        raise ValueError(f"configure_muon: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"configure_muon: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"configure_muon: min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
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


def configure_muon(
    module: nn.Module,
    *,
    lr: float = 1e-3,
    optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer] | None = None,
    warmup_steps: int = 0,
    max_steps: int | None = None,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    embedding_names: Sequence[str] = DEFAULT_EMBEDDING_NAMES,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    adamw_names: Sequence[str] = (),
    muon_names: Sequence[str] = (),
    verbose: bool = False,
    matrix_rules: Mapping[str, str] | None = None,
    split_qkv: bool | str = False,
    num_heads: int | None = None,
    **muon_kwargs: Any,
) -> torch.optim.Optimizer | dict[str, Any]:
    """Build a :class:`Muon` over ``module`` and return what ``configure_optimizers`` returns.

    Params are routed by :func:`lightning_muon.muon_param_groups` (groups ``muon``, ``adamw``,
    ``adamw_no_decay``, named so LearningRateMonitor logs them apart). With the default constant
    schedule and no warmup the optimizer itself is returned; otherwise
    ``{"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR, "interval": "step"}}``.
    ``max_steps=None`` with a decaying schedule uses ``module.trainer.estimated_stepping_batches``.

    Args:
        optimizer: an optimizer factory taking param groups, e.g. the ``OptimizerCallable`` that
            LightningCLI injects into a module's ``__init__``; default ``Muon(groups, lr=lr, **muon_kwargs)``.
        verbose: print the routing table (each parameter, its group and why).
        matrix_rules, split_qkv, num_heads: how Muon sees each matrix (conv kernel, stack of
            matrices, fused QKV split in blocks or per head); see :func:`lightning_muon.route_parameters`.
        **muon_kwargs: other :class:`Muon` arguments (``momentum``, ``adjust_lr``, ``adamw_lr``, ...).
    """
    if schedule != "constant" and max_steps is None:
        trainer = getattr(module, "_trainer", None)
        if trainer is None:
            raise ValueError(
                f"configure_muon: schedule={schedule!r} needs max_steps, or a module attached to a Trainer"
            )
        max_steps = int(trainer.estimated_stepping_batches)
    factor = lr_lambda(schedule, warmup_steps, max_steps, min_lr_ratio)
    groups = muon_param_groups(
        module,
        embedding_names=embedding_names,
        head_names=head_names,
        adamw_names=adamw_names,
        muon_names=muon_names,
        verbose=verbose,
        matrix_rules=matrix_rules,
        split_qkv=split_qkv,
        num_heads=num_heads,
    )
    if optimizer is None:
        opt: torch.optim.Optimizer = Muon(groups, lr=lr, **muon_kwargs)
    else:
        if muon_kwargs:
            raise ValueError(
                f"configure_muon: {sorted(muon_kwargs)} cannot be combined with optimizer=...; "
                "set them on the optimizer callable instead"
            )
        opt = optimizer(groups)
    if schedule == "constant" and warmup_steps == 0:
        return opt
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
