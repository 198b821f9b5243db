"""Spectral diagnostics of weight matrices and the critical-batch-size estimators.

Plain torch, no Lightning. Every function takes a matrix or a batch of matrices ``(..., m, n)``
(leading dims are batch dims) and computes in float32 (float64 stays float64), also for bf16
weights. A conv kernel ``(out, in, kh, kw)`` is analysed as the ``(out, in*kh*kw)`` matrix Muon
updates: pass :func:`lightning_muon.matrix_view` of it. Definitions: ``docs/muon-theory.md``
section 2 and 3.

Methods: the whole spectrum comes from ``eigvalsh`` of the smaller Gram matrix (absolute accuracy
about ``sqrt(eps) * s_1``, ample for entropies); ``sigma_1`` alone from power iteration (warm
startable); top-k singular frames from ``svd_lowrank`` (exact SVD when k is not small).

Example:
    >>> W = torch.randn(64, 128)
    >>> float(stable_rank(W)) > 1, 0 < float(spectral_entropy(W)) <= 1
    (True, True)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .functional import matrix_view
from .newton_schulz import orthogonalize

__all__ = [
    "singular_values",
    "top_singular_value",
    "top_frames",
    "stable_rank",
    "spectral_entropy",
    "effective_rank",
    "sin_theta",
    "polar_misalignment",
    "NoiseScale",
    "noise_scale",
    "polar_sensitivity",
    "CriticalBatch",
    "muon_critical_batch_size",
]

_SIDES = ("max", "left", "right")
_ENTROPY_FLOOR = 1e-12  # singular values at or below this are left out of the entropy


#: The former name of :func:`lightning_muon.functional.matrix_view`, kept so that old imports work.
as_matrix = matrix_view


def _fp32(W: Tensor, where: str) -> Tensor:
    if W.ndim < 2:
        raise ValueError(f"{where}: expected a (..., m, n) tensor, got shape {tuple(W.shape)}")
    if W.is_complex():
        raise ValueError(f"{where}: complex tensors are not supported")
    return W if W.dtype == torch.float64 else W.float()


def singular_values(W: Tensor) -> Tensor:
    """All ``min(m, n)`` singular values, descending, from ``eigvalsh`` of the smaller Gram matrix.

    Values below the method's accuracy, ``s_1 * sqrt(min(m, n) * eps)`` (about ``2e-3 s_1`` for
    a 32-wide fp32 matrix), are returned as exact zeros: the numerical rank.

    Example:
        >>> singular_values(torch.diag(torch.tensor([3.0, 1.0])))
        tensor([3., 1.])
    """
    X = _fp32(W, "singular_values")
    gram = X @ X.mT if X.shape[-2] <= X.shape[-1] else X.mT @ X
    s = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()
    floor = s[..., :1] * (s.shape[-1] * torch.finfo(s.dtype).eps) ** 0.5
    return torch.where(s > floor, s, torch.zeros_like(s))


def top_singular_value(W: Tensor, num_iters: int = 30, v0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(sigma_1, v)`` by power iteration on ``W^T W``; ``v`` (shape ``(..., n)``) warm-starts the next call.

    ``sigma_1 = ||W v||`` is a lower bound that converges like ``(s_2/s_1)^(2 num_iters)``.

    Example:
        >>> W = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> s, v = top_singular_value(W)             # cold start
        >>> s
        tensor(3.0000)
        >>> W_next = W + 0.01 * torch.ones(3, 3)
        >>> s, v = top_singular_value(W_next, 5, v)  # a few steps suffice after a small change
        >>> torch.allclose(s, torch.linalg.matrix_norm(W_next, ord=2), rtol=1e-4)
        True
    """
    X = _fp32(W, "top_singular_value")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"top_singular_value: num_iters must be an integer >= 1, got {num_iters!r}")
    if v0 is None or v0.shape != X.shape[:-2] + X.shape[-1:]:
        v = torch.randn(X.shape[:-2] + X.shape[-1:], dtype=X.dtype, device=X.device)
    else:
        v = v0.to(X)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    for _ in range(num_iters):
        v = (X.mT @ (X @ v.unsqueeze(-1))).squeeze(-1)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (X @ v.unsqueeze(-1)).squeeze(-1).norm(dim=-1), v


