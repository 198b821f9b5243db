"""``StableRankMonitor``: ``||W||_F^2 / sigma_1^2`` per layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ._base import SpectralMonitor, aggregates
from ._cache import SpectralCache
from .spectral_entropy import SpectralEntropyMonitor


class StableRankMonitor(SpectralMonitor):
    """Log the stable rank ``||W||_F^2 / sigma_1^2`` (in ``[1, min(m, n)]``) of each monitored weight.

    How many directions carry the weight's energy; Muon keeps it higher than AdamW. Tags:
    ``stable_rank/<param name>`` and ``stable_rank/{mean,min,max}``. sigma_1 comes from the
    spectrum when another monitor computed it this step, else from power iteration warm-started
    from the previous logging step's vector (``num_iters`` steps; 4x that on a cold start). The
    vectors are saved in checkpoints.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[StableRankMonitor(every_n_steps=100)])
    """

    prefix = "stable_rank/"
    charts = {"per layer": r"^stable_rank/(?!mean$|min$|max$)", "mean, min, max": r"^stable_rank/(mean|min|max)$"}

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        num_iters: int = 10,
    ) -> None:
        super().__init__(every_n_steps, include, exclude)
        if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f"StableRankMonitor: num_iters must be an integer >= 1, got {num_iters!r}")
        self.num_iters = num_iters
        self.vectors: dict[str, Tensor] = {}

    def compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        cache: SpectralCache,
    ) -> dict[str, float]:
        mats = {n: cache.matrix("weight", n, p) for n, p in params.items()}
        if not trainer.is_global_zero:
            return {}
        # Spectra a SpectralEntropyMonitor computes this step anyway: take sigma_1 from them.
        shared = {
            n
            for c in trainer.callbacks
            if isinstance(c, SpectralEntropyMonitor) and trainer.global_step % c.every_n_steps == 0
            for n in c.layers
        }
        cache.spectra("weight", [n for n in mats if n in shared])
        sigma = cache.sigma_max("weight", mats, self.vectors, self.num_iters)
        values = {f"{self.prefix}{n}": float(M.square().sum() / sigma[n].square()) for n, M in mats.items()}
        return {**values, **aggregates(self.prefix.rstrip("/"), values)}

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": {n: v.clone() for n, v in self.vectors.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.vectors = {n: v.clone() for n, v in state_dict.get("vectors", {}).items()}
