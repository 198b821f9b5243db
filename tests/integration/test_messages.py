"""Each error and warning of the constructor, the routing and ``configure_muon`` says what happened
and one thing that works: every test here triggers a message, then does what it advises and checks
that it works (no error, no warning, and the routing the advice promises, checked against the
model's own layers).
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_muon import Muon, configure_muon, muon_optimizer, muon_param_groups, route_parameters


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyLM(nn.Module):
    """Names outside the defaults: ``tok_emb`` and ``out`` match neither embedding nor head patterns."""

    def __init__(self, vocab: int = 50, d: int = 8) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.out = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.tok_emb(idx)))


def sequential_lm(vocab: int = 50, d: int = 8) -> nn.Sequential:
    """The same roles by position only: ``0.weight`` is the embedding, ``5.weight`` the head."""
    return nn.Sequential(
        nn.Embedding(vocab, d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, vocab)
    )


def _embedding_and_head(model: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """The independent answer: the model's nn.Embedding weight and its last nn.Linear weight."""
    embedding = next(m for m in model.modules() if isinstance(m, nn.Embedding)).weight
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight
    return embedding, head


def _muon_ids(optimizer: Muon) -> set[int]:
    return {id(p) for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}


def _no_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def _trains(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    model(x).float().square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ------------------------------------------------------------------ the constructor's routing advice
@pytest.mark.parametrize("make", [TinyLM, sequential_lm], ids=["tok_emb-out", "sequential"])
def test_unnamed_parameters_advise_muon_param_groups_which_routes_embedding_and_head(make):
    model = make()
    embedding, head = _embedding_and_head(model)
    with pytest.warns(
        UserWarning, match=r"routed them by shape alone.*Pass lightning_muon\.muon_param_groups\(model\)"
    ):
        shape_routed = Muon(model.parameters(), lr=0.02)
    assert {id(embedding), id(head)} <= _muon_ids(shape_routed)  # what the warning says went wrong
    followed = _no_warning(Muon, muon_param_groups(model), lr=0.02)
    assert not {id(embedding), id(head)} & _muon_ids(followed)
    _trains(model, followed, torch.arange(6))


@pytest.mark.parametrize("make", [TinyLM, sequential_lm], ids=["tok_emb-out", "sequential"])
def test_name_only_routing_that_finds_no_head_or_embedding_warns_and_its_advice_works(make):
    model = make()
    embedding, head = _embedding_and_head(model)
    with pytest.warns(UserWarning, match=r"by name alone .*no name matched an output head .* nor an embedding") as rec:
        name_routed = Muon(model.named_parameters(), lr=0.02)
    assert "muon_param_groups(model)" in str(rec[0].message)
    assert {id(embedding), id(head)} <= _muon_ids(name_routed)
    followed = _no_warning(Muon, muon_param_groups(model), lr=0.02)
    assert not {id(embedding), id(head)} & _muon_ids(followed)


def test_name_only_routing_with_default_names_does_not_warn():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.hidden, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    model = Net()
    optimizer = _no_warning(Muon, model.named_parameters(), lr=0.02)
    assert _muon_ids(optimizer) == {id(model.hidden.weight)}


def test_no_head_found_advice_names_a_module_and_routing_it_to_adamw_works():
    model = nn.Sequential(Block(8), Block(8))  # only repeated blocks: no head by name or structure
    with pytest.warns(UserWarning, match="no output head or classifier was recognised") as rec:
        muon_param_groups(model)
    suggested = re.search(r"adamw_names=\[('[^']+')\]", str(rec[0].message))
    assert suggested is not None
    name = suggested.group(1).strip("'")
    groups = _no_warning(muon_param_groups, model, adamw_names=[name])
    adamw = {n for g in groups if not g["use_muon"] for n, _ in g["params"]}
    assert f"{name}.weight" in adamw and "1.fc2.weight" in adamw
    assert {n for g in groups if g["use_muon"] for n, _ in g["params"]} == {
        "0.fc1.weight",
        "0.fc2.weight",
        "1.fc1.weight",
    }


@pytest.mark.parametrize("option, group", [("adamw_names", "adamw"), ("muon_names", "muon")])
def test_embedding_like_shape_warning_offers_two_ways_that_both_silence_it(option, group):
    model = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 256), nn.ReLU(), nn.Linear(256, 4))
    with pytest.warns(UserWarning, match=r"0\.weight \(2048 x 64\) is routed to Muon") as rec:
        route_parameters(model)
    assert f"{option}=['0.weight']" in str(rec[0].message)
    routes = _no_warning(route_parameters, model, **{option: ["0.weight"]})
    assert next(r for r in routes if r.name == "0.weight").group == group


# ------------------------------------------------------------------ configure_muon on a plain module
def test_configure_muon_on_a_plain_module_warns_and_muon_optimizer_steps_the_schedule():
    model = sequential_lm()
    settings = dict(lr=0.02, warmup_steps=2, schedule="cosine", max_steps=10, adjust_lr="original")
    with pytest.warns(UserWarning, match=r"plain nn\.Module.*muon_optimizer\(model, \.\.\.\)"):
        config = configure_muon(model, **settings)
    assert isinstance(config, dict) and not hasattr(config, "step")  # what the warning explains
    optimizer, scheduler = _no_warning(muon_optimizer, model, **settings)
    lrs = []
    for _ in range(10):
        _trains(model, optimizer, torch.arange(6))
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # closed form of the documented schedule: warmup (s + 1) / (w + 1), then cosine to 0 at max_steps
    expected = [0.02 * ((s + 1) / 3 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 8))) for s in range(1, 11)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_configure_muon_on_a_lightning_module_does_not_warn():
    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = sequential_lm()

    config = _no_warning(configure_muon, Lit(), lr=0.02, warmup_steps=2, schedule="cosine", max_steps=10)
    assert set(config) == {"optimizer", "lr_scheduler"}


