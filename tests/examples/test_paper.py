"""The paper reproduction (examples/paper): the paper's claims with the paper's thresholds, on the
seeds the committed report uses (docs/paper_report.json), recomputed here where that is cheap.

A claim the report finds reproduced is asserted; one it does not reproduce is asserted under a
strict xfail (so the test turns red the day the claim starts to hold and the report is stale).
Each reproduced claim's check is also run once on a broken mechanism (Muon's polar factor replaced
by the normalised gradient) to show that it can fail. Reference values come from closed forms,
finite differences, cvxpy or independent Monte Carlo, never from the function under test.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from examples.matrix_sensing import make_regression_problem, min_nuclear_norm_interpolant, nuclear_norm, train
from examples.paper import FIGURES, main
from examples.paper._report import VERDICTS, Claim
from examples.paper.alignment import (
    CONFIGS,
    RANK,
    delta_p_chance,
    fig7_verdict,
    fig8_verdict,
    haar,
    rpw_sphere,
    rpw_sphere_rate,
    sin_theta_chance,
    trajectory,
)
from examples.paper.geometry import rpw, sphere_minimisers
from examples.paper.noise import ar1_variance, polar_mse, with_spectrum
from examples.paper.plateau import FULL, estimate_cost, plateau_verdicts, plateau_width
from examples.paper.quotes import QUOTES, quote, summary_path
from examples.paper.sensing import (
    READINGS,
    acquisition_steps,
    atsr,
    fig3_verdicts,
    fig9_verdicts,
    gap_run,
    reading_problem,
)
from examples.paper.vit_control import vit_verdict
from lightning_muon import delta_p, polar_sensitivity, sin_theta

REPORT = Path(__file__).resolve().parents[2] / "docs" / "paper_report.json"


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the paper's words


def test_every_quote_is_verbatim_in_the_summary():
    path = summary_path()
    if path is None:
        pytest.skip("the paper's summary (shared/paper/) is not on this machine")
    text = re.sub(r"\s+", " ", path.read_text())
    for key, fragments in QUOTES.items():
        for f in fragments:
            assert re.sub(r"\s+", " ", f) in text, key


def test_every_paper_cell_of_the_report_is_a_quote_or_a_dash(report):
    path = summary_path()
    if path is None:
        pytest.skip("the paper's summary (shared/paper/) is not on this machine")
    text = re.sub(r"\s+", " ", path.read_text())
    for key, sec in report.items():
        for row in sec["rows"]:
            assert row["paper"] == "-" or re.sub(r"\s+", " ", row["paper"]) in text, (key, row["paper"])


def test_claims_refuse_unknown_quotes_and_verdicts():
    with pytest.raises(KeyError, match="no quote"):
        quote("fig99")
    with pytest.raises(ValueError, match="verdict must be one of"):
        Claim("Fig. 3", "fig3_large", "x", "roughly")


def test_report_json_has_a_verdict_for_every_claim_and_every_figure(report):
    assert set(report) == set(FIGURES)
    claims = [c for sec in report.values() for c in sec["claims"]]
    assert {c["verdict"] for c in claims} <= set(VERDICTS)
    assert {c["quote_key"] for c in claims} <= set(QUOTES)
    text = (REPORT.parent / "paper_report.md").read_text()
    for c in claims:  # the headline table shows each claim with its verdict
        assert f"**{c['verdict']}**" in text


# ----------------------------------------------------------------------------- Fig. 3


def _family(reading: str, seeds, methods=("muon_svd", "gd", "gd_rescaled"), steps=1000, lr=0.03):
    out = []
    for s in seeds:
        pr = reading_problem(reading, s)
        nmin = nuclear_norm(min_nuclear_norm_interpolant(pr))
        out.append(gap_run(pr, nmin, methods=methods, steps=steps, lr=lr, seed=s, log_every=10))
    return out


@pytest.fixture(scope="module")
def square_family(report):
    seeds = report["fig3"]["data"]["seeds"]
    return _family("square", seeds)


def test_fig3_family_square_reading_recomputed_on_the_report_seeds(report, square_family):
    # The paper: 1.29x-2.02x, mean 1.59x, zero seeds at the minimum. Recomputed on the report's 10
    # seeds, the same numbers as the committed report (to 1e-6: same code, same seeds).
    saved = report["fig3"]["data"]["family"]["square"]
    for mine, theirs in zip(square_family, saved):
        assert mine["gap"] == pytest.approx(theirs["gap"], rel=1e-6)
    gaps = [r["gap"] for r in square_family]
    assert min(gaps) >= 1.01  # "Zero seeds converge to the nuclear-norm minimum" (1% above cvxpy's)
    assert 1.29 <= sum(gaps) / len(gaps) <= 2.02  # the mean inside the paper's range
    assert fig3_verdicts([], {"square": square_family})["square"] == "reproduced"


def test_fig3_flattening_claim_and_its_failure_under_the_broken_mechanism(square_family):
    # "norm-matched gradient descent does not reproduce Muon, and recover the predicted flattening":
    # Muon's normalised entropy above GD's on every seed, and norm-matched GD ends at GD's point.
    assert fig3_verdicts(square_family, {})["flatten"] == "reproduced"
    # Broken once: the normalised gradient instead of polar(G) plays Muon. Then "Muon" is flat no
    # more than GD and lands where GD lands: the same check must fail.
    broken = _family("square", range(3), methods=("gd_rescaled", "gd"))
    assert fig3_verdicts(broken, {})["flatten"] == "not reproduced"


def test_fig3_regression_reading_lands_on_the_closed_form_minimum():
    # Reading W X = Y: every polar(G) acts on the span of the samples, so Muon's end point is
    # Y X^+ + W0 (I - X X^+) (computed here with pinv), the minimum-nuclear-norm interpolant up to
    # the 1e-3 init; the paper's 1.29x-2.02x family cannot come from this reading.
    pr = make_regression_problem(outputs=6, features=10, samples=6, seed=0)
    W0 = 1e-3 * torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    run = train(pr, "muon_svd", steps=1000, lr=0.03, init=W0, log_every=100)
    X = pr.A.reshape(6, 6, 6, 10)[0, :, 0, :].T  # the samples: A_(i,j) = e_i x_j^T
    Y = pr.target @ X
    Xp = torch.linalg.pinv(X)
    expected = Y @ Xp + W0 @ (torch.eye(10, dtype=torch.float64) - X @ Xp)
    torch.testing.assert_close(run.W, expected, rtol=0, atol=1e-4)  # the decayed step leaves ~1e-5
    assert nuclear_norm(run.W) / nuclear_norm(min_nuclear_norm_interpolant(pr)) < 1.005


def test_fig3_report_verdicts_follow_from_its_numbers(report):
    d = report["fig3"]["data"]
    assert fig3_verdicts(d["large"], d["family"]) == d["verdicts"]
    assert d["verdicts"]["regression"] == "not reproduced" and set(d["family"]) == set(READINGS)


# ----------------------------------------------------------------------------- Fig. 7, 8, 11, 12


def test_sin_theta_chance_matches_the_closed_form_per_side():
    # Haar k-frames in R^d: E||U^T V||_F^2 = k^2 / d, so E||sin Theta||_F^2 = k - k^2/d per side.
    d, k = 20, 2
    g = torch.Generator().manual_seed(3)
    A, B = (
        torch.randn(4000, d, d, generator=g, dtype=torch.float64),
        torch.randn(4000, d, d, generator=g, dtype=torch.float64),
    )
    left = sin_theta(A, B, k=k, side="left")
    assert float(left.square().mean()) == pytest.approx(k - k * k / d, rel=0.02)  # 4000 draws: ~0.5% s.e.
    ch = sin_theta_chance(d, d, k)
    assert ch["q05"] < math.sqrt(k - k * k / d) < ch["q95"]


def test_delta_p_chance_matches_the_closed_form():
    # E||W^T Q - Q^T W||_F^2 = 2 ||W||_F^2 (1 - 1/n) for Haar Q, so delta_P ~ sqrt(2 (n - 1)) / n.
    n = 20
    W = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert delta_p_chance(W, draws=2000) == pytest.approx(math.sqrt(2 * (n - 1)) / n, rel=0.02)
    Q = haar(n, 2000, torch.Generator().manual_seed(2))
    torch.testing.assert_close(Q @ Q.mT, torch.eye(n, dtype=torch.float64).expand(2000, n, n), atol=1e-12, rtol=0)


@pytest.mark.xfail(strict=True, reason="does not reproduce: W-vs-G frames sit at chance after the transient")
def test_fig7_paper_claim_below_0_1_post_transient(report):
    # The paper: "Misalignment remains < 0.1 post-transient" for d in {10, 20, 50}, 10 seeds each.
    for d, v in report["fig7"]["data"].items():
        if d.isdigit():
            assert v["post_frac_below"] >= 0.95, d


def test_fig7_holds_in_the_regression_reading(report):
    # The paper's threshold (< 0.1 post-transient) met in the regression reading (d=10, 3 seeds).
    v = report["fig7"]["data"]["ablations"]["regression"]
    assert v["frac_below"] >= 0.95 and v["median"] < 0.1


def test_fig7_post_transient_is_inside_the_chance_band(report):
    for d in map(str, CONFIGS):
        v = report["fig7"]["data"][d]
        assert v["chance"]["q05"] <= v["post_median"] <= v["chance"]["q95"], d
        assert fig7_verdict(v["post_frac_below"]) == "not reproduced"


def test_fig7_recomputed_seed_sits_at_chance():
    # d=10, seed 0 at the report's horizon: W vs G in the 2nd half is at the chance level, which
    # is sqrt(2 - 4/10) = 1.26 per side for 2-frames in R^10 (the reported value is the larger side).
    p, T = CONFIGS[10]
    t = trajectory(10, p, seed=0, steps=T)
    post = [v for s, v in zip(t["log_steps"], t["sin_wg"]) if s >= T // 2]
    assert min(post) > 1.0 > 0.1
    assert sum(post) / len(post) > math.sqrt(2 - 4 / 10)


def test_broken_mechanism_is_also_at_chance():
    # With the normalised gradient the frames are no better aligned: the chance finding is not
    # caused by the polar map (d=10, 600 steps, seed 0).
    t = trajectory(10, 12, seed=0, steps=600, method="normgd")
    post = [v for s, v in zip(t["log_steps"], t["sin_wg"]) if s >= 300]
    assert min(post) > 0.5


def test_fig12_delta_p_at_chance_after_the_transient_and_aligned_before(report):
    for d in map(str, CONFIGS):
        v = report["fig12"]["data"][d]
        assert 0.85 <= v["post"] / v["post_chance"] <= 1.1, d  # no better than unrelated matrices
        assert v["early"] < 0.5 * v["early_chance"], d  # the first steps: W ~ a sum of equal polar steps


def test_rpw_sphere_rate_is_the_derivative_of_rpw_on_the_sphere():
    # Finite differences of R_pw(sigma / ||sigma||) along sigma + h alpha (h = 1e-6, float64).
    g = torch.Generator().manual_seed(0)
    s = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    a = torch.randn(7, generator=g, dtype=torch.float64)
    h = 1e-6
    fd = (rpw_sphere(s + h * a) - rpw_sphere(s - h * a)) / (2 * h)
    assert rpw_sphere_rate(s, a) == pytest.approx(fd, rel=1e-6)
    # a common shift flattens the normalised spectrum: the rate is negative (toward the minimiser)
    assert rpw_sphere_rate(s, torch.ones(7, dtype=torch.float64)) < 0


def test_fig8_stand_in_verdicts_follow_from_the_report(report):
    d = report["fig8"]["data"]
    for dim, paper in ((10, 0.51), (20, 0.49), (50, 0.45)):
        v = d[str(dim)]
        claim = next(c for c in report["fig8"]["claims"] if c["figure"] == f"Fig. 8, d={dim}")
        assert f"stand-in verdict: {fig8_verdict(v['early_neg'], v['late_positive_mean'], paper)}" in claim["evidence"]


# ----------------------------------------------------------------------------- Fig. 2, 4, 9


def test_fig2_rpw_flat_point_and_corner_facts():
    assert rpw(torch.tensor([2**-0.5, 2**-0.5], dtype=torch.float64)) == pytest.approx(-2 * math.log(math.sqrt(2)))
    for k in (2, 3, 5):
        r = sphere_minimisers(k, samples=3000)
        assert r["rpw_flat_below_all"] and r["corner_below_all"]


def test_fig4_monte_carlo_matches_the_closed_form_s_mu():
    # S(mu) = r(r-1)/(4 s0^2) for a flat spectrum; Monte Carlo E||dP||^2 / (2 eps^2) independently.
    for r in (2, 4):
        mu = with_spectrum(torch.full((r,), 0.5), seed=r)
        mc = polar_mse(mu, 5e-5, 4000, seed=r) / (2 * 5e-5**2)
        tol = 4 * math.sqrt(2 / (4000 * r * (r - 1) / 2)) + 0.01
        assert mc == pytest.approx(r * (r - 1) / (4 * 0.25), rel=tol)
    # a non-flat spectrum against its own closed form 2 / (1 + 3)^2 (S sums ordered pairs)
    mu = with_spectrum(torch.tensor([1.0, 3.0]), seed=0)
    assert float(polar_sensitivity(mu)) == pytest.approx(2 / 16, rel=1e-9)


def test_ar1_variance_closed_form():
    assert ar1_variance(0.95, 20000, 400) == pytest.approx(0.05 / 1.95, rel=0.05)
    assert ar1_variance(0.5, 20000, 100) == pytest.approx(1 / 3, rel=0.03)


def test_atsr_definition():
    steps = [0, 10, 20, 30, 40]
    fast, slow = [0, 9, 10, 10, 10], [0, 1, 2, 5, 10]
    assert acquisition_steps(steps, [fast, slow]) == [10, 40]
    assert atsr(steps, [fast, slow]) == 4.0


def test_fig9_stand_in_verdicts_follow_from_the_report(report):
    d = report["fig9"]["data"]
    atsr_ = {m: {float(k): v for k, v in d["atsr"][m].items()} for m in d["atsr"]}
    assert fig9_verdicts(atsr_) == d["verdicts"]


# ----------------------------------------------------------------------------- the GPT sweep and the ViT control


def test_plateau_report_has_the_grid_the_issue_asks_for(report):
    runs = report["plateau"]["data"]["runs"]
    for opt in ("muon", "adamw"):
        lrs = {r["lr"] for r in runs if r["optimizer"] == opt}
        seeds = {r["seed"] for r in runs if r["optimizer"] == opt}
        assert len(lrs) >= 5 and len(seeds) >= 3
    v = plateau_verdicts(runs)
    for key in ("plateau", "loss", "srank"):
        assert v[key] == report["plateau"]["data"]["verdicts"][key]


def test_plateau_width_definition():
    lrs = [1, 2, 4, 8, 16]
    assert plateau_width(lrs, [3.0, 2.03, 2.0, 2.01, 2.5]) == (2, 8, 4.0)
    assert plateau_width(lrs, [1.0, 2.0, 3.0, 4.0, 5.0]) == (1, 1, 1.0)


def test_full_plan_is_the_papers_size_and_its_cost_is_6nt():
    assert (FULL.n_layer, FULL.n_embd, FULL.steps) == (12, 768, 5000)  # NanoGPT 124M, 5,000 steps (Fig. 5)
    c = estimate_cost(FULL)
    assert 120e6 < c["params"] < 130e6
    n, t, L, ctx, d = c["params"], c["tokens_per_run"], 12, FULL.block_size, 768
    assert c["flops"] == pytest.approx(c["runs"] * (6 * n * t + 12 * L * ctx * d * t))


def test_vit_verdict_from_the_report(report):
    d = report["vit"]["data"]
    runs = [{**r, "acc": {int(k): v for k, v in r["acc"].items()}} for r in d["runs"]]
    end = d["plan"]["checkpoints"][-1]
    assert vit_verdict(runs, "photos", end) == d["verdicts"]["photos"][str(end)]


def test_photo_patches_are_disjoint_natural_images():
    from examples.paper.photos import photo_patches

    xt, yt = photo_patches(3, "train", seed=0)
    xv, yv = photo_patches(3, "val", seed=0)
    assert xt.shape == (30, 3, 32, 32) and yv.tolist() == sorted(yv.tolist())
    # each crop standardised per channel
    torch.testing.assert_close(xt.mean((2, 3)), torch.zeros(30, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="split must be"):
        photo_patches(1, "test")


# ----------------------------------------------------------------------------- the command line


def test_quick_run_writes_report_with_headline_and_json(tmp_path):
    main(["--quick", "--only", "fig2", "fig4", "--out", str(tmp_path), "--workers", "1"])
    text = (tmp_path / "report.md").read_text()
    assert "## Headline" in text and text.count("**reproduced**") >= 3
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == {"fig2", "fig4"}
    assert (tmp_path / "fig2_rpw_geometry.png").stat().st_size > 10_000


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--only", "fig99", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--only", "fig3", "--full", "--out", str(tmp_path)])


def test_full_dry_run_prints_the_plan(tmp_path, capsys):
    main(["--only", "plateau", "--full", "--dry-run", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "124.4M parameters" in out and "GPU hours" in out
    assert not (tmp_path / "report.md").exists()


def test_delta_p_is_zero_for_shared_frames_and_chance_for_random():
    # sanity of the measure the alignment figures rely on (package function, exact values)
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    W = U @ torch.diag(torch.arange(6, 0, -1, dtype=torch.float64)) @ V.T
    assert float(delta_p(W, U @ V.T)) == pytest.approx(0, abs=1e-12)
    assert RANK == 2


# ----------------------------------------------------------------------------- the paper configs run


@pytest.mark.slow
def test_gpt_paper_config_runs_two_steps_at_a_small_size(tmp_path):
    from examples.gpt import cli_main

    cli = cli_main(
        ["fit", "--config", "examples/configs/gpt_paper.yaml", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
         "--trainer.precision=32-true", "--trainer.accumulate_grad_batches=1", "--trainer.val_check_interval=2",
         "--trainer.limit_val_batches=0.001", "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32",
         "--model.block_size=32", "--model.warmup_steps=1", "--data.batch_size=2", "--data.num_workers=0",
         "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
         f"--trainer.default_root_dir={tmp_path}"]
    )  # fmt: skip
    assert cli.trainer.global_step == 2 and cli.trainer.max_steps == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))


@pytest.mark.slow
def test_vit_paper_config_runs_on_the_photo_overlay(tmp_path):
    from examples.vit import cli_main

    cli = cli_main(
        ["fit", "--config", "examples/configs/vit_paper.yaml", "--config", "examples/configs/vit_paper_photos.yaml",
         "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.accumulate_grad_batches=1",
         "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--data.init_args.train_per_class=4",
         "--data.init_args.val_per_class=2", "--data.init_args.batch_size=8", "--model.num_layers=1",
         "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
         f"--trainer.default_root_dir={tmp_path}"]
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    assert (cli.model.hparams.image_size, cli.model.hparams.num_channels) == (32, 3)
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc"]) <= 1.0
