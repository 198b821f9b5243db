"""``StableRankMonitor``: ``||W||_F^2 / sigma_1^2`` per layer."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from ..validation import check_positive_int
from .base import SpectralMonitor, aggregates
from .cache import CacheRequest, SpectralCache


class StableRankMonitor(SpectralMonitor):
    """Log the stable rank ``||W||_F^2 / sigma_1^2`` (in ``[1, min(m, n)]``) of each monitored weight.

    How many directions carry the weight's energy; Muon keeps it higher than AdamW. Each matrix of
    the optimizer's view of a parameter is one value (:meth:`MonitorCallback.matrix_views`): tags
    ``per_layer/stable_rank/<param name>`` for a single matrix, ``per_layer/stable_rank/<param
    name>/<label>`` for each expert of a stack (``experts.w1/3``) or block of a split q/k/v
    (``c_attn.weight/q``, ``c_attn.weight/q.h2`` per head), and the headline
    ``stable_rank/{mean,min,max}`` over them. An all-zero
    matrix (e.g. a zero-initialised projection) has no stable rank and logs nothing. sigma_1 comes from the
    spectrum when another monitor (e.g. :class:`SpectralEntropyMonitor`) asks the shared cache for
    it at this step, else from power iteration warm-started from the previous logging step's
    vector (``num_iters`` steps; 4x that on a cold start). The vectors are saved in checkpoints
    (state key ``vectors``).

    Args:
        every_n_steps: log at every ``every_n_steps``-th optimizer step (from step 0).
        include: fnmatch patterns of the matrices to monitor (default: the Muon-routed ones).
        exclude: patterns removed from that selection.
        num_iters: warm-started power-iteration steps per logging step.

    Raises:
        ValueError: at construction, ``every_n_steps < 1`` or ``num_iters < 1``, or patterns not a
            list of strings.
        MisconfigurationException: at setup, a Trainer without a logger, or no layer selected.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[StableRankMonitor(every_n_steps=100)], logger=False)
        >>> trainer.callbacks[0].num_iters
        10
    """

    prefix = "stable_rank/"
    charts = {"mean, min, max over layers": r"^stable_rank/(mean|min|max)$"}
    layer_metrics = ("",)
    state_attributes = ("vectors",)

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        num_iters: int = 10,
    ) -> None:
        super().__init__(every_n_steps, include, exclude)
        self.num_iters = check_positive_int(num_iters, "num_iters", "StableRankMonitor")
        self.vectors: dict[str, Tensor] = {}

    @override
    def cache_requests(self) -> list[CacheRequest]:
        return [self.request("weight", "sigma_max")]

    @override
    def compute(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        cache: SpectralCache,
    ) -> dict[str, float]:
        views = self.matrix_views(trainer.lightning_module, optimizer, params)
        mats: dict[str, Tensor] = {}
        for name, p in params.items():
            mats.update(cache.matrices("weight", name, p, views[name]))
        if not trainer.is_global_zero:
            return {}
        mats = {key: M for key, M in mats.items() if bool(M.any())}  # all-zero: undefined, not logged
        sigma = cache.sigma_max("weight", mats, self.vectors, self.num_iters)
        values = {f"{self.layer_prefix}{key}": float(M.square().sum() / sigma[key].square()) for key, M in mats.items()}
        return {**values, **aggregates(self.prefix.rstrip("/"), values)}
