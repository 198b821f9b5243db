"""Routing: a nanoGPT-style GPT with tied embeddings, torchvision's ViT and a small CNN."""

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
    assert g["wte.weight"] == "adamw" and "tied: lm_head.weight" in next(r.reason for r in routes if r.name == "wte.weight")
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
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_small_cnn_and_a_step():
    model = SmallCNN()
    routes = route_parameters(model)
    g = _groups(routes)
    assert g["features.0.weight"] == "muon" and g["features.3.weight"] == "muon"
    assert "flattened to 16 x 27" in next(r.reason for r in routes if r.name == "features.0.weight")
    assert g["features.1.weight"] == "adamw_no_decay"  # BatchNorm gain
    assert g["classifier.weight"] == "adamw"
    # One step: each parameter gets its group's rule. Exact polar factor (svd) for the references.
    lr, wd = 0.02, 0.01
    opt = Muon(muon_param_groups(model), lr=lr, weight_decay=wd, ns_method="svd", ns_dtype="float32",
               adjust_lr="match_rms_adamw", adamw_eps=1e-8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    for name in ("features.0.weight", "features.3.weight"):  # Muon on the (out, in*3*3) matrix
        m = grads[name].shape[0]
        U, _, Vh = torch.linalg.svd(grads[name].reshape(m, -1).double(), full_matrices=False)
        scale = 0.2 * max(U.shape[0], Vh.shape[1]) ** 0.5  # match_rms_adamw on the flattened shape
        expected = (1 - lr * wd) * before[name] - lr * scale * (U @ Vh).reshape(before[name].shape).float()
        torch.testing.assert_close(after[name].detach(), expected, atol=1e-6, rtol=0)
    for name, decay in (("classifier.weight", wd), ("features.1.weight", 0.0), ("features.0.bias", 0.0)):
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


def test_warnings_on_suspicious_routing():
    body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="no output head"):
        route_parameters(body)
    wide = nn.ModuleDict({"proj": nn.Linear(32, 4096), "head": nn.Linear(4096, 4)})
    with pytest.warns(UserWarning, match="proj.weight .*looks like an embedding"):
        route_parameters(wide)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        route_parameters(GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32)))


@pytest.mark.parametrize(
    "shape, ok", [((4, 4), True), ((8, 3, 3, 3), True), ((4,), False), ((1, 10, 4), False), ((1, 1, 8), False), ((5, 1), False), ((0, 4), False)]
)
def test_why_not_muon(shape, ok):
    assert (why_not_muon(torch.zeros(shape)) is None) == ok
