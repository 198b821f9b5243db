"""The paper's controlled experiment: underdetermined matrix sensing with Muon vs gradient descent.

A rank-``rank`` target ``X*`` (``n x n``) is observed through ``p < n^2`` Gaussian measurements
``y_i = <A_i, X*>``. A single matrix ``W`` is trained on ``L(W) = 1/(2p) sum_i (<A_i, W> - y_i)^2``
from a small random init by

* ``muon_svd``: ``W <- W - lr_t * polar(G)``, the exact polar factor (``orthogonalize(G, "svd")``);
* ``muon_ns``: the same with Newton–Schulz (``orthogonalize(G, "polar_express")``, float32);
* ``gd``: ``W <- W - gd_lr * G``;
* ``gd_rescaled``: gradient descent with Muon's step length, ``W <- W - lr_t * ||polar(G)||_F G / ||G||_F``.

Muon's steps have a fixed length, so ``lr_t`` decays linearly to 0 (a discretised flow that lands
on the interpolation set; the final nuclear norm is insensitive to ``lr`` and ``steps``). In this
linear parametrisation gradient descent's end point does not depend on its step lengths (every
iterate stays in ``W0 + span(A_i)`` and converges to the projection of ``W0`` on the interpolation
set), so ``gd_rescaled`` lands where ``gd`` does: what separates Muon from GD is the direction of
its steps, not their size. The normalised spectral entropy of ``W`` is logged over time and the
final nuclear norms are compared with the minimum-nuclear-norm interpolant, solved with cvxpy.
Writes ``matrix_sensing.png``, ``matrix_sensing.md`` and ``matrix_sensing.json`` to ``--out``.

    python -m examples.matrix_sensing --out runs/matrix_sensing

Example (in Python):
    >>> from examples.matrix_sensing import make_problem, train, min_nuclear_norm_interpolant
    >>> problem = make_problem(n=20, rank=2, p=200, seed=0)
    >>> run = train(problem, "muon_svd", steps=500, lr=0.05)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lightning_muon import orthogonalize, spectral_entropy

__all__ = [
    "DECAYS",
    "METHODS",
    "SCHEDULES",
    "Problem",
    "Run",
    "ENSEMBLES",
    "make_problem",
    "make_regression_problem",
    "train",
    "min_nuclear_norm_interpolant",
    "normalized_spectral_entropy",
    "nuclear_norm",
    "main",
]

METHODS = ("muon_svd", "muon_ns", "gd", "gd_rescaled")
ENSEMBLES = ("gaussian", "rank_one", "entries")
SCHEDULES = ("linear", "constant")
DECAYS = ("decoupled", "coupled")


@dataclass(frozen=True)
class Problem:
    """Measurement operator ``A`` (``p x n x n``), target ``X*`` and measurements ``y = A(X*)``."""

    A: Tensor
    target: Tensor
    y: Tensor

    def measure(self, W: Tensor) -> Tensor:
        return torch.einsum("pij,ij->p", self.A, W)

    def residual(self, W: Tensor) -> float:
        """Relative measurement residual ``||A(W) - y|| / ||y||``."""
        return float(torch.linalg.vector_norm(self.measure(W) - self.y) / torch.linalg.vector_norm(self.y))

    def gradient(self, W: Tensor) -> Tensor:
        return torch.einsum("p,pij->ij", self.measure(W) - self.y, self.A) / len(self.y)


@dataclass
class Run:
    """A trained solution and its history (``steps``, ``entropy``, ``nuclear``, ``residual``)."""

    method: str
    W: Tensor
    steps: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    nuclear: list[float] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)
    probes: dict[str, list[float]] = field(default_factory=dict)


def normalized_spectral_entropy(W: Tensor) -> float:
    """``H / ln min(m, n)``, ``p_i = s_i / sum_j s_j``, in [0, 1]: ``lightning_muon.spectral_entropy``, a float."""
    return float(spectral_entropy(W))


def nuclear_norm(W: Tensor) -> float:
    return float(torch.linalg.matrix_norm(W, ord="nuc"))


def make_problem(
    n: int = 20,
    rank: int = 2,
    p: int = 200,
    seed: int = 0,
    *,
    underdetermined: bool = True,
    m: int | None = None,
    ensemble: str = "gaussian",
) -> Problem:
    """Target ``X* = L R^T / sqrt(n)`` (``m x n``, default square) with Gaussian ``m x rank`` and
    ``n x rank`` factors, observed through ``p`` measurements ``<A_i, X*>`` (float64).

    ``ensemble`` picks the ``A_i``: ``"gaussian"`` (i.i.d. entries), ``"rank_one"`` (``a_i b_i^T``,
    Gaussian vectors) or ``"entries"`` (``p`` distinct entries of ``X*``, matrix completion).
    ``underdetermined=False`` allows ``p >= m*n`` (an identifiable problem whose only interpolant
    is ``X*``). The regression reading of the paper's family is :func:`make_regression_problem`.
    """
    m = n if m is None else m
    for name, value in (("n", n), ("m", m), ("rank", rank), ("p", p)):
        if value < 1:
            raise ValueError(f"make_problem: {name} must be >= 1, got {value}")
    if rank > min(m, n):
        raise ValueError(f"make_problem: rank must be <= n, got rank={rank}, n={min(m, n)}")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"make_problem: ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if underdetermined and p >= m * n:
        raise ValueError(f"make_problem: p must be < n*n = {m * n} for an underdetermined problem, got {p}")
    if ensemble == "entries" and p > m * n:
        raise ValueError(f"make_problem: entry sampling needs p <= m*n = {m * n}, got {p}")
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(m, rank, generator=g, dtype=torch.float64)
    R = torch.randn(n, rank, generator=g, dtype=torch.float64)
    target = L @ R.T / math.sqrt(n)
    if ensemble == "gaussian":
        A = torch.randn(p, m, n, generator=g, dtype=torch.float64)
    elif ensemble == "rank_one":
        a = torch.randn(p, m, generator=g, dtype=torch.float64)
        b = torch.randn(p, n, generator=g, dtype=torch.float64)
        A = a[:, :, None] * b[:, None, :]
    else:
        idx = torch.randperm(m * n, generator=g)[:p]
        A = torch.zeros(p, m * n, dtype=torch.float64)
        A[torch.arange(p), idx] = math.sqrt(m * n)  # scaled so that E||A(X)||^2 / p = ||X||_F^2, as for Gaussians
        A = A.reshape(p, m, n)
    return Problem(A=A, target=target, y=torch.einsum("pij,ij->p", A, target))


def make_regression_problem(
    outputs: int = 6, features: int = 10, samples: int = 6, rank: int = 2, seed: int = 0
) -> Problem:
    """Multi-output linear regression ``W X = Y`` as a sensing problem: ``W`` is ``outputs x
    features``, ``X`` (``features x samples``) Gaussian data, ``Y = W* X`` with a rank-``rank``
    ``W* = L R^T / sqrt(features)``. Each entry ``Y_ij = <e_i x_j^T, W*>`` is one measurement, so
    ``p = outputs * samples`` and the loss is ``||W X - Y||_F^2 / (2 p)``.

    With fewer samples than features it is underdetermined: every interpolant is ``Y X^+ + Z`` with
    ``Z X = 0``, and ``||Y X^+ + Z||_* >= ||Y X^+||_*`` (``X^+ X`` is a projection), so the minimum-
    nuclear-norm interpolant is ``Y X^+``, which gradient descent from zero also reaches.

    Example:
        >>> pr = make_regression_problem(outputs=6, features=10, samples=6, seed=0)
        >>> tuple(pr.A.shape), tuple(pr.target.shape)
        ((36, 6, 10), (6, 10))
    """
    for name, value in (("outputs", outputs), ("features", features), ("samples", samples), ("rank", rank)):
        if value < 1:
            raise ValueError(f"make_regression_problem: {name} must be >= 1, got {value}")
    if rank > min(outputs, features):
        raise ValueError(f"make_regression_problem: rank must be <= min(outputs, features), got {rank}")
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(outputs, rank, generator=g, dtype=torch.float64)
    R = torch.randn(features, rank, generator=g, dtype=torch.float64)
    target = L @ R.T / math.sqrt(features)
    X = torch.randn(features, samples, generator=g, dtype=torch.float64)
    eye = torch.eye(outputs, dtype=torch.float64)
    A = (eye[:, None, :, None] * X.T[None, :, None, :]).reshape(outputs * samples, outputs, features)
    return Problem(A=A, target=target, y=torch.einsum("pij,ij->p", A, target))


def train(
    problem: Problem,
    method: str,
    *,
    steps: int = 1000,
    lr: float = 0.03,
    gd_lr: float = 0.1,
    init_scale: float = 1e-3,
    seed: int = 0,
    log_every: int = 10,
    init: Tensor | None = None,
    schedule: str = "linear",
    weight_decay: float = 0.0,
    decay: str = "decoupled",
    probes: dict[str, Callable[[Tensor], float]] | None = None,
) -> Run:
    """Train ``W`` (the target's shape) from ``init`` (default ``init_scale * N(0, 1/n)``) with one of :data:`METHODS`.

    ``lr`` is the initial step length of the Muon-type methods (decayed linearly to 0 over
    ``steps`` with ``schedule="linear"``, held with ``"constant"``); ``gd_lr`` is plain gradient
    descent's constant step size. ``weight_decay`` λ is applied ``decay="decoupled"`` (``W <- (1 -
    lr_t λ) W - lr_t step``) or ``"coupled"`` (``λ W`` added to the gradient before the polar map).
    ``probes`` maps names to functions of ``W`` recorded at every logged step in ``run.probes``.
    """
    if method not in METHODS:
        raise ValueError(f"train: method must be one of {METHODS}, got {method!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"train: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if decay not in DECAYS:
        raise ValueError(f"train: decay must be one of {DECAYS}, got {decay!r}")
    if weight_decay < 0:
        raise ValueError(f"train: weight_decay must be >= 0, got {weight_decay}")
    if steps < 1 or log_every < 1:
        raise ValueError(f"train: steps and log_every must be >= 1, got steps={steps}, log_every={log_every}")
    m, n = problem.target.shape
    if init is None:
        g = torch.Generator().manual_seed(seed + 1)
        W = init_scale * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    elif init.shape != (m, n):
        raise ValueError(f"train: init must have shape {(m, n)}, got {tuple(init.shape)}")
    else:
        W = init.to(torch.float64).clone()
    run = Run(method, W, probes={name: [] for name in probes or {}})

    def log(t: int) -> None:
        run.steps.append(t)
        run.entropy.append(normalized_spectral_entropy(W))
        run.nuclear.append(nuclear_norm(W))
        run.residual.append(problem.residual(W))
        for name, fn in (probes or {}).items():
            run.probes[name].append(float(fn(W)))

    log(0)
    for t in range(steps):
        G = problem.gradient(W)
        lr_t = lr * (1 - t / steps) if schedule == "linear" else lr
        if weight_decay and decay == "coupled":
            G = G + weight_decay * W
        elif weight_decay:
            W = W * (1 - (gd_lr if method == "gd" else lr_t) * weight_decay)
        if method == "gd":
            W = W - gd_lr * G
        elif method == "muon_ns":
            W = W - lr_t * orthogonalize(G, "polar_express", dtype=torch.float32)
        else:
            P = orthogonalize(G, "svd")
            if method == "muon_svd":
                W = W - lr_t * P
            else:  # gd_rescaled
                W = W - lr_t * torch.linalg.matrix_norm(P) / torch.linalg.matrix_norm(G).clamp_min(1e-300) * G
        if (t + 1) % log_every == 0 or t + 1 == steps:
            log(t + 1)
    run.W = W
    return run


def min_nuclear_norm_interpolant(problem: Problem, solver: str = "CLARABEL") -> Tensor:
    """``argmin ||X||_* s.t. <A_i, X> = y_i`` (a semidefinite program, solved with cvxpy)."""
    import cvxpy as cp

    p, m, n = problem.A.shape
    X = cp.Variable((m, n))
    A = problem.A.reshape(p, m * n).numpy()  # row-major, matching reshape(X, order="C")
    constraints = [A @ cp.reshape(X, (m * n,), order="C") == problem.y.numpy()]
    cp.Problem(cp.Minimize(cp.normNuc(X)), constraints).solve(solver=solver)
    if X.value is None:
        raise RuntimeError(f"min_nuclear_norm_interpolant: solver {solver} found no solution")
    return torch.from_numpy(X.value).to(torch.float64)


def _report(problem: Problem, runs: list[Run], X_min: Tensor) -> tuple[str, dict]:
    nuc_min = nuclear_norm(X_min)
    rows = [("min-nuclear-norm interpolant (cvxpy)", X_min)] + [(r.method, r.W) for r in runs]
    table = [
        "| solution | nuclear norm | / minimum | normalised entropy | rel. residual | rel. error to X* |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for name, W in rows:
        nuc = nuclear_norm(W)
        entry = dict(
            nuclear_norm=nuc,
            ratio_to_min=nuc / nuc_min,
            entropy=normalized_spectral_entropy(W),
            residual=problem.residual(W),
            error=float(torch.linalg.matrix_norm(W - problem.target) / torch.linalg.matrix_norm(problem.target)),
        )
        summary[name] = entry
        table.append(
            f"| {name} | {nuc:.3f} | {entry['ratio_to_min']:.3f} | {entry['entropy']:.3f} | "
            f"{entry['residual']:.1e} | {entry['error']:.3f} |"
        )
    summary["target"] = dict(
        nuclear_norm=nuclear_norm(problem.target), entropy=normalized_spectral_entropy(problem.target)
    )
    table.append(
        f"\nTarget X*: nuclear norm {summary['target']['nuclear_norm']:.3f}, "
        f"normalised entropy {summary['target']['entropy']:.3f}."
    )
    return "\n".join(table) + "\n", summary


def _plot(runs: list[Run], X_min: Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_n, ax_r) = plt.subplots(1, 3, figsize=(15, 4))
    for r in runs:
        style = dict(label=r.method, ls=":" if r.method in ("muon_ns", "gd_rescaled") else "-")
        ax_h.plot(r.steps, r.entropy, **style)
        ax_n.plot(r.steps, r.nuclear, **style)
        ax_r.semilogy(r.steps, r.residual, **style)
    ax_n.axhline(nuclear_norm(X_min), color="k", ls="--", lw=1, label="min-nuclear interpolant")
    ax_h.set(
        xlabel="step",
        ylabel="H / ln n",
        title=f"Normalised spectral entropy of W\n(min-nuclear interpolant: {normalized_spectral_entropy(X_min):.2f})",
    )
    ax_n.set(xlabel="step", ylabel="||W||_*", title="Nuclear norm")
    ax_r.set(xlabel="step", ylabel="||A(W) - y|| / ||y||", title="Measurement residual")
    for ax in (ax_h, ax_n, ax_r):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run every method, solve the convex problem, write the plot, table and JSON; return the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="matrix side")
    ap.add_argument("--rank", type=int, default=2, help="rank of the target")
    ap.add_argument("--p", type=int, default=200, help="number of Gaussian measurements")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.03, help="initial step length of the Muon-type methods")
    ap.add_argument("--gd-lr", type=float, default=0.1, help="step size of plain gradient descent")
    ap.add_argument("--init-scale", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solver", default="CLARABEL", help="cvxpy solver (CLARABEL or SCS)")
    ap.add_argument("--out", type=Path, default=Path("runs/matrix_sensing"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 20 x 20 matrices: extra threads only add synchronisation

    problem = make_problem(args.n, args.rank, args.p, args.seed)
    runs = [
        train(
            problem,
            m,
            steps=args.steps,
            lr=args.lr,
            gd_lr=args.gd_lr,
            init_scale=args.init_scale,
            seed=args.seed,
            log_every=max(1, args.steps // 200),
        )
        for m in METHODS
    ]
    X_min = min_nuclear_norm_interpolant(problem, args.solver)
    table, summary = _report(problem, runs, X_min)
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(runs, X_min, args.out / "matrix_sensing.png")
    header = (
        f"# Matrix sensing: n={args.n}, rank={args.rank}, p={args.p}, steps={args.steps}, "
        f"lr={args.lr}, gd_lr={args.gd_lr}, init_scale={args.init_scale}, seed={args.seed}\n\n"
    )
    (args.out / "matrix_sensing.md").write_text(header + table)
    (args.out / "matrix_sensing.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary}, indent=2)
    )
    print(header + table)
    return summary


if __name__ == "__main__":
    main()
