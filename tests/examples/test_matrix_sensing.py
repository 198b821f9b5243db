"""The matrix-sensing experiment (examples/matrix_sensing.py) against independent references."""

import json
import math

import pytest
import torch

from examples.matrix_sensing import (
    main,
    make_problem,
    make_regression_problem,
    min_nuclear_norm_interpolant,
    normalized_spectral_entropy,
    nuclear_norm,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 20 x 20 problems: one thread is several times faster than two on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem():
    return make_problem(n=20, rank=2, p=200, seed=0)


@pytest.fixture(scope="module")
def x_min(problem):
    return min_nuclear_norm_interpolant(problem)


@pytest.fixture(scope="module")
def runs(problem):
    return {
        m: train(problem, m, steps=400, lr=0.05, log_every=50) for m in ("muon_svd", "muon_ns", "gd", "gd_rescaled")
    }


def test_normalized_entropy_analytic_cases():
    # Exact values up to float64 round-off (1e-12): flat spectrum -> 1, rank 1 -> 0,
    # two equal singular values out of four -> ln 2 / ln 4 = 0.5.
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert normalized_spectral_entropy(Q) == pytest.approx(1.0, abs=1e-12)
    assert normalized_spectral_entropy(
        torch.outer(torch.randn(5, dtype=torch.float64), torch.randn(7, dtype=torch.float64))
    ) == pytest.approx(0.0, abs=1e-12)
    assert normalized_spectral_entropy(torch.diag(torch.tensor([3.0, 3.0, 0.0, 0.0]))) == pytest.approx(0.5, abs=1e-6)


def test_min_nuclear_norm_interpolant_is_feasible_and_below_every_trained_solution(problem, runs, x_min):
    X = x_min
    # Interior-point solution: measurements matched to 1e-8 relative.
    assert problem.residual(X) < 1e-8
    # X* itself is feasible, so the minimum cannot exceed its nuclear norm (solver slack 1e-6).
    nuc_min = nuclear_norm(X)
    assert nuc_min <= nuclear_norm(problem.target) * (1 + 1e-6)
    for method, run in runs.items():
        assert problem.residual(run.W) < 5e-3, method  # trained runs (nearly) interpolate
        assert nuc_min <= nuclear_norm(run.W), method


def test_gd_reaches_the_projection_of_its_init(problem):
    # Reference: GD on least squares stays in W0 + span(A_i) and converges to the projection
    # of W0 on {W : A(W) = y}, i.e. W0 + pinv(A) (y - A(W0)); computed independently with pinv.
    W0 = 1e-3 * torch.randn(20, 20, dtype=torch.float64)
    run = train(problem, "gd", steps=1000, gd_lr=0.1, init=W0, log_every=100)
    A = problem.A.reshape(len(problem.y), -1)
    expected = W0.reshape(-1) + torch.linalg.pinv(A) @ (problem.y - A @ W0.reshape(-1))
    assert problem.residual(run.W) < 1e-6  # rate 1 - 0.1 * lambda_min(A^T A / p) ~ 0.98 per step
    torch.testing.assert_close(run.W.reshape(-1), expected, rtol=0, atol=1e-6)


def test_muon_flattens_the_spectrum_and_misses_the_minimum(runs, x_min):
    # The paper's qualitative claims, with margins well inside what the default run shows
    # (entropy 0.95 vs 0.89, nuclear norm 2.4x vs 1.8x the minimum).
    nuc_min = nuclear_norm(x_min)
    muon, gd = runs["muon_svd"], runs["gd"]
    assert muon.entropy[-1] > gd.entropy[-1] + 0.02
    assert nuclear_norm(muon.W) > 1.3 * nuc_min
    # Newton–Schulz Muon ends near exact-polar Muon (measured 1-2% apart in nuclear norm).
    assert nuclear_norm(runs["muon_ns"].W) == pytest.approx(nuclear_norm(muon.W), rel=0.05)
    # In this linear model step lengths do not move GD's end point (measured 1e-5 apart).
    torch.testing.assert_close(runs["gd_rescaled"].W, gd.W, rtol=0, atol=1e-2)


def test_main_writes_plot_table_and_json(tmp_path):
    summary = main(["--steps", "100", "--lr", "0.1", "--out", str(tmp_path)])
    assert (tmp_path / "matrix_sensing.png").stat().st_size > 10_000
    table = (tmp_path / "matrix_sensing.md").read_text()
    for name in ("min-nuclear-norm interpolant", "muon_svd", "muon_ns", "gd", "gd_rescaled"):
        assert f"| {name}" in table
    saved = json.loads((tmp_path / "matrix_sensing.json").read_text())["summary"]
    assert saved["min-nuclear-norm interpolant (cvxpy)"]["ratio_to_min"] == 1.0
    assert math.isclose(saved["gd"]["nuclear_norm"], summary["gd"]["nuclear_norm"])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(p=400), "p must be < n\\*n"), (dict(rank=30), "rank must be <= n"), (dict(n=0), "n must be >= 1")],
)
def test_make_problem_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_problem(**kwargs)


