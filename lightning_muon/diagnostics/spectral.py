"""Spectral diagnostics of weight matrices: spectra, stable rank, entropy, frame misalignment.

Plain torch, no Lightning. Every function takes a matrix or a batch of matrices ``(..., m, n)``
(leading dims are batch dims) and computes in float32 (float64 stays float64), also for bf16
weights. A conv kernel ``(out, in, kh, kw)`` is analysed as the ``(out, in*kh*kw)`` matrix Muon
updates: pass :func:`lightning_muon.matrix_view` of it. Definitions: ``docs/muon-theory.md``
section 2; the critical batch size is :mod:`.critical_batch`.

Methods: the whole spectrum comes from ``eigvalsh`` of the smaller Gram matrix (absolute accuracy
about ``sqrt(eps) * s_1``, ample for entropies); ``sigma_1`` alone from power iteration (warm
startable); top-k singular frames from ``svd_lowrank`` (exact SVD when k is not small).

Example:
    >>> W = torch.randn(64, 128)
    >>> float(stable_rank(W)) > 1, 0 < float(spectral_entropy(W)) <= 1
    (True, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..optim.newton_schulz import orthogonalize

__all__ = [
    "singular_values",
    "top_singular_value",
    "top_frames",
    "stable_rank",
    "spectrum_entropy",
    "spectral_entropy",
    "effective_rank",
    "frames_sin_theta",
    "sin_theta",
    "delta_p",
    "polar_misalignment",
    "delta_p_chance",
    "sin_theta_chance",
]

_SIDES = ("max", "left", "right")


_ENTROPY_FLOOR = 1e-12  # singular values at or below this are left out of the entropy


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


def spectrum_entropy(s: Tensor, normalized: bool = True) -> Tensor:
    """Entropy of singular values ``s`` (shape ``(..., k)``) as a distribution ``p_i = s_i / sum_j s_j``.

    For a spectrum already computed (e.g. by :func:`singular_values`, batched over leading dims):
    :func:`spectral_entropy` is this applied to ``singular_values(W)``. Values at or below ``1e-12``
    count as zeros; ``normalized=True`` divides by ``ln k`` (1: flat, 0: one non-zero value).

    Args:
        s: non-negative singular values, ``(..., k)`` with ``k >= 1``.
        normalized: divide by ``ln k`` (a single value gives 1).

    Raises:
        ValueError: ``s`` is a 0-d or complex tensor.

    Example:
        >>> spectrum_entropy(torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 0.0, 0.0, 0.0]]))
        tensor([1., 0.])
    """
    if s.ndim < 1 or s.shape[-1] < 1 or s.is_complex():
        raise ValueError(
            f"spectrum_entropy: expected real singular values of shape (..., k), got {s.dtype} {tuple(s.shape)}"
        )
    s = s if s.dtype == torch.float64 else s.float()
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
    return spectrum_entropy(singular_values(W), normalized)


def effective_rank(W: Tensor) -> Tensor:
    """Roy & Vetterli's effective rank ``exp(H)`` (unnormalised entropy), in ``[1, min(m, n)]``."""
    return spectral_entropy(W, normalized=False).exp()


def frames_sin_theta(Ua: Tensor, Ub: Tensor) -> Tensor:
    """``||sin Theta||_F = sqrt(k - ||Ua^T Ub||_F^2)`` between orthonormal frames ``(..., d, k)``.

    For frames already computed (e.g. by :func:`top_frames`, batched over leading dims):
    :func:`sin_theta` is this applied to the top-``k`` frames of two matrices. 0 means the same
    subspace, ``sqrt(k)`` orthogonal ones.

    Args:
        Ua: orthonormal columns, ``(..., d, k)``.
        Ub: orthonormal columns of the same shape.

    Raises:
        ValueError: the shapes differ or are not ``(..., d, k)``.

    Example:
        >>> e = torch.eye(4)
        >>> frames_sin_theta(e[:, :2], e[:, :2]), frames_sin_theta(e[:, :2], e[:, 2:])
        (tensor(0.), tensor(1.4142))
    """
    if Ua.ndim < 2 or Ua.shape != Ub.shape:
        raise ValueError(
            f"frames_sin_theta: expected two frames of the same shape (..., d, k), "
            f"got {tuple(Ua.shape)} and {tuple(Ub.shape)}"
        )
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
    left, right = frames_sin_theta(Ua, Ub), frames_sin_theta(Va, Vb)
    return {"left": left, "right": right, "max": torch.maximum(left, right)}[side]


