"""Matrix structure: conv kernels flattened, stacks of matrices and fused QKV blocks orthogonalised one by one.

References are independent of the package: exact polar factors from torch.linalg.svd per slice or
block (float64), and Keller Jordan's quintic Newton–Schulz written out here per slice.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.gpt import GPT, GPTConfig
from lightning_muon import (
    MatrixView,
    Muon,
    configure_muon,
    matrix_view_for,
    muon_param_groups,
    route_parameters,
    routing_table,
)


def _polar(u: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(u, full_matrices=False)
    return U @ Vh


def _quintic_by_hand(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's iteration on one matrix, float32: X / ||X||_F, then X <- aX + (bA + cA^2)X."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


class MoE(nn.Module):
    """A mixture-of-experts-like layer: a bank of expert matrices (experts, d_in, d_out)."""

    def __init__(self, experts: int = 4, d_in: int = 8, d_out: int = 12) -> None:
        super().__init__()
        self.router = nn.Linear(d_in, experts)
        self.experts = nn.Parameter(torch.randn(experts, d_in, d_out) / math.sqrt(d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.router(x).softmax(-1)
        return torch.einsum("be,bi,eio->bo", gate, x, self.experts)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.moe = MoE(d_in=6, d_out=6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for conv in self.body:
            x = x + F.relu(conv(x))
        x = self.up(x).mean((2, 3))
        return self.fc(self.moe(x))


def _tiny_gpt(n_head: int = 4, n_embd: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=n_head, n_embd=n_embd))


# ---------------------------------------------------------------- the views themselves
@pytest.mark.parametrize(
    "spec, shape, count, m, n",
    [
        ("matrix", (6, 4), 1, 6, 4),
        ("flatten", (6, 2, 3, 3), 1, 6, 18),
        ("conv", (6, 2, 3, 3), 1, 6, 18),
        ("conv_transpose", (6, 2, 3, 3), 1, 6, 18),
        ("stack", (4, 8, 12), 4, 8, 12),
        ("stack", (2, 3, 8, 12), 6, 8, 12),
        ("split=3", (24, 8), 3, 8, 8),
        ("split=3,heads=2", (24, 8), 3, 8, 8),
        ("split=3,heads=2,per_head", (24, 8), 6, 4, 8),
        ("split=3,heads=2,order=heads", (24, 8), 3, 8, 8),
        ("split=3,heads=2,order=heads,per_head", (24, 8), 6, 4, 8),
    ],
)
def test_views_round_trip_and_count_their_matrices(spec, shape, count, m, n) -> None:
    view = MatrixView.parse(spec)
    assert str(view) == spec and MatrixView.parse(str(view)) == view
    assert view.matrices(shape) == (count, m, n) and view.why_not(shape) is None
    X = torch.randn(2, *shape)
    mats = view.to_matrices(X)
    assert mats.shape == (2 * count, m, n)
    assert torch.equal(view.from_matrices(mats, shape), X)


def test_split_blocks_follow_the_row_layout() -> None:
    # rows (part, head, head_dim) vs (head, part, head_dim): row r holds the value r
    W = torch.arange(24.0).view(24, 1).expand(24, 8)
    by_part = MatrixView.parse("split=3,heads=2").to_matrices(W[None])
    assert by_part[1, :, 0].tolist() == list(range(8, 16))  # k: the second third
    by_head = MatrixView.parse("split=3,heads=2,order=heads").to_matrices(W[None])
    assert by_head[1, :, 0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19]  # k of head 0, then of head 1
    per_head = MatrixView.parse("split=3,heads=2,order=heads,per_head").to_matrices(W[None])
    assert per_head[3, :, 0].tolist() == [12, 13, 14, 15]  # head 1's q


def test_split_matches_the_example_gpt_attention() -> None:
    # The view's q, k, v blocks are the weights the GPT's forward really uses for q, k and v.
    torch.manual_seed(0)
    gpt = _tiny_gpt()
    attn = gpt.h[0].attn
    view = MatrixView.parse(attn.muon_qkv_layout["c_attn.weight"])
    x = torch.randn(2, 5, 32)
    B, T, _ = x.shape
    q, k, v = attn.c_attn(x).view(B, T, -1, 3, attn.head_dim).permute(3, 0, 2, 1, 4)  # as forward() does
    assert attn.c_attn.bias is None
    blocks = view.to_matrices(attn.c_attn.weight.detach()[None])
    for part, ref in enumerate((q, k, v)):  # ref: (B, heads, T, head_dim)
        got = x @ blocks[part].T
        torch.testing.assert_close(got, ref.transpose(1, 2).reshape(B, T, -1), rtol=0, atol=1e-6)
    per_head = MatrixView.parse(attn.muon_qkv_layout["c_attn.weight"] + ",per_head").to_matrices(
        attn.c_attn.weight.detach()[None]
    )
    head, part = 2, 1  # blocks ordered (head, part): head 2's k
    torch.testing.assert_close(x @ per_head[head * 3 + part].T, k[:, head], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "spec, error",
    [
        ("stacked", "expected one of"),
        ("split=0", "positive integer"),
        ("split=3,heads=x", "positive integer"),
        ("split=3,per_head", "need heads=H"),
        ("split=3,order=heads", "need heads=H"),
        ("split=3,order=rows", "unknown option"),
        (3, "must be a string"),
    ],
)
def test_malformed_views_are_refused(spec, error) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        MatrixView.parse(spec)


# ---------------------------------------------------------------- routing on real modules
def _views(routes) -> dict:
    return {r.name: r.matrix for r in routes if r.use_muon}


def test_routing_conv_transposed_conv_and_stack() -> None:
    routes = route_parameters(ConvNet())
    views = _views(routes)
    assert views == {
        "body.0.weight": "conv",
        "body.1.weight": "conv",
        "up.weight": "conv_transpose",
        "moe.experts": "stack",
    }
    reasons = {r.name: r.reason for r in routes}
    assert reasons["moe.router.weight"] == "MoE router (4 expert logits; router='adamw')"  # next to the experts
    assert reasons["body.0.weight"] == "hidden conv kernel: conv (out, rest) 8 x 72"
    assert reasons["up.weight"] == "hidden conv kernel: conv_transpose (in, rest) 8 x 24"
    assert reasons["moe.experts"] == "hidden matrix: stack of 4 (6 x 6)"
    table = routing_table(routes)
    assert "stack of 4 (6 x 6)" in table and "conv (out, rest) 8 x 72" in table
    groups = muon_param_groups(ConvNet())
    assert groups[0]["matrix_views"] == {  # only what differs from Muon's default for the shape
        "body.0.weight": "conv",
        "body.1.weight": "conv",
        "up.weight": "conv_transpose",
        "moe.experts": "stack",
    }


def test_matrix_rules_override_per_pattern() -> None:
    routes = route_parameters(ConvNet(), matrix_rules={"moe.experts": "flatten", "body.*": "stack"})
    views = _views(routes)
    assert views["moe.experts"] == "flatten" and views["body.0.weight"] == "stack"
    reason = {r.name: r.reason for r in routes}["body.1.weight"]
    assert reason == "hidden matrix: stack of 64 (3 x 3) (matrix_rules 'body.*')"
    # the 'conv' rule on a stacked parameter of a non-conv module
    assert _views(route_parameters(MoE(), matrix_rules={"experts": "conv"}, structure=False))["experts"] == "conv"


def test_nn_multihead_attention_split_qkv() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.MultiheadAttention(16, 4) for _ in range(2)])
            self.out = nn.Linear(16, 3)

    whole = _views(route_parameters(Encoder()))
    assert whole["layers.0.in_proj_weight"] == "matrix"  # off unless asked
    split = route_parameters(Encoder(), split_qkv=True)
    assert _views(split)["layers.0.in_proj_weight"] == "split=3,heads=4"
    assert "split qkv 3 x (16 x 16) (split_qkv, nn.MultiheadAttention)" in routing_table(split)
    per_head = _views(route_parameters(Encoder(), split_qkv="per_head"))
    assert per_head["layers.1.in_proj_weight"] == "split=3,heads=4,per_head"
    assert MatrixView.parse(per_head["layers.1.in_proj_weight"]).matrices((48, 16)) == (12, 4, 16)


def test_example_gpt_split_qkv_uses_its_declared_layout() -> None:
    gpt = _tiny_gpt()
    assert _views(route_parameters(gpt, split_qkv=True))["h.0.attn.c_attn.weight"] == "split=3,heads=4,order=heads"
    routes = route_parameters(gpt, split_qkv="per_head")
    assert _views(routes)["h.1.attn.c_attn.weight"] == "split=3,heads=4,order=heads,per_head"
    assert "split qkv per head 12 x (8 x 32), rows (head, part, head_dim)" in routing_table(routes)
    for other in ("h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight"):
        assert _views(routes)[other] == "matrix"


def test_qkv_by_name_with_heads_from_the_module() -> None:
    class Attention(nn.Module):  # timm-like: rows (q/k/v, head, head_dim)
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = 2
            self.qkv = nn.Linear(8, 24)
            self.proj = nn.Linear(8, 8)

    model = nn.Sequential(Attention(), Attention())
    assert _views(route_parameters(model, split_qkv="per_head", warn=False))["0.qkv.weight"] == (
        "split=3,heads=2,per_head"
    )
    assert _views(route_parameters(model, split_qkv=True, num_heads=4, warn=False))["1.qkv.weight"] == (
        "split=3,heads=4"
    )


def test_bad_structure_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split_qkv must be one of"):
        route_parameters(_tiny_gpt(), split_qkv="heads")
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1"):
        route_parameters(_tiny_gpt(), split_qkv=True, num_heads=0)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        route_parameters(ConvNet(), matrix_rules={"experts_typo": "stack"})
    with pytest.raises(ValueError, match="expected one of"):
        route_parameters(ConvNet(), matrix_rules={"moe.experts": "stacked"})
    with pytest.raises(ValueError, match="'split' is for a 2-D fused projection"):
        route_parameters(ConvNet(), matrix_rules={"moe.experts": "split=2"})
    with pytest.raises(ValueError, match="cannot be cut in 3 parts x 5 heads"):
        route_parameters(_tiny_gpt(), matrix_rules={"c_attn": "split=3,heads=5"})
    with pytest.raises(ValueError, match="needs its number of heads"):  # qkv-shaped, no heads anywhere
        route_parameters(nn.ModuleDict({"qkv": nn.Linear(8, 24), "o": nn.Linear(8, 8)}), split_qkv="per_head")


def test_muon_refuses_views_that_do_not_fit_and_changes_nothing() -> None:
    w = nn.Parameter(torch.randn(6, 4))
    for views, error in [
        ({"w": "split=4"}, "cannot be cut in 4 parts"),
        ({"w": "stack"}, None),  # a 2-D stack is one matrix: fine
        ({"other": "stack"}, "not parameters of this group"),
        (["stack"], "must be a dict"),
        ({"w": "bogus"}, "expected one of"),
    ]:
        group = {"params": [("w", w)], "use_muon": True, "matrix_views": views}
        if error is None:
            Muon([group])
            continue
        with pytest.raises(ValueError, match=error):
            Muon([group])
    opt = Muon([{"params": [("w", w)], "use_muon": True}], lr=0.1)
    opt.param_groups[0]["matrix_views"] = {"w": "split=5"}  # edited after construction
    w.grad = torch.randn(6, 4)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="cannot be cut in 5 parts"):
        opt.step()
    assert torch.equal(w.detach(), before) and not opt.state


# ---------------------------------------------------------------- the optimizer step against references
def _one_step(shape, views, adjust_lr="original", method="svd", dtype="float64", lr=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64 if dtype == "float64" else None))
    g = torch.randn(shape, generator=gen, dtype=w.dtype)
    opt = Muon(
        [{"params": [("w", w)], "use_muon": True, "matrix_views": views}],
        lr=lr,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        ns_method=method,
        ns_dtype=dtype,
        adjust_lr=adjust_lr,
    )
    start = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    return start, g, w.detach()


@pytest.mark.parametrize("adjust_lr", ["original", "spectral", "match_rms_adamw"])
def test_stack_orthogonalises_each_slice_exactly(adjust_lr) -> None:
    from lightning_muon.optim.functional import ADJUST_LR

    shape = (3, 5, 8)
    start, g, got = _one_step(shape, {"w": "stack"}, adjust_lr)
    want = torch.stack([start[e] - 0.1 * ADJUST_LR[adjust_lr](5, 8) * _polar(g[e]) for e in range(3)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and not the flattened (5 x 24)-per-expert or (3 x 40) polar factor
    flat = start - 0.1 * ADJUST_LR[adjust_lr](3, 40) * _polar(g.reshape(3, 40)).reshape(shape)
    assert (got - flat).abs().max() > 1e-3


def test_default_for_plain_tensors_is_flatten() -> None:
    start, g, got = _one_step((3, 5, 8), None)  # no view: what Muon always did
    want = start - 0.1 * math.sqrt(max(1, 3 / 40)) * _polar(g.reshape(3, 40)).reshape(3, 5, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "spec, blocks",
    [
        ("split=3", lambda W: [W[0:8], W[8:16], W[16:24]]),
        ("split=3,heads=2,per_head", lambda W: [W[i : i + 4] for i in range(0, 24, 4)]),
        (
            "split=3,heads=2,order=heads",  # rows (head, part, head_dim)
            lambda W: [torch.cat([W[p * 4 : p * 4 + 4], W[12 + p * 4 : 16 + p * 4]]) for p in range(3)],
        ),
    ],
)
def test_split_orthogonalises_each_block_exactly(spec, blocks) -> None:
    start, g, got = _one_step((24, 8), {"w": spec}, adjust_lr="spectral")
    delta = (start - got) / 0.1
    for b_delta, b_grad in zip(blocks(delta), blocks(g)):
        m, n = b_grad.shape
        torch.testing.assert_close(b_delta, math.sqrt(m / n) * _polar(b_grad), rtol=0, atol=1e-12)


def test_conv_transpose_is_scaled_as_the_map_it_applies() -> None:
    # (in=4, out=6, 2, 2): orthogonalised as (4, 24); "original" scales by sqrt(max(1, fan_out / fan_in))
    # of the (24, 4) map it applies, sqrt(6), where a conv kernel (4, 24) would get 1
    start, g, got = _one_step((4, 6, 2, 2), {"w": "conv_transpose"})
    want = start - 0.1 * math.sqrt(6) * _polar(g.reshape(4, 24)).reshape(4, 6, 2, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    _, _, conv = _one_step((4, 6, 2, 2), {"w": "conv"})
    torch.testing.assert_close(start - (start - conv) * math.sqrt(6), want, rtol=0, atol=1e-12)


def test_newton_schulz_runs_per_slice() -> None:
    start, g, got = _one_step((3, 6, 10), {"w": "stack"}, adjust_lr="spectral", method="quintic", dtype="float32")
    for e in range(3):
        want = start[e] - 0.1 * math.sqrt(6 / 10) * _quintic_by_hand(g[e])
        torch.testing.assert_close(got[e], want, rtol=0, atol=2e-6)


def test_stack_shares_buckets_with_same_shape_matrices() -> None:
    # the 4 experts (8 x 12) join the bucket of a Linear (8 x 12); each result is its own polar factor
    gen = torch.Generator().manual_seed(1)
    bank, lin = nn.Parameter(torch.randn(4, 8, 12, generator=gen)), nn.Parameter(torch.randn(8, 12, generator=gen))
    grads = [torch.randn(4, 8, 12, generator=gen), torch.randn(8, 12, generator=gen)]
    together = Muon(
        [{"params": [("bank", bank), ("lin", lin)], "use_muon": True, "matrix_views": {"bank": "stack"}}],
        ns_method="svd",
        momentum=0.0,
    )
    ref = [nn.Parameter(bank.detach().clone()), nn.Parameter(lin.detach().clone())]
    apart = Muon([{"params": [p], "use_muon": True} for p in ref[1:]], ns_method="svd", momentum=0.0)
    for p, g in zip([bank, lin, ref[1]], [*grads, grads[1]]):
        p.grad = g.clone()
    together.step()
    apart.step()
    torch.testing.assert_close(lin.detach(), ref[1].detach(), rtol=0, atol=1e-6)
    scale = 1e-3 * 0.2 * math.sqrt(12)  # match_rms_adamw, lr 1e-3
    for e in range(4):
        want = (1 - 1e-3 * 0.01) * ref[0][e].detach() - scale * _polar(grads[0][e])
        torch.testing.assert_close(bank[e].detach(), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- state dicts, checkpoints, factories
def test_views_travel_with_the_state_dict() -> None:
    model = ConvNet()
    opt = Muon(muon_param_groups(model, router="muon", split_qkv=False, matrix_rules={"moe.experts": "flatten"}))
    state = copy.deepcopy(opt.state_dict())
    assert "moe.experts" not in state["param_groups"][0]["matrix_views"]  # flatten is the 3-D default
    assert state["param_groups"][0]["matrix_views"]["up.weight"] == "conv_transpose"
    fresh = Muon(muon_param_groups(model, router="muon"))  # routed with stack for the experts
    assert fresh.param_groups[0]["matrix_views"]["moe.experts"] == "stack"
    fresh.load_state_dict(state)  # the checkpoint's views win
    assert "moe.experts" not in fresh.param_groups[0]["matrix_views"]
    old = copy.deepcopy(state)
    del old["param_groups"][0]["matrix_views"]  # written before matrix views existed
    again = Muon(muon_param_groups(model, router="muon"))
    again.load_state_dict(old)
    assert again.param_groups[0]["matrix_views"]["moe.experts"] == "stack"  # this optimizer's views kept
    bad = copy.deepcopy(state)
    bad["param_groups"][0]["matrix_views"]["moe.router.weight"] = "split=3"  # 4 rows
    target = Muon(muon_param_groups(model, router="muon"))
    before = copy.deepcopy(target.param_groups[0]["matrix_views"])
    with pytest.raises(ValueError, match="cannot be cut in 3 parts"):
        target.load_state_dict(bad)
    assert target.param_groups[0]["matrix_views"] == before


def test_configure_muon_passes_the_structure_options() -> None:
    gpt = _tiny_gpt()
    opt = configure_muon(gpt, lr=0.02, split_qkv="per_head")
    views = opt.param_groups[0]["matrix_views"]
    assert views == {f"h.{i}.attn.c_attn.weight": "split=3,heads=4,order=heads,per_head" for i in range(2)}
    x = torch.randint(0, 64, (2, 16))
    F.cross_entropy(gpt(x).flatten(0, 1), x.flatten()).backward()
    opt.step()  # a real step through the split
    assert all(torch.isfinite(p).all() for p in gpt.parameters())


def test_matrix_view_for_defaults() -> None:
    assert str(matrix_view_for((4, 4), None)) == "matrix"
    assert str(matrix_view_for((4, 2, 3), None)) == "flatten"
    assert str(matrix_view_for((4, 2, 3), "stack")) == "stack"


def test_nanogpt_style_per_head_split_reads_n_head() -> None:
    class CausalSelfAttention(nn.Module):  # nanoGPT: c_attn rows (q/k/v, head, head_dim), n_head, no layout
        def __init__(self) -> None:
            super().__init__()
            self.n_head = 2
            self.c_attn = nn.Linear(8, 24)
            self.c_proj = nn.Linear(8, 8)

    model = nn.ModuleDict({"attn": CausalSelfAttention(), "head": nn.Linear(8, 3)})
    routes = route_parameters(model, split_qkv="per_head", warn=False)
    view = _views(routes)["attn.c_attn.weight"]
    assert view == "split=3,heads=2,per_head"
    # reference: 3 parts x 2 heads, each a (24 / 6) x 8 block of rows (q head 0, q head 1, k head 0, ...)
    W = model["attn"].c_attn.weight.detach()
    blocks = MatrixView.parse(view).to_matrices(W[None])
    torch.testing.assert_close(blocks, W.reshape(6, 4, 8), rtol=0, atol=0)
