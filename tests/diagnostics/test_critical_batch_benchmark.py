"""The measured critical batch size (``benchmarks/critical_batch.py``): its fit recovers a known
B_noise, and the script runs end to end with the monitor on the measured trajectory.

References: synthetic steps-to-target from McCandlish et al.'s model ``S = S_min (1 + B_noise / B)``
with a known ``B_noise`` (exact, with seeded lognormal scatter, and through loss curves sampled the
way the benchmark samples them); for the script, the plain training loop of the measure phase and
the Lightning Trainer of the predict phase must give the same loss curve (same seed, batches, LR).
"""

import doctest
import json
import math

import numpy as np
import pytest
import torch

from benchmarks import critical_batch_fit
from benchmarks.critical_batch_fit import fit_steps, steps_to_target

BATCHES = np.array([4, 8, 16, 32, 64, 128], dtype=float)  # 32x, as the benchmark's tasks


def model_steps(s_min: float, b_noise: float, batch_sizes=BATCHES) -> np.ndarray:
    return s_min * (1 + b_noise / np.asarray(batch_sizes, dtype=float))


@pytest.mark.parametrize("b_noise", [2.0, 32.0, 500.0])
def test_fit_recovers_b_noise_from_exact_steps(b_noise):
    # Inside and outside the batch range: exact data give S_min, E_min = S_min B_noise and
    # B_crit = E_min / S_min to rounding, with zero residuals.
    fit = fit_steps(BATCHES, model_steps(120.0, b_noise))
    assert fit.s_min == pytest.approx(120.0, rel=1e-9)
    assert fit.e_min == pytest.approx(120.0 * b_noise, rel=1e-9)
    assert fit.b_crit == pytest.approx(b_noise, rel=1e-9)
    assert fit.rms < 1e-12 and fit.n == 6


def test_fit_under_scatter_is_unbiased_and_its_interval_covers():
    # 5% lognormal scatter on every point (about what one seed of a real run shows), 400 seeded
    # draws with B_noise = 32: the median B_crit is within 3% of 32 (measured 0.997), 90% of the
    # estimates within [0.8, 1.25] x 32 (measured 5-95%: [0.87, 1.14]), and the 90% bootstrap
    # interval covers 32 in 80-95% of the draws (measured 88% on 1,000 draws).
    rng = np.random.default_rng(1)
    b_crit, covered = [], 0
    for _ in range(400):
        steps = model_steps(100.0, 32.0) * np.exp(0.05 * rng.standard_normal(len(BATCHES)))
        fit = fit_steps(BATCHES, steps, draws=500)
        b_crit.append(fit.b_crit)
        covered += fit.interval[0] <= 32.0 <= fit.interval[1]
        assert fit.rms == pytest.approx(np.sqrt(np.mean(np.square(fit.residuals))))
    ratio = np.asarray(b_crit) / 32.0
    assert abs(np.median(ratio) - 1) < 0.03
    lo, hi = np.quantile(ratio, [0.05, 0.95])
    assert 0.8 < lo < 1 < hi < 1.25
    assert 0.8 <= covered / 400 <= 0.95


def test_steps_to_target_and_fit_on_sampled_loss_curves():
    # Loss curves L(s) = 1 + 3 exp(-s / tau_B) whose step to the target 1.3 is exactly
    # S(B) = 80 (1 + 24 / B), evaluated the way the benchmark does (every ~64 examples, so every
    # 16 steps at B = 4 and every step at B >= 64): the interpolated crossing is within 1% of S(B)
    # (the curve is convex between evaluations) and B_crit within 3% of 24.
    target, exact = 1.3, model_steps(80.0, 24.0)
    measured = []
    for B, S in zip(BATCHES, exact):
        tau = S / math.log(3 / (target - 1))
        every = max(1, round(64 / B))
        steps = np.arange(0, 4 * S, every)
        losses = 1 + 3 * np.exp(-steps / tau)
        measured.append(steps_to_target(steps.tolist(), losses.tolist(), target))
    assert np.allclose(measured, exact, rtol=0.01)
    assert fit_steps(BATCHES, measured).b_crit == pytest.approx(24.0, rel=0.03)


def test_fit_without_a_critical_batch_and_bad_input():
    # Steps that do not fall with the batch (all runs far above B_crit): no critical batch (NaN),
    # not a made-up number; and inputs the fit cannot use are refused with what was given.
    flat = fit_steps(BATCHES, 50.0 * (1 + 0.01 * np.log(BATCHES)))
    assert math.isnan(flat.b_crit)
    with pytest.raises(ValueError, match="distinct positive batch sizes"):
        fit_steps([8, 8, 8], [10, 11, 12])
    with pytest.raises(ValueError, match="finite positive steps"):
        fit_steps([8, 16, 32], [10, float("nan"), 5])
    with pytest.raises(ValueError, match="one length"):
        fit_steps([8, 16, 32], [10, 5])
    assert steps_to_target([0, 5], [2.0, 1.5], 1.0) is None


