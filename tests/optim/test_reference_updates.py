"""Exact values of orthogonalize and Muon's step against references written here, independently.

Each test pins a value that a small realistic bug changes (see docs/testing.md, the mutation run):
the Polar Express coefficients and normalisation, the side Newton–Schulz iterates on, and Muon's
momentum, Nesterov and decay over several steps from non-zero momentum.
"""

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_muon import Muon, orthogonalize

# What this module tests depends on the dtype paths: .ci/run runs it again under every simulated CPU kind.
pytestmark = pytest.mark.cpu_kinds

# Published Polar Express list (Amsel, Persson, Musco & Gower 2025; as used by modded-nanogpt and
# microsoft/dion; docs/muon-theory.md section 1), copied from the docs, not from the package.
PUBLISHED_POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
PE_NORM_SCALE, PE_NORM_EPS = 1.02, 1e-6  # ||X||_F * 1.02 + 1e-6
NS5_TAIL = (15 / 8, -10 / 8, 3 / 8)  # classic degree-5 Newton–Schulz past the pinned schedule
KELLER = (3.4445, -4.7750, 2.0315)  # quintic, with ||X||_F + 1e-7


def _composed(s, coefficients, norm_scale, norm_eps):
    """The scalar odd polynomial that Newton–Schulz applies to each singular value, in float64."""
    x = s / (torch.linalg.vector_norm(s) * norm_scale + norm_eps)
    for a, b, c in coefficients:
        x = a * x + b * x**3 + c * x**5
    return x


def _diag(s, m, n):
    D = torch.zeros(m, n, dtype=torch.float64)
    D[range(len(s)), range(len(s))] = s
    return D


# Spread over [1e-3, 1] of the largest, with a small overall scale so that the 1e-6 in the
# normaliser is visible (a norm_eps of 1e-7 moves the result by ~1e-5 here).
SPECTRUM = torch.tensor([0.3, 0.2, 0.11, 0.05, 0.02, 7e-3, 2e-3, 6e-4], dtype=torch.float64)


@pytest.mark.parametrize("shape", [(8, 8), (8, 13), (13, 8)])
@pytest.mark.parametrize("steps", [5, 7])
def test_polar_express_composition_matches_published_list(shape, steps):
    # Diagonal input: every Newton–Schulz step maps diag(s) to diag(p(s)), so the output's diagonal
    # is the composed scalar polynomial. float64 round-off only: atol 1e-10.
    coefficients = PUBLISHED_POLAR_EXPRESS + [NS5_TAIL] * (steps - 5)
    expected = _composed(SPECTRUM, coefficients, PE_NORM_SCALE, PE_NORM_EPS)
    out = orthogonalize(_diag(SPECTRUM, *shape), "polar_express", steps=steps, dtype=torch.float64)
    torch.testing.assert_close(out, _diag(expected, *shape), atol=1e-10, rtol=0)
    # The normalisation matters at this tolerance: without the 1.02 the result is > 100x atol away
    # (measured 1e-2 at 5 steps; 6e-7 at 7, where the convergent tail has flattened it).
    unscaled = _composed(SPECTRUM, coefficients, 1.0, PE_NORM_EPS)
    assert (unscaled - expected).abs().max() > (1e-3 if steps == 5 else 1e-8)


def test_polar_express_rotated_input_matches_composition():
    # Off-diagonal input U diag(s) V^T: the output is U diag(p(s)) V^T (round-off grows at most by
    # the composition's slope ~1e3 near zero: atol 1e-10 still holds in float64).
    gen = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(12, 8, generator=gen, dtype=torch.float64))
    G = (U * SPECTRUM) @ V.T
    expected = (U * _composed(SPECTRUM, PUBLISHED_POLAR_EXPRESS, PE_NORM_SCALE, PE_NORM_EPS)) @ V.T
    for g, e in ((G, expected), (G.T, expected.T)):
        torch.testing.assert_close(orthogonalize(g, "polar_express", dtype=torch.float64), e, atol=1e-10, rtol=0)


def test_quintic_composition_matches_keller_coefficients():
    expected = _composed(SPECTRUM, [KELLER] * 5, 1.0, 1e-7)
    out = orthogonalize(_diag(SPECTRUM, 8, 11), "quintic", steps=5, dtype=torch.float64)
    torch.testing.assert_close(out, _diag(expected, 8, 11), atol=1e-10, rtol=0)


