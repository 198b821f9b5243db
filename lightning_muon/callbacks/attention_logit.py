"""``AttentionLogitMonitor``: the largest pre-softmax attention logit of each layer and head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from ..qk_clip import QKObserver
from ._base import check_patterns, check_positive_int
from ._qk import all_reduce_max, attach_observer, log_metrics, per_head_metrics


class AttentionLogitMonitor(Callback):
    """Log the max attention logit ``max q.k / sqrt(d)`` of every head (MuonClip's ``S_h``).

    Under Muon these logits can grow without bound (Kimi K2); this shows whether they do, and
    whether :class:`~lightning_muon.callbacks.QKClip` is needed. On every ``every_n_steps``-th
    optimizer step, forward hooks take the max over the step's training forward passes (all
    micro-batches under gradient accumulation, all ranks under DDP/FSDP2: MAX all-reduce) and rank 0
    logs ``attn_logit_max/<layer>/head_<h>``, ``attn_logit_max/<layer>/max`` and
    ``attn_logit_max/max`` at that step. Other steps cost nothing; a logging step recomputes q and k
    (one extra q/k projection and ``q k^T`` per attention layer, under ``no_grad``).

    Works out of the box on ``torch.nn.MultiheadAttention`` (torchvision's ViT), on the example
    GPT, and on any module implementing the protocol of :mod:`lightning_muon.qk_clip`.

    Args:
        every_n_steps: log every this many optimizer steps (from step 0).
        include: fnmatch patterns on attention module names (all clippable modules when ``None``).
        exclude: patterns of modules to leave out.

    Raises:
        ValueError: at construction, for a bad ``every_n_steps`` or patterns.
        MisconfigurationException: at fit start, when the Trainer has no logger or no attention module
            is selected.
        RuntimeError: on the first logging step, when query/key weights are tensor-parallel DTensors.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[AttentionLogitMonitor(every_n_steps=50)], logger=False)
    """

    prefix = "attn_logit_max"

    def __init__(self, every_n_steps: int = 50, include: Sequence[str] | None = None, exclude: Sequence[str] = ()):
        super().__init__()
        where = type(self).__name__
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps", where)
        self.include = check_patterns(include, "include", where)
        self.exclude = check_patterns(exclude, "exclude", where) or ()
        self.observer: QKObserver | None = None
        self._step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, include=self.include, exclude=self.exclude)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        where = type(self).__name__
        if not trainer.loggers:
            raise MisconfigurationException(f"{where}: the Trainer has no logger; pass logger=TensorBoardLogger(...).")
        self.observer = attach_observer(pl_module, self.include, self.exclude, where)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.observer is not None:
            self.observer.remove()
            self.observer = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._step = trainer.global_step
        if self.observer is not None:
            self.observer.enabled = self._step % self.every_n_steps == 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        obs = self.observer
        if obs is None:
            return
        obs.enabled = False
        if trainer.global_step == self._step:  # accumulating: the optimizer has not stepped yet
            return
        if self._step % self.every_n_steps == 0:
            maxima = obs.reduced(all_reduce_max(trainer))  # every rank takes part
            log_metrics(trainer, per_head_metrics(self.prefix, maxima), step=self._step)
        obs.reset()
