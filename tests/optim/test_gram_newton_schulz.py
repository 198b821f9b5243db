"""Gram Newton–Schulz against the exact SVD polar factor and against standard NS with the same coefficients."""

import json
import math
import sys

import pytest
import torch
from helpers import DIST_SCRIPTS
from torch import nn

from lightning_muon import GRAM_METHODS, METHODS, Muon, orthogonalize, singular_value_band
from lightning_muon.optim import newton_schulz
from lightning_muon.optim.newton_schulz import NS_PRESETS, _gram_batched, default_gram

sys.path.insert(0, str(DIST_SCRIPTS))
import raw_step  # noqa: E402
from _launch import launch, wait  # noqa: E402

# What this module tests depends on the dtype paths: .ci/run runs it again under every simulated CPU kind.
pytestmark = pytest.mark.cpu_kinds

PAIRS = [(name, variant.preset) for name, variant in GRAM_METHODS.items()]


def _with_spectrum(m: int, n: int, s: torch.Tensor, batch: tuple[int, ...] = (), seed: int = 0):
    """(batch..., m, n) float64 matrices U diag(s) V^T with random orthonormal U, V, and their polar factor U V^T."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64, generator=g))
    return (U * s) @ V.mT, U @ V.mT


def _exact_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_gram_methods_listed_with_their_presets_band():
    for name, variant in GRAM_METHODS.items():
        assert name in METHODS and variant.preset in NS_PRESETS
        assert singular_value_band(name) == singular_value_band(variant.preset)


def test_restart_schedule():
    pe, q = GRAM_METHODS["gram_polar_express"], GRAM_METHODS["gram_quintic"]
    assert pe.restart_steps(5) == {2} and pe.restart_steps(10) == {2, 5, 8}
    assert q.restart_steps(5) == {2, 4} and q.restart_steps(8) == {2, 4, 6}
    assert pe.restart_steps(2) == frozenset()  # step 0 is never a restart


@pytest.mark.parametrize("gram, standard", PAIRS)
@pytest.mark.parametrize(
    "shape, steps", [((24, 80), 5), ((80, 24), 5), ((3, 16, 40), 9), ((2, 2, 40, 16), 7), ((12, 40), 1), ((12, 40), 3)]
)
def test_same_polynomial_as_standard_ns_in_float64(gram, standard, shape, steps):
    # Gram NS is a reordering of the same matrix polynomial: in float64 only round-off separates them.
    G = torch.randn(*shape, dtype=torch.float64)
    ours = orthogonalize(G, gram, steps, dtype=torch.float64)
    ref = orthogonalize(G, standard, steps, dtype=torch.float64, gram=False)
    assert ours.shape == G.shape and ours.dtype == G.dtype
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("gram, standard", PAIRS)
@pytest.mark.parametrize("m, n", [(64, 192), (192, 64)])
def test_float32_singular_values_in_band_and_close_to_standard(gram, standard, m, n):
    # Spectrum from 1 down to 1e-2 of the largest: inside the design range of both presets.
    G, P = _with_spectrum(m, n, torch.logspace(0, -2, min(m, n), dtype=torch.float64), batch=(2,))
    out = orthogonalize(G.float(), gram, dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == G.shape
    lo, hi = singular_value_band(gram)
    sv = torch.linalg.svdvals(out.double())
    assert lo <= sv.min() and sv.max() <= hi, (sv.min(), sv.max())
    # Observed 2e-6..1e-5 from standard NS in float64 (same coefficients); fp32 round-off.
    assert _rel(out, orthogonalize(G, standard, dtype=torch.float64, gram=False)) < 1e-4
    # The 5-step presets are approximations of U V^T; same distance as standard NS (observed <= 0.2).
    assert abs(_rel(out, P) - _rel(orthogonalize(G.float(), standard, dtype=torch.float32, gram=False), P)) < 1e-4


def test_converges_to_svd_polar_factor_with_more_steps():
    # Past the pinned schedule the convergent degree-5 tail (with restarts at 5 and 8) reaches fp32 accuracy.
    G = torch.randn(48, 160, dtype=torch.float64)
    out = orthogonalize(G.float(), "gram_polar_express", steps=10, dtype=torch.float32)
    assert _rel(out, _exact_polar(G)) < 1e-5


@pytest.mark.parametrize("gram, standard", PAIRS)
@pytest.mark.parametrize("m, n", [(32, 96), (96, 32)])
def test_ill_conditioned_input_stays_bounded(gram, standard, m, n):
    # cond 1e4: the smallest singular values lie below the presets' design range, so they come out
    # below the band; the largest must not exceed it, and the result must track standard NS.
    G, _ = _with_spectrum(m, n, torch.logspace(0, -4, min(m, n), dtype=torch.float64), seed=1)
    _, hi = singular_value_band(gram)
    ref = orthogonalize(G, standard, dtype=torch.float64, gram=False)
    for dtype, tol in ((torch.float32, 1e-3), (torch.float16, 8e-2), (torch.bfloat16, 8e-2)):
        out = orthogonalize(G.float(), gram, dtype=dtype)
        sv = torch.linalg.svdvals(out.double())
        assert torch.isfinite(out).all() and sv.max() <= hi, (dtype, sv.max())
        # Observed: fp32 4e-6..6e-5; 16-bit (float16 arithmetic) 1e-2..4.5e-2.
        assert _rel(out, ref) < tol, dtype


@pytest.mark.parametrize("gram, standard", PAIRS)
@pytest.mark.parametrize("m, n", [(32, 96), (96, 32)])
def test_16_bit_in_band_and_close_to_standard(gram, standard, m, n):
    G, _ = _with_spectrum(m, n, torch.logspace(0, -2, min(m, n), dtype=torch.float64), batch=(2,), seed=2)
    lo, hi = singular_value_band(gram)
    ref = orthogonalize(G, standard, dtype=torch.float64, gram=False)
    for dtype in (torch.bfloat16, torch.float16):
        x = G.to(dtype)
        out = orthogonalize(x, gram, dtype=dtype)
        assert out.dtype == dtype and out.shape == G.shape
        sv = torch.linalg.svdvals(out.double())
        assert lo <= sv.min() and sv.max() <= hi, (dtype, sv.min(), sv.max())
        # Observed 3e-3..1.2e-2 (float16 arithmetic; standard NS in bf16 is 1.5e-2 from the same reference).
        assert _rel(out, ref) < 3e-2, dtype


def test_bfloat16_request_iterates_in_float16():
    # bf16 asked for, float16 used: identical results, and the reason for it (bf16 round-off in the
    # Gram matrix, amplified by the first steps) shows when the same kernel runs in bf16.
    G, _ = _with_spectrum(32, 96, torch.logspace(0, -4, 32, dtype=torch.float64), seed=3)
    as_bf16 = orthogonalize(G.float(), "gram_polar_express", dtype=torch.bfloat16)
    as_fp16 = orthogonalize(G.float(), "gram_polar_express", dtype=torch.float16)
    assert torch.equal(as_bf16, as_fp16)
    preset = NS_PRESETS["polar_express"]
    X = (G / (G.norm() * preset.norm_scale + preset.norm_eps)).to(torch.bfloat16)[None]
    in_bf16 = _gram_batched(X, preset.coefficients(5), GRAM_METHODS["gram_polar_express"].restart_steps(5))[0]
    assert torch.linalg.svdvals(in_bf16.double()).max() > 1.3  # observed 1.46; band ends at 1.2


def test_restarts_keep_float16_stable():
    # Without the restart, float16 round-off in R is amplified until singular values leave the band.
    G, _ = _with_spectrum(32, 96, torch.logspace(0, -4, 32, dtype=torch.float64), seed=1)
    preset = NS_PRESETS["polar_express"]
    X = (G / (G.norm() * preset.norm_scale + preset.norm_eps)).to(torch.float16)[None]
    top = {}
    for restarts in (frozenset(), GRAM_METHODS["gram_polar_express"].restart_steps(5)):
        out = _gram_batched(X, preset.coefficients(5), restarts)[0]
        top[restarts] = torch.linalg.svdvals(out.double()).max().item()
    assert top[frozenset()] > 2.0 and top[frozenset({2})] <= 1.2, top  # observed 136 and 1.14


@pytest.mark.parametrize("method", list(GRAM_METHODS))
def test_looped_and_batched_kernels_agree(method):
    G = torch.randn(3, 24, 72, dtype=torch.float64)
    looped = orthogonalize(G, method, dtype=torch.float64, kernel="looped")
    batched = orthogonalize(G, method, dtype=torch.float64, kernel="batched")
    torch.testing.assert_close(looped, batched, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", list(GRAM_METHODS))
def test_zero_tiny_and_rank_one(method):
    Z = torch.zeros(3, 8, 20)
    assert torch.equal(orthogonalize(Z, method), Z)
    assert orthogonalize(torch.zeros(0, 8, 20), method).shape == (0, 8, 20)
    u, v = torch.randn(8, 1), torch.randn(1, 20)
    lo, hi = singular_value_band(method)
    for scale in (1.0, 1e-30):  # late-training momentum can be tiny
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = orthogonalize(scale * (u @ v), method, dtype=dtype)
            assert torch.isfinite(out).all(), (scale, dtype)
            if scale == 1.0:
                assert lo <= out.double().norm() <= hi
                # Round-off in the 7 null directions is amplified by the steps: observed 1e-7 in fp32 and
                # 0.035..0.055 in 16 bits (float16 arithmetic; standard NS: 0.055 fp16, 0.26..0.44 bf16).
                direction = (u @ v) / (u.norm() * v.norm())
                atol = 1e-2 if dtype == torch.float32 else 0.1
                torch.testing.assert_close(out.float() / out.float().norm(), direction, atol=atol, rtol=0)


def test_input_never_modified():
    for dtype in (torch.float32, torch.bfloat16):
        G = torch.randn(2, 16, 48).to(dtype)
        before = G.clone()
        out = orthogonalize(G, "gram_polar_express", dtype=dtype)
        assert torch.equal(G, before) and out.dtype == dtype


@pytest.mark.parametrize("gram, standard", PAIRS)
def test_muon_step_with_gram_equals_standard(gram, standard, monkeypatch):
    # Muon with a Gram method against Muon with the standard method (independent NS code), float64 NS.
    monkeypatch.setattr(newton_schulz, "GRAM_MIN_ASPECT", math.inf)  # the standard run must stay standard
    shapes = [(16, 48), (48, 16), (24, 24), (2, 3, 8, 20)]
    params = {m: [nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in shapes] for m in (gram, standard)}
    for p, q in zip(params[gram], params[standard]):
        q.data.copy_(p.data)
    opts = {
        m: Muon([{"params": ps, "use_muon": True}], lr=0.05, weight_decay=0.1, ns_method=m, ns_dtype="float64")
        for m, ps in params.items()
    }
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params[gram], params[standard]):
            grad = torch.randn(p.shape, dtype=torch.float64, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        for opt in opts.values():
            opt.step()
    for p, q in zip(params[gram], params[standard]):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-10, rtol=0)


def test_muon_step_with_gram_in_float32_matches_exact_update():
    # One step from zero momentum: W1 = (1 - lr wd) W0 - lr s(m, n) O(g), O within the band of U V^T.
    W = nn.Parameter(torch.randn(32, 96))
    W0 = W.detach().clone()
    g = torch.randn(32, 96)
    W.grad = g.clone()
    opt = Muon(
        [{"params": [W], "use_muon": True}],
        lr=0.1,
        weight_decay=0.2,
        ns_method="gram_polar_express",
        ns_dtype="float32",
        adjust_lr="spectral",
    )
    opt.step()
    update = ((1 - 0.1 * 0.2) * W0 - W.detach()) / (0.1 * math.sqrt(32 / 96))
    lo, hi = singular_value_band("gram_polar_express")
    sv = torch.linalg.svdvals(update.double())
    assert lo <= sv.min() and sv.max() <= hi
    assert _rel(update, orthogonalize(g.double(), "polar_express", dtype=torch.float64, gram=False)) < 1e-4


def test_standard_presets_run_as_gram_where_default(monkeypatch):
    wide, square = torch.randn(2, 24, 72), torch.randn(2, 24, 24)
    gram = orthogonalize(wide, "gram_polar_express", dtype=torch.float32)
    standard = orthogonalize(wide, "polar_express", dtype=torch.float32, gram=False)
    assert not torch.equal(gram, standard)  # different round-off: the two paths are told apart
    # Small matrices (smaller side < GRAM_MIN_SIDE) keep standard NS; shrink the limit to test the rule here.
    assert not default_gram("cpu", torch.float32, 24, 72)
    assert torch.equal(orthogonalize(wide, "polar_express", dtype=torch.float32), standard)
    monkeypatch.setattr(newton_schulz, "GRAM_MIN_SIDE", 16)
    assert default_gram("cpu", torch.float32, 24, 72) and not default_gram("cpu", torch.float32, 24, 24)
    assert torch.equal(orthogonalize(wide, "polar_express", dtype=torch.float32), gram)
    assert torch.equal(orthogonalize(wide.mT, "polar_express", dtype=torch.float32), gram.mT)  # tall too
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # every dtype path, whatever "auto" is here
        forced = orthogonalize(square, "quintic", gram=True, dtype=dtype)
        assert torch.equal(forced, orthogonalize(square, "gram_quintic", dtype=dtype)), dtype
    assert torch.equal(
        orthogonalize(square, "quintic", dtype=torch.float32),
        orthogonalize(square, "quintic", dtype=torch.float32, gram=False),
    )
    # 16-bit compute stays standard NS in the requested dtype.
    assert torch.equal(
        orthogonalize(wide, "polar_express", dtype=torch.bfloat16),
        orthogonalize(wide, "polar_express", dtype=torch.bfloat16, gram=False),
    )
    monkeypatch.setattr(newton_schulz, "GRAM_MIN_ASPECT", math.inf)
    assert torch.equal(orthogonalize(wide, "polar_express", dtype=torch.float32), standard)


def test_gram_in_16_bit_does_not_depend_on_the_batch():
    # A DDP rank orthogonalises the matrices it owns, one process all of them: with native 16-bit
    # matmuls a batched k x k product rounds differently by batch size, so 16-bit Gram NS on CPU
    # iterates one matrix at a time (default_kernel) and each matrix comes out bit for bit the same.
    X = torch.randn(6, 16, 24)
    for dtype in (torch.bfloat16, torch.float16):
        whole = orthogonalize(X, "gram_polar_express", dtype=dtype)
        alone = torch.cat([orthogonalize(X[i : i + 1], "gram_polar_express", dtype=dtype) for i in range(6)])
        assert torch.equal(whole, alone), dtype


def test_bad_gram_flag():
    with pytest.raises(ValueError, match="gram must be None, True or False"):
        orthogonalize(torch.randn(4, 8), gram="yes")
    with pytest.raises(ValueError, match="gram must be"):
        orthogonalize(torch.randn(4, 8), gram=1)


def test_unknown_method_lists_gram_methods():
    with pytest.raises(ValueError, match="gram_polar_express"):
        orthogonalize(torch.randn(4, 8), "gram")
    with pytest.raises(ValueError, match="gram_quintic"):
        Muon([nn.Parameter(torch.randn(4, 8))], ns_method="gram")


def test_benchmark_script_prints_a_table(capsys):
    from benchmarks import gram_newton_schulz as bench

    bench.main(["--shapes", "16x48", "24x24", "--repeats", "1", "--warmup", "0", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "| 16x48 | gram_polar_express |" in out and out.count("| 24x24 |") == 2
    assert "load average" in out


@pytest.mark.slow  # 2 and 4 gloo processes
@pytest.mark.parametrize("mode, world", [("ddp", 2), ("fsdp", 4)])
def test_distributed_steps_with_gram_in_16_bit_match_one_process(tmp_path, mode, world):
    # bfloat16 asked for, float16 computed: the ranks must exchange momenta and results without
    # rounding them to bfloat16, or they would drift from one process on the same gradients.
    wait(
        [
            launch(
                "raw_step.py",
                str(tmp_path),
                str(world),
                mode,
                "bfloat16",
                json.dumps({"ns_method": "gram_polar_express"}),
            )
        ]
    )
    init, grads = raw_step.make(0)
    params = [nn.Parameter(p.clone()) for p in init]
    opt = Muon(raw_step.groups(params), lr=0.05, ns_dtype="bfloat16", weight_decay=0.1, ns_method="gram_polar_express")
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    for f in sorted(tmp_path.glob("rank*.pt")):
        rank = torch.load(f, weights_only=False)
        for a, b in zip(params, rank["params"]):
            torch.testing.assert_close(b, a.detach(), rtol=0, atol=1e-6)  # float32 round-off


@pytest.mark.parametrize(
    "m, n, expected",
    [
        (256, 768, True),  # aspect exactly 3, smaller side exactly 256: Gram
        (768, 256, True),  # tall: the same rule on (min, max)
        (256, 767, False),  # aspect just below 3
        (255, 765, False),  # aspect 3, smaller side just below 256
    ],
)
def test_gram_default_boundary_is_inclusive(m, n, expected):
    # The documented rule: max(m, n) >= 3 min(m, n) and min(m, n) >= 256 (both inclusive), CPU float32/64
    assert default_gram("cpu", torch.float32, m, n) is expected
    assert default_gram("cpu", torch.float64, m, n) is expected
