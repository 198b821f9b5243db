"""bfloat16 momentum (``momentum_dtype="bfloat16"``): stochastic rounding is unbiased, keeps what
round-to-nearest loses, and halves Muon's state."""

import math

import pytest
import torch
from torch import nn

from lightning_muon import Muon
from lightning_muon.optim.stochastic_rounding import random_bits16, stochastic_round

# What this module tests depends on the dtype paths: .ci/run runs it again under every simulated CPU kind.
pytestmark = pytest.mark.cpu_kinds


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and above each float32 ``x`` (by magnitude), computed by truncation."""
    low = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    ulp = torch.ldexp(torch.ones_like(x), torch.frexp(low)[1] - 8)  # bfloat16 keeps 8 significant bits
    return low, low + torch.sign(x) * ulp


def test_rounds_to_a_neighbour_and_keeps_exact_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g) * torch.logspace(-30, 30, 50_000)
    y = stochastic_round(x, torch.arange(x.numel()), key=3).float()
    low, high = _neighbours(x)
    assert bool(((y == low) | (y == high)).all())
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(stochastic_round(exact, torch.arange(x.numel()), key=3).float(), exact)


def test_unbiased_in_expectation():
    # 2**18 copies of each of a few values between bfloat16 neighbours: the mean of the rounded
    # copies is the value. Each rounding's standard deviation is <= ulp / 2, so the mean's is
    # <= ulp / (2 * 512); we allow 5 of those (a false failure has probability ~6e-7 per value).
    n = 2**18
    for i, frac in enumerate([0.01, 0.25, 0.5, 0.9]):
        for base in (1.0, -3.0, 1e-20):
            ulp = math.ldexp(1.0, math.frexp(abs(base))[1] - 8)
            value = base + math.copysign(frac * ulp, base)
            x = torch.full((n,), value, dtype=torch.float32)
            mean = stochastic_round(x, torch.arange(n), key=i).double().mean().item()
            assert abs(mean - float(x[0])) <= 5 * ulp / (2 * math.sqrt(n)), (base, frac)


def test_random_bits_are_uniform_and_depend_on_key():
    bits = random_bits16(torch.arange(2**18), key=11)
    counts = torch.bincount(bits >> 12, minlength=16).double()  # 16 bins of the top 4 bits
    expected = 2**18 / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45  # chi-square, 15 degrees of freedom: p ~ 1e-4
    assert (bits != random_bits16(torch.arange(2**18), key=12)).float().mean() > 0.99


def test_stall_round_to_nearest_stops_stochastic_rounding_follows():
    # momentum 0.95 settled at 1.0; the gradient moves to 1.003: each step changes the buffer by
    # 0.05 * (1.003 - buf) <= 1.5e-4, under half a bfloat16 ulp at 1.0 (2**-8 ~ 3.9e-3).
    n, beta, target = 4096, 0.95, 1.003
    W = nn.Parameter(torch.zeros(8, n // 8))  # few rows: Newton–Schulz is cheap
    opt = Muon([{"params": [W], "use_muon": True}], lr=0.0, momentum=beta, momentum_dtype="bfloat16", ns_steps=1)
    rtn = torch.ones(n, dtype=torch.bfloat16)
    exact = torch.ones(n, dtype=torch.float64)
    opt.state[W]["momentum_buffer"] = torch.ones_like(W, dtype=torch.bfloat16)
    for _ in range(200):
        W.grad = torch.full_like(W, target)
        opt.step()
        rtn = (beta * rtn.float() + (1 - beta) * target).to(torch.bfloat16)
        exact = beta * exact + (1 - beta) * target
    assert torch.equal(rtn.float(), torch.ones(n))  # round to nearest: stalled at 1.0
    ours = opt.state[W]["momentum_buffer"].double().mean().item()
    want = exact.mean().item()  # 1.003 - 0.003 * 0.95**200 ~ 1.003
    # per element the error is at most one ulp of 1.0 (2**-7); the mean of 4096 correlated-through-
    # time but independently rounded elements is far tighter: we ask for 1e-4 (2.5% of an ulp)
    assert abs(ours - want) < 1e-4, (ours, want)
    assert opt.state[W]["momentum_buffer"].dtype == torch.bfloat16


def test_momentum_matches_float32_in_expectation_on_random_gradients():
    torch.manual_seed(0)
    shape, steps = (16, 2048), 30
    grads = [torch.randn(shape) for _ in range(steps)]
    bufs = {}
    for dtype in (None, "bfloat16"):
        W = nn.Parameter(torch.zeros(shape))
        opt = Muon([{"params": [W], "use_muon": True}], lr=0.0, momentum=0.95, momentum_dtype=dtype, ns_steps=1)
        for g in grads:
            W.grad = g.clone()
            opt.step()
        bufs[dtype] = opt.state[W]["momentum_buffer"].double()
    err = bufs["bfloat16"] - bufs[None]
    # each step adds a rounding error of at most one bfloat16 ulp (2**-7 relative, variance <=
    # ulp^2 / 4), damped by 0.95 per step: the accumulated error's rms is at most
    # sqrt(0.25 / (1 - 0.95**2)) ~ 1.6 ulps of the buffer's typical size (its rms)
    scale = 2**-7 * bufs[None].square().mean().sqrt().item()
    assert err.square().mean().sqrt().item() < 1.6 * scale
    # unbiased: the mean over 32768 independently rounded elements is within 5 standard errors of 0
    assert abs(err.mean().item()) < 5 * err.std().item() / math.sqrt(err.numel())


def test_bfloat16_momentum_halves_the_state_and_float32_is_kept_for_bf16_weights():
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        opt = Muon([{"params": list(model.parameters()), "use_muon": True}], momentum_dtype=dtype)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sizes[dtype] = sum(s["momentum_buffer"].nbytes for s in opt.state.values())
    assert sizes["bfloat16"] * 2 == sizes["float32"] == 2 * 64 * 64 * 4
    W = nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    opt = Muon([{"params": [W], "use_muon": True}], momentum_dtype="float32")
    W.grad = torch.randn_like(W)
    opt.step()
    assert opt.state[W]["momentum_buffer"].dtype == torch.float32


def test_rounding_is_deterministic_across_runs():
    def run():
        W = nn.Parameter(torch.ones(16, 16))
        opt = Muon([{"params": [W], "use_muon": True}], lr=0.01, momentum_dtype="bfloat16")
        g = torch.Generator().manual_seed(5)
        for _ in range(5):
            W.grad = torch.randn(16, 16, generator=g)
            opt.step()
        return W.detach().clone(), opt.state[W]["momentum_buffer"].clone()

    (a, ma), (b, mb) = run(), run()
    assert torch.equal(a, b) and torch.equal(ma, mb)


@pytest.mark.parametrize("bad", ["float16", torch.float16, "half", torch.int8, 16])
def test_bad_momentum_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="momentum_dtype must be None, 'float32' or 'bfloat16'"):
        Muon([nn.Parameter(torch.randn(4, 4))], momentum_dtype=bad)
