"""Critical batch size: the gradient noise scale and Muon's polar-map sensitivity.

Plain torch, no Lightning. :func:`noise_scale` is McCandlish et al.'s B_simple from squared
gradient norms at two batch sizes; :func:`muon_critical_batch_size` the paper's Muon-specific
B_crit from the mean gradient's spectrum and the per-entry noise. Definitions:
``docs/muon-theory.md`` section 3.

Example:
    >>> import torch
    >>> noise_scale(5.0, 2.0, 1, 4).b_simple  # |G|^2 = 1, tr Sigma = 4
    tensor(4.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .spectral import singular_values

__all__ = ["CriticalBatch", "NoiseScale", "muon_critical_batch_size", "noise_scale", "polar_sensitivity"]


class NoiseScale(NamedTuple):
    """Two-batch estimates: ``grad_sq`` ~ |G|^2, ``trace_sigma`` ~ tr(Sigma), ``b_simple`` = their ratio."""

    grad_sq: Tensor
    trace_sigma: Tensor
    b_simple: Tensor


def noise_scale(small_sq: Tensor | float, big_sq: Tensor | float, b_small: float, b_big: float) -> NoiseScale:
    """McCandlish et al.'s simple noise scale from squared gradient norms at two batch sizes.

    ``small_sq`` ~ E||G_b||^2 and ``big_sq`` ~ E||G_B||^2 for mean gradients over ``b_small < b_big``
    examples. Each of ``|G|^2 = (B |G_B|^2 - b |G_b|^2) / (B - b)`` and
    ``tr Sigma = (|G_b|^2 - |G_B|^2) / (1/b - 1/B)`` is unbiased, their ratio is not: average
    (e.g. EMA) the squared norms over steps first, then call this. It is the SGD-geometry estimate
    of the critical batch size (in the units of ``b``).

    Example:
        >>> noise_scale(5.0, 2.0, 1, 4).b_simple  # |G|^2 = 1, tr Sigma = 4
        tensor(4.)
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"noise_scale: need 0 < b_small < b_big, got b_small={b_small!r}, b_big={b_big!r}")
    small, big = torch.as_tensor(small_sq, dtype=torch.float32), torch.as_tensor(big_sq, dtype=torch.float32)
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    return NoiseScale(grad_sq, trace, trace / grad_sq)


def _sensitivity(s: Tensor, keep: Tensor) -> Tensor:
    """``sum_{i != j, both kept} 1 / (s_i + s_j)^2``."""
    pair = 1.0 / (s.unsqueeze(-1) + s.unsqueeze(-2)).clamp_min(1e-30).square()
    mask = keep.unsqueeze(-1) & keep.unsqueeze(-2)
    mask = mask & ~torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    return torch.where(mask, pair, torch.zeros_like(pair)).sum((-2, -1))


def _kept(s: Tensor, threshold: Tensor | float | None) -> Tensor:
    if threshold is None:  # numerical rank (singular_values zeroes what is below its accuracy)
        threshold = 0.0
    threshold = torch.as_tensor(threshold, dtype=s.dtype, device=s.device)
    if threshold.ndim:
        threshold = threshold.unsqueeze(-1)
    return s > threshold


def polar_sensitivity(mu: Tensor, threshold: float | Tensor | None = None) -> Tensor:
    """The paper's ``S(mu) = sum_{i != j} 1 / (s_i + s_j)^2`` over singular values ``s_i > threshold``.

    ``threshold=None`` keeps the numerical rank. A flat spectrum of ``r`` values ``s0`` gives
    ``r (r - 1) / (4 s0^2)``; small singular values dominate, so cut them at the noise edge
    (see :func:`muon_critical_batch_size`).
    """
    s = singular_values(mu)
    return _sensitivity(s, _kept(s, threshold))


class CriticalBatch(NamedTuple):
    """``b_crit`` with its inputs: kept ``rank`` r, per-entry noise ``sigma2`` and ``sensitivity`` S."""

    b_crit: Tensor
    rank: Tensor
    sigma2: Tensor
    sensitivity: Tensor


def muon_critical_batch_size(
    mu: Tensor,
    sigma2: Tensor | float,
    *,
    momentum: float = 0.0,
    batch_size: float | None = None,
    singular_values_: Tensor | None = None,
) -> CriticalBatch:
    """Muon's critical batch size ``2 sigma^2 S(mu) / r * (1 - beta) / (1 + beta)`` (the paper's Theorem 4).

    Args:
        mu: the mean gradient (e.g. the large-batch gradient), ``(..., m, n)``.
        sigma2: per-entry, per-example gradient noise variance, e.g. ``tr(Sigma) / (m n)``.
        momentum: Muon's ``beta``; the AR(1) stationary variance factor ``(1-beta)/(1+beta)``.
        batch_size: examples behind ``mu``; if given, singular values below the noise edge
            ``sqrt(sigma2 / batch_size) (sqrt m + sqrt n)`` are left out, else the numerical rank.
        singular_values_: ``mu``'s singular values if already computed (skips the decomposition).

    ``r = 0`` gives NaN. Example (a flat spectrum ``s0 = 2``, ``r = 4``: ``S = r (r - 1) / (4 s0^2) = 0.75``,
    ``b_crit = 2 * 1 * 0.75 / 4 = 0.375`` without momentum, times ``0.05 / 1.95`` with ``beta = 0.95``):
        >>> muon_critical_batch_size(2 * torch.eye(4), sigma2=1.0)
        CriticalBatch(b_crit=tensor(0.3750), rank=tensor(4.), sigma2=tensor(1.), sensitivity=tensor(0.7500))
        >>> muon_critical_batch_size(2 * torch.eye(4), sigma2=1.0, momentum=0.95).b_crit
        tensor(0.0096)
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"muon_critical_batch_size: momentum must be in [0, 1), got {momentum!r}")
    s = singular_values(mu) if singular_values_ is None else singular_values_
    sigma2 = torch.as_tensor(sigma2, dtype=s.dtype, device=s.device)
    m, n = mu.shape[-2:]
    edge = None
    if batch_size is not None:
        edge = (sigma2.clamp_min(0) / batch_size).sqrt() * (m**0.5 + n**0.5)
    keep = _kept(s, edge)
    S = _sensitivity(s, keep)
    r = keep.sum(-1).to(s.dtype)
    b = 2 * sigma2 * S / r * ((1 - momentum) / (1 + momentum))
    return CriticalBatch(b, r, sigma2.expand_as(b), S)
