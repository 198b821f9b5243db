"""``AttentionLogitMonitor``: the largest pre-softmax attention logit of each layer and head."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from .base import AttentionCallback


class AttentionLogitMonitor(AttentionCallback):
    """Log the max attention logit ``max q.k / sqrt(d)`` of every head (MuonClip's ``S_h``).

    Under Muon these logits can grow without bound (Kimi K2); this shows whether they do, and
    whether :class:`~lightning_muon.callbacks.QKClip` is needed. On every ``every_n_steps``-th
    optimizer step, forward hooks take the max over the step's training forward passes (all
    micro-batches under gradient accumulation, all ranks under DDP/FSDP2: MAX all-reduce) and rank 0
    logs ``attn_logit_max/<layer>/head_<h>``, ``attn_logit_max/<layer>/max`` and
    ``attn_logit_max/max`` at that step (also in ``trainer.callback_metrics``, for EarlyStopping).
    Other steps cost nothing; a logging step recomputes q and k (one extra q/k projection and
    ``q k^T`` per attention layer, under ``no_grad``).

    Works out of the box on ``torch.nn.MultiheadAttention`` (torchvision's ViT), on the example
    GPT, and on any module implementing the protocol of :mod:`lightning_muon.diagnostics.attention`.

    Args:
        every_n_steps: log every this many optimizer steps (from step 0).
        include: fnmatch patterns on attention module names (all clippable modules when ``None``).
        exclude: patterns of modules to leave out.

    Raises:
        ValueError: at construction, for a bad ``every_n_steps`` or patterns.
        MisconfigurationException: at setup, when the Trainer has no logger or no attention module
            is selected.
        RuntimeError: on the first logging step, when query/key weights are tensor-parallel DTensors.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[AttentionLogitMonitor(every_n_steps=50)], logger=False)
    """

    prefix = "attn_logit_max/"
    charts = {"max over heads, per layer": r"^attn_logit_max/.*/max$", "max over layers": r"^attn_logit_max/max$"}

    def __init__(self, every_n_steps: int = 50, include: Sequence[str] | None = None, exclude: Sequence[str] = ()):
        super().__init__(every_n_steps, include, exclude)

    @override
    def on_step_maxima(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, maxima: dict[str, Tensor]
    ) -> None:
        self.log_metrics(trainer, per_head_metrics(self.prefix.rstrip("/"), maxima), step=step)


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
