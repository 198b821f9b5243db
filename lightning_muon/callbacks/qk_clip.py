"""``QKClip``: MuonClip's per-head rescaling of query and key weights after each optimizer step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from ..diagnostics.attention import find_qk_attention
from ..optim.qk_clip import check_tau, qk_clip_
from .base import AttentionCallback


class QKClip(AttentionCallback):
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
    ``qk_clip/max_logit`` (before clipping) every ``every_n_steps`` steps (default: the Trainer's
    ``log_every_n_steps``), also into ``trainer.callback_metrics``. No logger is needed.

    Sharded weights: FSDP2 (``Shard(0)`` DTensors) is supported, each rank scaling its own rows;
    tensor-parallel attention (DTensor q/k weights inside the forward) is refused with a RuntimeError
    at the first step, before any weight changes.

    Args:
        tau: the logit threshold (Kimi K2 used 100).
        include: fnmatch patterns on attention module names (all clippable modules when ``None``).
        exclude: patterns of modules to leave out.
        every_n_steps: log every this many optimizer steps (None: ``trainer.log_every_n_steps``).

    Raises:
        ValueError: at construction, for ``tau`` not a finite number > 0 or bad patterns.
        MisconfigurationException: at setup, when no attention module is selected.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[QKClip(tau=100.0)], logger=False)
    """

    prefix = "qk_clip/"
    charts = {"clipped heads": r"^qk_clip/clipped_heads", "max logit before clipping": r"^qk_clip/max_logit$"}
    state_attributes = ("clipped_total",)
    requires_logger = False

    def __init__(
        self,
        tau: float = 100.0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        every_n_steps: int | None = None,
    ):
        try:
            check_tau(tau)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        super().__init__(1 if every_n_steps is None else every_n_steps, include, exclude)
        self._log_every = every_n_steps
        self.tau = float(tau)
        self.clipped_total = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(tau=self.tau, include=self.include, exclude=self.exclude)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._log_every is None:
            self.every_n_steps = trainer.log_every_n_steps
        super().setup(trainer, pl_module, stage)

    @override
    def select(self, pl_module: pl.LightningModule) -> list[str]:
        """The selected attention modules whose weights can be clipped (the others: one warning)."""
        selected = super().select(pl_module)
        found = find_qk_attention(pl_module)
        refused = {n: why for n in selected if (why := getattr(found[n][1], "qk_clip_refusal", None))}
        if refused:
            name, why = next(iter(refused.items()))
            text = f"QKClip: {len(refused)} attention module(s) cannot be clipped, e.g. {name!r}: {why}"
            if len(refused) == len(selected):
                raise MisconfigurationException(
                    f"{text}. AttentionLogitMonitor() still logs their logits; remove QKClip for this model."
                )
            rank_zero_warn(f"{text}. They are left out: {sorted(refused)}; exclude them to silence this warning.")
        return [n for n in selected if n not in refused]

    @override
    def observes(self, step: int) -> bool:
        return True  # every step is clipped

    @override
    def on_step_maxima(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, maxima: dict[str, Tensor]
    ) -> None:
        clipped, top = 0, -math.inf
        for name, s in maxima.items():
            bad = torch.isnan(s) | (s == math.inf)
            if bad.any():
                rank_zero_warn(
                    f"QKClip: non-finite max logit in {name} heads {bad.nonzero().flatten().tolist()} at step "
                    f"{step}; those heads are not clipped."
                )
            observed = torch.isfinite(s)
            if observed.any():
                top = max(top, float(s[observed].max()))
            safe = torch.where(observed, s, torch.zeros_like(s))  # 0 <= tau: not clipped
            clipped += int(qk_clip_(self.observer.modules[name][1].qk_clip_rows(), safe, self.tau).sum())
        self.clipped_total += clipped
        if self.is_logging_step(step):
            metrics = {f"{self.prefix}clipped_heads": clipped, f"{self.prefix}clipped_heads_total": self.clipped_total}
            if top > -math.inf:
                metrics[f"{self.prefix}max_logit"] = top
            self.log_metrics(trainer, metrics, step=step)
