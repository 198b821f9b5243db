"""``QKClip``: MuonClip's per-head rescaling of query and key weights after each optimizer step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ..qk_clip import QKObserver, _check_tau, qk_clip_
from ._base import check_patterns
from ._qk import all_reduce_max, attach_observer, log_metrics


class QKClip(Callback):
    """QK-clip (Kimi K2's MuonClip): after an optimizer step, scale the query and key rows of every
    head whose largest pre-softmax logit ``S_h`` exceeded ``tau`` by ``sqrt(tau / S_h)`` each.

    ``S_h`` is the max of ``q.k / sqrt(d)`` over the step's training forward passes (every
    micro-batch under gradient accumulation; MAX all-reduced over ranks under DDP/FSDP2 so that
    every rank applies the same factors), observed by forward hooks that recompute q and k (one extra
    q/k projection and ``q k^T`` per attention layer per micro-batch, under ``no_grad``). The clip runs
    in ``on_train_batch_end`` only when the optimizer actually stepped. As in MuonClip, ``S_h`` is
    measured with the weights before the step and applied to the weights after it: the logits of the
    step's batches are then at most ``tau`` up to the step's own change. A head that never exceeds
    ``tau`` is left bit for bit as it is; values, outputs and other heads are never touched.

    Logs ``qk_clip/clipped_heads`` (heads clipped at that step), ``qk_clip/clipped_heads_total`` and
    ``qk_clip/max_logit`` (before clipping) every ``trainer.log_every_n_steps`` steps.

    Sharded weights: FSDP2 (``Shard(0)`` DTensors) is supported, each rank scaling its own rows;
    tensor-parallel attention (DTensor q/k weights inside the forward) is refused with a RuntimeError
    at the first step, before any weight changes.

    Args:
        tau: the logit threshold (Kimi K2 used 100).
        include: fnmatch patterns on attention module names (all clippable modules when ``None``).
        exclude: patterns of modules to leave out.

    Raises:
        ValueError: at construction, for ``tau`` not a finite number > 0 or bad patterns.
        MisconfigurationException: at fit start, when no attention module is selected.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[QKClip(tau=100.0)], logger=False)
    """

    prefix = "qk_clip"

    def __init__(self, tau: float = 100.0, include: Sequence[str] | None = None, exclude: Sequence[str] = ()):
        super().__init__()
        where = type(self).__name__
        try:
            _check_tau(tau)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        self.tau = float(tau)
        self.include = check_patterns(include, "include", where)
        self.exclude = check_patterns(exclude, "exclude", where) or ()
        self.observer: QKObserver | None = None
        self.clipped_total = 0
        self._step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(tau=self.tau, include=self.include, exclude=self.exclude)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.observer = attach_observer(pl_module, self.include, self.exclude, type(self).__name__)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.observer is not None:
            self.observer.remove()
            self.observer = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._step = trainer.global_step
        if self.observer is not None:
            self.observer.enabled = True

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
        maxima = obs.reduced(all_reduce_max(trainer))  # every rank takes part, every rank gets the same
        obs.reset()
        clipped, top = 0, -math.inf
        for name, s in maxima.items():
            bad = torch.isnan(s) | (s == math.inf)
            if bad.any():
                rank_zero_warn(
                    f"QKClip: non-finite max logit in {name} heads {bad.nonzero().flatten().tolist()} at step "
                    f"{self._step}; those heads are not clipped."
                )
            observed = torch.isfinite(s)
            if observed.any():
                top = max(top, float(s[observed].max()))
            safe = torch.where(observed, s, torch.zeros_like(s))  # 0 <= tau: not clipped
            clipped += int(qk_clip_(obs.modules[name][1].qk_clip_rows(), safe, self.tau).sum())
        self.clipped_total += clipped
        if self._step % trainer.log_every_n_steps == 0:
            metrics = {
                f"{self.prefix}/clipped_heads": clipped,
                f"{self.prefix}/clipped_heads_total": self.clipped_total,
            }
            if top > -math.inf:
                metrics[f"{self.prefix}/max_logit"] = top
            log_metrics(trainer, metrics, step=self._step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"clipped_total": self.clipped_total}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clipped_total = int(state_dict.get("clipped_total", 0))
