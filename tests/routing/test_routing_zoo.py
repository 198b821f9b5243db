"""Routing on the models users bring: every classification model of torchvision's zoo, and GPT
layouts (nanoGPT's and Hugging Face's GPT-2 names).

The zoo models are built with ``weights=None`` and 7 classes (a size no hidden layer has, so the
classifier is identified independently of the routing rules), their parameters moved to the meta
device as they are registered: the same module tree and shapes as a CPU build without the cost of
allocating and initialising about 4 GB of weights. ``test_meta_build_routes_like_a_cpu_build``
checks that equivalence on real CPU builds. No forward pass.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings

import pytest
import torch
from torch import nn

from examples.gpt import GPT, GPTConfig
from lightning_muon import muon_param_groups, route_parameters

torchvision = pytest.importorskip("torchvision")
models = torchvision.models

NUM_CLASSES = 7
ZOO = sorted(models.list_models(module=models))
EMBEDDINGS = ("conv_proj.*", "class_token", "*pos_embedding", "*relative_position_bias_table")


@contextlib.contextmanager
def _params_on_meta():
    """Every parameter registered inside this block is moved to the meta device (shape and dtype kept)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _build(name: str, meta: bool = True) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init-weights FutureWarnings (GoogLeNet, Inception)
        if not meta:
            return models.get_model(name, weights=None, num_classes=NUM_CLASSES)
        try:  # fastest: every tensor on meta
            with torch.device("meta"):
                return models.get_model(name, weights=None, num_classes=NUM_CLASSES)
        except NotImplementedError:  # RegNet computes its widths with tensors: only the parameters on meta
            with _params_on_meta():
                return models.get_model(name, weights=None, num_classes=NUM_CLASSES)


def test_the_zoo_is_all_there():
    assert len(ZOO) >= 80, ZOO  # torchvision 0.21-0.29: 80 classification models
    for family in (
        "resnet18",
        "vgg11",
        "efficientnet_b0",
        "mobilenet_v3_small",
        "convnext_tiny",
        "regnet_x_400mf",
        "vit_b_16",
        "swin_t",
        "googlenet",
        "inception_v3",
        "densenet121",
        "maxvit_t",
    ):
        assert family in ZOO


@pytest.mark.slow  # about 80 builds: 15-110 s on 2 cores depending on load; still run in CI
@pytest.mark.parametrize("name", ZOO)
def test_torchvision_zoo_routing(name):
    try:
        model = _build(name)
    except Exception as exc:  # noqa: BLE001 - only if a future torchvision model cannot build on CPU
        pytest.skip(f"{name} cannot be built without weights on CPU: {type(exc).__name__}: {exc}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-routed zoo model triggers neither routing warning
        routes = route_parameters(model)
    by_name = {r.name: r for r in routes}
    assert len(routes) == len(list(model.parameters()))  # every parameter exactly once
    matrices = [n for n, p in model.named_parameters() if p.ndim >= 2 and min(p.shape[0], p[0].numel()) > 1]
    stem = next(n for n, p in model.named_parameters() if p.ndim == 4)  # every zoo model starts with a conv
    classifiers = [n for n in matrices if by_name[n].param.shape[0] == NUM_CLASSES]
    embeddings = [n for n in matrices if any(fnmatch.fnmatchcase(n, e) for e in EMBEDDINGS)]
    assert classifiers, "no layer with the class count found"
    for n in classifiers:
        assert by_name[n].group == "adamw", (n, by_name[n].reason)
        assert "output head" in by_name[n].reason, (n, by_name[n].reason)
    for n in embeddings:
        assert by_name[n].group == "adamw" and by_name[n].reason.startswith("embedding"), (n, by_name[n].reason)
    if stem not in embeddings:  # ViT's conv_proj is its patch embedding
        assert by_name[stem].group == "adamw" and by_name[stem].reason.startswith("input stem"), by_name[stem]
    depthwise = {  # one input channel per group: C separate filters, routed to AdamW
        f"{m}.weight"
        for m, mod in model.named_modules()
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.in_channels == mod.groups
    }
    for n in depthwise:
        assert by_name[n].group == "adamw" and by_name[n].reason.startswith("depthwise conv"), (n, by_name[n].reason)
    grouped = {  # more than one input channel per group (ResNeXt, RegNet): AdamW by default (grouped_conv)
        f"{m}.weight"
        for m, mod in model.named_modules()
        if isinstance(mod, nn.modules.conv._ConvNd) and 1 < mod.groups < mod.in_channels
    }
    for n in grouped:
        assert by_name[n].group == "adamw" and by_name[n].reason.startswith("grouped conv"), (n, by_name[n].reason)
    special = {stem, *classifiers, *embeddings, *depthwise, *grouped}
    for n in matrices:
        if n not in special:
            assert by_name[n].group == "muon", (n, by_name[n].reason)
            assert by_name[n].reason == "hidden matrix" or by_name[n].reason.startswith(("hidden ", "hidden matrix")), n
    for r in routes:
        if r.name not in matrices:
            assert r.group in ("adamw", "adamw_no_decay"), (r.name, r.reason)
    # The decisions that names alone got wrong before structure was used.
    if name.startswith(("resnet", "resnext", "wide_resnet", "regnet", "shufflenet", "googlenet", "inception")):
        assert by_name["fc.weight"].reason == "output head (last layer outside the repeated blocks)"
    if name.startswith("vgg"):
        assert by_name["classifier.0.weight"].group == by_name["classifier.3.weight"].group == "muon"


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "mobilenet_v3_small", "regnet_x_400mf", "squeezenet1_1"])
def test_meta_build_routes_like_a_cpu_build(name):
    meta = _build(name)
    assert all(p.is_meta for p in meta.parameters())
    cpu = _build(name, meta=False)
    assert not any(p.is_meta for p in cpu.parameters())
    assert [(r.name, r.group, r.reason) for r in route_parameters(meta)] == [
        (r.name, r.group, r.reason) for r in route_parameters(cpu)
    ]


