"""Third-party layer conventions: a weight stored (in, out), grouped and depthwise convs, MoE routers,
fused gate/up experts. No third-party library needed: each layout is written out here.

References are independent of the view code: a twin model where the layer is a plain nn.Linear (the
stored transpose), separate nn.Conv2d per group, separate gate and up matrices, and exact polar
factors from torch.linalg.svd (float64).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_muon import MatrixView, Muon, RoutingRules, muon_param_groups, route_parameters


class Conv1D(nn.Module):
    """Hugging Face's Conv1D layout (transformers.pytorch_utils): y = x @ W + b, W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Attn(nn.Module):
    def __init__(self, d: int, heads: int, linear: bool) -> None:
        super().__init__()
        self.num_heads = heads
        make = (lambda i, o: nn.Linear(i, o)) if linear else (lambda i, o: Conv1D(o, i))
        self.c_attn, self.c_proj = make(d, 3 * d), make(d, d)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, linear: bool) -> None:
        super().__init__()
        make = (lambda i, o: nn.Linear(i, o)) if linear else (lambda i, o: Conv1D(o, i))
        self.attn = Attn(d, heads, linear)
        self.c_fc, self.mlp_proj = make(d, 4 * d), make(4 * d, d)


class GPT2Like(nn.Module):
    """GPT-2's parameter layout (only what routing and the optimizer see)."""

    def __init__(self, d: int = 16, heads: int = 2, linear: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, d)
        self.h = nn.ModuleList([Block(d, heads, linear) for _ in range(2)])
        self.lm_head = nn.Linear(d, 50, bias=False)


def _twin(model: GPT2Like) -> tuple[GPT2Like, set[str]]:
    """The same model with nn.Linear layers holding the Conv1D weights transposed, and the Conv1D names."""
    twin = GPT2Like(linear=True)
    convs = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = name.rpartition(".")[0]
            value = p.T if owner in convs and name.endswith("weight") else p
            twin.get_parameter(name).copy_(value)
    return twin, convs


def test_conv1d_is_read_as_its_out_in_map_in_the_routing_table():
    routes = {r.name: r for r in route_parameters(GPT2Like(), warn=False)}
    c_fc, c_proj = routes["h.0.c_fc.weight"], routes["h.0.mlp_proj.weight"]
    assert c_fc.matrix == "matrix,transposed" and "matrix 64 x 16, stored (in, out)" in c_fc.reason
    assert c_proj.matrix == "matrix,transposed" and "matrix 16 x 64, stored (in, out)" in c_proj.reason
    # adjust_lr reads (fan_out, fan_in) of the map: c_fc is 16 -> 64, c_proj 64 -> 16
    assert MatrixView.parse(c_fc.matrix).scale_shape(tuple(c_fc.param.shape)) == (64, 16)
    assert MatrixView.parse(c_proj.matrix).scale_shape(tuple(c_proj.param.shape)) == (16, 64)
    split = {r.name: r for r in route_parameters(GPT2Like(), split_qkv=True, warn=False)}
    assert split["h.0.attn.c_attn.weight"].matrix == "split=3,heads=2,transposed"
    assert split["h.0.attn.c_proj.weight"].matrix == "matrix,transposed"