def test_fit_module_docstring_examples():
    # The benchmarks are not collected as doctests by the suite: run this module's here.
    result = doctest.testmod(critical_batch_fit, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.slow  # trains 12 tiny runs and 4 Trainer runs (~15-60 s on 2 loaded cores)
def test_quick_run_end_to_end(tmp_path):
    from benchmarks import critical_batch

    threads = torch.get_num_threads()
    try:
        rows = critical_batch.main(["--quick", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "r.json").read_text())["tasks"]
    assert set(results) == {"gpt", "vit"}
    for name, entry in results.items():
        task = critical_batch._task(entry)
        for optimizer in ("muon", "adamw"):
            runs = entry["runs"][optimizer]
            assert sorted(r["batch_size"] for r in runs) == sorted(task.batch_sizes[optimizer])
            # The predict phase's Trainer (with the monitor's hooks) follows the measure phase's
            # plain loop at the reference batch: same seed, batches and LR, so the same evaluated
            # losses at every common step (measured: identical).
            predicted = entry["predict"][optimizer]
            measured = next(r for r in runs if r["batch_size"] == task.ref_batch and r["k"] == predicted["k"])
            a, b = dict(map(tuple, measured["curve"])), dict(map(tuple, predicted["curve"]))
            common = sorted(set(a) & set(b))
            assert len(common) >= 3
            assert np.allclose([a[s] for s in common], [b[s] for s in common], rtol=1e-5, atol=0)
            # What the monitor logged is kept by step; the GPT's matrices are all nn.Linear, so
            # its per-example B_simple is measured and positive at some logging step.
            values = [v for _, v in critical_batch.logged_series(predicted, critical_batch.B_SIMPLE)]
            if name == "gpt":
                assert any(math.isfinite(v) and v > 0 for v in values)
            # The tags the analysis reads exist under these names: the model-level b_crit (not only
            # its per-matrix aggregates) and the Muon group's momentum factor, which is the closed
            # form of Muon's stationary Nesterov noise at beta = 0.95 (docs/muon-theory.md 3.3:
            # (1 - b)(1 + 2b - 2b^3)/(1 + b) = 0.0304) and 1 under AdamW (no momentum in the direction).
            logged = predicted["logged"]["values"]
            assert any(math.isfinite(v) and v > 0 for v in logged[critical_batch.B_CRIT])
            factors = [logged[t] for t in logged if t.startswith(critical_batch.MOMENTUM_FACTOR)]
            beta = 0.95
            expected = (1 - beta) * (1 + 2 * beta - 2 * beta**3) / (1 + beta) if optimizer == "muon" else 1.0
            assert factors and all(
                v == pytest.approx(expected, rel=1e-4) for f in factors for v in f if math.isfinite(v)
            )
    # Rows: (task, optimizer) x (early, final target). A curve crosses the early (higher) loss
    # no later than the final one, so at every batch size the early target takes fewer steps.
    assert len(rows) == 8
    for early, final in zip(rows[::2], rows[1::2]):
        assert (early.task, early.optimizer, early.which, final.which) == (
            final.task,
            final.optimizer,
            "early",
            "final",
        )
        steps_final = dict(final.points)
        assert all(steps <= steps_final[b] for b, steps in early.points if b in steps_final)
    # Each row's b_crit is the model-level tag's last finite value at or before the step where the
    # monitored run reached the target, read from the raw logged table here; its momentum-free
    # value divides it by the logged factor.
    gpt_rows = [r for r in rows if r.task == "gpt" and math.isfinite(r.step)]
    assert gpt_rows
    for r in gpt_rows:
        logged = results["gpt"]["predict"][r.optimizer]["logged"]
        seen = [
            v
            for s, v in zip(logged["steps"], logged["values"][critical_batch.B_CRIT])
            if s <= r.step and math.isfinite(v)
        ]
        assert seen and r.b_crit == seen[-1]
        assert r.b_crit_free == pytest.approx(r.b_crit / r.momentum_factor, rel=1e-12)
        assert (r.momentum_factor < 0.05) == (r.optimizer == "muon")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_student_t95_against_the_printed_table():
    # Student's t 95% quantiles as printed in statistics tables (3 decimals): beyond 10 degrees of
    # freedom the expansion is used, below it the stored values.
    from benchmarks.critical_batch_fit import student_t95

    table = {1: 6.314, 3: 2.353, 4: 2.132, 5: 2.015, 11: 1.796, 15: 1.753, 20: 1.725, 60: 1.671, 120: 1.658}
    for dof, value in table.items():
        assert student_t95(dof) == pytest.approx(value, abs=6e-4)
    with pytest.raises(ValueError, match="dof >= 1"):
        student_t95(0)
