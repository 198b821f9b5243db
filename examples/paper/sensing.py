"""Matrix-sensing figures: the nuclear-norm gap (Fig. 3, every reading of its family) and the weight
decay phase diagram (Fig. 9/10).

Built on :mod:`examples.matrix_sensing` (problems, training loop, cvxpy minimum). The alignment
figures (7, 8, 11, 12) are :mod:`examples.paper.alignment`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from examples.matrix_sensing import (
    Problem,
    make_problem,
    make_regression_problem,
    min_nuclear_norm_interpolant,
    normalized_spectral_entropy,
    nuclear_norm,
    train,
)
from examples.paper._report import Claim, Row, Section, figure, mean_range, save

__all__ = [
    "READINGS",
    "acquisition_steps",
    "atsr",
    "fig3",
    "fig3_verdicts",
    "fig9",
    "fig9_verdicts",
    "gap_run",
    "reading_problem",
    "stable_gd_lr",
]

# The defaults every Fig. 3 run shares (our choices, stated in the report).
LR, STEPS, INIT, RANK = 0.03, 1000, 1e-3, 2

#: the readings of the paper's "10-seed family (p=n=6, d=10)" (the summary does not say which)
READINGS = {
    "square": "10x10 W, p=6 Gaussian measurements <A_i, W>",
    "regression": "regression W X = Y: W 6x10 (6 outputs, d=10 features), n=6 samples (36 measurements)",
    "rectangular": "6x10 W (n=6 rows, d=10 columns), p=6 Gaussian measurements",
}


def reading_problem(reading: str, seed: int) -> Problem:
    """The family's problem for ``seed`` under one of :data:`READINGS`."""
    if reading == "square":
        return make_problem(n=10, rank=RANK, p=6, seed=seed)
    if reading == "regression":
        return make_regression_problem(outputs=6, features=10, samples=6, rank=RANK, seed=seed)
    if reading == "rectangular":
        return make_problem(n=10, m=6, rank=RANK, p=6, seed=seed)
    raise ValueError(f"reading_problem: reading must be one of {list(READINGS)}, got {reading!r}")


def _rel(A: Tensor, B: Tensor) -> float:
    return float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))


def stable_gd_lr(problem: Problem) -> float:
    """``1 / L`` for the loss's smoothness ``L = lambda_max(A A^T) / p`` (GD converges for any step < 2/L)."""
    A = problem.A.reshape(len(problem.y), -1)
    return float(len(problem.y) / torch.linalg.eigvalsh(A @ A.T)[-1])


def gap_run(
    problem: Problem, nuc_min: float, methods: tuple[str, ...] = ("muon_svd", "gd", "gd_rescaled"), **kw
) -> dict[str, Any]:
    """Muon, GD and norm-matched GD on one problem: gaps to the nuclear-norm minimum, entropies,
    distances between the end points. ``methods[0]`` plays Muon's part (the tests pass the broken
    mechanism ``gd_rescaled`` there)."""
    runs = {
        m: train(problem, m, gd_lr=stable_gd_lr(problem), **kw) for m in dict.fromkeys((*methods, "gd", "gd_rescaled"))
    }
    muon = runs[methods[0]]
    first = len(muon.steps) // 4  # "non-diminishing": the gap a quarter into training vs at the end
    return dict(
        gap=nuclear_norm(muon.W) / nuc_min,
        gap_quarter=muon.nuclear[first] / nuc_min,
        step_quarter=muon.steps[first],
        gd_gap=nuclear_norm(runs["gd"].W) / nuc_min,
        resc_gap=nuclear_norm(runs["gd_rescaled"].W) / nuc_min,
        ent_muon=normalized_spectral_entropy(muon.W),
        ent_gd=normalized_spectral_entropy(runs["gd"].W),
        resc_to_muon=_rel(runs["gd_rescaled"].W, muon.W),
        resc_to_gd=_rel(runs["gd_rescaled"].W, runs["gd"].W),
        residual=muon.residual[-1],
        gd_residual=runs["gd"].residual[-1],
        curves={
            m: dict(steps=r.steps, nuclear=[v / nuc_min for v in r.nuclear], entropy=r.entropy) for m, r in runs.items()
        },
    )