@pytest.mark.parametrize(
    "options",
    [
        dict(adjust_lr="original"),
        dict(adjust_lr="match_rms_adamw"),
        dict(adjust_lr="spectral", variant="normuon"),
        dict(adjust_lr="original", split_qkv=True),
        dict(adjust_lr="original", split_qkv="per_head", variant="normuon"),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_a_conv1d_model_trains_exactly_like_its_linear_twin(options):
    # Every Conv1D update must be the transpose of the twin nn.Linear's: scale, NorMuon rows, split blocks.
    torch.manual_seed(0)
    model = GPT2Like()
    twin, convs = _twin(model)
    split = options.pop("split_qkv", False)
    opts = []
    for m in (model, twin):
        groups = muon_param_groups(m, split_qkv=split, warn=False) if split else muon_param_groups(m)
        opts.append(Muon(groups, lr=0.05, ns_method="svd", ns_dtype="float32", weight_decay=0.01, **options))
    for step in range(3):
        torch.manual_seed(100 + step)
        for name, p in twin.named_parameters():  # the same gradients, transposed for the Conv1D weights
            p.grad = torch.randn_like(p)
            transposed = name.rpartition(".")[0] in convs and name.endswith("weight")
            model.get_parameter(name).grad = p.grad.T.contiguous() if transposed else p.grad.clone()
        for opt in opts:
            opt.step()
    for name, p in model.named_parameters():
        expect = twin.get_parameter(name)
        got = p.T if name.rpartition(".")[0] in convs and name.endswith("weight") else p
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6, msg=name)  # fp32 SVD: only rounding differs


def test_transposed_view_is_the_plain_view_of_the_transpose():
    torch.manual_seed(1)
    W = torch.randn(2, 8, 24)  # two stored (in=8, out=24) weights
    for spec in ("matrix", "split=3", "split=3,heads=2", "split=3,heads=2,per_head", "split=3,heads=2,order=heads"):
        plain, stored = MatrixView.parse(spec), MatrixView.parse(spec + ",transposed")
        assert str(stored) == spec + ",transposed" and MatrixView.parse(str(stored)) == stored
        assert stored.matrices((8, 24)) == plain.matrices((24, 8))
        torch.testing.assert_close(stored.to_matrices(W), plain.to_matrices(W.mT))
        assert torch.equal(stored.from_matrices(stored.to_matrices(W), (8, 24)), W)
        rows = stored.row_of((8, 24), torch.arange(8 * 24).view(8, 24))
        assert torch.equal(rows, torch.arange(24).expand(8, 24))  # the stored columns are the rows
    assert MatrixView.parse("split=3,transposed").why_not((8, 23)) == "23 rows cannot be cut in 3 parts"
    with pytest.raises(ValueError, match="unknown option 'transposed' for 'stack'"):
        MatrixView.parse("stack,transposed")


# ---------------------------------------------------------------- grouped and depthwise convolutions
class ConvNet(nn.Module):
    def __init__(self, groups: int = 4, depthwise: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.blocks = nn.ModuleList(
            [
                nn.ModuleDict(
                    {
                        "grouped": nn.Conv2d(16, 16, 3, groups=groups, bias=False),
                        "dw": nn.Conv2d(16, 16, 3, groups=16, bias=False) if depthwise else nn.Conv2d(16, 16, 1),
                        "pw": nn.Conv2d(16, 16, 1),
                    }
                )
                for _ in range(2)
            ]
        )
        self.fc = nn.Linear(16, 10)


def test_depthwise_to_adamw_grouped_per_group_and_the_options():
    default = {r.name: r for r in route_parameters(ConvNet(), warn=False)}
    assert default["blocks.0.grouped.weight"].group == "adamw"
    assert default["blocks.0.grouped.weight"].reason == "grouped conv (groups=4; grouped_conv='adamw')"
    routes = {r.name: r for r in route_parameters(ConvNet(), grouped_conv="per_group", warn=False)}
    dw = routes["blocks.0.dw.weight"]
    assert dw.group == "adamw" and dw.reason.startswith("depthwise conv (groups=16, one input channel per group)")
    grouped = routes["blocks.0.grouped.weight"]
    assert grouped.group == "muon" and grouped.matrix == "conv,groups=4"
    assert "conv per group 4 x (out/groups, rest) 4 x 36" in grouped.reason
    assert routes["stem.weight"].group == "adamw" and routes["blocks.0.pw.weight"].matrix == "conv"
    whole = {r.name: r for r in route_parameters(ConvNet(), grouped_conv="whole", warn=False)}
    assert (
        whole["blocks.0.grouped.weight"].matrix == "conv"
        and "grouped_conv='whole'" in whole["blocks.0.grouped.weight"].reason
    )
    adamw = {r.name: r for r in route_parameters(ConvNet(), grouped_conv="adamw", warn=False)}
    assert adamw["blocks.0.grouped.weight"].group == "adamw"
    assert adamw["blocks.0.dw.weight"].group == "adamw"
    stem = {r.name: r for r in route_parameters(ConvNet(), stem="muon", warn=False)}
    assert stem["stem.weight"].group == "muon" and stem["stem.weight"].matrix == "conv"


def _polar(m: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (U @ Vh).float()


def test_per_group_update_is_each_group_orthogonalised_on_its_own():
    # Reference: the polar factor of each group's (out/G, in/G * k * k) block, by SVD.
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 24, 3, groups=4, bias=False)
    model = nn.Sequential(conv)
    groups = muon_param_groups(model, grouped_conv="per_group", warn=False)
    opt = Muon(
        groups,
        lr=1.0,
        momentum=0.0,
        nesterov=False,
        ns_method="svd",
        ns_dtype="float32",
        weight_decay=0.0,
        adjust_lr="spectral",
    )
    conv.weight.grad = torch.randn_like(conv.weight)
    before = conv.weight.detach().clone()
    opt.step()
    update = (before - conv.weight.detach()).reshape(4, 6, 36)
    blocks = conv.weight.grad.reshape(4, 6, 36)
    for g in range(4):  # spectral scaling sqrt(fan_out / fan_in) of the group's own map: sqrt(6 / 36)
        torch.testing.assert_close(update[g], math.sqrt(6 / 36) * _polar(blocks[g]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MoE routers and fused gate/up experts
class Experts(nn.Module):
    def __init__(self, experts: int = 3, hidden: int = 8, inner: int = 6) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner))


class MoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 3, bias=False)
        self.experts = Experts()


class MoEModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.layers = nn.ModuleList([nn.ModuleDict({"mlp": MoELayer(), "proj": nn.Linear(8, 8)}) for _ in range(2)])
        self.lm_head = nn.Linear(8, 20)


def test_router_and_fused_gate_up_routes_and_options():
    routes = {r.name: r for r in route_parameters(MoEModel(), warn=False)}
    router = routes["layers.0.mlp.gate.weight"]
    assert router.group == "adamw" and router.reason == "MoE router (3 expert logits; router='adamw')"
    gate_up = routes["layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.matrix == "stack,split=2" and "stack of 3 x 2 row blocks (6 x 8)" in gate_up.reason
    assert routes["layers.0.mlp.experts.down_proj"].matrix == "stack"
    other = {r.name: r for r in route_parameters(MoEModel(), router="muon", split_gate_up=False, warn=False)}
    assert other["layers.0.mlp.gate.weight"].group == "muon"
    assert other["layers.0.mlp.experts.gate_up_proj"].matrix == "stack"
    # a gate named like a router but without experts next to it is a hidden matrix
    plain = nn.ModuleDict(
        {"a": nn.ModuleDict({"gate": nn.Linear(8, 8), "proj": nn.Linear(8, 8)}), "out": nn.Linear(8, 8)}
    )
    assert {r.name: r.group for r in route_parameters(plain, warn=False)}["a.gate.weight"] == "muon"


def test_split_gate_up_orthogonalises_gate_and_up_apart():
    torch.manual_seed(3)
    model = MoEModel()
    opt = Muon(
        muon_param_groups(model, warn=False),
        lr=1.0,
        momentum=0.0,
        nesterov=False,
        ns_method="svd",
        ns_dtype="float32",
        weight_decay=0.0,
        adjust_lr="spectral",
    )
    p = model.layers[0].mlp.experts.gate_up_proj
    for q in model.parameters():
        q.grad = torch.randn_like(q)
    before = p.detach().clone()
    opt.step()
    update = before - p.detach()  # (3, 12, 8)
    for e in range(3):
        for half in (slice(0, 6), slice(6, 12)):  # [gate; up]: each its own (6 x 8) map
            torch.testing.assert_close(
                update[e, half], math.sqrt(6 / 8) * _polar(p.grad[e, half]), rtol=1e-5, atol=1e-6
            )


def test_gate_up_layouts_that_are_not_row_halves_are_left_whole():
    # GPT-OSS-like: (E, H, 2I) with a (E, I, H) down projection: not [gate; up] rows
    experts = Experts()
    experts.gate_up_proj = nn.Parameter(torch.randn(3, 8, 12))
    experts.down_proj = nn.Parameter(torch.randn(3, 6, 8))
    model = nn.ModuleDict({"mlp": nn.ModuleDict({"experts": experts}), "x": nn.Linear(8, 8)})
    routes = {r.name: r for r in route_parameters(model, warn=False)}
    assert routes["mlp.experts.gate_up_proj"].matrix == "stack"


def test_new_routing_options_are_validated():
    for field, bad in (("stem", "sgd"), ("grouped_conv", "split"), ("router", "none"), ("split_gate_up", 1)):
        with pytest.raises(ValueError, match=field):
            RoutingRules(**{field: bad})
    assert copy.deepcopy(RoutingRules(router="muon")).router == "muon"


@pytest.fixture
def single_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_transposed_weight_as_a_dtensor_follows_the_same_rows(single_rank_group):
    # The DTensor path (FSDP2 layout; one rank here): NorMuon's row sums over the mesh and the
    # orthogonalisation of the assembled tensor read the stored columns as rows, like a plain tensor.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(5)
    init, grads = torch.randn(8, 24), [torch.randn(8, 24) for _ in range(3)]
    mesh = init_device_mesh("cpu", (1,))
    results = []
    for sharded in (False, True):
        w = distribute_tensor(init.clone(), mesh, [Shard(0)]) if sharded else init.clone()
        p = nn.Parameter(w)
        group = {
            "params": [("c_attn.weight", p)],
            "use_muon": True,
            "matrix_views": {"c_attn.weight": "split=3,transposed"},
        }
        opt = Muon([group], lr=0.05, ns_method="svd", ns_dtype="float32", variant="normuon", adjust_lr="original")
        for g in grads:
            p.grad = distribute_tensor(g, mesh, [Shard(0)]) if sharded else g.clone()
            opt.step()
        results.append((p.full_tensor() if sharded else p).detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    # and the plain tensor is the transpose of the untransposed view's training
    q = nn.Parameter(init.T.clone())
    opt = Muon(
        [{"params": [("w", q)], "use_muon": True, "matrix_views": {"w": "split=3"}}],
        lr=0.05,
        ns_method="svd",
        ns_dtype="float32",
        variant="normuon",
        adjust_lr="original",
    )
    for g in grads:
        q.grad = g.T.clone()
        opt.step()
    torch.testing.assert_close(results[0], q.detach().T, rtol=1e-5, atol=1e-6)