def test_auxiliary_classifiers_are_heads():
    by_name = {r.name: r for r in route_parameters(_build("googlenet"))}
    for aux in ("aux1", "aux2"):
        assert by_name[f"{aux}.fc2.weight"].group == "adamw"
        assert by_name[f"{aux}.fc2.weight"].reason.startswith(f"auxiliary output head (last layer of {aux!r}")
        assert by_name[f"{aux}.fc1.weight"].group == "muon"  # the hidden layer of the aux branch


# --- GPT layouts -------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """Hugging Face GPT-2's linear layer: weight stored as (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class HFAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)


class HFMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)


class HFBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), HFAttention(d), nn.LayerNorm(d), HFMLP(d)


class HFGPT2(nn.Module):
    """The parameter names of Hugging Face's GPT2LMHeadModel: transformer.{wte,wpe,h.N,ln_f}, lm_head."""

    def __init__(self, vocab: int = 50, ctx: int = 16, d: int = 32, n_layer: int = 3, tied: bool = True) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte, self.transformer.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.transformer.h = nn.ModuleList(HFBlock(d) for _ in range(n_layer))
        self.transformer.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.transformer.wte.weight


HIDDEN_GPT = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.mark.parametrize("tied", [True, False])
def test_hugging_face_gpt2_layout(tied):
    model = HFGPT2(tied=tied)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        routes = {r.name: r for r in route_parameters(model)}
    wte = routes["transformer.wte.weight"]
    assert wte.group == "adamw" and wte.reason.startswith("embedding (Embedding)")
    assert routes["transformer.wpe.weight"].group == "adamw"
    if tied:
        assert "lm_head.weight" not in routes and "tied: lm_head.weight" in wte.reason
    else:
        assert routes["lm_head.weight"].group == "adamw"
        assert routes["lm_head.weight"].reason == "output head (name matches 'lm_head')"
    for i in range(3):
        for layer in HIDDEN_GPT:
            r = routes[f"transformer.h.{i}.{layer}.weight"]
            assert r.group == "muon" and r.reason == "hidden matrix", (r.name, r.reason)
            assert routes[f"transformer.h.{i}.{layer}.bias"].group == "adamw_no_decay"
    n = sum(len(g["params"]) for g in muon_param_groups(model))
    assert n == len(list(model.parameters()))


def test_hugging_face_layout_with_an_unnamed_head_is_found_by_structure():
    model = HFGPT2(tied=False)
    model.out = model.lm_head  # a head called something no pattern knows
    del model.lm_head
    routes = {r.name: r for r in route_parameters(model)}
    assert routes["out.weight"].group == "adamw"
    assert routes["out.weight"].reason == "output head (last layer outside the repeated blocks)"
    assert routes["transformer.h.2.mlp.c_proj.weight"].group == "muon"


@pytest.mark.parametrize("tied", [True, False])
def test_nanogpt_layout(tied):
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tied))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        routes = {r.name: r for r in route_parameters(model)}
    assert routes["wte.weight"].group == routes["wpe.weight"].group == "adamw"
    assert routes["wte.weight"].reason.startswith("embedding")
    if not tied:
        assert routes["lm_head.weight"].group == "adamw" and "output head" in routes["lm_head.weight"].reason
    for i in range(2):
        for layer in HIDDEN_GPT:
            assert routes[f"h.{i}.{layer}.weight"].group == "muon"
            assert routes[f"h.{i}.{layer}.weight"].reason == "hidden matrix"
