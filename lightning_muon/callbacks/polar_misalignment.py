"""``PolarMisalignmentMonitor``: how far the weight's singular frames are from the gradient's and
from Muon's update direction."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from ..diagnostics.spectral import delta_p, frames_sin_theta
from ..optim.newton_schulz import orthogonalize
from ..parallel.dtensor import full
from ..routing.matrix_view import matrix_view
from ..validation import check_positive_int
from .base import SpectralMonitor, aggregates
from .cache import CacheRequest, SpectralCache

METRICS = ("grad_sin_theta", "update_sin_theta", "grad_delta_p", "update_delta_p")


class PolarMisalignmentMonitor(SpectralMonitor):
    """Log the misalignment of each weight W with its gradient G and with Muon's update direction.

    Four metrics per layer, each under ``polar_misalignment/<metric>/<param name>`` with
    ``.../<metric>/{mean,min,max}``:

    * ``grad_sin_theta``, ``update_sin_theta``: ``||sin Theta||_F`` between the top-``k``
      singular frames of W and of G (or of the update direction: the momentum/Nesterov matrix Muon
      orthogonalises, whose singular vectors its step shares), the larger of left and right; 0
      aligned, ``sqrt(k)`` orthogonal. Meaningful when W has a spectral gap after ``s_k``.
    * ``grad_delta_p``, ``update_delta_p``: the basis-free ``delta_P`` of W with ``P = polar(G)``
      (or the update the optimizer applies), in [0, 1]; well defined for flat spectra too.

    Gradients are read in ``on_before_optimizer_step``: accumulated, unscaled, all-reduced, not yet
    clipped. With :class:`lightning_muon.Muon` the update direction and the update are the
    optimizer's own (:meth:`lightning_muon.Muon.preview`: its momentum, matrix views, variant and
    ``ns_dtype``, computed on a copy of its state); with another optimizer, the gradient and its
    polar factor. Cost per logging step: top-k frames by ``svd_lowrank`` of W, G and the update
    direction, one Newton–Schulz polar factor of G and the optimizer's own preview of the step.

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
    charts = {m: rf"^polar_misalignment/{m}/" for m in METRICS}

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
        names = [n for n, p in params.items() if p.grad is not None]
        preview = optimizer.preview([params[n] for n in names]) if hasattr(optimizer, "preview") else {}
        polar: dict[str, Tensor] = {}
        for n in names:
            p = params[n]
            cache.matrix("weight", n, p)
            cache.matrix("grad", n, p.grad)
            direction, update = preview.get(p, (p.grad, None))
            cache.matrix("update", n, direction)
            if update is not None:
                polar[n] = matrix_view(full(update.detach())).float()
        if not trainer.is_global_zero or not names:
            return {}
        metrics: dict[str, float] = {}
        weight_frames = cache.frames("weight", names, self.k)
        for kind in ("grad", "update"):
            frames = cache.frames(kind, names, self.k)
            for n in names:
                (Uw, Vw), (Ux, Vx) = weight_frames[n], frames[n]
                metrics[f"{self.prefix}{kind}_sin_theta/{n}"] = float(
                    torch.maximum(frames_sin_theta(Uw, Ux), frames_sin_theta(Vw, Vx))
                )
        for n in names:
            W, group = cache.matrix("weight", n), groups.get(id(params[n]), {})
            # polar(G) with a Muon group's Newton–Schulz settings; elsewhere orthogonalize's defaults
            muon = group.get("use_muon") and "ns_method" in group
            ns = {"method": group["ns_method"], "steps": group["ns_steps"]} if muon else {}
            P = orthogonalize(cache.matrix("grad", n), **ns, dtype=torch.float32)
            metrics[f"{self.prefix}grad_delta_p/{n}"] = float(delta_p(W, P))
            U = polar.get(n, P)  # the applied update, or (another optimizer) polar(G)
            metrics[f"{self.prefix}update_delta_p/{n}"] = float(delta_p(W, U))
        for m in METRICS:
            metrics.update(
                aggregates(
                    f"{self.prefix}{m}", {k: v for k, v in metrics.items() if k.startswith(f"{self.prefix}{m}/")}
                )
            )
        return metrics
