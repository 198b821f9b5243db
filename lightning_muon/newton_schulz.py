"""Approximate polar factors: Newton–Schulz iterations and the exact SVD reference.

For a matrix ``G = U S V^T`` the polar factor is ``U V^T``: the same singular directions with a
flat spectrum. Muon applies it to the momentum of every hidden weight matrix. This module is plain
torch (no Lightning) and works on batches of matrices ``(..., m, n)``.

Example:
    >>> import torch
    >>> from lightning_muon import orthogonalize
    >>> G = torch.randn(4, 64, 128)
    >>> O = orthogonalize(G, method="svd")
    >>> torch.allclose(O @ O.mT, torch.eye(64).expand(4, 64, 64), atol=1e-4)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .precision import resolve_ns_dtype

__all__ = [
    "NSPreset",
    "NS_PRESETS",
    "METHODS",
    "orthogonalize",
    "ns_flops",
    "singular_value_band",
    "default_kernel",
]

Coefficients = tuple[float, float, float]


@dataclass(frozen=True)
class NSPreset:
    """Coefficients of an odd quintic Newton–Schulz iteration ``X <- a X + (b A + c A^2) X``.

    ``schedule[i]`` is used at step ``i``; steps past the end of the schedule use ``tail``.
    The input is normalised as ``X / (||X||_F * norm_scale + norm_eps)`` so that its spectral
    norm is at most ``1 / norm_scale``.
    """

    schedule: tuple[Coefficients, ...]
    tail: Coefficients
    norm_scale: float
    norm_eps: float
    band: tuple[float, float]  # singular values of the output for inputs in the design range

    def coefficients(self, steps: int) -> list[Coefficients]:
        return [self.schedule[i] if i < len(self.schedule) else self.tail for i in range(steps)]


# Keller Jordan's quintic (also torch.optim.Muon's default): maximal slope at zero, does not
# converge to 1; after 5 steps the singular values of the output lie roughly in [0.5, 1.2].
_KELLER: Coefficients = (3.4445, -4.7750, 2.0315)

# Classic degree-5 Newton–Schulz for the polar factor (Higham): p(x) = (15x - 10x^3 + 3x^5) / 8.
# Converges to exactly 1 for singular values in (0, sqrt(7/3)); used to refine past a schedule.
_NEWTON_SCHULZ_5: Coefficients = (15 / 8, -10 / 8, 3 / 8)

# Polar Express (Amsel, Persson, Musco & Gower, 2025, arXiv:2505.16932). How the list was made:
# the paper's greedy minimax construction (its Algorithm 1) picks, at each step, the odd quintic
# p_t minimising max |1 - p_t(x)| over the current interval [l_t, u_t] of singular values, starting
# from l_0 = 1e-3, u_0 = 1, for 5 steps; each p_t is "cushioned" (the interval's lower end is
# raised to 0.02 * u_t so bf16 round-off cannot push a value below it) and made safe for round-off
# by evaluating p_t(x / 1.01) (a / 1.01, b / 1.01^3, c / 1.01^5). The list below is the output of
# that construction as published and used by modded-nanogpt and microsoft/dion; we pin it instead
# of regenerating it at import time. tests/test_newton_schulz.py checks its defining property:
# the composition maps every singular value in [1e-3, 1] into a narrow band around 1.
_POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

NS_PRESETS: dict[str, NSPreset] = {
    "quintic": NSPreset((_KELLER,), _KELLER, norm_scale=1.0, norm_eps=1e-7, band=(0.45, 1.25)),
    "polar_express": NSPreset(_POLAR_EXPRESS, _NEWTON_SCHULZ_5, norm_scale=1.02, norm_eps=1e-6, band=(0.8, 1.2)),
}
METHODS: tuple[str, ...] = (*NS_PRESETS, "svd")


def singular_value_band(method: str) -> tuple[float, float]:
    """Documented range of the output's singular values for well-scaled, full-rank input.

    ``"svd"`` is exact (1, 1). For the Newton–Schulz presets the range holds at 5 or more steps
    for every input singular value ``s`` with ``s / ||G||_F >= 1e-3`` (smaller ones come out
    smaller, and exactly zero ones stay zero). Measured over [1e-3, 1] in float64: quintic
    [0.47, 1.21], polar_express [0.85, 1.15] at 5 steps and [0.99, 1.01] at 6.
    """
    if method == "svd":
        return (1.0, 1.0)
    return NS_PRESETS[_check_method(method)].band


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"orthogonalize: unknown method {method!r}; choose one of {METHODS}")
    return method


def _newton_schulz_batched(X: Tensor, coefficients: list[Coefficients]) -> Tensor:
    """Iterate on a (batch, m, n) tensor with m <= n: three fused batched matmuls per step."""
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    return X


def _newton_schulz_looped(X: Tensor, coefficients: list[Coefficients]) -> Tensor:
    """The same iteration, one matrix at a time with mm/addmm (see :func:`default_kernel`)."""
    out = torch.empty_like(X)
    for i, x in enumerate(X):
        for a, b, c in coefficients:
            A = torch.mm(x, x.T)
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            x = torch.addmm(x, B, x, beta=a)
        out[i] = x
    return out


_KERNELS: dict[str, Callable[[Tensor, list[Coefficients]], Tensor]] = {
    "batched": _newton_schulz_batched,
    "looped": _newton_schulz_looped,
}


#: On CPU, matrices whose smaller side is at least this are iterated one at a time.
LOOP_MIN_SIDE = 512


def default_kernel(device: torch.device | str, side: int) -> str:
    """The faster Newton–Schulz kernel for matrices whose smaller side is ``side``.

    ``"looped"`` (mm/addmm per matrix) on CPU for ``side >= LOOP_MIN_SIDE`` (512), else
    ``"batched"`` (bmm on the stack): on CPU one large matmul at a time beats a batched one, while
    small matrices, and every size on a GPU, gain from batching. The measurements behind the
    threshold are in ``benchmarks/RESULTS.md`` ("Newton–Schulz kernel choice").

    Example:
        >>> default_kernel("cpu", 768), default_kernel("cpu", 128), default_kernel("cuda", 768)
        ('looped', 'batched', 'batched')
    """
    return "looped" if torch.device(device).type == "cpu" and side >= LOOP_MIN_SIDE else "batched"


_COMPILED: dict[str, Callable[[Tensor, list[Coefficients]], Tensor]] = {}


def _compiled(kernel: str) -> Callable[[Tensor, list[Coefficients]], Tensor]:
    """``torch.compile`` of a Newton–Schulz kernel, built once per kernel (compiling takes seconds)."""
    if kernel not in _COMPILED:
        _COMPILED[kernel] = torch.compile(_KERNELS[kernel], dynamic=False)
    return _COMPILED[kernel]


def _polar_svd(X: Tensor) -> Tensor:
    """Exact polar factor on the range of X: U diag(s > tol) V^T (zero input gives zero)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    tol = S[..., :1] * (max(X.shape[-2:]) * torch.finfo(X.dtype).eps)
    keep = (tol < S).to(X.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def orthogonalize(
    G: Tensor,
    method: str = "polar_express",
    steps: int = 5,
    *,
    dtype: torch.dtype | None = None,
    kernel: str | None = None,
    compile: bool = False,
) -> Tensor:
    """Approximate polar factor ``U V^T`` of each matrix in ``G`` (shape ``(..., m, n)``).

    Args:
        G: a matrix or a batch of matrices; conv kernels must be flattened to 2-D by the caller.
        method: ``"polar_express"`` (default; per-step minimax coefficients, singular values of
            the output close to 1), ``"quintic"`` (Keller Jordan's coefficients, as in
            ``torch.optim.Muon``; output singular values roughly in [0.5, 1.2]) or ``"svd"``
            (exact, via ``torch.linalg.svd``; for research and tests).
        steps: Newton–Schulz iterations (ignored by ``"svd"``). Past the pinned Polar Express
            schedule, extra steps use the convergent degree-5 Newton–Schulz polynomial.
        dtype: compute dtype. Default: for Newton–Schulz :func:`lightning_muon.resolve_ns_dtype`
            of ``G``'s device (bfloat16 where the hardware computes it natively, else float16 on
            pre-Ampere GPUs or float32); for ``"svd"`` float32 (or the input's float64).
        kernel: ``"looped"`` (one matrix at a time) or ``"batched"`` (bmm on the stack); both
            compute the same thing. Default: :func:`default_kernel` (by device and size).
        compile: run the Newton–Schulz kernel through ``torch.compile`` (opt-in: the first call
            per kernel and shape compiles for seconds; about 1.1x faster after that on CPU).

    Returns:
        A new tensor with the shape and dtype of ``G``; ``G`` is never modified. A zero matrix
        gives zeros. Iteration runs on the smaller side (tall matrices are transposed).
    """
    _check_method(method)
    if kernel is not None and kernel not in _KERNELS:
        raise ValueError(f"orthogonalize: kernel must be None or one of {tuple(_KERNELS)}, got {kernel!r}")
    if G.ndim < 2:
        raise ValueError(f"orthogonalize: expected a (..., m, n) tensor, got shape {tuple(G.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"orthogonalize: steps must be an integer >= 1, got {steps!r}")
    if G.is_complex():
        raise ValueError("orthogonalize: complex tensors are not supported")
    if G.numel() == 0:
        return torch.zeros_like(G)
    m, n = G.shape[-2:]
    batch_shape = G.shape[:-2]
    transpose = m > n
    X = G.mT if transpose else G
    X = X.reshape(-1, *X.shape[-2:])
    if method == "svd":
        compute = dtype or (torch.float64 if G.dtype == torch.float64 else torch.float32)
        out = _polar_svd(X.to(compute))
    else:
        preset = NS_PRESETS[method]
        compute = dtype or resolve_ns_dtype(G.device)
        if torch.finfo(compute).max < 0.5 * torch.finfo(X.dtype).max:
            # A narrower range than the input's (fp16): normalise before the cast, or large entries
            # overflow and tiny ones (late-training momentum) underflow.
            X = X.to(torch.promote_types(X.dtype, torch.float32))
            norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
            X = (X / (norm * preset.norm_scale + preset.norm_eps)).to(compute)
        else:
            X = X.to(compute)  # a new tensor unless G already has the compute dtype
            acc = torch.promote_types(compute, torch.float32)  # no fp32 copy of a bf16 stack
            norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=acc)
            X = X / (norm * preset.norm_scale + preset.norm_eps).to(compute)  # out of place
        kernel = kernel or default_kernel(X.device, X.shape[-2])
        ns = _compiled(kernel) if compile else _KERNELS[kernel]
        out = ns(X, preset.coefficients(steps))
    out = out.reshape(*batch_shape, *out.shape[-2:])
    if transpose:
        out = out.mT
    return out.to(G.dtype).contiguous()


def ns_flops(m: int, n: int, steps: int) -> int:
    """Floating-point operations of ``steps`` Newton–Schulz iterations on one m x n matrix."""
    m, n = min(m, n), max(m, n)
    per_step = 2 * m * m * n + 2 * m * m * m + 2 * m * m * n  # X X^T, A A, B X
    return steps * per_step
