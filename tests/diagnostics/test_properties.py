"""Property tests (hypothesis) for orthogonalize: random shapes and conditioning up to 1e6."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_muon import orthogonalize, singular_value_band

# What this module tests depends on the dtype paths: .ci/run runs it again under every simulated CPU kind.
pytestmark = pytest.mark.cpu_kinds


@st.composite
def matrices(draw):
    m = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    batch = draw(st.sampled_from([(), (2,), (2, 1)]))
    log_cond = draw(st.floats(0, 6))
    log_scale = draw(st.floats(-3, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -log_cond, k, dtype=torch.float64) * 10**log_scale
    return (U * s) @ V.mT, s


@settings(max_examples=60, deadline=None)
@given(matrices(), st.sampled_from(["quintic", "polar_express", "svd"]))
def test_output_singular_values_in_documented_band(case, method):
    G, s = case
    lo, hi = singular_value_band(method)
    out = orthogonalize(G.float(), method, dtype=torch.float32)
    assert out.shape == G.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    sv = torch.linalg.svdvals(out.double())  # descending, like s
    # Every output singular value is at most the band's top; those whose input singular value is
    # inside the design range (s_i / ||G||_F >= 1e-3) are at least the band's bottom. fp32
    # round-off allowance: 1e-3 absolute.
    assert sv.max() <= hi + 1e-3
    in_range = s / s.norm() >= 1e-3
    assert (sv[..., in_range] >= lo - 1e-3).all()


@settings(max_examples=40, deadline=None)
@given(matrices(), st.sampled_from(["quintic", "polar_express"]))
def test_half_precision_is_finite_and_bounded(case, method):
    # Every half-precision dtype ns_dtype="auto" can pick, and the default (auto) itself, on any
    # input scale (1e-3..1e3): fp16 is normalised before the cast, so nothing overflows.
    G, _ = case
    for dtype in (torch.float32, torch.bfloat16):
        x = G.to(dtype)
        for compute in (None, torch.bfloat16, torch.float16):
            out = orthogonalize(x, method, dtype=compute)
            assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
            # half round-off can lift a tiny direction, never beyond the band's top (+5%).
            assert torch.linalg.svdvals(out.double()).max() <= singular_value_band(method)[1] + 0.05


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 3), st.sampled_from(["quintic", "polar_express", "svd"]))
def test_rank_deficient_and_zero_input(m, n, rank, method):
    g = torch.Generator().manual_seed(m * 31 + n)
    r = min(rank, m, n)
    G = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    out = orthogonalize(G, method)
    assert torch.isfinite(out).all()
    if r == 0:
        assert torch.equal(out, torch.zeros_like(G))
    elif method == "svd":
        # exact polar factor on the range: r singular values equal to 1, the rest 0
        sv = torch.linalg.svdvals(out.double())
        assert torch.allclose(sv[:r], torch.ones(r, dtype=torch.float64), atol=1e-5)
        assert (sv[r:] < 1e-5).all()
