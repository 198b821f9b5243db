"""Routing: a nanoGPT-style GPT with tied embeddings, torchvision's ViT and a small CNN.

The whole torchvision classification zoo and a Hugging Face-style GPT layout are in
tests/routing/test_routing_zoo.py."""

import warnings

import pytest
import torch
from torch import nn

from examples.gpt import GPT, GPTConfig
from lightning_muon import Muon, muon_param_groups, route_parameters, routing_table, why_not_muon


def _groups(routes):
    return {r.name: r.group for r in routes}


def test_gpt_with_tied_embeddings():
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))
    routes = route_parameters(model)
    g = _groups(routes)
    assert g["wte.weight"] == "adamw" and "tied: lm_head.weight" in next(
        r.reason for r in routes if r.name == "wte.weight"
    )
    assert "lm_head.weight" not in g  # one tensor, routed once
    assert g["wpe.weight"] == "adamw"
    for i in range(2):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert g[f"h.{i}.{name}.weight"] == "muon"
        assert g[f"h.{i}.ln_1.weight"] == "adamw_no_decay"
    assert g["ln_f.weight"] == "adamw_no_decay"
    groups = muon_param_groups(model)
    n_params = sum(len(gr["params"]) for gr in groups)
    assert n_params == len(list(model.parameters()))  # every trainable parameter exactly once


def test_gpt_untied_head_goes_to_adamw():
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False))
    assert _groups(route_parameters(model))["lm_head.weight"] == "adamw"


def test_torchvision_vision_transformer():
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    g = _groups(route_parameters(vit))
    assert g["conv_proj.weight"] == "adamw"  # patch embedding
    assert g["class_token"] == "adamw" and g["encoder.pos_embedding"] == "adamw"
    assert g["heads.head.weight"] == "adamw"
    layer = "encoder.layers.encoder_layer_0"
    assert g[f"{layer}.self_attention.in_proj_weight"] == "muon"
    assert g[f"{layer}.self_attention.out_proj.weight"] == "muon"
    assert g[f"{layer}.mlp.0.weight"] == "muon" and g[f"{layer}.mlp.3.weight"] == "muon"
    assert g[f"{layer}.self_attention.in_proj_bias"] == "adamw_no_decay"


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_small_cnn_and_a_step():
    model = SmallCNN()
    routes = route_parameters(model)
    g = _groups(routes)
    # The first layer is a convolution reading the image: the input stem, on AdamW (Keller Jordan's rule).
    assert g["features.0.weight"] == "adamw" and g["features.3.weight"] == "muon"
    reasons = {r.name: r.reason for r in routes}
    assert reasons["features.0.weight"] == "input stem (first layer, a convolution reading the input)"
    assert reasons["features.3.weight"] == "hidden conv kernel: conv (out, rest) 32 x 144"
    assert g["features.1.weight"] == "adamw_no_decay"  # BatchNorm gain
    assert g["classifier.weight"] == "adamw"
    # One step: each parameter gets its group's rule. Exact polar factor (svd) for the references.
    lr, wd = 0.02, 0.01
    opt = Muon(
        muon_param_groups(model),
        lr=lr,
        weight_decay=wd,
        ns_method="svd",
        ns_dtype="float32",
        adjust_lr="match_rms_adamw",
        adamw_eps=1e-8,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    for name in ("features.3.weight",):  # Muon on the (out, in*3*3) matrix
        m = grads[name].shape[0]
        U, _, Vh = torch.linalg.svd(grads[name].reshape(m, -1).double(), full_matrices=False)
        scale = 0.2 * max(U.shape[0], Vh.shape[1]) ** 0.5  # match_rms_adamw on the flattened shape
        expected = (1 - lr * wd) * before[name] - lr * scale * (U @ Vh).reshape(before[name].shape).float()
        torch.testing.assert_close(after[name].detach(), expected, atol=1e-6, rtol=0)
    for name, decay in (
        ("classifier.weight", wd),
        ("features.0.weight", wd),
        ("features.1.weight", 0.0),
        ("features.0.bias", 0.0),
    ):  # the stem kernel is on AdamW
        # AdamW's first step: bias-corrected moments give g / (|g| + eps).
        g = grads[name]
        expected = (1 - lr * decay) * before[name] - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after[name].detach(), expected, atol=1e-6, rtol=0)


def test_overrides_table_and_frozen():
    model = SmallCNN()
    model.features[0].weight.requires_grad_(False)
    routes = route_parameters(model, adamw_names=["features.3.weight"], muon_names=["classifier.weight"])
    g = _groups(routes)
    assert "features.0.weight" not in g  # frozen: left out
    assert g["features.3.weight"] == "adamw" and g["classifier.weight"] == "muon"
    table = routing_table(routes)
    assert "adamw_names pattern 'features.3.weight'" in table and table.splitlines()[0].startswith("parameter")
    with pytest.raises(ValueError, match=r"features\.1\.weight.*cannot be a Muon matrix: 1-D"):
        route_parameters(model, muon_names=["features.1.*"])
    # A module path matches all of its parameters (a dotted prefix), not only whole names or components.
    g = _groups(route_parameters(model, adamw_names=["features.3"]))
    assert g["features.3.weight"] == "adamw" and g["features.3.bias"] == "adamw_no_decay"
    assert g["features.4.weight"] == "adamw_no_decay" and g["classifier.weight"] == "adamw"


