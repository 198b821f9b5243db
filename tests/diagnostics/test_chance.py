"""Chance levels of the misalignment diagnostics against Monte Carlo over unrelated matrices (float64).

``delta_P`` of a weight W (Gaussian, or with a fast-decaying spectrum) and an independent uniformly
random orthogonal factor (the law of a Gaussian matrix's polar factor); ``||sin Theta||_F`` between
independent uniformly random frames.
"""

import pytest
import torch

from lightning_muon import delta_p, delta_p_chance, frames_sin_theta, sin_theta_chance

SHAPES = [(20, 20), (16, 64), (64, 16), (5, 5)]


def _frames(draws, d, k, g):
    Q, _ = torch.linalg.qr(torch.randn(draws, d, k, generator=g, dtype=torch.float64))
    return Q


@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("spectrum", ["gaussian", "decaying"])
def test_delta_p_chance_matches_unrelated_matrices(m, n, spectrum):
    g = torch.Generator().manual_seed(0)
    draws, k = 1000, min(m, n)
    # a uniformly random orthogonal factor (the polar factor of a Gaussian matrix has this law; QR is faster)
    P = _frames(draws, m, n, g) if m >= n else _frames(draws, n, m, g).mT
    if spectrum == "gaussian":
        W = torch.randn(draws, m, n, generator=g, dtype=torch.float64)
    else:
        s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.5
        W = (_frames(draws, m, k, g) * s) @ _frames(draws, n, k, g).mT
    # The closed form is exact for the expected squares; the mean of the root is within 0.2% at sides >= 16
    # and 2% at 5 x 5 (measured); Monte Carlo standard error 0.3-1%.
    assert float(delta_p(W, P).mean()) == pytest.approx(delta_p_chance(m, n), rel=0.03)


def test_delta_p_chance_is_the_issues_number():
    # "unrelated matrices score about sqrt(2/n) (0.31 at n = 20)"
    assert delta_p_chance(20, 20) == pytest.approx(0.31, abs=0.005)


@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_sin_theta_chance_matches_random_frames(m, n, k):
    g = torch.Generator().manual_seed(1)
    draws = 2000
    left = frames_sin_theta(_frames(draws, m, k, g), _frames(draws, m, k, g))
    right = frames_sin_theta(_frames(draws, n, k, g), _frames(draws, n, k, g))
    # Measured within 0.6% (k = 1 at 5 x 5: 0.4%); standard error <= 0.5%.
    assert float(left.mean()) == pytest.approx(sin_theta_chance(m, n, k, "left"), rel=0.02)
    assert float(right.mean()) == pytest.approx(sin_theta_chance(m, n, k, "right"), rel=0.02)
    assert float(torch.maximum(left, right).mean()) == pytest.approx(sin_theta_chance(m, n, k), rel=0.02)


def test_sin_theta_chance_edges_and_bad_input():
    assert sin_theta_chance(4, 9, 4, "left") == 0.0  # k = d: both frames span R^4
    with pytest.raises(ValueError, match="k must be an integer in"):
        sin_theta_chance(4, 9, 5)
    with pytest.raises(ValueError, match="side must be one of"):
        sin_theta_chance(4, 9, 2, side="both")
    with pytest.raises(ValueError, match="m must be a positive integer"):
        delta_p_chance(0, 3)
