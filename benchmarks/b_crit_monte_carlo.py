"""Muon's critical batch size: the closed forms of docs/muon-theory.md section 3 against Monte Carlo.

Not a timing benchmark: it prints the tables of ``docs/muon-theory.md`` section 3 (float64, exact
SVD polar factors, fixed seeds), so that every number there can be regenerated:

1. first-order coefficients ``K`` (squared perturbation) and ``2 sum s_i d_i`` (alignment) against
   ``E||P(mu + eps Z) - P(mu)||^2`` and ``E<mu, P(mu + eps Z)>`` at ``eps = 1e-3``;
2. the critical batch ``B*`` (``R(B*)^2 = 1/2``, bisection on Monte Carlo ``R``) against the
   saturating, first-order and paper estimates from the true mean, and the saturating and paper
   estimates from ``mu + noise`` observed at ``4 B*`` (median of 5 draws);
3. NorMuon's critical batch against Muon's (stationary row second moment).

    python -m benchmarks.b_crit_monte_carlo            # about 10 minutes on 2 CPU cores
    python -m benchmarks.b_crit_monte_carlo --quick    # fewer draws, one shape (tests)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from benchmarks._timing import markdown_table, run_header
from lightning_muon import muon_critical_batch_size, polar_deficits, polar_perturbation, polar_sensitivity

SHAPES = {"12 x 12": (12, 12), "8 x 32": (8, 32), "32 x 8": (32, 8)}
SPECTRA: dict[str, Callable[[int], torch.Tensor]] = {
    "flat": lambda k: torch.ones(k, dtype=torch.float64),
    "linear": lambda k: torch.linspace(2.0, 1.0, k, dtype=torch.float64),
    "power 1/i": lambda k: 1 / torch.arange(1, k + 1, dtype=torch.float64),
    "exponential": lambda k: torch.exp(-torch.arange(k, dtype=torch.float64) / 3),
    "rank 4": lambda k: torch.cat([torch.tensor([4.0, 3, 2, 1], dtype=torch.float64), torch.zeros(k - 4)]),
}


def mean_matrix(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An ``m x n`` matrix with singular values ``s`` and random frames (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * s) @ V.T


def polar(X: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def normuon(P: torch.Tensor) -> torch.Tensor:
    """NorMuon's rows normalised by their stationary mean square (over the draws), Frobenius norm kept."""
    v = P.square().mean(-1).mean(0) if P.ndim == 3 else P.square().mean(-1)
    N = P / v.sqrt()[..., :, None]
    return N * (P.norm(dim=(-2, -1)) / N.norm(dim=(-2, -1)))[..., None, None]


def alignment_sq(mu: torch.Tensor, B: float, Z: torch.Tensor, variant: str = "muon") -> float:
    """Monte Carlo ``R(B)^2``: the step's progress at batch B over its noise-free value."""
    step = polar(mu + Z / math.sqrt(B))
    ref = polar(mu)
    if variant == "normuon":
        step, ref = normuon(step), normuon(ref)
    return float((mu * step).sum((-2, -1)).mean() / (mu * ref).sum()) ** 2


def critical_batch(mu: torch.Tensor, guess: float, Z: torch.Tensor, variant: str = "muon", iters: int = 16) -> float:
    """``B*`` with ``R(B*)^2 = 1/2`` by bisection in log B within ``[guess / 30, 30 guess]``."""
    lo, hi = guess / 30, guess * 30
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if alignment_sq(mu, mid, Z, variant) < 0.5 else (lo, mid)
    return math.sqrt(lo * hi)