def delta_p(W: Tensor, P: Tensor) -> Tensor:
    """The basis-free misalignment ``delta_P`` of ``W`` with a given orthogonal factor ``P``, in ``[0, 1]``.

    ``delta_P = (||W^T P - P^T W||_F + ||W P^T - P W^T||_F) / (2 ||W||_F ||P||_F)``, batched over
    leading dims. :func:`polar_misalignment` computes ``P = polar(G)`` first; call this one when
    ``P`` is already at hand (e.g. the Newton–Schulz factor Muon applies).

    Args:
        W: the matrix, ``(..., m, n)``.
        P: the orthogonal factor, same shape as ``W``.

    Raises:
        ValueError: the shapes differ or are not ``(..., m, n)``.

    Example:
        >>> W = torch.diag(torch.tensor([3.0, 1.0]))
        >>> delta_p(W, torch.eye(2)), delta_p(W, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        (tensor(0.), tensor(0.6325))
    """
    if W.ndim < 2 or W.shape != P.shape:
        raise ValueError(
            f"delta_p: W and P must have the same shape (..., m, n), got {tuple(W.shape)} and {tuple(P.shape)}"
        )
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
    return delta_p(X, orthogonalize(Y, method, dtype=X.dtype))


def delta_p_chance(m: int, n: int) -> float:
    """``delta_P`` of two unrelated ``m x n`` matrices: ``(sqrt(m - 1) + sqrt(n - 1)) / sqrt(2 m n)``.

    For ``P`` a uniformly random orthogonal factor (orthonormal rows or columns, e.g. the polar
    factor of a Gaussian matrix) independent of ``W``, the expected squares of the two commutator
    norms in :func:`delta_p` are ``2 ||W||^2 (1 - 1/l)`` and ``2 ||W||^2 (k - 1) / l`` (``k, l`` the
    smaller and larger of ``m, n``), whatever ``W``'s spectrum; this is ``delta_P`` at those values
    (``sqrt(2 / n)`` for a square ``n x n``: 0.31 at ``n = 20``). A measured ``delta_P`` near it
    means no alignment; well below it, shared singular vectors. Monte Carlo agrees within 3%
    (``tests/diagnostics/test_chance.py``).

    Example:
        >>> round(delta_p_chance(20, 20), 3), round(delta_p_chance(64, 256), 3)
        (0.308, 0.132)
    """
    _check_sides(m, n, "delta_p_chance")
    return (math.sqrt(m - 1) + math.sqrt(n - 1)) / math.sqrt(2 * m * n)


def _frame_side(d: int, k: int) -> tuple[float, float]:
    """Mean and variance of ``||sin Theta||_F`` between two random ``k``-frames in ``R^d``.

    ``X = ||U^T V||_F^2`` has mean ``k^2 / d`` and variance ``2 k^2 (d - k)^2 / (d^2 (d - 1)(d + 2))``;
    ``sqrt(k - X)`` by the delta method to second order."""
    if k >= d:
        return 0.0, 0.0
    mean_x = k * k / d
    var_x = 2 * k * k * (d - k) ** 2 / (d * d * (d - 1) * (d + 2))
    a = k - mean_x
    return math.sqrt(a) - var_x / (8 * a**1.5), var_x / (4 * a)


def sin_theta_chance(m: int, n: int, k: int, side: str = "max") -> float:
    """``||sin Theta||_F`` (:func:`sin_theta`) of two unrelated ``m x n`` matrices' top-``k`` frames.

    Independent uniformly random ``k``-frames in ``R^d`` give ``sqrt(k (1 - k / d))`` on average
    (``d = m`` for ``side="left"``, ``n`` for ``"right"``; second-order corrected); ``"max"`` is the
    expected larger of the two (Clark's formula for the maximum of two Gaussians). ``sqrt(k)`` is
    orthogonal frames, 0 equal ones. Monte Carlo agrees within 2% (``tests/diagnostics/test_chance.py``).

    Example:
        >>> round(sin_theta_chance(20, 20, 2, side="left"), 3), round(sin_theta_chance(20, 20, 2), 3)
        (1.341, 1.367)
    """
    _check_sides(m, n, "sin_theta_chance")
    if side not in _SIDES:
        raise ValueError(f"sin_theta_chance: side must be one of {_SIDES}, got {side!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, n):
        raise ValueError(f"sin_theta_chance: k must be an integer in [1, min(m, n) = {min(m, n)}], got {k!r}")
    (mu_l, var_l), (mu_r, var_r) = _frame_side(m, k), _frame_side(n, k)
    if side == "left":
        return mu_l
    if side == "right":
        return mu_r
    theta = math.sqrt(var_l + var_r)
    if theta == 0:
        return max(mu_l, mu_r)
    alpha = (mu_l - mu_r) / theta
    cdf = 0.5 * (1 + math.erf(alpha / math.sqrt(2)))
    pdf = math.exp(-alpha * alpha / 2) / math.sqrt(2 * math.pi)
    return mu_l * cdf + mu_r * (1 - cdf) + theta * pdf


def _check_sides(m: int, n: int, where: str) -> None:
    for name, v in (("m", m), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be a positive integer (a matrix side), got {v!r}")
