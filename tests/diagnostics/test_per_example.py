"""Per-example gradient norms against brute force: torch.func.vmap(grad) of each example's own loss."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_muon import noise_scale
from lightning_muon.diagnostics.per_example import linear_grad_norms, norm_grad_norms, per_example_noise_scale


class Tiny(nn.Module):
    """A transformer-ish stack: LayerNorm -> Linear -> GELU -> Linear -> RMSNorm -> Linear head."""

    def __init__(self, d=6, h=10, out=5):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, h)
        self.proj = nn.Linear(h, d, bias=False)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, out)
        with torch.no_grad():  # non-trivial gains and biases
            for m in (self.ln, self.rms):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
            self.ln.bias.add_(0.2 * torch.randn_like(self.ln.bias))

    def forward(self, x):
        return self.head(self.rms(x + self.proj(nn.functional.gelu(self.fc(self.ln(x))))))


def _captured(model, x, y):
    """Inputs and output gradients of every layer, from hooks, for the batch-mean loss."""
    seen = {}

    def fwd(name):
        def hook(mod, args, out):
            out.register_hook(lambda g: seen.__setitem__(name, (args[0].detach(), g.detach())))

        return hook

    handles = [m.register_forward_hook(fwd(n)) for n, m in model.named_modules() if n]
    nn.functional.mse_loss(model(x), y, reduction="none").sum(-1).mean().backward()  # mean over all tokens
    for h in handles:
        h.remove()
    return seen


def _brute_force(model, x, y):
    """Each example's contribution to the batch-mean gradient: grad of its own loss / B."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    B = x.shape[0]

    def loss(p, xi, yi):  # mean over this example's tokens, as a share of the batch mean
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.mse_loss(out, yi.unsqueeze(0), reduction="none").sum(-1).mean() / B

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("shape", [(7,), (7, 5), (3, 4, 2)])  # (B,), (B, T), (B, T1, T2) examples
@pytest.mark.parametrize("method", ["materialize", "ghost", "auto"])
def test_linear_and_norm_layers_match_vmap_grad(shape, method):
    torch.manual_seed(1)
    model = Tiny().double()
    x, y = torch.randn(*shape, 6, dtype=torch.float64), torch.randn(*shape, 5, dtype=torch.float64)
    seen = _captured(model, x, y)
    per_example = _brute_force(model, x, y)
    for name in ("fc", "proj", "head"):
        A, G = seen[name]
        got = linear_grad_norms(A, G, method)
        c = per_example[f"{name}.weight"]
        torch.testing.assert_close(got.per_example_sq, c.square().sum((1, 2)), rtol=1e-10, atol=0)
        torch.testing.assert_close(got.batch_sq, getattr(model, name).weight.grad.square().sum(), rtol=1e-10, atol=0)
    for name, rms in (("ln", False), ("rms", True)):
        A, G = seen[name]
        mod = getattr(model, name)
        has_bias = getattr(mod, "bias", None) is not None
        got = norm_grad_norms(A, G, eps=mod.eps, rms=rms, bias=has_bias)
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if has_bias else [])
        expect = sum(per_example[k].reshape(x.shape[0], -1).square().sum(1) for k in keys)
        torch.testing.assert_close(got.per_example_sq, expect, rtol=1e-10, atol=0)
        batch = sum(mod.get_parameter(k.split(".")[1]).grad.square().sum() for k in keys)
        torch.testing.assert_close(got.batch_sq, batch, rtol=1e-10, atol=0)


def test_fp32_and_bf16_inputs_are_computed_in_fp32():
    torch.manual_seed(0)
    A, G = torch.randn(4, 9, 16), torch.randn(4, 9, 12)
    ref = linear_grad_norms(A.double(), G.double(), "materialize")
    for method in ("materialize", "ghost"):
        got = linear_grad_norms(A, G, method)
        assert got.per_example_sq.dtype == torch.float32
        torch.testing.assert_close(got.per_example_sq.double(), ref.per_example_sq, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.batch_sq.double(), ref.batch_sq, rtol=1e-5, atol=0)
    bf = linear_grad_norms(A.bfloat16(), G.bfloat16())  # inputs rounded to bf16, products in fp32
    torch.testing.assert_close(bf.per_example_sq.double(), ref.per_example_sq, rtol=3e-2, atol=0)


def test_auto_picks_the_cheaper_method():
    # ghost for T (d_in + d_out) < d_in d_out; both give the same numbers anyway
    A, G = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    torch.testing.assert_close(
        linear_grad_norms(A, G, "auto").per_example_sq, linear_grad_norms(A, G, "ghost").per_example_sq
    )
    from lightning_muon.diagnostics.per_example import _linear_cost

    m, g = _linear_cost(3, 64, 64)
    assert g < m
    m, g = _linear_cost(128, 128, 384)
    assert m < g


def test_per_example_noise_scale_is_the_two_batch_formula_with_b_1():
    torch.manual_seed(0)
    c = torch.randn(8, 5)  # 8 per-example contributions to a 5-dim batch gradient
    got = per_example_noise_scale(c.square().sum(1), c.sum(0).square().sum())
    # small batch (one example): g_i = B c_i; large: the mean, sum_i c_i
    expect = noise_scale((8 * c).square().sum(1).mean(), c.sum(0).square().sum(), 1, 8)
    torch.testing.assert_close(got.b_simple, expect.b_simple)
    # scale invariance: a loss scaled by any factor gives the same B_simple
    s = per_example_noise_scale((3 * c).square().sum(1), (3 * c).sum(0).square().sum())
    torch.testing.assert_close(s.b_simple, got.b_simple, rtol=1e-5, atol=0)


def test_closed_form_linear_regression_one_batch():
    # loss_i = 0.5 |W x_i - y_i|^2, y = W* x + e, x ~ N(0, I_d), e ~ N(0, s^2 I_k), D = W - W*:
    # G = D, tr Sigma = (d + 1) |D|^2 + k d s^2 (fourth moments of a Gaussian).
    torch.manual_seed(0)
    d, k, s, B, n_batches = 8, 4, 0.5, 64, 400
    D = 0.3 * torch.randn(k, d, dtype=torch.float64)
    small, big = [], []
    for _ in range(n_batches):
        x = torch.randn(B, d, dtype=torch.float64)
        e = s * torch.randn(B, k, dtype=torch.float64)
        g_out = (x @ D.T - e) / B  # d(batch-mean loss) / d(output)
        norms = linear_grad_norms(x, g_out)
        est = per_example_noise_scale(norms.per_example_sq, norms.batch_sq)
        small.append(est.trace_sigma)
        big.append(est.grad_sq)
    trace, grad_sq = torch.stack(small).mean(), torch.stack(big).mean()
    true_trace = (d + 1) * D.square().sum() + k * d * s**2
    # 400 batches x 64 examples: standard errors ~1% (trace) and ~2% (|G|^2); 5% tolerance
    assert float(trace) == pytest.approx(float(true_trace), rel=0.05)
    assert float(grad_sq) == pytest.approx(float(D.square().sum()), rel=0.05)


def test_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        linear_grad_norms(torch.ones(2, 3), torch.ones(2, 4), "fast")
    with pytest.raises(ValueError, match="agree"):
        linear_grad_norms(torch.ones(2, 5, 3), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        linear_grad_norms(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="one shape"):
        norm_grad_norms(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="normalized_ndim"):
        norm_grad_norms(torch.ones(2, 3), torch.ones(2, 3), normalized_ndim=2)
    with pytest.raises(ValueError, match=">= 2 examples"):
        per_example_noise_scale(torch.ones(1), 1.0)
