"""Per-example gradient norms against brute force: torch.func.vmap(grad) of each example's own loss."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_muon import noise_scale
from lightning_muon.diagnostics.per_example import (
    conv_grad_norms,
    embedding_grad_norms,
    linear_grad_norms,
    norm_grad_norms,
    per_example_noise_scale,
)


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


# ---------------------------------------------------------------- convolutions, HF Conv1D, embeddings
def _per_example_weight_grads(layer: nn.Module, inputs: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """vmap(grad) of <layer(x_i), g_i> w.r.t. the weight: example i's weight gradient, float64."""
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def f(p, xi, gi):
        return (functional_call(layer, p, (xi.unsqueeze(0),)) * gi.unsqueeze(0)).sum()

    return vmap(grad(f), in_dims=(None, 0, 0))(params, inputs, cotangent)["weight"]


CONVS = [
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3), (5, 4, 11)),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding="valid", dilation=2), (5, 4, 13)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (4, 3, 6, 5)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=1), (3, 4, 7, 6)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", dilation=2), (3, 4, 9, 8)),
    (
        nn.Conv2d,
        dict(in_channels=6, out_channels=4, kernel_size=3, groups=2, padding=1, padding_mode="reflect"),
        (3, 6, 5, 5),
    ),
    (
        nn.Conv2d,
        dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, padding=1, padding_mode="circular"),
        (3, 4, 5, 6),
    ),
    (nn.Conv2d, dict(in_channels=4, out_channels=4, kernel_size=1), (6, 4, 3, 3)),
    (
        nn.Conv3d,
        dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1)),
        (3, 2, 4, 5, 3),
    ),
]


