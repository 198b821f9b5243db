"""What the attention-logit monitor and the QK-clip callback share: finding the attention modules,
watching the forward passes of one optimizer step, and the MAX all-reduce across ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from ..qk_clip import QKObserver, find_qk_attention
from ..routing import matching_pattern


def attach_observer(
    pl_module: pl.LightningModule, include: Sequence[str] | None, exclude: Sequence[str], where: str
) -> QKObserver:
    """Hooks on every clippable attention module of ``pl_module`` selected by ``include``/``exclude``."""
    found = find_qk_attention(pl_module)
    selected = {
        n: v
        for n, v in found.items()
        if (include is None or matching_pattern(n, include)) and not matching_pattern(n, exclude)
    }
    if not selected:
        raise MisconfigurationException(
            f"{where}: no attention module to watch"
            + (f" among {list(found)} with include={include}, exclude={list(exclude)}" if found else "")
            + ". Supported: torch.nn.MultiheadAttention and modules implementing the QK-clip protocol "
            "(n_head, qk_logit_max(args, kwargs), qk_clip_rows(); see lightning_muon.qk_clip and docs/qk-clip.md)."
        )
    return QKObserver(selected)


def all_reduce_max(trainer: pl.Trainer):
    """A function MAX-reducing a tensor over all ranks (``None`` on one process)."""
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None

    def reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    return reduce


def per_head_metrics(prefix: str, maxima: dict[str, Tensor]) -> dict[str, float]:
    """``prefix/<layer>/head_<h>``, ``prefix/<layer>/max`` and ``prefix/max`` over observed heads."""
    out: dict[str, float] = {}
    overall = -math.inf
    for layer, values in maxima.items():
        vals = values.tolist()
        if all(v == -math.inf for v in vals):
            continue  # not called in this step
        for h, v in enumerate(vals):
            out[f"{prefix}/{layer}/head_{h}"] = v
        out[f"{prefix}/{layer}/max"] = max(vals)
        overall = max(overall, max(vals))
    if out:
        out[f"{prefix}/max"] = overall
    return out


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    if trainer.is_global_zero and metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