def test_warnings_on_suspicious_routing():
    # A backbone that ends in its repeated blocks has no head, by name or by structure.
    body = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)) for _ in range(2)])
    with pytest.warns(UserWarning, match="no output head .* nor by structure"):
        routes = route_parameters(body)
    assert {r.group for r in routes if r.param.ndim == 2} == {"muon"}
    with pytest.warns(UserWarning, match="no output head"):
        route_parameters(nn.Linear(8, 8))  # one matrix layer: nothing to tell apart, it stays on Muon
    with warnings.catch_warnings():  # two plain layers: the last one is the head (structure)
        warnings.simplefilter("error")
        routes = route_parameters(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    assert [r.reason for r in routes if r.param.ndim == 2] == [
        "hidden matrix",
        "output head (last layer outside the repeated blocks)",
    ]
    wide = nn.ModuleDict({"proj": nn.Linear(32, 4096), "head": nn.Linear(4096, 4)})
    with pytest.warns(UserWarning, match="proj.weight .*looks like an embedding"):
        route_parameters(wide)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        route_parameters(GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32)))


@pytest.mark.parametrize(
    "shape, ok",
    [
        ((4, 4), True),
        ((8, 3, 3, 3), True),
        ((4,), False),
        ((1, 10, 4), False),
        ((1, 1, 8), False),
        ((5, 1), False),
        ((0, 4), False),
    ],
)
def test_why_not_muon(shape, ok):
    assert (why_not_muon(torch.zeros(shape)) is None) == ok


def test_structure_false_keeps_names_and_shapes_only():
    model = SmallCNN()
    model.fc = model.classifier  # alias: the tensor now also has the name fc.weight
    del model.classifier
    g = _groups(route_parameters(model, structure=False, warn=False))
    assert g["features.0.weight"] == "muon" and g["fc.weight"] == "muon"
    g = _groups(route_parameters(model))
    assert g["features.0.weight"] == "adamw" and g["fc.weight"] == "adamw"


def test_head_names_on_a_sequential_mark_only_its_last_layer():
    """VGG-style ``classifier = Sequential(Linear, ReLU, Linear)``: the first Linear is hidden.
    A ModuleList of heads (multi-task) is parallel: every member is an output head."""
    model = nn.Module()
    model.body = nn.Linear(8, 16)
    model.classifier = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    model.heads = nn.ModuleList([nn.Linear(16, 2), nn.Linear(16, 5)])
    routes = {r.name: r for r in route_parameters(model)}
    assert routes["classifier.0.weight"].group == "muon"
    assert routes["classifier.0.weight"].reason.startswith("hidden matrix inside the head 'classifier'")
    assert routes["classifier.2.weight"].group == "adamw"
    assert routes["classifier.2.weight"].reason == "output head (name matches 'classifier')"
    assert routes["heads.0.weight"].group == routes["heads.1.weight"].group == "adamw"
    assert routes["body.weight"].group == "muon"  # a dense first layer without a body after it


def test_a_branch_with_the_heads_output_size_is_not_an_auxiliary_head():
    """A feature MLP whose last layer has the head's width is no side branch (nothing repeated before it)."""
    model = nn.Module()
    model.features = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64))
    model.head = nn.Linear(64, 64)
    g = _groups(route_parameters(model))
    assert g["features.2.weight"] == "muon" and g["head.weight"] == "adamw"


class _ResBlock(nn.Module):
    """A block whose MLP is called ``fc1``/``fc2``, next to a classifier called ``fc``: names alone can't tell."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _ResMLP(nn.Module):
    def __init__(self, d=16, depth=3, classes=5):
        super().__init__()
        self.fc_in = nn.Linear(12, d)
        self.blocks = nn.ModuleList(_ResBlock(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, classes)

    def forward(self, x):
        x = self.fc_in(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.norm(x))


def test_head_and_stem_from_structure_where_names_do_not_settle_it():
    model = _ResMLP()
    routes = {r.name: r for r in route_parameters(model)}
    assert routes["fc.weight"].group == "adamw"
    assert routes["fc.weight"].reason == "output head (last layer outside the repeated blocks)"
    assert routes["fc_in.weight"].group == "adamw"
    assert routes["fc_in.weight"].reason == "input stem (first layer, before the repeated blocks)"
    for i in range(3):
        for name in ("fc1", "fc2"):
            assert routes[f"blocks.{i}.{name}.weight"].group == "muon"
            assert routes[f"blocks.{i}.{name}.weight"].reason == "hidden matrix"
    assert routes["fc.bias"].group == "adamw_no_decay"
    # Overrides still win over structure.
    g = _groups(route_parameters(model, muon_names=["fc_in.weight"], adamw_names=["blocks.0.fc1.weight"]))
    assert g["fc_in.weight"] == "muon" and g["blocks.0.fc1.weight"] == "adamw"
    # And the routed model trains: one step, all finite.
    opt = Muon(muon_param_groups(model), lr=0.02)
    nn.functional.cross_entropy(model(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
