"""``SpectralEntropyMonitor``: normalised spectral entropy per layer, spectra to TensorBoard."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ..diagnostics.spectral import spectrum_entropy
from ..validation import check_bool
from .base import SpectralMonitor, aggregates, layer_depth, layer_role, tensorboard
from .cache import CacheRequest, SpectralCache


class SpectralEntropyMonitor(SpectralMonitor):
    """Log the normalised spectral entropy ``H / ln min(m, n)`` of each monitored weight.

    1 is a flat spectrum (all directions equally used, what Muon's updates push towards), 0 rank
    one. Each matrix of the optimizer's view of a parameter (each expert, each q/k/v block or head,
    a conv kernel's ``(out, rest)``) is one value: ``per_layer/spectral_entropy/<param name>`` or
    ``per_layer/spectral_entropy/<param name>/<label>`` (labels as in :class:`StableRankMonitor`),
    and the headline ``spectral_entropy/{mean,min,max}``; an all-zero matrix logs nothing. With a
    TensorBoardLogger and ``log_spectra=True`` also a histogram of singular values per matrix
    (``singular_values/<key>``) and a figure of the normalised spectra ``s_i / s_1`` against
    ``i / k`` across layers (``spectral_entropy/spectra``; needs matplotlib), coloured by depth
    (the block index in the name, with a colour bar) and dashed by role (legend).

    Cost per logging step: one Gram eigendecomposition per matrix (batched by shape), shared with
    the other monitors.

    Args:
        every_n_steps: log at every ``every_n_steps``-th optimizer step (from step 0).
        include: fnmatch patterns of the matrices to monitor (default: the Muon-routed ones).
        exclude: patterns removed from that selection.
        log_spectra: also log the histograms and the spectra figure (TensorBoard only).

    Raises:
        ValueError: at construction, ``every_n_steps < 1``, patterns not a list of strings, or
            ``log_spectra`` not a bool.
        MisconfigurationException: at setup, a Trainer without a logger, or no layer selected.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SpectralEntropyMonitor(every_n_steps=100)], logger=False)
        >>> trainer.callbacks[0].every_n_steps
        100
    """

    prefix = "spectral_entropy/"
    charts = {"mean, min, max over layers": r"^spectral_entropy/(mean|min|max)$"}
    layer_metrics = ("",)

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_spectra: bool = True,
    ) -> None:
        super().__init__(every_n_steps, include, exclude)
        self.log_spectra = check_bool(log_spectra, "log_spectra", "SpectralEntropyMonitor")
        self._figure = log_spectra and importlib.util.find_spec("matplotlib") is not None
        if log_spectra and not self._figure:
            rank_zero_warn("SpectralEntropyMonitor: matplotlib is not installed; no spectra figure")

    @override
    def cache_requests(self) -> list[CacheRequest]:
        return [self.request("weight", "spectrum")]

    @override
    def compute(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        cache: SpectralCache,
    ) -> dict[str, float]:
        views = self.matrix_views(trainer.lightning_module, optimizer, params)
        keys: list[str] = []
        for name, p in params.items():
            keys.extend(cache.matrices("weight", name, p, views[name]))
        if not trainer.is_global_zero:
            return {}
        spectra = cache.spectra("weight", keys)
        values = {f"{self.layer_prefix}{k}": float(spectrum_entropy(s)) for k, s in spectra.items() if s[0] > 0}
        tb = tensorboard(trainer)
        if tb is not None and self.log_spectra:
            self._tensorboard_extras(tb.experiment, spectra, trainer.global_step)
        return {**values, **aggregates(self.prefix.rstrip("/"), values)}

    def _tensorboard_extras(self, writer, spectra: dict[str, Tensor], step: int) -> None:
        for name, s in spectra.items():
            writer.add_histogram(f"singular_values/{name}", s.detach().cpu(), step)
        if not self._figure:  # pragma: no cover - matplotlib is optional
            return
        writer.add_figure(f"{self.prefix}spectra", spectra_figure(spectra, step), step, close=False)


#: line styles of the layer roles in the spectra figure (a legend names them)
_DASHES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2)))


def spectra_figure(spectra: dict[str, Tensor], step: int):
    """A matplotlib figure of the normalised spectra ``s_i / s_1`` against ``i / k``, one line per
    matrix: coloured by depth (:func:`~lightning_muon.callbacks.base.layer_depth`, the block index
    in its name, else its order), with a colour bar, and dashed by role (the name with its block
    index as ``*``), with a legend when there are at most 8 roles. All-zero matrices are left out."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    kept = {k: s.detach().float().cpu() for k, s in spectra.items() if s[0] > 0}
    depth = {k: layer_depth(k, i) for i, k in enumerate(kept)}
    roles = list(dict.fromkeys(layer_role(k) for k in kept))
    low, high = min(depth.values(), default=0), max(depth.values(), default=0)
    discrete = high - low < 12  # one colour band per block, ticks on the blocks
    cmap = colormaps["viridis"].resampled(high - low + 1) if discrete else colormaps["viridis"]
    norm = Normalize(low - 0.5, high + 0.5) if discrete else Normalize(low, high)
    fig = Figure(figsize=(7.5, 4.5), dpi=100)  # no pyplot: no GUI backend is touched
    ax = fig.add_subplot()
    for key, s in kept.items():
        style = _DASHES[roles.index(layer_role(key)) % len(_DASHES)]
        x = torch.arange(1, len(s) + 1) / len(s)
        ax.plot(x, s / s[0], color=cmap(norm(depth[key])), linestyle=style, linewidth=1.2)
    ax.set(yscale="log", xlabel="i / min(m, n)", ylabel="s_i / s_1", title=f"normalised spectra, step {step}")
    ax.grid(True, alpha=0.3)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    bar.set_label("depth (block index)")
    if discrete:
        bar.set_ticks(range(low, high + 1))
    if 1 < len(roles) <= len(_DASHES):
        handles = [Line2D([], [], color="0.3", linestyle=_DASHES[i]) for i in range(len(roles))]
        ax.legend(handles, roles, fontsize=6, title="role", title_fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig
