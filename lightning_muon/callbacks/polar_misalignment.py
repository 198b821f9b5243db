"""``PolarMisalignmentMonitor``: how far the weight's singular frames are from the gradient's and
from Muon's update direction."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..distributed import full
from ..functional import muon_direction
from ..newton_schulz import orthogonalize
from ..spectral import _delta_p, _frame_sin
from ._base import SpectralMonitor, aggregates
from ._cache import SpectralCache

METRICS = ("grad_sin_theta", "update_sin_theta", "grad_delta_p", "update_delta_p")


def muon_update(grad: Tensor, group: dict, state: dict) -> Tensor:
    """The matrix Muon orthogonalises this step (:func:`lightning_muon.muon_direction` with the
    group's ``momentum`` and ``nesterov``), computed on a copy of the momentum buffer so that the
    optimizer state is untouched. For a param outside a Muon group (another optimizer), the gradient."""
    if not group.get("use_muon") or "momentum" not in group:
        return grad
    buf = state.get("momentum_buffer")
    buf = torch.zeros_like(grad) if buf is None else full(buf).reshape(grad.shape).to(grad.dtype, copy=True)
    return muon_direction([grad], [buf], group["momentum"], group.get("nesterov", False))[0]


class PolarMisalignmentMonitor(SpectralMonitor):
    """Log the misalignment of each weight W with its gradient G and with Muon's update direction.

    Four metrics per layer, each under ``polar_misalignment/<metric>/<param name>`` with
    ``.../<metric>/{mean,min,max}``:

    * ``grad_sin_theta``, ``update_sin_theta``: ``||sin Theta||_F`` between the top-``k``
      singular frames of W and of G (or of the update: Muon's momentum/Nesterov matrix, whose
      singular vectors its orthogonalised step shares), the larger of left and right; 0 aligned,
      ``sqrt(k)`` orthogonal. Meaningful when W has a spectral gap after ``s_k``.
    * ``grad_delta_p``, ``update_delta_p``: the basis-free ``delta_P`` of W with ``P = polar(G)``
      (or the orthogonalised update), in [0, 1]; well defined for flat spectra too.

    Gradients are read in ``on_before_optimizer_step``: accumulated, unscaled, all-reduced, not yet
    clipped. The update uses the optimizer's ``momentum_buffer`` and group settings when the
    optimizer is :class:`lightning_muon.Muon`, else the gradient. Cost per logging step: top-k
    frames by ``svd_lowrank`` of W, G and the update, and two Newton–Schulz polar factors (fp32).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[PolarMisalignmentMonitor(k=8, every_n_steps=100)])
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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"PolarMisalignmentMonitor: k must be an integer >= 1, got {k!r}")
        self.k = k

    def compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        cache: SpectralCache,
    ) -> dict[str, float]:
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        names = [n for n, p in params.items() if p.grad is not None]
        for n in names:
            p = params[n]
            cache.matrix("weight", n, p)
            G = cache.matrix("grad", n, p.grad)
            group = groups.get(id(p), {})
            cache.matrix("update", n, muon_update(G, group, optimizer.state.get(p, {})))
        if not trainer.is_global_zero or not names:
            return {}
        metrics: dict[str, float] = {}
        weight_frames = cache.frames("weight", names, self.k)
        for kind in ("grad", "update"):
            frames = cache.frames(kind, names, self.k)
            for n in names:
                (Uw, Vw), (Ux, Vx) = weight_frames[n], frames[n]
                metrics[f"{self.prefix}{kind}_sin_theta/{n}"] = float(
                    torch.maximum(_frame_sin(Uw, Ux), _frame_sin(Vw, Vx))
                )
        for n in names:
            W, group = cache.matrix("weight", n), groups.get(id(params[n]), {})
            # a Muon group's Newton–Schulz settings; elsewhere orthogonalize's defaults
            muon = group.get("use_muon") and "ns_method" in group
            ns = {"method": group["ns_method"], "steps": group["ns_steps"]} if muon else {}
            for kind in ("grad", "update"):
                P = orthogonalize(cache.matrix(kind, n), **ns, dtype=torch.float32)
                metrics[f"{self.prefix}{kind}_delta_p/{n}"] = float(_delta_p(W, P))
        for m in METRICS:
            metrics.update(
                aggregates(
                    f"{self.prefix}{m}", {k: v for k, v in metrics.items() if k.startswith(f"{self.prefix}{m}/")}
                )
            )
        return metrics
