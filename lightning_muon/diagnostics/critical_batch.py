"""Critical batch size: the gradient noise scale and Muon's critical batch size.

Plain torch, no Lightning. :func:`noise_scale` is McCandlish et al.'s B_simple from squared
gradient norms at two batch sizes. For Muon, :func:`muon_critical_batch_size` is the batch at
which gradient noise halves the progress of Muon's step (McCandlish et al.'s ``B_noise`` for the
polar update, with isotropic noise and curvature), from the mean gradient's spectrum, the
per-entry noise and the momentum; :func:`polar_deficits` and :func:`polar_perturbation` are the
first-order perturbation theory behind it, :func:`momentum_noise_factor` the noise left in the
momentum Muon orthogonalises. Derivations and Monte Carlo checks: ``docs/muon-theory.md``
section 3.

Example:
    >>> import torch
    >>> noise_scale(5.0, 2.0, 1, 4).b_simple  # |G|^2 = 1, tr Sigma = 4
    tensor(4.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .spectral import singular_values

__all__ = [
    "CRITICAL_BATCH_METHODS",
    "CriticalBatch",
    "NoiseScale",
    "momentum_noise_factor",
    "muon_critical_batch_size",
    "noise_scale",
    "polar_deficits",
    "polar_perturbation",
    "polar_sensitivity",
]

#: ``method`` of :func:`muon_critical_batch_size`
CRITICAL_BATCH_METHODS = ("saturating", "first_order", "paper")
_ROWS = 256  # rows of the pairwise (k x k) sums computed at a time (bounds the temporary for wide layers)


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


def momentum_noise_factor(momentum: float, nesterov: bool = False, steps: int | None = None) -> float:
    """Noise-to-signal variance of the direction Muon orthogonalises, per unit of gradient noise.

    The direction is a weighted sum ``u = sum_s w_s g_s`` of the gradients so far (EMA
    ``buf <- beta buf + (1 - beta) g``, and with ``nesterov`` ``u = (1 - beta) g + beta buf``).
    With independent gradient noise of variance ``v`` per step and a constant mean gradient,
    ``u / sum_s w_s`` has noise variance ``v * sum_s w_s^2 / (sum_s w_s)^2``: this factor. After
    ``steps`` gradients (``None``: stationary, infinitely many) it is

    * EMA: ``(1 - beta) / (1 + beta) * (1 - beta^(2t)) / (1 - beta^t)^2`` (stationary
      ``(1 - beta) / (1 + beta)``: the paper's factor);
    * Nesterov: ``(1 - beta)^2 ((1 + beta)^2 + beta^4 (1 - beta^(2t - 2)) / (1 - beta^2)) /
      (1 - beta^(t + 1))^2`` (stationary ``(1 - beta)(1 + 2 beta - 2 beta^3) / (1 + beta)``).

    Both are 1 at ``steps=1`` (the first direction is the gradient itself) and for ``beta = 0``.

    Example:
        >>> round(momentum_noise_factor(0.95), 4), round(momentum_noise_factor(0.95, nesterov=True), 4)
        (0.0256, 0.0304)
        >>> momentum_noise_factor(0.95, nesterov=True, steps=1)
        1.0
    """
    if not (isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0 <= momentum < 1):
        raise ValueError(f"momentum_noise_factor: momentum must be a number in [0, 1), got {momentum!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"momentum_noise_factor: steps must be an integer >= 1 or None, got {steps!r}")
    b = float(momentum)
    if b == 0.0:
        return 1.0
    tail = 0.0 if steps is None else b ** (2 * steps)  # beta^(2t)
    if not nesterov:  # weights (1 - b) b^(t - s), s = 1..t
        total = 1.0 - (0.0 if steps is None else b**steps)
        squares = (1 - b) ** 2 * (1 - tail) / (1 - b * b)
    else:  # weights (1 - b)(1 + b) on g_t, (1 - b) b^(t - s + 1) on g_s for s < t
        total = 1.0 - (0.0 if steps is None else b ** (steps + 1))
        older = 0.0 if steps == 1 else b**4 * (1 - tail / (b * b)) / (1 - b * b)
        squares = (1 - b) ** 2 * ((1 + b) ** 2 + older)
    return min(1.0, squares / total**2)


def _as_singular_values(mu: Tensor, singular_values_: Tensor | None) -> Tensor:
    s = singular_values(mu) if singular_values_ is None else singular_values_
    return s.double()


def _deficits(s: Tensor, m: int, n: int) -> Tensor:
    """``d_i = sum_{j != i} 1 / (s_i + s_j)^2 + |m - n| / (2 s_i^2)`` for ``s_i > 0`` (0 elsewhere).

    ``s`` (..., k) float64; zeros are null directions of mu (partners, no deficit of their own).
    """
    k = s.shape[-1]
    pos = s > 0
    safe = torch.where(pos, s, torch.ones_like(s))
    out = torch.empty_like(s)
    for lo in range(0, k, _ROWS):  # rows i in [lo, hi): a (..., rows, k) temporary at a time
        hi = min(k, lo + _ROWS)
        si = safe[..., lo:hi, None]
        pair = 1.0 / (si + s[..., None, :]).square()
        own = torch.arange(lo, hi, device=s.device)
        pair[..., torch.arange(hi - lo, device=s.device), own] = 0.0  # j != i
        out[..., lo:hi] = pair.sum(-1)
    out = out + abs(m - n) / (2 * safe.square())
    return torch.where(pos, out, torch.zeros_like(out))


def _kept(s: Tensor, threshold: Tensor | float | None) -> Tensor:
    if threshold is None:  # numerical rank (singular_values zeroes what is below its accuracy)
        threshold = 0.0
    threshold = torch.as_tensor(threshold, dtype=s.dtype, device=s.device)
    if threshold.ndim:
        threshold = threshold.unsqueeze(-1)
    return s > threshold


def polar_deficits(mu: Tensor, threshold: float | Tensor | None = None) -> Tensor:
    """First-order noise deficit ``d_i`` of each singular direction of ``mu``'s polar factor, ``(..., k)``.

    For ``mu = sum_i s_i u_i v_i^T`` (``m x n``, ``k = min(m, n)``) and noise ``E`` with i.i.d.
    entries of variance ``eps^2``, ``E[1 - u_i^T polar(mu + E) v_i] = eps^2 d_i + O(eps^4)`` with

        d_i = sum_{j != i} 1 / (s_i + s_j)^2 + |m - n| / (2 s_i^2),

    ``j`` over all ``k`` singular values, zeros included (a null direction of a rank-deficient
    ``mu`` tilts ``u_i`` and ``v_i`` like a partner with ``s_j = 0``); ``|m - n|`` counts the
    directions outside the smaller side. Singular values at or below ``threshold`` (``None``: the
    numerical rank) are null directions: their own ``d_i`` is 0 (their direction is not defined
    by ``mu``). ``docs/muon-theory.md`` section 3 derives it; the tests check it against Monte Carlo.

    Example:
        >>> polar_deficits(torch.eye(3))  # flat square: 2 partners at 1 / (1 + 1)^2
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)
        >>> polar_deficits(torch.ones(1, 5))  # one direction, 4 extra columns: 4 / (2 * 5)
        tensor([0.4000], dtype=torch.float64)
    """
    s = singular_values(mu).double()
    s = torch.where(_kept(s, threshold), s, torch.zeros_like(s))
    return _deficits(s, *mu.shape[-2:])


def polar_perturbation(mu: Tensor, threshold: float | Tensor | None = None) -> Tensor:
    """``K(mu)``: the first-order squared perturbation of Muon's polar factor per unit noise variance.

    ``E||polar(mu + E) - polar(mu)||_F^2 = (k - r) + eps^2 K(mu) + O(eps^3)`` for i.i.d. noise of
    variance ``eps^2``, with ``K = 2 sum_i d_i`` (:func:`polar_deficits`), ``r`` the rank of ``mu``
    and ``polar(mu) = sum_{s_i > 0} u_i v_i^T``. The ``k - r`` null directions of a rank-deficient
    ``mu`` each gain a unit singular value of pure noise, at any noise level. For a square,
    full-rank ``mu`` it is the paper's ``2 S(mu)`` (:func:`polar_sensitivity`); a wide or tall
    ``mu`` adds ``|m - n| sum_i 1 / s_i^2``.

    Example:
        >>> polar_perturbation(2 * torch.eye(4)), 2 * polar_sensitivity(2 * torch.eye(4))  # square: 2 S
        (tensor(1.5000, dtype=torch.float64), tensor(1.5000))
    """
    return 2 * polar_deficits(mu, threshold).sum(-1)


def polar_sensitivity(mu: Tensor, threshold: float | Tensor | None = None) -> Tensor:
    """The paper's ``S(mu) = sum_{i != j} 1 / (s_i + s_j)^2`` over singular values ``s_i > threshold``.

    ``threshold=None`` keeps the numerical rank. A flat spectrum of ``r`` values ``s0`` gives
    ``r (r - 1) / (4 s0^2)``. ``2 S`` is the first-order perturbation of a square, full-rank
    ``mu``'s polar factor; :func:`polar_perturbation` is the general one (rectangular and
    rank-deficient ``mu``).
    """
    s = singular_values(mu)
    keep = _kept(s, threshold)
    pair = 1.0 / (s.unsqueeze(-1) + s.unsqueeze(-2)).clamp_min(1e-30).square()
    mask = keep.unsqueeze(-1) & keep.unsqueeze(-2)
    mask = mask & ~torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    return torch.where(mask, pair, torch.zeros_like(pair)).sum((-2, -1))


def _denoise(s_hat: Tensor, eps2: Tensor, m: int, n: int) -> Tensor:
    """Singular values of the mean from those of ``mean + noise`` (i.i.d. variance ``eps2``): 0 up to
    the noise edge ``sqrt(eps2) (sqrt m + sqrt n)``, above it the inverse of the spiked-model map
    ``s_hat^2 = (s^2 + eps2 m)(s^2 + eps2 n) / s^2``."""
    e2 = eps2.unsqueeze(-1)
    a = s_hat.square() - e2 * (m + n)
    disc = (a.square() - 4 * e2.square() * m * n).clamp_min(0)
    s = ((a + disc.sqrt()) / 2).clamp_min(0).sqrt()
    edge = e2.sqrt() * (m**0.5 + n**0.5)
    return torch.where(s_hat > edge, s, torch.zeros_like(s))


def _saturating(s: Tensor, d: Tensor) -> Tensor:
    """``x`` with ``sum_i s_i (1 + 2 d_i / x)^(-1/2) = sum_i s_i / sqrt(2)`` (NaN where ``s`` is all zero)."""
    pos = s > 0
    nuc = s.sum(-1)
    big = torch.where(pos, d, torch.full_like(d, -math.inf)).amax(-1)
    small = torch.where(pos, d, torch.full_like(d, math.inf)).amin(-1)
    lo, hi = (2 / 3) * small, 2 * big  # every term <= 1/2 at lo, >= 1/sqrt(2) at hi
    ok = pos.any(-1)
    lo, hi = torch.where(ok, lo, torch.ones_like(lo)), torch.where(ok, hi, torch.ones_like(hi))
    for _ in range(64):  # bisection in log x: (hi / lo)^(2^-64) relative precision
        mid = (lo * hi).sqrt()
        x = mid.unsqueeze(-1)
        value = (s * torch.rsqrt(1 + 2 * d / x)).sum(-1)
        up = value < nuc / math.sqrt(2)
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return torch.where(ok, (lo * hi).sqrt(), torch.full_like(lo, math.nan))


class CriticalBatch(NamedTuple):
    """Muon's ``b_crit = noise_factor * sigma2 * sensitivity`` with its inputs.

    ``rank``: singular values of the mean gradient used (above the noise edge); ``sigma2``: the
    per-entry, per-example gradient noise; ``sensitivity``: the spectrum's sensitivity to noise
    (``1 / gradient^2`` units, see :func:`muon_critical_batch_size`); ``noise_factor``: the
    momentum factor (:func:`momentum_noise_factor`, stationary); ``nuclear_norm``: ``||mu||_*`` of
    the singular values used (after the noise correction), the weight of this matrix in a
    model-level estimate.
    """

    b_crit: Tensor
    rank: Tensor
    sigma2: Tensor
    sensitivity: Tensor
    noise_factor: Tensor
    nuclear_norm: Tensor


def muon_critical_batch_size(
    mu: Tensor,
    sigma2: Tensor | float,
    *,
    momentum: float = 0.0,
    batch_size: float | Tensor | None = None,
    singular_values_: Tensor | None = None,
    nesterov: bool = False,
    method: str = "saturating",
) -> CriticalBatch:
    """Muon's critical batch size: the batch at which gradient noise halves the progress of its step.

    Muon steps along ``P(u)``, the polar factor of the momentum ``u`` of batch gradients. With
    isotropic curvature (the assumption behind B_simple) the best step along ``P(u)`` decreases
    the loss by ``<mu, E P(u)>^2 / (2 h E||P(u)||^2)``; gradient noise leaves ``||P(u)||`` alone
    and shrinks the alignment ``R = <mu, E P(u)> / ||mu||_*``. ``b_crit`` is the batch at which
    ``R^2 = 1/2``: there Muon needs twice the steps of a noise-free batch, which is McCandlish et
    al.'s ``B_noise`` in ``S = S_min (1 + B_noise / B)``. With per-entry noise
    ``noise_factor * sigma2 / B`` in ``u`` and the deficits ``d_i`` of :func:`polar_deficits`,
    ``b_crit = noise_factor * sigma2 * sensitivity`` where ``sensitivity`` is, by ``method``:

    * ``"saturating"`` (default): the root ``x`` of ``sum_i s_i (1 + 2 d_i / x)^(-1/2) =
      ||mu||_* / sqrt(2)``: each direction's alignment ``(1 + 2 eps^2 d_i)^(-1/2)`` is exact to
      first order and in the wide limit, and stays in ``(0, 1]`` for directions drowned by the
      noise. Within 2x of Monte Carlo on the shapes and spectra of ``docs/muon-theory.md``.
    * ``"first_order"``: ``2 sum_i s_i d_i / ||mu||_*``, the limit of ``B (1 - R(B)^2)`` for large
      ``B``; dominated by small singular values (20x too large on an exponentially decaying spectrum).
    * ``"paper"``: the paper's Theorem 4, ``2 S(mu) / r`` over the kept singular values.

    All three equal the paper's ``2 S / r`` on a square mean gradient with a flat spectrum.

    Args:
        mu: the mean gradient (or a momentum buffer divided by the sum of its weights),
            ``(..., m, n)``.
        sigma2: per-entry, per-example gradient noise variance, e.g. ``tr(Sigma) / (m n)``.
        momentum: Muon's ``beta``; ``noise_factor`` is :func:`momentum_noise_factor` (stationary).
        batch_size: examples behind ``mu`` (for a momentum buffer, the batch divided by its
            :func:`momentum_noise_factor`); if given, ``mu`` is taken as the mean plus noise of
            variance ``sigma2 / batch_size``: singular values below the noise edge
            ``sqrt(sigma2 / batch_size) (sqrt m + sqrt n)`` are null directions and those above it
            are corrected for the noise (``"paper"``: left out, not corrected). Else ``mu`` is the
            mean itself (its numerical rank).
        singular_values_: ``mu``'s singular values if already computed (skips the decomposition).
        nesterov: the direction is Nesterov's ``(1 - beta) g + beta buf`` (Muon's default).
        method: ``"saturating"``, ``"first_order"`` or ``"paper"``.

    ``rank = 0`` (nothing above the noise) gives a NaN ``b_crit``: the monitors log nothing then.

    Example (a flat spectrum ``s0 = 2``, ``r = 4``: ``2 S / r = (r - 1) / (2 s0^2) = 0.375``; the
    EMA factor ``0.05 / 1.95``, Nesterov's ``0.0304`` at ``beta = 0.95``):
        >>> est = muon_critical_batch_size(2 * torch.eye(4), sigma2=1.0)
        >>> est.b_crit, est.rank, est.sensitivity, est.noise_factor
        (tensor(0.3750), tensor(4.), tensor(0.3750), tensor(1.))
        >>> muon_critical_batch_size(2 * torch.eye(4), sigma2=1.0, momentum=0.95).b_crit
        tensor(0.0096)
        >>> muon_critical_batch_size(2 * torch.eye(4), sigma2=1.0, momentum=0.95, nesterov=True).b_crit
        tensor(0.0114)
    """
    if not (isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0 <= momentum < 1):
        raise ValueError(f"muon_critical_batch_size: momentum must be in [0, 1), got {momentum!r}")
    if method not in CRITICAL_BATCH_METHODS:
        raise ValueError(f"muon_critical_batch_size: method must be one of {CRITICAL_BATCH_METHODS}, got {method!r}")
    m, n = mu.shape[-2:]
    s_obs = singular_values(mu) if singular_values_ is None else singular_values_
    out_dtype = s_obs.dtype if s_obs.dtype == torch.float64 else torch.float32
    s_obs = s_obs.double()
    var = torch.as_tensor(sigma2, dtype=torch.float64, device=s_obs.device)
    factor = momentum_noise_factor(momentum, nesterov)
    if batch_size is None:
        s = s_obs
    else:
        eps2 = (var.clamp_min(0) / torch.as_tensor(batch_size, dtype=torch.float64, device=s_obs.device)).expand(
            s_obs.shape[:-1]
        )
        if method == "paper":  # the paper's noise edge: drop what is below it, keep the rest as observed
            edge = eps2.sqrt().unsqueeze(-1) * (m**0.5 + n**0.5)
            s = torch.where(s_obs > edge, s_obs, torch.zeros_like(s_obs))
        else:
            s = _denoise(s_obs, eps2, m, n)
    rank = (s > 0).sum(-1).to(torch.float64)
    if method == "paper":
        keep = s > 0
        pair = 1.0 / (s.unsqueeze(-1) + s.unsqueeze(-2)).clamp_min(1e-300).square()
        mask = keep.unsqueeze(-1) & keep.unsqueeze(-2) & ~torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
        S = torch.where(mask, pair, torch.zeros_like(pair)).sum((-2, -1))
        sensitivity = 2 * S / rank
    else:
        d = _deficits(s, m, n)
        sensitivity = 2 * (s * d).sum(-1) / s.sum(-1) if method == "first_order" else _saturating(s, d)
    sensitivity = torch.where(rank > 0, sensitivity, torch.full_like(sensitivity, math.nan))
    b = factor * var * sensitivity
    cast = lambda t: t.to(out_dtype)  # noqa: E731
    return CriticalBatch(
        cast(b),
        cast(rank),
        cast(var.expand_as(b)),
        cast(sensitivity),
        cast(torch.full_like(b, factor)),
        cast(s.sum(-1)),
    )