def fig3_verdicts(large: list[dict], family: dict[str, list[dict]]) -> dict[str, str]:
    """Verdicts with the paper's thresholds: the large instance (1.44x, non-diminishing), the family
    per reading (1.29x-2.02x, mean 1.59x, zero seeds at the minimum) and the flattening / norm-matched
    GD claim.

    * large: reproduced when every seed is within 25% of 1.44x and the gap does not shrink (end >=
      95% of the gap a quarter in); partly when it stays above 1.05x and does not shrink.
    * family: reproduced when no seed is within 1% of the minimum and the mean is inside the paper's
      range 1.29-2.02; partly when no seed converges but the mean is outside; else not reproduced.
    * flattening: Muon's normalised entropy above GD's by more than 0.01 on every problem (the large
      instance and the square family) and norm-matched GD's end point closer to GD's than to Muon's.
    """
    gaps = [r["gap"] for r in large]
    steady = all(r["gap"] >= 0.95 * r["gap_quarter"] for r in large)
    if steady and all(abs(g / 1.44 - 1) <= 0.25 for g in gaps):
        v_large = "reproduced"
    elif steady and min(gaps) > 1.05:
        v_large = "partly"
    else:
        v_large = "not reproduced"
    out = {"large": v_large}
    for reading, runs in family.items():
        g = [r["gap"] for r in runs]
        mean = sum(g) / len(g)
        if min(g) >= 1.01 and 1.29 <= mean <= 2.02:
            out[reading] = "reproduced"
        elif min(g) >= 1.01:
            out[reading] = "partly"
        else:
            out[reading] = "not reproduced"
    every = large + family.get("square", [])
    flat = all(r["ent_muon"] > r["ent_gd"] + 0.01 for r in every)
    resc = all(r["resc_to_gd"] < r["resc_to_muon"] for r in every)
    out["flatten"] = "reproduced" if flat and resc else "partly" if flat or resc else "not reproduced"
    return out


