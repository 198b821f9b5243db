"""``SpectralEntropyMonitor``: normalised spectral entropy per layer, spectra to TensorBoard."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..spectral import _entropy
from ._base import SpectralMonitor, aggregates, tensorboard
from ._cache import SpectralCache


class SpectralEntropyMonitor(SpectralMonitor):
    """Log the normalised spectral entropy ``H / ln min(m, n)`` of each monitored weight.

    1 is a flat spectrum (all directions equally used, what Muon's updates push towards), 0 rank
    one. Tags: ``spectral_entropy/<param name>`` and ``spectral_entropy/{mean,min,max}``. With a
    TensorBoardLogger and ``log_spectra=True`` also a histogram of singular values per layer
    (``singular_values/<param name>``) and a figure of the normalised spectra ``s_i / s_1``
    against ``i / k`` across layers (``spectral_entropy/spectra``; needs matplotlib).

    Cost per logging step: one Gram eigendecomposition per matrix (batched by shape), shared with
    the other monitors.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SpectralEntropyMonitor(every_n_steps=100)])
    """

    prefix = "spectral_entropy/"
    charts = {
        "per layer": r"^spectral_entropy/(?!mean$|min$|max$)",
        "mean, min, max": r"^spectral_entropy/(mean|min|max)$",
    }

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_spectra: bool = True,
    ) -> None:
        super().__init__(every_n_steps, include, exclude)
        self.log_spectra = log_spectra

    def compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        cache: SpectralCache,
    ) -> dict[str, float]:
        for name, p in params.items():
            cache.matrix("weight", name, p)
        if not trainer.is_global_zero:
            return {}
        spectra = cache.spectra("weight", params)
        values = {f"{self.prefix}{n}": float(_entropy(s, normalized=True)) for n, s in spectra.items()}
        tb = tensorboard(trainer)
        if tb is not None and self.log_spectra:
            self._tensorboard_extras(tb.experiment, spectra, trainer.global_step)
        return {**values, **aggregates(self.prefix.rstrip("/"), values)}

    def _tensorboard_extras(self, writer, spectra: dict[str, Tensor], step: int) -> None:
        for name, s in spectra.items():
            writer.add_histogram(f"singular_values/{name}", s.detach().cpu(), step)
        try:
            from matplotlib.figure import Figure
        except ImportError:  # pragma: no cover - matplotlib is optional
            warnings.warn("SpectralEntropyMonitor: matplotlib is not installed; no spectra figure", stacklevel=2)
            self.log_spectra = False
            return
        fig = Figure(figsize=(6, 4), dpi=100)  # no pyplot: no GUI backend is touched
        ax = fig.add_subplot()
        for name, s in spectra.items():
            s = s.detach().cpu()
            if s[0] > 0:
                ax.plot(torch.arange(1, len(s) + 1) / len(s), s / s[0], label=name, linewidth=1)
        ax.set(yscale="log", xlabel="i / min(m, n)", ylabel="s_i / s_1", title=f"normalised spectra, step {step}")
        ax.grid(True, alpha=0.3)
        if len(spectra) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        writer.add_figure(f"{self.prefix}spectra", fig, step, close=False)
