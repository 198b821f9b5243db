"""``PolarMisalignmentMonitor``: how far the weight's singular frames are from the gradient's and
from Muon's update direction, next to the value unrelated matrices would give."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from ..diagnostics.spectral import delta_p, delta_p_chance, frames_sin_theta, sin_theta_chance
from ..optim.newton_schulz import orthogonalize
from ..parallel.dtensor import full
from ..validation import check_positive_int
from .base import SpectralMonitor, aggregates
from .cache import CacheRequest, SpectralCache, view_keys

METRICS = ("grad_sin_theta", "update_sin_theta", "grad_delta_p", "update_delta_p")


class PolarMisalignmentMonitor(SpectralMonitor):
    """Log the misalignment of each weight W with its gradient G and with Muon's update direction.

    Four metrics per matrix of the optimizer's view of a parameter (each expert of a stack, each
    q/k/v block or head of a split projection, a conv kernel's ``(out, rest)``; see
    :meth:`MonitorCallback.matrix_views`), each under ``per_layer/polar_misalignment/<metric>/<key>``
    (``<key>``: the parameter name, or ``<name>/<label>`` as in :class:`StableRankMonitor`), with
    the headline ``polar_misalignment/<metric>/{mean,min,max}``:

    * ``grad_sin_theta``, ``update_sin_theta``: ``||sin Theta||_F`` between the top-``k``
      singular frames of W and of G (or of the update direction: the momentum/Nesterov matrix Muon
      orthogonalises, whose singular vectors its step shares), the larger of left and right; 0
      aligned, ``sqrt(k)`` orthogonal. Meaningful when W has a spectral gap after ``s_k``.
    * ``grad_delta_p``, ``update_delta_p``: the basis-free ``delta_P`` of W with ``P = polar(G)``
      (or the update the optimizer applies), in [0, 1]; well defined for flat spectra too.

    **Chance levels.** Unrelated matrices are far from 0 and from ``sqrt(k)`` or 1: independent
    random frames give ``||sin Theta||_F`` about ``sqrt(k (1 - k / d))``, and ``delta_P`` about
    ``(sqrt(m - 1) + sqrt(n - 1)) / sqrt(2 m n)`` (0.31 for 20 x 20). They are logged per matrix
    shape, ``polar_misalignment/chance/{sin_theta,delta_p}/<m>x<n>``
    (:func:`lightning_muon.sin_theta_chance`, :func:`lightning_muon.delta_p_chance`), and each
    metric's ``.../<metric>/vs_chance`` is the mean over matrices of value / chance: 1 is no more
    aligned than chance, 0 aligned.

    Gradients are read in ``on_before_optimizer_step``: accumulated, unscaled, all-reduced, not yet
    clipped. With :class:`lightning_muon.Muon` the update direction and the update are the
    optimizer's own (:meth:`lightning_muon.Muon.preview`: its momentum, matrix views, variant and
    ``ns_dtype``, computed on a copy of its state); with another optimizer, the gradient and its
    polar factor. A matrix whose weight or gradient is all zero (a zero-initialised layer, a layer
    without gradient this step) has no singular frames and logs nothing. Cost per logging step:
    top-k frames by ``svd_lowrank`` of W, G and the update direction, one Newton–Schulz polar
    factor of G and the optimizer's own preview of the step.

    Args:
        every_n_steps: log at every ``every_n_steps``-th optimizer step (from step 0).
        include: fnmatch patterns of the matrices to monitor (default: the Muon-routed ones).
        exclude: patterns removed from that selection.
        k: number of top singular directions compared by ``sin_theta`` (clipped to ``min(m, n)``).

    Raises:
        ValueError: at construction, ``every_n_steps < 1`` or ``k < 1``, or patterns not a list of
            strings.
        MisconfigurationException: at setup, a Trainer without a logger, or no layer selected.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[PolarMisalignmentMonitor(k=8, every_n_steps=100)], logger=False)
        >>> trainer.callbacks[0].k
        8
    """

    prefix = "polar_misalignment/"
    charts = {
        "vs chance (1: no more aligned than unrelated matrices)": r"^polar_misalignment/\w+/vs_chance$",
        **{  # the chance levels on each metric's chart
            f"{m}: mean, min, max, chance": rf"^polar_misalignment/({m}/(mean|min|max)$|chance/{m.split('_', 1)[1]}/)"
            for m in METRICS
        },
    }
    layer_metrics = METRICS

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        k: int = 8,
    ) -> None:
        super().__init__(every_n_steps, include, exclude)
        self.k = check_positive_int(k, "k", "PolarMisalignmentMonitor")

    @override
    def cache_requests(self) -> list[CacheRequest]:
        return [self.request(kind, "frames") for kind in ("weight", "grad", "update")]

    @override
    def compute(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        cache: SpectralCache,
    ) -> dict[str, float]:
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        views = self.matrix_views(trainer.lightning_module, optimizer, params)
        names = [n for n, p in params.items() if p.grad is not None]
        preview = optimizer.preview([params[n] for n in names]) if hasattr(optimizer, "preview") else {}
        polar: dict[str, Tensor] = {}
        owner: dict[str, str] = {}
        for n in names:
            p, view = params[n], views[n]
            cache.matrices("weight", n, p, view)
            cache.matrices("grad", n, p.grad, view)
            direction, update = preview.get(p, (p.grad, None))
            cache.matrices("update", n, direction, view)
            keys = view_keys(n, view, tuple(p.shape))
            owner.update(dict.fromkeys(keys, n))
            if update is not None:
                polar.update(zip(keys, view.to_matrices(full(update.detach())[None]).float()))
        if not trainer.is_global_zero or not names:
            return {}
        # a matrix whose weight, gradient or direction is all zero has no singular frames: left out
        keys = [k for k in owner if all(bool(cache.matrix(kind, k).any()) for kind in ("weight", "grad", "update"))]
        metrics: dict[str, float] = {}
        chance: dict[str, tuple[float, float]] = {}  # key -> (sin_theta, delta_p) of unrelated matrices
        for key in keys:
            m, n = cache.matrix("weight", key).shape
            chance[key] = (sin_theta_chance(m, n, min(self.k, m, n)), delta_p_chance(m, n))
            metrics[f"{self.prefix}chance/sin_theta/{m}x{n}"] = chance[key][0]
            metrics[f"{self.prefix}chance/delta_p/{m}x{n}"] = chance[key][1]
        weight_frames = cache.frames("weight", keys, self.k)
        for kind in ("grad", "update"):
            frames = cache.frames(kind, keys, self.k)
            for key in keys:
                (Uw, Vw), (Ux, Vx) = weight_frames[key], frames[key]
                metrics[f"{self.layer_prefix}{kind}_sin_theta/{key}"] = float(
                    torch.maximum(frames_sin_theta(Uw, Ux), frames_sin_theta(Vw, Vx))
                )
        for key in keys:
            W, group = cache.matrix("weight", key), groups.get(id(params[owner[key]]), {})
            # polar(G) with a Muon group's Newton–Schulz settings; elsewhere orthogonalize's defaults
            muon = group.get("use_muon") and "ns_method" in group
            ns = {"method": group["ns_method"], "steps": group["ns_steps"]} if muon else {}
            P = orthogonalize(cache.matrix("grad", key), **ns, dtype=torch.float32)
            metrics[f"{self.layer_prefix}grad_delta_p/{key}"] = float(delta_p(W, P))
            U = polar.get(key, P)  # the applied update, or (another optimizer) polar(G)
            metrics[f"{self.layer_prefix}update_delta_p/{key}"] = float(delta_p(W, U))
        for m in METRICS:
            per_key = {k: metrics[f"{self.layer_prefix}{m}/{k}"] for k in keys}
            metrics.update(aggregates(f"{self.prefix}{m}", per_key))
            level = 0 if m.endswith("sin_theta") else 1
            ratios = [v / chance[k][level] for k, v in per_key.items() if chance[k][level] > 0]
            if ratios:
                metrics[f"{self.prefix}{m}/vs_chance"] = sum(ratios) / len(ratios)
        return metrics