def top_frames(W: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` left and right singular vectors ``(U (..., m, k), V (..., n, k))``.

    ``svd_lowrank`` (q = k + 8, 4 subspace iterations) when ``4 q <= min(m, n)``,
    otherwise the exact ``torch.linalg.svd``. The randomized frames are accurate when the
    spectrum has a gap after ``s_k`` (as the frames themselves are only then well defined).
    """
    X = _fp32(W, "top_frames")
    small = min(X.shape[-2:])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= small:
        raise ValueError(f"top_frames: k must be an integer in [1, min(m, n) = {small}], got {k!r}")
    q = k + 8
    if 4 * q > small:  # svd_lowrank only pays off for q well below min(m, n)
        U, _, Vh = torch.linalg.svd(X, full_matrices=False)
        return U[..., :k], Vh[..., :k, :].mT
    U, _, V = torch.svd_lowrank(X, q=q, niter=4)
    return U[..., :k], V[..., :k]


def stable_rank(W: Tensor, num_iters: int = 30) -> Tensor:
    """``||W||_F^2 / sigma_1^2`` in ``[1, min(m, n)]``; sigma_1 by power iteration (exact
    when ``num_iters`` is large enough for the gap ``s_2 / s_1``). A zero matrix gives NaN.

    Example:
        >>> stable_rank(torch.eye(4))
        tensor(4.)
    """
    X = _fp32(W, "stable_rank")
    sigma, _ = top_singular_value(X, num_iters)
    return X.square().sum((-2, -1)) / sigma.square()


def _entropy(s: Tensor, normalized: bool) -> Tensor:
    """Entropy of ``p_i = s_i / sum s`` over ``s_i > 1e-12`` (divided by ``ln k`` if normalised)."""
    s = torch.where(s > _ENTROPY_FLOOR, s, torch.zeros_like(s))
    p = s / s.sum(-1, keepdim=True)
    H = -torch.special.xlogy(p, p).sum(-1)
    k = s.shape[-1]
    if not normalized:
        return H
    return H / torch.log(torch.tensor(float(k), dtype=s.dtype)) if k > 1 else torch.ones_like(H)


def spectral_entropy(W: Tensor, normalized: bool = True) -> Tensor:
    """Entropy of the singular values as a distribution, ``p_i = s_i / sum_j s_j``.

    ``normalized=True`` divides by ``ln min(m, n)``: 1 for a flat spectrum (an orthogonal matrix),
    0 for rank one.

    Example:
        >>> spectral_entropy(torch.eye(8))
        tensor(1.0000)
        >>> spectral_entropy(torch.outer(torch.ones(4), torch.ones(6)))  # rank one
        tensor(0.)
    """
    return _entropy(singular_values(W), normalized)


def effective_rank(W: Tensor) -> Tensor:
    """Roy & Vetterli's effective rank ``exp(H)`` (unnormalised entropy), in ``[1, min(m, n)]``."""
    return spectral_entropy(W, normalized=False).exp()


def _frame_sin(Ua: Tensor, Ub: Tensor) -> Tensor:
    """``||sin Theta||_F = sqrt(k - ||Ua^T Ub||_F^2)`` for orthonormal ``(..., d, k)`` frames."""
    k = Ua.shape[-1]
    return (k - (Ua.mT @ Ub).square().sum((-2, -1))).clamp_min(0).sqrt()


def sin_theta(A: Tensor, B: Tensor, k: int, side: str = "max") -> Tensor:
    """``||sin Theta||_F`` between the top-``k`` singular frames of ``A`` and ``B``.

    ``side="left"`` compares left singular vectors, ``"right"`` right ones, ``"max"`` (default)
    reports the larger. 0 means the same subspaces, ``sqrt(k)`` orthogonal ones. Singular vectors
    inside a cluster of equal singular values are not unique; see :func:`polar_misalignment`.

    Example:
        >>> W = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25]))
        >>> R, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
        >>> sin_theta(W, W @ R, k=4, side="left")  # a right rotation leaves left frames alone
        tensor(0.)
        >>> sin_theta(W, torch.eye(6)[[1, 0, 2, 3, 4, 5]] @ W, k=1, side="left")  # top direction moved: sqrt(1)
        tensor(1.)
    """
    if side not in _SIDES:
        raise ValueError(f"sin_theta: side must be one of {_SIDES}, got {side!r}")
    if A.shape[-2:] != B.shape[-2:]:
        raise ValueError(
            f"sin_theta: A and B must have the same matrix shape, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    Ua, Va = top_frames(A, k)
    Ub, Vb = top_frames(B, k)
    left, right = _frame_sin(Ua, Ub), _frame_sin(Va, Vb)
    return {"left": left, "right": right, "max": torch.maximum(left, right)}[side]


def _delta_p(W: Tensor, P: Tensor) -> Tensor:
    num = (W.mT @ P - P.mT @ W).norm(dim=(-2, -1)) + (W @ P.mT - P @ W.mT).norm(dim=(-2, -1))
    return num / (2 * W.norm(dim=(-2, -1)) * P.norm(dim=(-2, -1)))


def polar_misalignment(W: Tensor, G: Tensor, method: str = "svd") -> Tensor:
    """Basis-free misalignment ``delta_P`` of ``W`` with ``P = polar(G)``, in ``[0, 1]``.

    ``delta_P = (||W^T P - P^T W||_F + ||W P^T - P W^T||_F) / (2 ||W||_F ||P||_F)``, zero exactly
    when W and P share singular vectors; unlike :func:`sin_theta` it is well defined for a flat
    spectrum. ``method`` is passed to :func:`lightning_muon.orthogonalize` (``"svd"``: exact).

    Example:
        >>> W = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
        >>> polar_misalignment(W, W)  # W shares its own singular vectors
        tensor(0.)
    """
    X, Y = _fp32(W, "polar_misalignment"), _fp32(G, "polar_misalignment")
    if X.shape[-2:] != Y.shape[-2:]:
        raise ValueError(
            f"polar_misalignment: W and G must have the same matrix shape, got {tuple(X.shape)} and {tuple(Y.shape)}"
        )
    return _delta_p(X, orthogonalize(Y, method, dtype=X.dtype))


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