def first_order_table(draws: int, shapes: dict) -> list[tuple]:
    rows = []
    for label, (m, n) in shapes.items():
        k = min(m, n)
        for r in (k, k // 2):
            s = torch.linspace(2.0, 1.0, k, dtype=torch.float64)
            s[r:] = 0
            mu = mean_matrix(m, n, s)
            Z = torch.randn(draws, m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            eps = 1e-3
            P = polar(mu + eps * Z)
            U, sv, Vh = torch.linalg.svd(mu, full_matrices=False)
            keep = sv > 1e-9 * sv[0]
            P0 = U[:, keep] @ Vh[keep]
            K = ((P - P0).square().sum((-2, -1)) - (k - r)) / eps**2
            A = 2 * (s.sum() - (mu * P).sum((-2, -1))) / eps**2
            se = lambda x: float(x.std()) / math.sqrt(draws)  # noqa: E731
            rows.append(
                (
                    label,
                    r,
                    f"{float(K.mean()):.1f} ± {se(K):.1f}",
                    f"{float(polar_perturbation(mu)):.1f}",
                    f"{2 * float(polar_sensitivity(mu.float())):.1f}",
                    f"{float(A.mean()):.1f} ± {se(A):.1f}",
                    f"{float(2 * (torch.linalg.svdvals(mu) * polar_deficits(mu)).sum()):.1f}",
                )
            )
    return rows


def critical_batch_table(draws: int, shapes: dict, iters: int) -> list[tuple]:
    rows = []
    for label, (m, n) in shapes.items():
        for name, spectrum in SPECTRA.items():
            mu = mean_matrix(m, n, spectrum(min(m, n)))
            Z = torch.randn(draws, m, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            sat = float(muon_critical_batch_size(mu, 1.0).b_crit)
            B = critical_batch(mu, sat, Z, iters=iters)
            first = float(muon_critical_batch_size(mu, 1.0, method="first_order").b_crit)
            paper = float(muon_critical_batch_size(mu, 1.0, method="paper").b_crit)
            observed = []
            for seed in range(5):
                noise = torch.randn(m, n, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
                G = mu + noise / math.sqrt(4 * B)
                observed.append(
                    [
                        float(muon_critical_batch_size(G, 1.0, batch_size=4 * B).b_crit),
                        float(muon_critical_batch_size(G, 1.0, batch_size=4 * B, method="paper").b_crit),
                    ]
                )
            obs = torch.tensor(observed).median(0).values
            rows.append((label, name, B, sat / B, first / B, paper / B, float(obs[0]) / B, float(obs[1]) / B))
    return rows


def normuon_table(draws: int, iters: int) -> list[tuple]:
    rows = []
    for label, (m, n) in SHAPES.items():
        for name in ("linear", "power 1/i", "rank 4"):
            mu = mean_matrix(m, n, SPECTRA[name](min(m, n)))
            Z = torch.randn(draws, m, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            sat = float(muon_critical_batch_size(mu, 1.0).b_crit)
            a = critical_batch(mu, sat, Z, "muon", iters)
            b = critical_batch(mu, sat, Z, "normuon", iters)
            rows.append((label, name, a, b, b / a))
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[tuple]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws and one shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: one thread is fastest and independent of the machine's load
    print(run_header(torch.device("cpu"), "float64"))
    draws_first, draws, iters = (400, 60, 8) if args.quick else (4000, 300, 16)
    shapes = {"8 x 32": SHAPES["8 x 32"]} if args.quick else SHAPES
    tables = {
        "first_order": first_order_table(draws_first, shapes),
        "critical_batch": critical_batch_table(draws, shapes, iters),
    }
    print(f"\n1. First-order coefficients, eps = 1e-3, {draws_first} draws")
    print(
        markdown_table(
            ("shape", "rank", "K: MC", "K: formula", "paper 2S", "alignment: MC", "formula"), tables["first_order"]
        )
    )
    print(f"\n2. Critical batch B* (R^2 = 1/2, {draws} draws), estimates / B*, sigma^2 = 1, no momentum")
    print(
        markdown_table(
            ("shape", "spectrum", "B*", "saturating", "first order", "paper", "from mu+noise@4B*", "paper, edge cut"),
            tables["critical_batch"],
        )
    )
    if not args.quick:
        tables["normuon"] = normuon_table(draws, iters)
        print("\n3. NorMuon vs Muon critical batch (stationary second moment)")
        print(markdown_table(("shape", "spectrum", "Muon B*", "NorMuon B*", "ratio"), tables["normuon"]))
    return tables


if __name__ == "__main__":
    main()