def fig3(out: Path, quick: bool = False, workers: int = 1) -> Section:
    """Nuclear-norm gap: the large instance (d=20, p=50) and the 10-seed family under each reading."""
    t0 = time.perf_counter()
    steps = 300 if quick else STEPS
    lr = 0.1 if quick else LR
    kw = dict(steps=steps, lr=lr, log_every=max(1, steps // 100))
    seeds = range(3 if quick else 10)
    large = []
    for s in seeds:
        pr = make_problem(n=20, rank=RANK, p=50, seed=s)
        nmin = nuclear_norm(min_nuclear_norm_interpolant(pr))
        large.append({**gap_run(pr, nmin, seed=s, **kw), "nuc_muon": None, "nuc_min": nmin})
        large[-1]["nuc_muon"] = large[-1]["gap"] * nmin
    family: dict[str, list[dict]] = {}
    for reading in READINGS:
        family[reading] = []
        for s in seeds:
            pr = reading_problem(reading, s)
            family[reading].append(gap_run(pr, nuclear_norm(min_nuclear_norm_interpolant(pr)), seed=s, **kw))
    verdicts = fig3_verdicts(large, family)
    # ablations of our other choices, on the large instance, seed 0
    ablations = {}
    if not quick:
        big = make_problem(n=20, rank=RANK, p=50, seed=0)
        big_min = large[0]["nuc_min"]
        for name, problem, extra in (
            ("target rank 4 (default 2)", make_problem(n=20, rank=4, p=50, seed=0), {}),
            ("init scale 1e-1 (default 1e-3)", big, dict(init_scale=1e-1)),
            ("constant step 0.01 (default: 0.03 decayed linearly)", big, dict(schedule="constant", lr=0.01)),
            ("Newton-Schulz polar express, float32 (default: exact polar)", big, dict(method="muon_ns")),
        ):
            nmin = big_min if problem is big else nuclear_norm(min_nuclear_norm_interpolant(problem))
            res = train(problem, extra.pop("method", "muon_svd"), **{**kw, **extra})
            ablations[name] = (nuclear_norm(res.W) / nmin, res.residual[-1])

    fig, axes = figure(3)
    ax_g, ax_f, ax_h = axes
    for m, style in (("muon_svd", "-"), ("gd", "--"), ("gd_rescaled", ":")):
        c = large[0]["curves"][m]
        ax_g.plot(c["steps"], c["nuclear"], style, label=m)
        ax_h.plot(c["steps"], c["entropy"], style, label=m)
    ax_g.axhline(1.0, color="k", lw=0.8)
    ax_g.axhline(1.44, color="r", lw=0.8, ls="--", label="paper 1.44x")
    ax_g.set(title="large d=20, p=50, seed 0: ||W||_* / min", xlabel="step", ylim=(0, None))
    xs = list(seeds)
    for k, (reading, runs) in enumerate(family.items()):
        ax_f.plot([x + 0.2 * k for x in xs], [r["gap"] for r in runs], "o", label=f"Muon, {reading}")
    ax_f.plot(xs, [r["gd_gap"] for r in family["square"]], "kx", label="GD, square")
    ax_f.axhspan(1.29, 2.02, color="r", alpha=0.1, label="paper's range 1.29-2.02")
    ax_f.axhline(1.0, color="k", lw=0.8)
    ax_f.set(title="family p=n=6, d=10: final gap per seed", xlabel="seed")
    ax_h.set(title="large, seed 0: normalised spectral entropy", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=7)
    png = save(fig, out / "fig3_nuclear_gap.png")

    n = len(seeds)
    gaps_l = [r["gap"] for r in large]
    setting_l = f"d=20, p=50, rank {RANK}, {steps} steps, lr {lr} linear decay, init {INIT}, exact polar"
    rows = [
        Row(
            "large, seed 0: Muon ||W||_* vs cvxpy minimum",
            "≈ 20.3 vs. CVXPY minimum 14.1 (1.44×",
            f"{large[0]['nuc_muon']:.2f} vs {large[0]['nuc_min']:.2f} ({large[0]['gap']:.2f}x)",
            setting_l,
            "1",
        ),
        Row("large: Muon gap over seeds", "-", mean_range(gaps_l), setting_l, str(n)),
        Row(
            "large: gap a quarter into training -> end (seed 0)",
            "non-diminishing",
            f"{large[0]['gap_quarter']:.2f}x (step {large[0]['step_quarter']}) -> {large[0]['gap']:.2f}x",
            setting_l,
            "1",
        ),
        Row(
            "large: GD gap; norm-matched GD gap",
            "-",
            f"{mean_range([r['gd_gap'] for r in large])}; {mean_range([r['resc_gap'] for r in large])}",
            setting_l,
            str(n),
        ),
    ]
    for reading, runs in family.items():
        g = [r["gap"] for r in runs]
        rows += [
            Row(
                f"family, {reading} reading: Muon gap min-max, mean; seeds within 1% of the minimum",
                "gap ranges 1.29×–2.02× (mean 1.59×). Zero seeds converge to the nuclear-norm minimum.",
                f"{min(g):.2f}x-{max(g):.2f}x, mean {sum(g) / n:.2f}x; {sum(x < 1.01 for x in g)} of {n}",
                READINGS[reading],
                str(n),
            ),
            Row(
                f"family, {reading} reading: GD gap (mean)",
                "-",
                f"{sum(r['gd_gap'] for r in runs) / n:.2f}x",
                READINGS[reading],
                str(n),
            ),
        ]
    every = large + family["square"]
    rows += [
        Row(
            "normalised entropy: Muon above GD (problems)",
            "-",
            f"{sum(r['ent_muon'] > r['ent_gd'] for r in every)} of {len(every)}",
            "large + square family",
            str(len(every)),
        ),
        Row(
            "norm-matched GD: distance to GD's / to Muon's end point (relative)",
            "-",
            f"{max(r['resc_to_gd'] for r in every):.0e} (max) / {mean_range([r['resc_to_muon'] for r in every], 2)}",
            "large + square family",
            str(len(every)),
        ),
    ]
    rows += [
        Row(f"ablation: {k}", "-", f"gap {g:.2f}x (residual {r:.0e})", "large instance, seed 0", "1")
        for k, (g, r) in ablations.items()
    ]
    mean_sq = sum(r["gap"] for r in family["square"]) / n
    claims = [
        Claim(
            "Fig. 3 left",
            "fig3_large",
            f"seed 0: {large[0]['gap']:.2f}x ({large[0]['gap_quarter']:.2f}x a quarter in); {n} seeds "
            f"{min(gaps_l):.2f}-{max(gaps_l):.2f}x; GD alone {mean_range([r['gd_gap'] for r in large], 3)}x",
            verdicts["large"],
        ),
    ]
    for reading, runs in family.items():
        g = [r["gap"] for r in runs]
        claims.append(
            Claim(
                f"Fig. 3 right ({reading} reading)",
                "fig3_family",
                f"{min(g):.2f}x-{max(g):.2f}x, mean {sum(g) / n:.2f}x; {sum(x < 1.01 for x in g)} of {n} seeds at the "
                f"minimum (GD alone: mean {sum(r['gd_gap'] for r in runs) / n:.2f}x)",
                verdicts[reading],
            )
        )
    claims.append(
        Claim(
            "abstract (Fig. 3)",
            "abstract_flatten",
            f"Muon's normalised entropy above GD's on {sum(r['ent_muon'] > r['ent_gd'] for r in every)} of "
            f"{len(every)} "
            f"problems; norm-matched GD ends {max(r['resc_to_gd'] for r in every):.0e} from GD and "
            f"{min(r['resc_to_muon'] for r in every):.2f}-{max(r['resc_to_muon'] for r in every):.2f} from Muon",
            verdicts["flatten"],
        )
    )
    choices = [
        f"target X* = L R^T / sqrt(d), rank {RANK}, Gaussian factors; Gaussian A_i; ablation: rank 4.",
        f"init W0 = {INIT} N(0, 1/d); ablation: 1e-1.",
        f"Muon: exact polar factor, step length {lr} decayed linearly to 0 over {steps} steps (a discretised flow that "
        "lands on the interpolation set); ablations: a constant step 0.01, Newton-Schulz (polar express, float32).",
        "GD: constant step 1/L (L = lambda_max(A A^T)/p); norm-matched GD: GD's direction at Muon's step length "
        "lr_t ||polar(G)||_F. In this linear model every GD iterate stays in W0 + span(A_i), so any step sizes, "
        "norm-matched included, end at the same point: 'norm-matched GD does not reproduce Muon' is here the same "
        "statement as 'GD does not'.",
        f"the large instance over {n} seeds (the paper shows one); 'non-diminishing' = the gap at the end is at least "
        "95% of the gap a quarter into training.",
        "the family 'p=n=6, d=10' under three readings, all run: "
        + "; ".join(f"{k}: {v}" for k, v in READINGS.items()),
    ]
    notes = [
        "The regression reading cannot produce the paper's family: every gradient (W X - Y) X^T and its polar factor "
        "act only on the span of the 6 samples, so Muon's iterates keep W0's component outside it, and on the "
        "interpolation set that leaves exactly one point, Y X^+ + W0 (I - X X^+), the minimum-nuclear-norm "
        "interpolant up to the 1e-3 init. Measured: every seed at the minimum.",
        f"The size of the gap alone does not tell Muon from GD here: GD's own gap (large: "
        f"{mean_range([r['gd_gap'] for r in large], 3)}x; square family mean "
        f"{sum(r['gd_gap'] for r in family['square']) / n:.2f}x) is inside the paper's 1.29-2.02 range. "
        "What separates Muon is the flatter spectrum and the end point outside W0 + span(A_i) (Muon square family "
        f"mean "
        f"{mean_sq:.2f}x).",
    ]
    return Section(
        "fig3",
        "Fig. 3: nuclear-norm gap (Muon does not find the minimum-nuclear-norm interpolant)",
        rows,
        choices,
        notes,
        png=png,
        seconds=time.perf_counter() - t0,
        data=dict(
            large=[{k: v for k, v in r.items() if k != "curves"} for r in large],
            family={k: [{kk: vv for kk, vv in r.items() if kk != "curves"} for r in v] for k, v in family.items()},
            ablations=ablations,
            verdicts=verdicts,
            seeds=list(seeds),
            steps=steps,
            lr=lr,
        ),
        claims=claims,
    )


def _target_frames(problem: Problem, r: int) -> tuple[Tensor, Tensor]:
    U, _, Vh = torch.linalg.svd(problem.target)
    return U[:, :r], Vh[:r].T


WD_LAMBDAS = (0.0, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
WD_RANK, WD_STEPS, WD_LR = 4, 500, 0.05
WD_P_RATIO = 0.5


def acquisition_steps(steps: list[int], values: list[list[float]], frac: float = 0.9) -> list[int]:
    """For each series, the first logged step at which it reaches ``frac`` of its final value."""
    out = []
    for v in values:
        target = frac * v[-1]
        out.append(next(s for s, x in zip(steps, v) if (x >= target if v[-1] >= 0 else x <= target)))
    return out


def atsr(steps: list[int], values: list[list[float]]) -> float:
    """The stand-in for the paper's ATSR: last / first step at which a target singular value reaches 90%."""
    t = acquisition_steps(steps, values)
    return max(t) / max(min(t), 1)


def fig9_verdicts(atsr_mean: dict[str, dict[float, float]]) -> dict[str, str]:
    """What the paper's Fig. 9 words say, checked on the stand-in ATSR (thresholds: "explodes" =
    at least 2x the lambda=0 value at every lambda >= 1e-2; "nearly constant" = within 25% of the
    lambda=0 value at every lambda <= 1e-2). All three lambdas ranges must be present."""
    c, dc = atsr_mean["coupled"], atsr_mean["decoupled"]
    big = [lam for lam in c if lam >= 1e-2]
    small = [lam for lam in dc if 0 < lam <= 1e-2]
    exploded = [c[lam] >= 2 * c[0.0] for lam in big]
    flat = [abs(dc[lam] / dc[0.0] - 1) <= 0.25 for lam in small]
    return dict(
        coupled="reproduced" if all(exploded) else "partly" if any(exploded) else "not reproduced",
        decoupled="reproduced" if all(flat) else "partly" if any(flat) else "not reproduced",
    )


def fig9(out: Path, quick: bool = False, workers: int = 1, method: str = "muon_svd") -> Section:
    """Weight decay phase diagram: coupled vs decoupled over lambda (ATSR stand-in)."""
    t0 = time.perf_counter()
    lambdas = (0.0, 1e-2, 1e-1) if quick else WD_LAMBDAS
    seeds = range(2 if quick else 3)
    steps = 300 if quick else WD_STEPS
    res: dict[str, dict[float, list[float]]] = {"decoupled": {}, "coupled": {}}
    shrink: dict[str, dict[float, list[float]]] = {"decoupled": {}, "coupled": {}}
    examples = {}
    for s in seeds:
        d = 20
        pr = make_problem(n=d, rank=WD_RANK, p=int(WD_P_RATIO * d * d), seed=s, underdetermined=WD_P_RATIO < 1)
        U, V = _target_frames(pr, WD_RANK)
        s_star = torch.linalg.svdvals(pr.target)[:WD_RANK]
        probes = {f"a{i}": (lambda W, i=i, U=U, V=V: float(U[:, i] @ W @ V[:, i])) for i in range(WD_RANK)}
        for mode in res:
            for lam in lambdas:
                run = train(
                    pr,
                    method,
                    steps=steps,
                    lr=WD_LR,
                    seed=s,
                    log_every=2,
                    probes=probes,
                    weight_decay=lam,
                    decay=mode,
                )
                vals = [run.probes[f"a{i}"] for i in range(WD_RANK)]
                res[mode].setdefault(lam, []).append(atsr(run.steps, vals))
                shrink[mode].setdefault(lam, []).append(float(min(v[-1] / s_star[i] for i, v in enumerate(vals))))
                if s == 0:
                    examples[(mode, lam)] = (run.steps, vals)
    mean = {m: {lam: sum(v) / len(v) for lam, v in d.items()} for m, d in res.items()}
    big = [lam for lam in lambdas if lam == 0 or lam >= 1e-2]
    # ablation: the identifiable problem (p = 1.5 d^2) at lambda = 1e-2
    abl = {}
    if not quick:
        for mode in res:
            vals_ = []
            for s in seeds:
                pr = make_problem(n=20, rank=WD_RANK, p=600, seed=s, underdetermined=False)
                U, V = _target_frames(pr, WD_RANK)
                probes = {f"a{i}": (lambda W, i=i, U=U, V=V: float(U[:, i] @ W @ V[:, i])) for i in range(WD_RANK)}
                run = train(
                    pr,
                    "muon_svd",
                    steps=steps,
                    lr=WD_LR,
                    seed=s,
                    log_every=2,
                    probes=probes,
                    weight_decay=1e-2,
                    decay=mode,
                )
                vals_.append(atsr(run.steps, [run.probes[f"a{i}"] for i in range(WD_RANK)]))
            abl[mode] = sum(vals_) / len(vals_)

    fig, (ax_p, ax_c, ax_d) = figure(3)
    xs = [max(lam, 1e-4) for lam in lambdas]
    for mode, style in (("coupled", "o-"), ("decoupled", "s--")):
        ax_p.semilogx(xs, [mean[mode][lam] for lam in lambdas], style, label=mode)
    ax_p.set(title="ATSR stand-in vs lambda (lambda=0 at 1e-4)", xlabel="lambda", ylabel="t_last / t_first (90%)")
    ax_p.legend()
    lam_show = max(lambdas)
    for ax, mode in ((ax_c, "coupled"), (ax_d, "decoupled")):
        st, vals = examples[(mode, lam_show)]
        for i, v in enumerate(vals):
            ax.plot(st, v, label=f"u{i}^T W v{i}")
        ax.set(title=f"{mode}, lambda={lam_show}: target directions", xlabel="step")
        ax.legend(fontsize=8)
    png = save(fig, out / "fig9_weight_decay.png")
    setting = f"sensing d=20, p={WD_P_RATIO} d^2, rank {WD_RANK}, {steps} steps, lr {WD_LR} linear decay, exact polar"
    rows = [
        Row(
            f"ATSR stand-in, lambda={lam:g}: coupled / decoupled",
            "-",
            f"{mean['coupled'][lam]:.2f}x / {mean['decoupled'][lam]:.2f}x",
            setting,
            str(len(seeds)),
        )
        for lam in lambdas
    ]
    rows += [
        Row(
            f"smallest u_i^T W v_i / s_i at the end, lambda={lam:g}: coupled / decoupled",
            "-",
            f"{sum(shrink['coupled'][lam]) / len(seeds):.2f} / {sum(shrink['decoupled'][lam]) / len(seeds):.2f}",
            setting,
            str(len(seeds)),
        )
        for lam in big
    ]
    if abl:
        rows.append(
            Row(
                "ablation: identifiable p=1.5 d^2, lambda=0.01: coupled / decoupled",
                "-",
                f"{abl['coupled']:.2f}x / {abl['decoupled']:.2f}x",
                "otherwise as above",
                str(len(seeds)),
            )
        )
    choices = [
        "ATSR is not defined in the text we have. Stand-in: for each of the target's r=4 singular pairs "
        "(u_i, v_i), the step at which u_i^T W v_i first reaches 90% of its final value; ATSR = last / first of "
        "those steps (1 = all directions acquired together).",
        "coupled: W <- W - lr_t polar(G + lambda W); decoupled: W <- (1 - lr_t lambda) W - lr_t polar(G).",
        f"target rank {WD_RANK} (distinct singular values, so acquisition order is visible); lr {WD_LR} linear decay; "
        f"underdetermined p = {WD_P_RATIO} d^2 (ablation: the identifiable p = 1.5 d^2, where the gradient dominates "
        "lambda W and the contrast vanishes).",
    ]
    v = fig9_verdicts(mean)
    big_l = [lam for lam in lambdas if lam >= 1e-2]
    small_l = [lam for lam in lambdas if 0 < lam <= 1e-2]
    c, dc = mean["coupled"], mean["decoupled"]
    claims = [
        Claim(
            "Fig. 9 left",
            "fig9_coupled",
            "stand-in ATSR, coupled: "
            + ", ".join(f"{c[lam]:.1f}x at {lam:g}" for lam in big_l)
            + f" vs {c[0.0]:.2f}x at 0 (stand-in verdict: {v['coupled']})",
            "not computable from the summary",
        ),
        Claim(
            "Fig. 9 right",
            "fig9_decoupled",
            "stand-in ATSR, decoupled: "
            + ", ".join(f"{dc[lam]:.2f}x at {lam:g}" for lam in small_l)
            + f" vs {dc[0.0]:.2f}x at 0 (stand-in verdict: {v['decoupled']})",
            "not computable from the summary",
        ),
        Claim(
            "Fig. 10(a)",
            "fig10_numbers",
            f"stand-in ATSR at lambda=0.01: {c.get(1e-2, float('nan')):.2f}x coupled, "
            f"{dc.get(1e-2, float('nan')):.2f}x "
            "decoupled (the summary does not say at which lambda its numbers are)",
            "not computable from the summary",
        ),
    ]
    return Section(
        "fig9",
        "Fig. 9/10: weight decay phase diagram (coupled vs decoupled)",
        rows,
        choices,
        png=png,
        seconds=time.perf_counter() - t0,
        data=dict(atsr=mean, raw=res, shrink=shrink, ablation=abl, verdicts=v, method=method),
        claims=claims,
    )
