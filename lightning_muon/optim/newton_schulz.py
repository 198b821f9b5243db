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

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ns_dtype import _cpu_flags, resolve_ns_dtype

__all__ = [
    "NSPreset",
    "NS_PRESETS",
    "GramVariant",
    "GRAM_METHODS",
    "METHODS",
    "orthogonalize",
    "polar_stack",
    "clear_workspace",
    "ns_flops",
    "singular_value_band",
    "cpu_kind",
    "default_kernel",
    "LOOP_MIN_SIDE",
    "default_gram",
    "register_ns_method",
    "available_methods",
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

#: The Newton–Schulz iterations by name (``ns_method``): coefficients per step and normalisation.
NS_PRESETS: dict[str, NSPreset] = {
    "quintic": NSPreset((_KELLER,), _KELLER, norm_scale=1.0, norm_eps=1e-7, band=(0.45, 1.25)),
    "polar_express": NSPreset(_POLAR_EXPRESS, _NEWTON_SCHULZ_5, norm_scale=1.02, norm_eps=1e-6, band=(0.8, 1.2)),
}


@dataclass(frozen=True)
class GramVariant:
    """Gram Newton–Schulz with the coefficients of an :data:`NS_PRESETS` entry.

    The iteration runs on the ``k x k`` Gram matrix (``k`` the smaller side) and touches the
    ``k x n`` matrix only at the start, at each restart and at the end. ``restarts`` are the steps
    before which ``X`` is rebuilt as ``Q X`` and the Gram matrix recomputed from it; past the last
    listed restart one follows every ``restart_every`` steps.
    """

    preset: str
    restarts: tuple[int, ...]
    restart_every: int

    def restart_steps(self, steps: int) -> frozenset[int]:
        """Steps in ``range(1, steps)`` that begin with a restart."""
        out = {i for i in self.restarts if 0 < i < steps}
        last = max(self.restarts, default=0)
        out.update(range(last + self.restart_every, steps, self.restart_every))
        return frozenset(out)


# Why restarts: the Gram matrix R = X X^T holds the squared singular values of X, so a round-off
# error of size eps * ||X||_F^2 in R can make its smallest eigenvalues slightly negative. A step
# maps r -> r * p(r)^2 with p(r) = a + b r + c r^2 and b < 0: a negative r is multiplied by about
# a^2 (66 in Polar Express' first step) and never recovers, whereas standard NS recomputes X X^T
# from X at every step. A restart rebuilds X = Q X and R = X X^T, resetting that error to the
# round-off of the current, better-conditioned X. Steps chosen with a scalar model (as Dao-AILab's
# restart autotuner does): the condition number of Q over singular values in [1e-10, 1] when -4e-4
# (float16 round-off) is added to R at each (re)start. Polar Express, restarts {2, 5, 8, ...}: 107
# at 5, 8 and 10 steps (no restart: 1.7e14 at 5 steps; {2} alone: 5e6 at 8). Keller's quintic,
# {2, 4, 6, ...}: 20 at 5 and 8 steps ({2} alone: 74 at 5, 7e25 at 8). With bfloat16's round-off
# (-4e-3) no schedule of one or two restarts stays below 1e20, hence float16 for 16-bit Gram NS.
#: The Gram forms of the iterations (``ns_method="gram_*"``): which preset, and when to restart.
GRAM_METHODS: dict[str, GramVariant] = {
    "gram_polar_express": GramVariant("polar_express", restarts=(2,), restart_every=3),
    "gram_quintic": GramVariant("quintic", restarts=(2,), restart_every=2),
}
_GRAM_OF: dict[str, str] = {variant.preset: name for name, variant in GRAM_METHODS.items()}
#: Every accepted ``ns_method``: the presets, their Gram forms and the exact ``"svd"``.
METHODS: tuple[str, ...] = (*NS_PRESETS, *GRAM_METHODS, "svd")


#: Newton–Schulz replacements a user registered (:func:`register_ns_method`), by name.
CUSTOM_METHODS: dict[str, Callable[[Tensor, int], Tensor]] = {}


def register_ns_method(name: str, fn: Callable[[Tensor, int], Tensor]) -> None:
    """Make ``fn`` available as ``ns_method=name`` (in :class:`lightning_muon.Muon` and :func:`orthogonalize`).

    ``fn(X, steps)`` gets a ``(batch, m, n)`` stack with ``m <= n`` (tall matrices arrive
    transposed), in the compute dtype (``ns_dtype``), not normalised, and returns the approximate
    polar factors in the same shape; :func:`orthogonalize` transposes back and casts to the
    input's dtype. Under DDP and FSDP2 every rank must register the same function (each matrix is
    orthogonalised on one rank). The name is stored in param groups and checkpoints, the function
    is not: register it again before loading one.

    Example:
        >>> def svd_polar(X, steps):
        ...     U, _, Vh = torch.linalg.svd(X.float(), full_matrices=False)
        ...     return (U @ Vh).to(X.dtype)
        >>> register_ns_method("my_svd", svd_polar)
        >>> O = orthogonalize(torch.randn(3, 8, 4), "my_svd", dtype=torch.float32)
        >>> torch.allclose(O.mT @ O, torch.eye(4).expand(3, 4, 4), atol=1e-5)
        True
        >>> del CUSTOM_METHODS["my_svd"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_ns_method: name must be a non-empty string, got {name!r}")
    if name in METHODS:
        raise ValueError(f"register_ns_method: {name!r} is a built-in method; choose another name")
    if not callable(fn):
        raise TypeError(f"register_ns_method: fn must be callable (X, steps) -> Tensor, got {type(fn).__name__}")
    CUSTOM_METHODS[name] = fn


def available_methods() -> tuple[str, ...]:
    """Every ``ns_method`` accepted now: :data:`METHODS` and the registered ones.

    Example:
        >>> available_methods()[:3]
        ('quintic', 'polar_express', 'gram_polar_express')
    """
    return (*METHODS, *CUSTOM_METHODS)


def singular_value_band(method: str) -> tuple[float, float]:
    """Documented range of the output's singular values for well-scaled, full-rank input.

    ``"svd"`` is exact (1, 1). For the Newton–Schulz presets the range holds at 5 or more steps
    for every input singular value ``s`` with ``s / ||G||_F >= 1e-3`` (smaller ones come out
    smaller, and exactly zero ones stay zero). Measured over [1e-3, 1] in float64: quintic
    [0.47, 1.21], polar_express [0.85, 1.15] at 5 steps and [0.99, 1.01] at 6.
    """
    if method == "svd":
        return (1.0, 1.0)
    if _check_method(method) in CUSTOM_METHODS:
        raise ValueError(f"singular_value_band: {method!r} is a registered method; its band is not documented here")
    return _preset(method).band


def _preset(method: str) -> NSPreset:
    """The coefficient preset a Newton–Schulz method (standard or Gram) iterates with."""
    return NS_PRESETS[GRAM_METHODS[method].preset if method in GRAM_METHODS else method]


def _check_method(method: str) -> str:
    if method not in METHODS and method not in CUSTOM_METHODS:
        raise ValueError(f"orthogonalize: unknown method {method!r}; choose one of {available_methods()}")
    return method


def _products(tall: bool, batched: bool) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """``(gram, left)``: the two products of an iteration on ``X`` of shape (..., m, n).

    Newton–Schulz iterates on the smaller side. A wide ``X`` (m <= n) uses ``gram(X) = X X^T``
    and ``left(P, X) = P X``; a tall one runs the same iteration on ``X^T`` without transposing
    ``X`` (no strided copy in or out): ``gram(X) = X^T X`` and ``left(P, X) = X P^T = (P X^T)^T``.
    BLAS reads the transposed operands in place. Both take ``out``; ``left(P, X, beta=a)`` adds
    ``a X`` (addmm: ``X`` is first copied into ``out``).
    """
    mm, addmm = (torch.bmm, torch.baddbmm) if batched else (torch.mm, torch.addmm)

    def gram(x: Tensor, out: Tensor | None = None) -> Tensor:
        return mm(x.mT, x, out=out) if tall else mm(x, x.mT, out=out)

    def left(p: Tensor, x: Tensor, out: Tensor | None = None, beta: float | None = None) -> Tensor:
        first, second = (x, p.mT) if tall else (p, x)
        return mm(first, second, out=out) if beta is None else addmm(x, first, second, beta=beta, out=out)

    return gram, left


#: Dtypes in which ``a X + B X`` is computed as ``(B + a I) X``: no copy of ``X`` per step, and in
#: float32 closer to float64 than before (measured: 1.9e-6 vs 1.2e-5 relative on 512 x 2048). In 16
#: bits rounding ``a + B_ii`` to the dtype doubled the distance to float64 (bf16: 2.0e-2 vs 1.1e-2),
#: so there ``a X`` is added by addmm, as torch.optim.Muon does.
_FOLD_DTYPES = (torch.float32, torch.float64)


def _newton_schulz_batched(
    X: Tensor, coefficients: list[Coefficients], tall: bool = False, Y: Tensor | None = None
) -> Tensor:
    """Iterate on a (batch, m, n) stack (on its transpose when ``tall``): three bmm per step.

    ``X <- a X + B X`` with ``B = b A + c A^2``; in float32/float64 as ``(B + a I) X``
    (:data:`_FOLD_DTYPES`): adding ``a`` to the diagonal of the k x k ``B`` replaces the copy of
    the k x n ``X`` that ``baddbmm(X, B, X, beta=a)`` makes into its output at every step. ``X``
    (a scaled copy made by :func:`polar_stack`) is overwritten, and so is ``Y``, a buffer of its
    shape (None: a new one); the result is one of the two.
    """
    gram, left = _products(tall, batched=True)
    fold = X.dtype in _FOLD_DTYPES
    k = X.shape[-1] if tall else X.shape[-2]
    A = X.new_empty(X.shape[0], k, k)
    B = torch.empty_like(A)
    Y = torch.empty_like(X) if Y is None else Y
    for a, b, c in coefficients:
        gram(X, out=A)
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)  # b A + c A^2
        if fold:
            B.diagonal(dim1=-2, dim2=-1).add_(a)
        left(B, X, out=Y, beta=None if fold else a)
        X, Y = Y, X
    return X


def _newton_schulz_looped(
    X: Tensor, coefficients: list[Coefficients], tall: bool = False, Y: Tensor | None = None
) -> Tensor:
    """The same iteration, one matrix at a time with mm/addmm (see :func:`default_kernel`)."""
    gram, left = _products(tall, batched=False)
    fold = X.dtype in _FOLD_DTYPES
    k = X.shape[-1] if tall else X.shape[-2]
    A = X.new_empty(k, k)
    B = torch.empty_like(A)
    Y = torch.empty_like(X) if Y is None else Y
    for x, y in zip(X, Y):
        for a, b, c in coefficients:
            gram(x, out=A)
            torch.addmm(A, A, A, beta=b, alpha=c, out=B)
            if fold:
                B.diagonal().add_(a)
            left(B, x, out=y, beta=None if fold else a)
            x, y = y, x
    return X if len(coefficients) % 2 == 0 else Y  # every matrix ends in the same buffer


_KERNELS: dict[str, Callable[[Tensor, list[Coefficients], bool, Tensor | None], Tensor]] = {
    "batched": _newton_schulz_batched,
    "looped": _newton_schulz_looped,
}


def _gram_newton_schulz(
    X: Tensor, coefficients: list[Coefficients], restarts: frozenset[int], tall: bool, batched: bool
) -> Tensor:
    """Gram NS on one (m, n) matrix or a (batch, m, n) stack, on the smaller side (``tall``: m > n).

    Standard NS has ``X_t = Q_t X_0`` with ``Q_t`` a polynomial in ``R_0 = X_0 X_0^T``; this
    carries ``Q`` and ``R_t = X_t X_t^T`` (both k x k, commuting, symmetric) instead of ``X``:
    ``Z = b R + c R^2``, ``Q <- Q (a I + Z)``, ``R <- (a I + Z) R (a I + Z)``.
    """
    gram, left = _products(tall, batched)
    addmm = torch.baddbmm if batched else torch.addmm
    R = gram(X)
    k = R.shape[-1]
    eye = torch.eye(k, dtype=X.dtype, device=X.device)
    Q: Tensor | None = None
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        if i in restarts:
            X = left(Q, X)
            R = gram(X)
            Q = None
        Z = addmm(R, R, R, beta=b, alpha=c)  # b R + c R^2
        Q = Z + a * eye if Q is None else addmm(Q, Q, Z, beta=a)  # a Q + Q Z
        if i < last and i + 1 not in restarts:
            RZ = addmm(R, R, Z, beta=a)  # a R + R Z
            R = addmm(RZ, Z, RZ, beta=a)  # a RZ + Z RZ = (a I + Z) R (a I + Z)
            # Exact arithmetic keeps R symmetric, round-off does not; re-symmetrising (O(k^2)) roughly
            # halves the distance to standard NS (measured: float32 5e-5 vs 1e-4, float16 2.7e-2 vs 3.5e-2).
            R = 0.5 * (R + R.mT)
    return left(Q, X)


def _gram_batched(X: Tensor, coefficients: list[Coefficients], restarts: frozenset[int], tall: bool = False) -> Tensor:
    return _gram_newton_schulz(X, coefficients, restarts, tall, batched=True)


def _gram_looped(X: Tensor, coefficients: list[Coefficients], restarts: frozenset[int], tall: bool = False) -> Tensor:
    out = torch.empty_like(X)
    for i, x in enumerate(X):
        out[i] = _gram_newton_schulz(x, coefficients, restarts, tall, batched=False)
    return out


_GRAM_KERNELS: dict[str, Callable[[Tensor, list[Coefficients], frozenset[int], bool], Tensor]] = {
    "batched": _gram_batched,
    "looped": _gram_looped,
}


#: Per kind of CPU (:func:`cpu_kind`): matrices whose smaller side is at least this are iterated
#: one at a time (``"looped"``), smaller ones as one batched stack; ``math.inf``: always batched.
#: Measured 2026-12-03 with ``benchmarks/cpu_kinds.py -- kernel_choice`` (GPT matrices of widths
#: 128-1024, quintic, 5 steps, 2 threads, each kind simulated on an AMX Xeon; ``benchmarks/RESULTS.md``,
#: "Newton–Schulz kernel choice per CPU kind"), batched time / looped time: with AMX (bf16)
#: 0.59-0.85 at every width, so always batched; with AVX-512-BF16 (bf16) 0.83-0.95 below 512 and
#: 0.99-1.03 from 512 on (a tie); with AVX2 (float32) 0.84-0.88 below 512 and 0.96-0.98 from 512 on
#: (within this run's noise, while a real AVX2 AMD EPYC had run 768-wide NS 5-15% faster looped,
#: one thread): both keep 512.
LOOP_MIN_SIDE: dict[str, float] = {
    "avx2": 512,
    "avx512": 512,
    "avx512_bf16": 512,
    "amx_bf16": math.inf,
    "other": 512,  # CPUs of no kind above (Arm, older x86): the former single threshold
}


def cpu_kind() -> str:
    """The kind of this CPU, as :data:`LOOP_MIN_SIDE` is keyed: ``"amx_bf16"``, ``"avx512_bf16"``,
    ``"avx512"``, ``"avx2"`` or ``"other"``.

    Read from the flags ``ns_dtype="auto"`` reads (:mod:`lightning_muon.optim.ns_dtype`), so
    ``LIGHTNING_MUON_CPU_KIND`` makes it the simulated kind.

    Example:
        >>> cpu_kind() in LOOP_MIN_SIDE
        True
    """
    flags = _cpu_flags()
    if flags.get("simulated"):
        return str(flags["simulated"])
    if flags.get("amx_bf16"):
        return "amx_bf16"
    if flags.get("avx512_bf16"):
        return "avx512_bf16"
    if flags.get("avx512_f") or flags.get("capability") == "AVX512":
        return "avx512"
    if flags.get("avx2") or flags.get("capability") == "AVX2":
        return "avx2"
    return "other"


def default_kernel(
    device: torch.device | str,
    side: int,
    dtype: torch.dtype | None = None,
    gram: bool = False,
    kind: str | None = None,
) -> str:
    """The Newton–Schulz kernel for matrices whose smaller side is ``side``.

    On CPU ``"looped"`` (mm/addmm per matrix) for ``side >= LOOP_MIN_SIDE[kind]``, else
    ``"batched"`` (bmm on the stack); ``kind`` defaults to :func:`cpu_kind`. Every size on a GPU
    is ``"batched"``. The measurements behind the thresholds are in :data:`LOOP_MIN_SIDE`.

    Gram Newton–Schulz in 16 bits on CPU (``gram=True``, ``dtype`` float16 or bfloat16) is always
    ``"looped"``: with native 16-bit matmuls (AMX) a batched k x k product rounds differently
    depending on how many matrices share the call (measured: 2.4e-3 on a 16 x 24 output), so the
    matrices a DDP rank owns would not come out as one process computes them; one at a time they do.

    Example:
        >>> default_kernel("cpu", 768, kind="avx2"), default_kernel("cpu", 128, kind="avx2")
        ('looped', 'batched')
        >>> default_kernel("cpu", 768, kind="amx_bf16"), default_kernel("cuda", 768)
        ('batched', 'batched')
        >>> default_kernel("cpu", 128, torch.float16, gram=True)
        'looped'
    """
    if torch.device(device).type != "cpu":
        return "batched"
    if gram and dtype in (torch.float16, torch.bfloat16):
        return "looped"
    return "looped" if side >= LOOP_MIN_SIDE.get(kind or cpu_kind(), LOOP_MIN_SIDE["other"]) else "batched"


#: On CPU in float32/float64, a standard preset runs as its Gram form when max(m, n) >= this * min(m, n)
GRAM_MIN_ASPECT = 3.0
#: ... and min(m, n) >= this: on small matrices NS costs little, and Gram NS's float32 round-off was
#: several times standard NS's (an input change of 1e-6 moved a 96 x 32 output 8x as much).
GRAM_MIN_SIDE = 256


def default_gram(device: torch.device | str, dtype: torch.dtype, m: int, n: int) -> bool:
    """Whether a standard preset (``"polar_express"``, ``"quintic"``) runs as its Gram form here.

    Yes on CPU in float32 or float64 when one side is at least ``GRAM_MIN_ASPECT`` times the other
    and the smaller side is at least ``GRAM_MIN_SIDE``:
    there Gram NS computes the same polynomial with fewer FLOPs (Polar Express: 3/4 of them at
    aspect ratio 3, 2/3 at 4) and ran correspondingly faster, with the same singular values and
    distance to the SVD polar factor; at aspect ratio 2 (7/8 of the FLOPs) the gain was within the
    timing noise (``benchmarks/gram_newton_schulz.py``; numbers in ``docs/gram-newton-schulz.md``).
    Not for square-ish matrices (more FLOPs), not in 16 bits (Gram NS then iterates in float16,
    not the requested dtype), and not on GPUs (not measured here).
    Set ``GRAM_MIN_ASPECT = math.inf`` to turn it off.

    Example:
        >>> default_gram("cpu", torch.float32, 768, 3072), default_gram("cpu", torch.float32, 768, 768)
        (True, False)
        >>> default_gram("cpu", torch.float32, 32, 128)  # small: standard NS
        False
        >>> default_gram("cpu", torch.bfloat16, 768, 3072), default_gram("cuda", torch.float32, 768, 3072)
        (False, False)
    """
    small, large = min(m, n), max(m, n)
    return (
        torch.device(device).type == "cpu"
        and dtype in (torch.float32, torch.float64)
        and large >= GRAM_MIN_ASPECT * small
        and small >= GRAM_MIN_SIDE
    )


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def _compiled(kernel: str) -> Callable[[Tensor, list[Coefficients], bool, Tensor | None], Tensor]:
    """``torch.compile`` of a Newton–Schulz kernel, built once per kernel (compiling takes seconds)."""
    if kernel not in _COMPILED:
        _COMPILED[kernel] = torch.compile(_KERNELS[kernel], dynamic=False)
    return _COMPILED[kernel]


def _compiled_gram(kernel: str) -> Callable[[Tensor, list[Coefficients], frozenset[int], bool], Tensor]:
    """``torch.compile`` of a Gram Newton–Schulz kernel, built once per kernel."""
    key = f"gram_{kernel}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_GRAM_KERNELS[kernel], dynamic=False)
    return _COMPILED[key]


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
    gram: bool | None = None,
) -> Tensor:
    """Approximate polar factor ``U V^T`` of each matrix in ``G`` (shape ``(..., m, n)``).

    Args:
        G: a matrix or a batch of matrices; conv kernels must be flattened to 2-D by the caller.
        method: ``"polar_express"`` (default; per-step minimax coefficients, singular values of
            the output close to 1), ``"quintic"`` (Keller Jordan's coefficients, as in
            ``torch.optim.Muon``; output singular values roughly in [0.5, 1.2]), their Gram
            Newton–Schulz forms ``"gram_polar_express"`` / ``"gram_quintic"`` (the same polynomial
            iterated on the ``k x k`` Gram matrix, see :data:`GRAM_METHODS`: fewer FLOPs when one
            side is at least about 1.5x the other, measured faster from 3x; a bfloat16 ``dtype``
            iterates in float16) or ``"svd"`` (exact, via ``torch.linalg.svd``; for research and
            tests).
        steps: Newton–Schulz iterations (ignored by ``"svd"``). Past the pinned Polar Express
            schedule, extra steps use the convergent degree-5 Newton–Schulz polynomial.
        dtype: compute dtype. Default: for Newton–Schulz :func:`lightning_muon.resolve_ns_dtype`
            of ``G``'s device (bfloat16 where the hardware computes it natively, else float16 on
            pre-Ampere GPUs or float32); for ``"svd"`` float32 (or the input's float64).
        kernel: ``"looped"`` (one matrix at a time) or ``"batched"`` (bmm on the stack); both
            compute the same thing. Default: :func:`default_kernel` (by device and size).
        compile: run the Newton–Schulz kernel through ``torch.compile`` (opt-in: the first call
            per kernel and shape compiles for seconds; about 1.1x faster after that on CPU).
        gram: run ``"polar_express"``/``"quintic"`` as their Gram forms (True) or as standard NS
            (False). Default: :func:`default_gram` (Gram on CPU in float32/float64 for matrices at
            least three times as wide as tall, or tall as wide). Ignored by ``"svd"`` and the
            ``gram_*`` methods.

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
    if gram is not None and not isinstance(gram, bool):
        raise ValueError(f"orthogonalize: gram must be None, True or False, got {gram!r}")
    if G.numel() == 0:
        return torch.zeros_like(G)
    m, n = G.shape[-2:]
    out = polar_stack(G.reshape(-1, m, n), method, steps, dtype=dtype, kernel=kernel, compile=compile, gram=gram)
    return out.reshape(G.shape)


def polar_stack(
    matrices: Tensor | Sequence[Tensor],
    method: str = "polar_express",
    steps: int = 5,
    *,
    dtype: torch.dtype | None = None,
    kernel: str | None = None,
    compile: bool = False,
    gram: bool | None = None,
    out: Sequence[Tensor] | None = None,
) -> Tensor | Sequence[Tensor]:
    """:func:`orthogonalize` of a ``(batch, m, n)`` stack or a list of same-shape ``(m, n)`` matrices.

    What :class:`lightning_muon.Muon` calls per bucket: a list is read in place (no stacked copy
    of the inputs). Arguments are :func:`orthogonalize`'s, not checked again. Returns a new
    contiguous ``(batch, m, n)`` tensor in the inputs' dtype, or, with ``out`` (one ``(m, n)``
    tensor per matrix, any dtype; may be the inputs themselves), writes each result into its
    ``out`` tensor and returns ``out``.

    The Newton–Schulz methods read the inputs twice (a cast, the norms, see :func:`_scaled_copy`)
    and write the result once; tall matrices are not transposed (the iteration runs on ``X^T``
    through transposed BLAS operands, :func:`_products`); on CPU the iteration's two buffers are
    reused from call to call (:func:`clear_workspace`).

    Example:
        >>> A, B = torch.randn(8, 16), torch.randn(8, 16)
        >>> out = polar_stack([A, B], "polar_express", dtype=torch.float32)
        >>> torch.allclose(out[1], orthogonalize(B, "polar_express", dtype=torch.float32), atol=1e-6)
        True
        >>> _ = polar_stack([A, B], "polar_express", dtype=torch.float32, out=[A, B])  # in place
        >>> torch.equal(A, out[0])
        True
    """
    first = matrices[0]
    m, n = first.shape[-2:]
    tall = m > n
    if method == "svd" or method in CUSTOM_METHODS:
        X = matrices if isinstance(matrices, Tensor) else torch.stack(list(matrices))
        X = X.mT if tall else X  # both take (batch, k, n) with k <= n
        if method == "svd":
            result = _polar_svd(X.to(dtype or (torch.float64 if first.dtype == torch.float64 else torch.float32)))
        else:
            X = X.to(dtype or resolve_ns_dtype(first.device))
            result = CUSTOM_METHODS[method](X, steps)
            if not isinstance(result, Tensor) or result.shape != X.shape:
                got = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
                raise ValueError(f"orthogonalize: ns_method {method!r} returned {got} for input {tuple(X.shape)}")
        result = result.mT if tall else result
        if out is None:
            return result.to(first.dtype, memory_format=torch.contiguous_format)
    else:
        preset = _preset(method)
        compute = dtype or resolve_ns_dtype(first.device)
        if method in NS_PRESETS and (default_gram(first.device, compute, m, n) if gram is None else gram):
            method = _GRAM_OF[method]  # before the dtype rule below, which every Gram form follows
        if method in GRAM_METHODS and compute == torch.bfloat16:
            compute = torch.float16  # see GRAM_METHODS: the Gram matrix needs float16's mantissa
        X, Y = _workspace(len(matrices), (m, n), compute, first.device)
        _scaled_copy(matrices, X, preset)
        kernel = kernel or default_kernel(first.device, min(m, n), compute, method in GRAM_METHODS)
        if method in GRAM_METHODS:
            gram_ns = _compiled_gram(kernel) if compile else _GRAM_KERNELS[kernel]
            result = gram_ns(X, preset.coefficients(steps), GRAM_METHODS[method].restart_steps(steps), tall)
        else:
            ns = _compiled(kernel) if compile else _KERNELS[kernel]
            result = ns(X, preset.coefficients(steps), tall, Y)
        if out is None:  # never hand out the workspace: a new tensor (a cast, or a copy)
            return result.to(first.dtype, copy=result is X or result is Y)
    for target, r in zip(out, result):
        target.copy_(r)
    return out


_LOCAL = threading.local()


def _workspace(count: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Two new ``(count, *shape)`` buffers of ``dtype`` for one Newton–Schulz call.

    On CPU they are views of one flat buffer per thread, device and dtype that later calls reuse
    (grown to the largest call so far): a new large allocation costs its page faults each time
    (measured: casting 6.3 M values into new memory took 2.8 ms, into reused memory 0.74 ms).
    Elsewhere (CUDA's allocator caches already) they are new tensors.
    """
    size = count * shape[0] * shape[1]
    if torch.device(device).type != "cpu":
        return tuple(torch.empty((count, *shape), dtype=dtype, device=device) for _ in range(2))
    cache: dict[tuple[str, torch.dtype], Tensor] = _LOCAL.__dict__.setdefault("buffers", {})
    flat = cache.get((str(device), dtype))
    if flat is None or flat.numel() < 2 * size:
        cache[(str(device), dtype)] = flat = torch.empty(2 * size, dtype=dtype, device=device)
    return flat[:size].view(count, *shape), flat[size : 2 * size].view(count, *shape)


def clear_workspace() -> None:
    """Free the buffers :func:`polar_stack` keeps for reuse on CPU (this thread's).

    They hold two copies of the largest bucket (same-shape matrices orthogonalised together) in the
    Newton–Schulz dtype: with bfloat16 4 bytes per element of that bucket. The next call allocates
    them again.

    Example:
        >>> _ = orthogonalize(torch.randn(4, 8), dtype=torch.float32)
        >>> clear_workspace()
    """
    _LOCAL.__dict__.pop("buffers", None)


def _scaled_copy(matrices: Tensor | Sequence[Tensor], X: Tensor, preset: NSPreset) -> None:
    """``M / (||M||_F * norm_scale + norm_eps)`` of each matrix ``M`` into the stack ``X`` (its dtype).

    Into a wider or same-range dtype (float32 to bfloat16, float32 to float64): cast first, then
    the norms of the cast values and an in-place multiply, so the result depends on the input
    only through its cast (DDP and FSDP2 send the inputs in that dtype: exact) and no float32
    temporary is made. Into the same dtype, or into float16, whose narrow range needs the scaling
    before the cast: norms of the inputs, then one multiply into the stack. Norms are taken per
    row and combined in float64 (torch's one-pass float32 norm of a 768 x 3072 matrix was 4e-5
    off, relative; the rows' norms combined 2e-10); only if one overflows (entries beyond about
    1e19) are they recomputed in float64. The scale itself is never rounded to a 16-bit dtype.
    """
    mats = list(matrices)
    first = mats[0]
    narrow = torch.finfo(X.dtype).max < 0.5 * torch.finfo(first.dtype).max  # float16
    cast_first = X.dtype != first.dtype and not narrow
    if cast_first:
        for x, source in zip(X, mats):
            x.copy_(source)
    sources = list(X) if cast_first else mats
    rows = torch.stack([torch.linalg.vector_norm(m, dim=-1) for m in sources])
    if not bool(rows.isfinite().all()):  # one host sync; entries beyond ~1e19 overflow a float32 norm
        rows = torch.stack([torch.linalg.vector_norm(m, dim=-1, dtype=torch.float64) for m in sources])
    norms = torch.linalg.vector_norm(rows.double(), dim=-1)
    scale = (1.0 / (norms * preset.norm_scale + preset.norm_eps)).to(
        torch.promote_types(sources[0].dtype, torch.float32)
    )
    for x, source, factor in zip(X, sources, scale):
        if cast_first:
            x.mul_(factor)  # a 0-dim float32 factor: applied unrounded, no temporary
        else:
            torch.mul(source, factor, out=x)


def ns_flops(m: int, n: int, steps: int, method: str | None = None) -> int:
    """Floating-point operations of ``steps`` Newton–Schulz iterations on one m x n matrix.

    ``method`` matters only for the Gram methods (:data:`GRAM_METHODS`), which trade the per-step
    ``k x n`` products for ``k x k`` ones plus a few ``k x n`` products at the start, restarts and end.

    Example:
        >>> ns_flops(768, 3072, 5) / ns_flops(768, 3072, 5, "gram_polar_express")
        1.5
    """
    m, n = min(m, n), max(m, n)
    if method in GRAM_METHODS:
        restarts = GRAM_METHODS[method].restart_steps(steps)
        total = 2 * m * m * n * (2 + 2 * len(restarts))  # R = X X^T and Q X at the start, each restart, the end
        for i in range(steps):
            total += 2 * m**3  # Z = b R + c R^2
            total += 0 if i == 0 or i in restarts else 2 * m**3  # Q <- a Q + Q Z
            total += 4 * m**3 if i < steps - 1 and i + 1 not in restarts else 0  # R Z, Z (R Z)
        return total
    per_step = 2 * m * m * n + 2 * m * m * m + 2 * m * m * n  # X X^T, A A, B X
    return steps * per_step