class _MatmulShapes(TorchFunctionMode):
    """Records the output shape of every matrix product torch computes inside the block."""

    PRODUCTS = frozenset(
        {
            torch.mm,
            torch.bmm,
            torch.matmul,
            torch.addmm,
            torch.baddbmm,
            torch.Tensor.__matmul__,
            torch.Tensor.mm,
            torch.Tensor.bmm,
            torch.Tensor.matmul,
            torch.Tensor.addmm,
            torch.Tensor.baddbmm,
        }
    )

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.PRODUCTS:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("kernel", ["batched", "looped"])
@pytest.mark.parametrize("method", ["polar_express", "quintic"])
def test_tall_matrices_iterate_on_the_smaller_side(kernel, method):
    # A 96 x 12 input must be iterated as 12 x 96: every Gram matrix is 12 x 12, never 96 x 96
    # (the same result, about (96/12)^2 more work; a behaviour test, not a timing).
    G = torch.randn(2, 96, 12)
    with _MatmulShapes() as spy:
        out = orthogonalize(G, method, dtype=torch.float32, kernel=kernel)
    assert spy.shapes, "no matrix product recorded"
    assert all(s[-2:] in ((12, 12), (12, 96)) for s in spy.shapes), sorted(set(spy.shapes))
    # And the tall result is exactly the transpose of the wide one (same computation).
    assert torch.equal(out, orthogonalize(G.mT, method, dtype=torch.float32, kernel=kernel).mT)


# ------------------------------------------------------------------ Muon against torch.optim.Muon
def _grads(shapes, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("nesterov", [True, False])
def test_multi_step_muon_matches_torch_optim_muon(nesterov):
    # Same quintic coefficients in bf16, "original" scaling, decoupled decay, 8 steps (momentum is
    # non-zero from step 2 on). Measured: bitwise equal (torch 2.14.1). Tolerance 1e-2 of how far
    # the weights moved: running our Newton–Schulz in float32 instead moves the result by 0.5% of
    # that; a wrong Nesterov or EMA weight by 30-45%.
    shapes = [(32, 16), (16, 32), (24, 24), (24, 24)]
    torch.manual_seed(0)
    ours_p = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    start = [p.detach().clone() for p in ours_p]
    ours = Muon(
        [{"params": ours_p, "use_muon": True}],
        lr=0.02,
        momentum=0.9,
        nesterov=nesterov,
        weight_decay=0.1,
        ns_method="quintic",
        ns_steps=5,
        ns_dtype="bfloat16",
        adjust_lr="original",
    )
    ref = torch.optim.Muon(ref_p, lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1, adjust_lr_fn="original")
    for step in range(8):
        for a, b, g in zip(ours_p, ref_p, _grads(shapes, step)):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for a, b, w0 in zip(ours_p, ref_p, start):
        moved = (b - w0).norm()
        assert moved > 0.3  # the test is not vacuous: the weights did move
        assert (a - b).norm() <= 1e-2 * moved, (float((a - b).norm()), float(moved))
        torch.testing.assert_close(ours.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"], atol=1e-6, rtol=0)


def _exact_polar(u):
    U, _, Vh = torch.linalg.svd(u, full_matrices=False)
    return U @ Vh


SCALES = {
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    "spectral": lambda m, n: math.sqrt(m / n),
}


@pytest.mark.parametrize("adjust_lr", list(SCALES))
@pytest.mark.parametrize("nesterov", [True, False])
def test_multi_step_update_formula_float64(nesterov, adjust_lr):
    # The documented update, written out: buf <- beta buf + (1 - beta) g; u = g + beta (buf - g)
    # (Nesterov) or buf; W <- (1 - lr wd) W - lr scale(m, n) U V^T(u), conv kernels flattened to
    # (out, rest). Exact SVD in float64, 5 steps with fresh gradients: atol 1e-12.
    lr, beta, wd = 0.05, 0.8, 0.3
    shapes = [(6, 10), (10, 6), (4, 2, 3, 3)]
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    W = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(w) for w in W]
    opt = Muon(
        [{"params": params, "use_muon": True}],
        lr=lr,
        momentum=beta,
        nesterov=nesterov,
        weight_decay=wd,
        ns_method="svd",
        ns_dtype="float64",
        adjust_lr=adjust_lr,
    )
    for step in range(5):
        grads = [g.double() for g in _grads(shapes, step)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = beta * bufs[i] + (1 - beta) * g
            u = g + beta * (bufs[i] - g) if nesterov else bufs[i]
            m = u.shape[0]
            n = u.numel() // m
            polar = _exact_polar(u.reshape(m, n)).reshape(u.shape)
            W[i] = (1 - lr * wd) * W[i] - lr * SCALES[adjust_lr](m, n) * polar
        for p, w, b in zip(params, W, bufs):
            torch.testing.assert_close(p.detach(), w, atol=1e-12, rtol=0)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, atol=1e-14, rtol=0)