def test_constant_schedule_returns_the_optimizer_for_any_module():
    optimizer = _no_warning(configure_muon, sequential_lm(), lr=0.02)
    assert isinstance(optimizer, Muon)


# ------------------------------------------------------------------ errors whose advice is followed
def test_schedule_without_max_steps_advice():
    model = sequential_lm()
    with pytest.raises(ValueError, match=r"pass max_steps=<total optimizer steps>"):
        muon_optimizer(model, schedule="linear")
    optimizer, scheduler = muon_optimizer(model, schedule="linear", max_steps=4)
    assert scheduler is not None and isinstance(optimizer, Muon)


def test_muon_settings_next_to_an_optimizer_factory_advice():
    model = sequential_lm()
    with pytest.raises(ValueError, match=r"optimizer=functools\.partial\(Muon, momentum=0\.9\)"):
        configure_muon(model, optimizer=Muon, momentum=0.9)
    optimizer = configure_muon(model, optimizer=functools.partial(Muon, momentum=0.9))
    assert {g["momentum"] for g in optimizer.param_groups if g["use_muon"]} == {0.9}


def test_a_single_tensor_advice():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(TypeError, match=r"got a single Tensor; pass a list such as \[weight\]"):
        Muon(w)
    assert _muon_ids(Muon([w])) == {id(w)}


def test_empty_parameter_list_advice():
    model = sequential_lm()
    params = model.parameters()
    with pytest.warns(UserWarning):
        Muon(params)
    with pytest.raises(ValueError, match=r"already consumed.*pass lightning_muon\.muon_param_groups\(model\)"):
        Muon(params)  # the generator is used up
    _trains(model, _no_warning(Muon, muon_param_groups(model)), torch.arange(6))


def test_a_mix_of_forms_advice():
    model = sequential_lm()
    mixed = [model[1].weight, ("3.weight", model[3].weight)]
    with pytest.raises(TypeError, match=r"got a mix of \['Parameter', 'tuple'\].*list\(model\.named_parameters\(\)\)"):
        Muon(mixed)
    with pytest.warns(UserWarning, match="by name alone"):  # works; it warns as the name-only test says
        optimizer = Muon(list(model.named_parameters()))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_a_group_mixing_named_and_bare_tensors_advice():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"mixes \(name, tensor\) pairs and bare tensors"):
        Muon([{"params": [("weight", model.weight), model.bias]}])
    optimizer = Muon([{"params": list(model.named_parameters())}])
    assert _muon_ids(optimizer) == {id(model.weight)}


def test_a_non_leaf_tensor_advice():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"non-leaf Tensor .* pass the nn\.Parameter itself"):
        Muon([{"params": [model.weight * 2], "use_muon": True}])
    assert _muon_ids(Muon([{"params": [model.weight], "use_muon": True}])) == {id(model.weight)}


def test_a_group_without_params_advice():
    weight = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"needs a 'params' key, got keys \['lr'\]; e\.g\. \{'params'"):
        Muon([{"lr": 0.1}])
    assert _muon_ids(Muon([{"params": [weight], "use_muon": True}])) == {id(weight)}


def test_the_same_parameter_twice_advice():
    model = sequential_lm()
    with pytest.raises(ValueError, match=r"more than one parameter group; build the groups with"):
        Muon([{"params": [model[1].weight]}, {"params": [model[1].weight, model[3].weight]}])
    groups = muon_param_groups(model)
    ids = [id(p) for g in groups for _, p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_matrix_views_naming_no_parameter_of_the_group_advice():
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"not parameters of this group; its parameters are \['2\.weight'\]"):
        Muon([{"params": [("2.weight", model[2].weight)], "use_muon": True, "matrix_views": {"2.wieght": "split=3"}}])
    optimizer = Muon(muon_param_groups(model, matrix_rules={"2.weight": "split=3"}))
    muon = next(g for g in optimizer.param_groups if g["use_muon"])
    assert muon["matrix_views"]["2.weight"].startswith("split=3")


def test_matrix_rules_pattern_that_matches_nothing_advice():
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
    with pytest.raises(
        ValueError, match=r"matches no trainable parameter; .* e\.g\. \['0\.weight', '0\.bias', '2\.weight'\]"
    ):
        muon_param_groups(model, matrix_rules={"mlp.weight": "split=3"})
    routes = route_parameters(model, matrix_rules={"2.weight": "split=3"})
    assert next(r for r in routes if r.name == "2.weight").matrix.startswith("split=3")


def test_unknown_routing_option_lists_the_options():
    model = sequential_lm()
    with pytest.raises(
        TypeError, match=r"unknown routing option\(s\) \['adamw_name'\]; the options are \[.*'adamw_names'"
    ):
        muon_param_groups(model, adamw_name=["5"])
    groups = muon_param_groups(model, adamw_names=["5"])
    assert "5.weight" in {n for g in groups if not g["use_muon"] for n, _ in g["params"]}