@pytest.mark.parametrize("cls, kwargs, shape", CONVS, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("method", ["materialize", "ghost"])
def test_conv_norms_match_vmap_grad(cls, kwargs, shape, method):
    torch.manual_seed(2)
    conv = cls(**kwargs).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = conv(x)
    g = torch.randn_like(y)
    expect = _per_example_weight_grads(conv, x, g)
    got = conv_grad_norms(
        x,
        g,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        method=method,
    )
    # float64 throughout: only summation order differs
    torch.testing.assert_close(got.per_example_sq, expect.square().flatten(1).sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(got.batch_sq, expect.sum(0).square().sum(), rtol=1e-10, atol=0)


def test_conv_norms_in_chunks_match_one_pass(monkeypatch):
    import lightning_muon.diagnostics.per_example as pe

    torch.manual_seed(0)
    x, g = torch.randn(7, 3, 6, 6, dtype=torch.float64), torch.randn(7, 4, 6, 6, dtype=torch.float64)
    whole = conv_grad_norms(x, g, 3, padding=1)
    monkeypatch.setattr(pe, "_CHUNK", 3 * 36 * 9 * 2)  # two examples per chunk: 4 chunks
    parts = pe.conv_grad_norms(x, g, 3, padding=1)
    torch.testing.assert_close(parts.per_example_sq, whole.per_example_sq, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts.batch_sq, whole.batch_sq, rtol=1e-12, atol=0)


class HFConv1D(nn.Module):
    """Hugging Face's Conv1D layout, written out: x @ W + b with W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_transposed_linear_norms_are_the_linear_formula():
    torch.manual_seed(3)
    layer = HFConv1D(6, 4).double()
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    g = torch.randn(5, 7, 6, dtype=torch.float64)
    expect = _per_example_weight_grads(layer, x, g)  # (B, in, out)
    got = linear_grad_norms(x, g)
    torch.testing.assert_close(got.per_example_sq, expect.square().sum((1, 2)), rtol=1e-10, atol=0)
    torch.testing.assert_close(got.batch_sq, expect.sum(0).square().sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_norms_match_vmap_grad(padding_idx):
    torch.manual_seed(4)
    emb = nn.Embedding(10, 5, padding_idx=padding_idx).double()
    ids = torch.randint(0, 4, (6, 9))  # few ids: many repeats within an example
    g = torch.randn(6, 9, 5, dtype=torch.float64)
    expect = _per_example_weight_grads(emb, ids, g)
    got = embedding_grad_norms(ids, g, padding_idx)
    torch.testing.assert_close(got.per_example_sq, expect.square().sum((1, 2)), rtol=1e-10, atol=0)
    torch.testing.assert_close(got.batch_sq, expect.sum(0).square().sum(), rtol=1e-10, atol=0)


def test_conv_and_embedding_bad_inputs():
    with pytest.raises(ValueError, match="groups must divide"):
        conv_grad_norms(torch.ones(2, 3, 5), torch.ones(2, 4, 3), 3, groups=2)
    with pytest.raises(ValueError, match="output positions"):
        conv_grad_norms(torch.ones(2, 3, 5), torch.ones(2, 4, 4), 3)
    with pytest.raises(ValueError, match="same number of dims"):
        conv_grad_norms(torch.ones(2, 3, 5), torch.ones(2, 4), 3)
    with pytest.raises(ValueError, match="integers"):
        embedding_grad_norms(torch.ones(2, 3), torch.ones(2, 3, 4))


@pytest.mark.parametrize("method", ["materialize", "ghost"])
def test_linear_norms_in_small_chunks_match_per_example_gradients(monkeypatch, method):
    # A wide layer is computed a few examples at a time (_CHUNK elements per temporary): every chunk's
    # examples, and the whole batch's gradient, must count. Reference: the per-example gradients
    # G_i^T A_i written out in float64 (rtol 1e-12: only summation order differs).
    import lightning_muon.diagnostics.per_example as pe

    torch.manual_seed(5)
    B, T, d_in, d_out = 7, 3, 10, 8
    A, G = torch.randn(B, T, d_in, dtype=torch.float64), torch.randn(B, T, d_out, dtype=torch.float64)
    c = torch.einsum("bto,bti->boi", G, A)  # example i's weight gradient
    per_chunk = d_in * d_out if method == "materialize" else T * T
    monkeypatch.setattr(pe, "_CHUNK", 2 * per_chunk)  # 2 examples per chunk: 4 chunks, the last one short
    got = pe.linear_grad_norms(A, G, method)
    torch.testing.assert_close(got.per_example_sq, c.square().sum((1, 2)), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.batch_sq, c.sum(0).square().sum(), rtol=1e-12, atol=0)


class TokenNorm(nn.Module):
    """A LayerNorm over the last two dims (tokens, features), then a Linear head."""

    def __init__(self, T=5, d=6, out=3):
        super().__init__()
        self.ln = nn.LayerNorm((T, d))
        self.head = nn.Linear(d, out)
        with torch.no_grad():  # non-trivial gain and bias
            self.ln.weight.add_(0.3 * torch.randn_like(self.ln.weight))
            self.ln.bias.add_(0.2 * torch.randn_like(self.ln.bias))

    def forward(self, x):
        return self.head(self.ln(x))


@pytest.mark.parametrize("shape", [(6, 5, 6), (4, 2, 5, 6)])  # (B, T, d) and (B, S, T, d) examples
def test_layernorm_over_two_dims_matches_vmap_grad(shape):
    torch.manual_seed(6)
    model = TokenNorm().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    seen = _captured(model, x, y)
    per_example = _brute_force(model, x, y)
    A, G = seen["ln"]
    got = norm_grad_norms(A, G, normalized_ndim=2, eps=model.ln.eps)
    expect = sum(per_example[k].reshape(x.shape[0], -1).square().sum(1) for k in ("ln.weight", "ln.bias"))
    torch.testing.assert_close(got.per_example_sq, expect, rtol=1e-10, atol=0)
    batch = model.ln.weight.grad.square().sum() + model.ln.bias.grad.square().sum()
    torch.testing.assert_close(got.batch_sq, batch, rtol=1e-10, atol=0)
