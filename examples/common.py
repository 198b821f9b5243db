"""What the example LightningModules and their command lines share: the optimizer they are given,
FSDP2 sharding, and :class:`ExampleCLI` (a progress bar in optimizer steps, no third-party noise,
and where the logs are at the end).

Each example module takes ``optimizer: OptimizerCallable`` (LightningCLI's injection: a class path
and its arguments in YAML or on the command line) plus the LR schedule, and hands both to
:func:`lightning_muon.configure_muon`, which routes the parameters into named groups (``muon``,
``adamw``, ``adamw_no_decay``) whichever optimizer is injected. So the AdamW baseline is the same
module, the same groups and the same schedule with ``torch.optim.AdamW`` injected instead of Muon.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_muon import Muon
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> type(configure_optimizer(net, muon())).__name__, type(configure_optimizer(net, adamw())).__name__
    ('Muon', 'AdamW')
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_muon import Muon, configure_muon

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]

__all__ = [
    "ExampleCLI",
    "OptimizerFactory",
    "adamw",
    "configure_optimizer",
    "fully_shard_blocks",
    "muon",
    "quiet_third_party_noise",
    "run_summary",
]


def muon(lr: float = 0.02, adamw_lr: float = 1e-3, **kwargs: Any) -> OptimizerFactory:
    """The examples' Muon: Keller Jordan's ``adjust_lr="original"`` at ``lr`` for the hidden
    matrices, AdamW at ``adamw_lr`` for the rest, no weight decay (the paper's settings); what
    the configs under ``examples/configs`` write out as ``model.optimizer``."""
    settings = dict(lr=lr, adamw_lr=adamw_lr, adjust_lr="original", weight_decay=0.0, momentum=0.95)
    return partial(Muon, **{**settings, **kwargs})


def adamw(lr: float = 1e-3, **kwargs: Any) -> OptimizerFactory:
    """The examples' AdamW baseline: every parameter at ``lr``, betas (0.9, 0.95), no weight decay
    (the no-decay group keeps weight decay 0 either way); what ``examples/configs/adamw.yaml`` sets.
    Pass ``fused=True`` for torch's fused kernel (plain CPU/CUDA tensors only, not DTensors), as Muon
    uses for its own AdamW groups, when timings are compared."""
    settings = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return partial(torch.optim.AdamW, **{**settings, **kwargs})


def configure_optimizer(
    module: nn.Module,
    optimizer: OptimizerFactory,
    warmup_steps: int = 0,
    schedule: str = "constant",
    split_qkv: bool | str = False,
) -> torch.optim.Optimizer | dict[str, Any]:
    """``configure_muon(module, optimizer=optimizer, ...)``: Muon's routing and named groups, and one
    LR schedule over every group, for whichever optimizer the module was given. ``split_qkv``
    (Muon only): orthogonalise fused q, k, v projections as blocks (True) or per head
    (``"per_head"``), see :func:`lightning_muon.route_parameters`."""
    if not callable(optimizer):
        raise TypeError(
            f"optimizer must be a callable that takes param groups (an OptimizerCallable such as "
            f"lightning_muon.Muon or torch.optim.AdamW), got {optimizer!r}"
        )
    return configure_muon(
        module, optimizer=optimizer, warmup_steps=warmup_steps, schedule=schedule, split_qkv=split_qkv
    )


def fully_shard_blocks(lightning_module: Any, model: nn.Module, blocks: Any) -> None:
    """For ``configure_model``: under ``ModelParallelStrategy`` (FSDP2) shard each block, then the
    whole model, over the data-parallel mesh; under any other strategy do nothing."""
    mesh = lightning_module.device_mesh
    if mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"]
    for block in blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip")


def quiet_third_party_noise() -> None:
    """Silence what other packages print into the progress bar and the examples cannot act on:
    torch's ``FutureWarning`` about ``LeafSpec`` that Lightning's own ``_pytree`` helper triggers
    (torch >= 2.10 with Lightning 2.6), and Lightning's "Tip" advertising a cloud logger. For the
    examples' command lines only: the package itself filters nothing."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_a_tip not in rank_zero.filters:
        rank_zero.addFilter(_not_a_tip)


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies inside it (as a user would type it)."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _tensorboard_command() -> str:
    """``tensorboard`` next to this Python (a virtual environment's bin/), else the bare name."""
    beside = Path(sys.executable).parent / ("tensorboard.exe" if os.name == "nt" else "tensorboard")
    return _shown(beside) if beside.exists() else "tensorboard"


def run_summary(trainer: Any) -> str:
    """Where a finished run put its logs and checkpoints, and the command that opens the logs.

    Example:
        >>> import lightning as L
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> trainer = L.Trainer(logger=TensorBoardLogger("runs", name="demo", version=0), enable_checkpointing=False)
        >>> print(run_summary(trainer))  # doctest: +ELLIPSIS
        TensorBoard logs: runs/demo/version_0
          open them with: ...tensorboard --logdir runs
    """
    lines = []
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir is None:
            continue
        if type(logger).__name__ == "TensorBoardLogger":
            lines.append(f"TensorBoard logs: {_shown(log_dir)}")
            lines.append(f"  open them with: {_tensorboard_command()} --logdir {_shown(logger.save_dir)}")
        elif type(logger).__name__ == "CSVLogger":
            lines.append(f"metrics: {_shown(Path(log_dir) / 'metrics.csv')}")
        else:
            lines.append(f"{type(logger).__name__} logs: {_shown(log_dir)}")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        for label, path in (("best checkpoint", checkpoint.best_model_path), ("last", checkpoint.last_model_path)):
            if path:
                lines.append(f"{label}: {_shown(path)}")
    return "\n".join(lines)


class ExampleCLI(LightningCLI):
    """The examples' ``LightningCLI``: a training bar counted in optimizer steps
    (:func:`lightning_muon.callbacks.step_progress_bar`: totals and ETA hold under
    ``accumulate_grad_batches``) unless the config brings its own bar or turns it off; no
    third-party deprecation or advertising lines (:func:`quiet_third_party_noise`); and after
    ``fit``, where the logs and checkpoints are and the command that opens them (:func:`run_summary`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_third_party_noise()
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.pytorch.callbacks import ProgressBar

        from lightning_muon.callbacks import step_progress_bar

        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, step_progress_bar()])
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if self.trainer.is_global_zero and (summary := run_summary(self.trainer)):
            print(summary, flush=True)