def test_train_rejects_unknown_method(problem):
    with pytest.raises(ValueError, match="method must be one of"):
        train(problem, "adam")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="cosine"), "schedule must be one of"),
        (dict(decay="both"), "decay must be one of"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    ],
)
def test_train_rejects_bad_schedule_and_decay(problem, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train(problem, "muon_svd", steps=2, **kwargs)


def test_coupled_and_decoupled_decay_match_their_definitions(problem):
    # One step from W0, by hand: decoupled W1 = (1 - lr*wd) W0 - lr*polar(G(W0)),
    # coupled W1 = W0 - lr*polar(G(W0) + wd*W0); exact polar from torch.linalg.svd.
    W0 = torch.randn(20, 20, dtype=torch.float64)
    lr, wd = 0.1, 0.5

    def polar(M):
        U, _, Vh = torch.linalg.svd(M)
        return U @ Vh

    G = problem.gradient(W0)
    dec = train(problem, "muon_svd", steps=1, lr=lr, init=W0, weight_decay=wd, decay="decoupled").W
    cou = train(problem, "muon_svd", steps=1, lr=lr, init=W0, weight_decay=wd, decay="coupled").W
    torch.testing.assert_close(dec, (1 - lr * wd) * W0 - lr * polar(G), rtol=0, atol=1e-10)
    torch.testing.assert_close(cou, W0 - lr * polar(G + wd * W0), rtol=0, atol=1e-10)


def test_measurement_ensembles_have_the_stated_structure():
    # rank-one A_i = a_i b_i^T (matrix rank 1); entry sampling: one nonzero sqrt(m n) per A_i at
    # distinct entries; rectangular shapes follow m.
    pr = make_problem(n=8, m=5, rank=2, p=12, seed=0, ensemble="rank_one")
    assert pr.A.shape == (12, 5, 8) and pr.target.shape == (5, 8)
    assert all(int(torch.linalg.matrix_rank(A)) == 1 for A in pr.A)
    pe = make_problem(n=8, m=5, rank=2, p=12, seed=0, ensemble="entries")
    nz = pe.A.reshape(12, -1).ne(0)
    assert nz.sum(1).tolist() == [1] * 12 and nz.any(0).sum() == 12
    assert torch.all(pe.A.reshape(12, -1)[nz] == math.sqrt(40))
    torch.testing.assert_close(pe.y, pe.A.reshape(12, -1)[nz] * pe.target.reshape(-1)[nz.nonzero()[:, 1]])
    with pytest.raises(ValueError, match="ensemble must be one of"):
        make_problem(n=4, p=3, ensemble="fourier")


def test_regression_problem_measures_w_times_x():
    # The measurements of W are the entries of W X (computed independently with a matmul).
    pr = make_regression_problem(outputs=3, features=5, samples=2, rank=1, seed=1)
    X = pr.A.reshape(3, 2, 3, 5)[0, :, 0, :].T  # (features, samples)
    W = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(pr.measure(W), (W @ X).reshape(-1))
    torch.testing.assert_close(pr.y, (pr.target @ X).reshape(-1))
    with pytest.raises(ValueError, match="rank must be"):
        make_regression_problem(outputs=2, features=5, samples=2, rank=3)


def test_rectangular_problem_trains_and_solves():
    pr = make_problem(n=8, m=5, rank=2, p=20, seed=0)
    X = min_nuclear_norm_interpolant(pr)
    assert X.shape == (5, 8) and pr.residual(X) < 1e-8
    assert nuclear_norm(X) <= nuclear_norm(pr.target) * (1 + 1e-6)
    run = train(pr, "muon_svd", steps=300, lr=0.05, log_every=100)
    assert run.W.shape == (5, 8) and pr.residual(run.W) < 1e-2
    with pytest.raises(ValueError, match="init must have shape"):
        train(pr, "gd", steps=1, init=torch.zeros(8, 8))
