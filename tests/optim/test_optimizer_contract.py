"""torch's optimizer contract for ``lightning_muon.Muon``.

torch checks every built-in optimizer with the same generic tests: ``test/test_optim.py`` (class
``TestOptimRenewed``, driven by the ``OptimizerInfo`` entries of
``torch/testing/_internal/common_optimizers.py``). Each test here ports one of those behaviours
to Muon (both of its families: Muon groups and AdamW groups) and names the torch test it follows;
the code is ours. ``add_param_group`` gets its own tests, since Lightning's finetuning callbacks
depend on it.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lightning_muon import Muon, NonFiniteGradientError, muon_param_groups
from lightning_muon.parallel.groups import all_finite

KW = dict(lr=0.02, adjust_lr="original", adamw_lr=3e-3, ns_dtype="float32")  # fp32 NS: fast on any CPU

#: The group keys the previous release (main before this change) wrote into a state dict.
PREVIOUS_MUON_KEYS = {
    "params",
    "param_names",
    "name",
    "use_muon",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "ns_method",
    "ns_steps",
    "ns_dtype",
    "adjust_lr",
}
PREVIOUS_ADAMW_KEYS = {"params", "param_names", "name", "use_muon", "lr", "betas", "eps", "weight_decay", "foreach"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.hidden(self.embed(idx))))
        return self.head(torch.relu(self.mid(h)))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 12, (32,), generator=g)
    target = torch.randint(0, 5, (32,), generator=g)
    return nn.functional.cross_entropy(model(idx), target)


def _make(seed: int = 0, **kw) -> tuple[Net, Muon]:
    torch.manual_seed(seed)
    model = Net()
    return model, Muon(muon_param_groups(model), **{**KW, **kw})


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()


def _same(a, b) -> bool:
    """Exact structural equality of nested state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ defaults and add_param_group
def test_defaults_hold_both_families():
    """torch: ``Optimizer.defaults`` holds every setting a new group can be filled from."""
    model = Net()
    opt = Muon(
        muon_param_groups(model),
        lr=0.02,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.1,
        ns_method="quintic",
        ns_steps=4,
        ns_dtype="float32",
        adjust_lr="spectral",
        variant="normuon",
        variant_options={"beta2": 0.9, "eps": 1e-7},
        momentum_dtype=torch.bfloat16,
        adamw_lr=1e-3,
        adamw_betas=(0.8, 0.9),
        adamw_eps=1e-7,
        foreach=False,
    )
    assert opt.defaults == {
        "lr": 0.02,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 0.1,
        "ns_method": "quintic",
        "ns_steps": 4,
        "ns_dtype": "float32",
        "adjust_lr": "spectral",
        "variant": "normuon",
        "variant_options": {"beta2": 0.9, "eps": 1e-7},
        "momentum_dtype": "bfloat16",
        "adamw_lr": 1e-3,
        "adamw_betas": (0.8, 0.9),
        "adamw_eps": 1e-7,
        "adamw_weight_decay": 0.1,
        "foreach": False,
    }
    muon, adamw, no_decay = opt.param_groups
    assert {k: muon[k] for k in ("lr", "momentum", "nesterov", "ns_steps")} == dict(
        lr=0.02, momentum=0.9, nesterov=False, ns_steps=4
    )
    assert (adamw["lr"], adamw["betas"], adamw["eps"], adamw["weight_decay"]) == (1e-3, (0.8, 0.9), 1e-7, 0.1)
    assert no_decay["weight_decay"] == 0.0


def test_add_param_group_unnamed_tensors_to_a_named_optimizer():
    """What Lightning's BaseFinetuning does: ``{"params": [plain tensors], "lr": x}`` and nothing else.

    torch refuses an unnamed group next to named ones; Muon names the new tensors, routes them
    by shape (a split group: AdamW part first, Muon part last) and fills every setting. In a
    split group ``lr`` is the Muon part's and the AdamW part keeps the constructor's ratio.
    """
    torch.manual_seed(0)
    model = Net()
    model.hidden.requires_grad_(False)
    opt = Muon(muon_param_groups(model), **KW)
    before = len(opt.param_groups)
    model.hidden.requires_grad_(True)
    with pytest.warns(UserWarning, match="by shape"):
        opt.add_param_group({"params": list(model.hidden.parameters()), "lr": 0.002})
    adamw, muon = opt.param_groups[before:]
    assert (adamw["use_muon"], adamw["params"]) == (False, [model.hidden.bias])
    assert (muon["use_muon"], muon["params"]) == (True, [model.hidden.weight])
    assert muon["lr"] == 0.002 and adamw["lr"] == pytest.approx(0.002 * 3e-3 / 0.02)
    assert (muon["momentum"], muon["ns_dtype"], muon["adjust_lr"]) == (0.95, "float32", "original")
    assert (adamw["betas"], adamw["eps"], adamw["weight_decay"]) == ((0.9, 0.95), 1e-8, 0.01)
    assert all(len(g["param_names"]) == len(g["params"]) for g in opt.param_groups)
    assert len({g["name"] for g in opt.param_groups}) == len(opt.param_groups)  # LearningRateMonitor keys
    start = _params(model.hidden)
    _train(model, opt, 2)
    assert all(not torch.equal(a, b) for a, b in zip(start, model.hidden.parameters()))
    assert "momentum_buffer" in opt.state[model.hidden.weight] and "exp_avg" in opt.state[model.hidden.bias]


def test_add_param_group_with_params_only():
    """Any caller: ``{"params": [...]}`` and no other key gets both families' defaults."""
    model = Net()
    model.hidden.requires_grad_(False)
    opt = Muon(muon_param_groups(model), **KW)
    model.hidden.requires_grad_(True)
    with pytest.warns(UserWarning, match="by shape"):
        opt.add_param_group({"params": model.hidden.parameters()})  # a generator, as torch allows
    adamw, muon = opt.param_groups[-2:]
    assert (adamw["lr"], muon["lr"], muon["adjust_lr"]) == (3e-3, 0.02, "original")
    _train(model, opt, 1)


def test_add_param_group_named_pairs_are_routed_like_the_constructor():
    """A ``(name, tensor)`` group without ``use_muon`` is routed by name and shape, as ``Muon(named)`` is."""
    model = Net()
    opt = Muon([{"params": [("mid.weight", model.mid.weight)], "use_muon": True}], **KW)
    rest = [(n, p) for n, p in model.named_parameters() if n != "mid.weight"]
    opt.add_param_group({"params": rest, "name": "rest"})
    got = {g["name"]: (g["use_muon"], g["param_names"], g["weight_decay"]) for g in opt.param_groups[1:]}
    assert list(got) == ["rest/adamw", "rest/adamw_no_decay", "rest/muon"]  # Muon part last
    assert got["rest/adamw"] == (False, ["embed.weight", "head.weight"], 0.01)
    vectors = ["hidden.bias", "norm.weight", "norm.bias", "mid.bias", "head.bias"]
    assert got["rest/adamw_no_decay"] == (False, vectors, 0.0)
    assert got["rest/muon"] == (True, ["hidden.weight"], 0.01)
    reference = Muon(model.named_parameters(), **KW)
    family = lambda o: {n: g["use_muon"] for g in o.param_groups for n in g["param_names"]}  # noqa: E731
    assert family(opt) == family(reference)


def test_add_param_group_dicts_are_filled_from_their_family():
    """torch: missing settings of an added group come from ``defaults``; for AdamW groups from ``adamw_*``."""
    w1, w2, w3 = (nn.Parameter(torch.randn(4, 6)) for _ in range(3))
    b = nn.Parameter(torch.zeros(4))
    opt = Muon(
        [{"params": [w1], "use_muon": True}],
        lr=0.02,
        momentum=0.9,
        adamw_lr=1e-3,
        adamw_eps=1e-6,
        adamw_weight_decay=0.0,
    )
    opt.add_param_group({"params": [b], "use_muon": False})
    opt.add_param_group({"params": w2, "use_muon": True, "lr": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all matrices, no use_muon: Muon, no shape warning
        opt.add_param_group({"params": [w3]})
    g_b, g_w2, g_w3 = opt.param_groups[1:]
    assert set(g_b) == {"params", "use_muon", "name", "lr", "betas", "eps", "weight_decay", "foreach"}
    assert (g_b["lr"], g_b["eps"], g_b["weight_decay"], g_b["betas"]) == (1e-3, 1e-6, 0.0, (0.9, 0.95))
    assert set(g_w2) == {
        "params",
        "use_muon",
        "name",
        "lr",
        "momentum",
        "nesterov",
        "weight_decay",
        "ns_method",
        "ns_steps",
        "ns_dtype",
        "adjust_lr",
        "variant",
        "variant_options",
        "momentum_dtype",
        "matrix_views",  # {name: view} where not the default ("matrix" for 2-D, "flatten" above)
    }
    assert (g_w2["lr"], g_w2["momentum"], g_w3["use_muon"], g_w3["lr"]) == (0.5, 0.9, True, 0.02)
    assert g_w2["matrix_views"] == {}
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw", "muon_1", "muon_2"]


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ({"use_muon": True, "momentum": 2.0}, ValueError, "momentum must be"),
        ({"use_muon": True, "lr": torch.tensor(0.1)}, ValueError, "lr as a Tensor is not supported"),
        ({"maximize": True}, ValueError, "maximize=True is not supported"),
        ({"use_muon": True, "adamw_lr": 0.1}, ValueError, "adamw_"),
        ({"use_muon": True, "bias": True}, ValueError, "cannot be orthogonalised: 1-D"),
        ({"duplicate": True}, ValueError, "more than one parameter group"),
        ({"set": True}, TypeError, "ordered collection"),
    ],
)
def test_add_param_group_refuses_like_the_constructor_and_changes_nothing(bad, error, match):
    """torch's test_errors for add_param_group: a bad group raises and the optimizer is unchanged."""
    model = Net()
    model.hidden.requires_grad_(False)
    opt = Muon(muon_param_groups(model), **KW)
    before = copy.deepcopy(opt.state_dict())
    group = dict(bad)
    params = [model.hidden.weight]
    if group.pop("bias", False):
        params = [model.hidden.bias]
    if group.pop("duplicate", False):
        params = [model.hidden.weight, model.mid.weight]
    if group.pop("set", False):
        params = set(params)
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": params, **group})
    assert _same(opt.state_dict(), before)


def test_named_group_added_to_an_unnamed_optimizer():
    """torch refuses mixing named and unnamed groups; names are used for routing, then dropped."""
    model = Net()
    opt = Muon([{"params": [model.mid.weight], "use_muon": True}], **KW)
    opt.add_param_group({"params": list(model.head.named_parameters(prefix="head"))})
    assert all("param_names" not in g for g in opt.param_groups)
    assert [(g["name"], g["use_muon"]) for g in opt.param_groups] == [
        ("muon", True),
        ("adamw", False),
        ("adamw_no_decay", False),
    ]


def test_groups_added_later_train_exactly_like_groups_given_at_construction():
    """torch: param groups are equivalent however they are given (here: constructor vs add_param_group)."""
    model, opt = _make()
    twin = copy.deepcopy(model)
    groups = muon_param_groups(twin)
    late = Muon(groups[:1], **KW)
    for g in groups[1:]:
        late.add_param_group(g)
    _train(model, opt, 3)
    _train(twin, late, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# ------------------------------------------------------------------ state dict, pickling, copies
def test_state_dict_deterministic():
    """torch test_state_dict_deterministic: load into a twin, step both, same params and state dicts."""
    model, opt = _make()
    _train(model, opt, 3)
    twin = copy.deepcopy(model)
    twin_opt = Muon(muon_param_groups(twin), **KW)
    saved = copy.deepcopy(opt.state_dict())  # as torch's test: state_dict() returns live state tensors
    kept = copy.deepcopy(saved)
    twin_opt.load_state_dict(saved)
    assert _same(saved, kept)  # loading does not modify the state dict
    _train(model, opt, 3, start=3)
    _train(twin, twin_opt, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert _same(opt.state_dict(), twin_opt.state_dict())


def _continue_after_loading(mutate) -> None:
    model, opt = _make()
    _train(model, opt, 2)
    twin = copy.deepcopy(model)
    twin_opt = Muon(muon_param_groups(twin), **KW)
    saved = copy.deepcopy(opt.state_dict())
    mutate(saved)
    twin_opt.load_state_dict(saved)
    _train(model, opt, 2, start=2)
    _train(twin, twin_opt, 2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert [set(g) for g in twin_opt.param_groups] == [set(g) for g in opt.param_groups]


def test_loads_a_state_dict_written_by_the_previous_release():
    """Checkpoints saved before this change (groups with the previous keys only) load and resume exactly."""

    def previous(saved):
        for g in saved["param_groups"]:
            keep = PREVIOUS_MUON_KEYS if g["use_muon"] else PREVIOUS_ADAMW_KEYS
            for key in set(g) - keep:
                del g[key]

    _continue_after_loading(previous)


def test_can_load_older_state_dict():
    """torch test_can_load_older_state_dict: groups missing later-added settings get the defaults."""

    def older(saved):
        for g in saved["param_groups"]:
            for key in ("foreach", "nesterov", "ns_dtype", "adjust_lr", "eps"):
                g.pop(key, None)

    _continue_after_loading(older)


def test_load_nontensor_step():
    """torch test_load_nontensor_step: an AdamW ``step`` saved as a Python number still loads."""

    def as_numbers(saved):
        for state in saved["state"].values():
            if "step" in state:
                state["step"] = state["step"].item()

    _continue_after_loading(as_numbers)


def test_deepcopy_copies_all_public_attrs_and_pickle_round_trips():
    """torch test_deepcopy_copies_all_public_attrs; plus (model, optimizer) through deepcopy and pickle."""
    model, opt = _make(nonfinite="skip", process_group=None)
    _train(model, opt, 2)
    public = lambda o: {k: v for k, v in vars(o).items() if not k.startswith("_") and k != "state"}  # noqa: E731
    clone = copy.deepcopy(opt)
    assert public(clone).keys() == public(opt).keys()
    assert (clone.nonfinite, clone.process_group) == ("skip", None)
    assert {k: v for k, v in clone.defaults.items() if k != "differentiable"} == opt.defaults  # torch adds it
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    _train(model, opt, 2, start=2)
    for m, o in copies:
        _train(m, o, 2, start=2)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m.parameters()))


# ------------------------------------------------------------------ step behaviour
def test_step_pre_and_post_hooks_fire_in_order():
    """torch test_step_pre_hook, test_step_post_hook, test_step_all_hooks (global and per-instance)."""
    model, opt = _make()
    calls, seen = [], []

    def hook(label: str):
        def record(optimizer, args, kwargs) -> None:  # a pre-hook returning something replaces the args
            assert optimizer is opt
            calls.append(label)
            seen.append(model.mid.weight.detach().clone())

        return record

    hooks = [
        register_optimizer_step_pre_hook(hook("global_pre")),
        register_optimizer_step_post_hook(hook("global_post")),
        opt.register_step_pre_hook(hook("pre")),
        opt.register_step_post_hook(hook("post")),
    ]
    try:
        start = model.mid.weight.detach().clone()
        _train(model, opt, 1)
        assert calls == ["global_pre", "pre", "post", "global_post"]
        assert torch.equal(seen[1], start) and not torch.equal(seen[2], start)  # pre: before, post: after
        for handle in hooks[2:]:
            handle.remove()
        _train(model, opt, 1, start=1)
        assert calls[4:] == ["global_pre", "global_post"]
    finally:
        for handle in hooks:
            handle.remove()


@pytest.mark.parametrize("foreach", [None, True, False])
def test_zero_grad_both_ways(foreach):
    """torch's zero_grad contract: set_to_none=True leaves None, False zeroes in place (foreach or not)."""
    model, opt = _make(foreach=foreach)
    _loss(model, 0).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_is_noop_when_params_have_no_grad():
    """torch test_step_is_noop_when_params_have_no_grad: nothing changes, no state is created."""
    model, opt = _make()
    start = _params(model)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
    assert len(opt.state) == 0


def test_step_is_noop_for_zero_grads():
    """torch test_step_is_noop_for_zero_grads: zero gradients (and no weight decay) move nothing."""
    model, opt = _make(weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    start = _params(model)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))


def test_params_whose_grad_is_none_in_some_steps_are_left_alone():
    """torch's "grads can be None" case: such a param and its state stay bit for bit; others train."""
    model, opt = _make()
    _train(model, opt, 2)
    frozen = [model.mid.weight, model.mid.bias]
    params = [p.detach().clone() for p in frozen]
    states = copy.deepcopy([opt.state[p] for p in frozen])
    other = model.hidden.weight.detach().clone()
    opt.zero_grad()
    _loss(model, 5).backward()
    for p in frozen:
        p.grad = None
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, frozen))
    assert _same(states, [opt.state[p] for p in frozen])
    assert not torch.equal(other, model.hidden.weight)


def test_tensor_lr_is_refused_clearly():
    """torch test_tensor_lr accepts "lr as a Tensor is not supported"; checked before any update."""
    w = nn.Parameter(torch.randn(4, 6))
    b = nn.Parameter(torch.zeros(4))
    for kwargs in ({"lr": torch.tensor(0.01)}, {"adamw_lr": torch.tensor(0.01)}):
        with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
            Muon([{"params": [w], "use_muon": True}, {"params": [b], "use_muon": False}], **kwargs)
    opt = Muon([{"params": [w], "use_muon": True}, {"params": [b], "use_muon": False}], lr=0.01)
    opt.param_groups[1]["lr"] = torch.tensor(0.01)  # assigned after construction
    w.grad, b.grad = torch.randn(4, 6), torch.randn(4)
    start = [w.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
        opt.step()
    assert torch.equal(start[0], w) and torch.equal(start[1], b) and len(opt.state) == 0


def test_mixed_dtypes_in_one_group():
    """torch test_mixed_device_dtype (CPU dtypes): each tensor steps as it would alone in its dtype."""
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(6, 4, generator=g).to(d) for d in dtypes]
    vecs = [torch.randn(6, generator=g).to(d) for d in dtypes]
    grads = [
        [torch.randn(6, 4, generator=g) for _ in dtypes] + [torch.randn(6, generator=g) for _ in dtypes]
        for _ in range(3)
    ]

    def run(indices):
        params = [nn.Parameter((mats + vecs)[i].clone()) for i in indices]
        muon = [p for i, p in zip(indices, params) if i < 3]
        adamw = [p for i, p in zip(indices, params) if i >= 3]
        groups = ([{"params": muon, "use_muon": True}] if muon else []) + (
            [{"params": adamw, "use_muon": False}] if adamw else []
        )
        opt = Muon(groups, lr=0.02, ns_dtype="float32")
        for step in grads:
            for i, p in zip(indices, params):
                p.grad = step[i].to(p.dtype)
            opt.step()
        return params

    together = run(list(range(6)))
    for i in range(6):
        alone = run([i])[0]
        assert together[i].dtype == dtypes[i % 3]
        assert torch.equal(together[i], alone), i


@pytest.mark.parametrize("option", ["maximize", "capturable", "differentiable", "fused"])
def test_unsupported_torch_options_are_refused(option):
    """torch optimizers take maximize/capturable/differentiable/fused; Muon says clearly it does not."""
    w = nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=f"{option}=True is not supported"):
        Muon([w], **{option: True})
    with pytest.raises(ValueError, match=f"{option}=True is not supported"):
        Muon([{"params": [w], "use_muon": True, option: True}])
    Muon([{"params": [w], "use_muon": True}], **{option: False if option != "fused" else None})
    with pytest.raises(TypeError):
        Muon([w], amsgrad=True)  # not a Muon option at all


def test_forloop_goes_right_direction_with_a_scheduler_and_prints():
    """torch test_forloop_goes_right_direction (+ LR scheduler) and test_optimizer_can_be_printed."""
    model, opt = _make(lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    first = _loss(model, 0).item()
    for _ in range(20):
        opt.zero_grad()
        _loss(model, 0).backward()
        opt.step()
        scheduler.step()
    assert _loss(model, 0).item() < 0.8 * first
    assert "Muon (" in repr(opt) and "use_muon" in repr(opt)


@pytest.mark.parametrize("value, error", [("world", ValueError), (3, TypeError)])
def test_bad_process_group_is_refused(value, error):
    with pytest.raises(error, match="process_group must be"):
        Muon([nn.Parameter(torch.randn(4, 6))], process_group=value)


# ------------------------------------------------------------------ bugs fixed (docs/bad-inputs.md)
@pytest.mark.parametrize("ns_dtype", [None, "bfloat16", "float32", "float64"])
def test_svd_steps_with_any_ns_dtype_and_is_exact(ns_dtype):
    """Row 29: ``ns_method="svd"`` computes in float32 or wider whatever ``ns_dtype`` says (bf16 has no SVD)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    start = w.detach().clone()
    kwargs = {} if ns_dtype is None else {"ns_dtype": ns_dtype}
    opt = Muon(
        [{"params": [w], "use_muon": True}], lr=0.1, weight_decay=0.0, adjust_lr="spectral", ns_method="svd", **kwargs
    )
    w.grad = torch.randn(6, 10, dtype=torch.float64).float()
    opt.step()  # first step: the Nesterov update is proportional to the gradient
    u, _, vh = torch.linalg.svd(w.grad.double(), full_matrices=False)
    expected = start.double() - 0.1 * (6 / 10) ** 0.5 * (u @ vh)
    torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=1e-6)


def test_large_finite_gradients_step():
    """Row 7b: gradients of 1e20 are finite: the step runs (no empty NonFiniteGradientError), and
    Muon's update (scale-invariant) equals the one for the same gradient at scale 1."""
    torch.manual_seed(0)
    grad = torch.randn(8, 12)
    results = []
    for scale in (1.0, 1e20):
        w = nn.Parameter(torch.ones(8, 12))
        b = nn.Parameter(torch.ones(8))
        opt = Muon([{"params": [w], "use_muon": True}, {"params": [b], "use_muon": False}], lr=0.05, ns_dtype="float32")
        w.grad, b.grad = grad * scale, torch.full((8,), 3e19)
        opt.step()
        assert all(t.isfinite().all() for t in (w, b))
        results.append(w.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)
    assert all_finite([torch.full((3, 3), 3e38), torch.full((2,), 6e4, dtype=torch.float16), torch.empty(0, 4)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")], dtype=torch.bfloat16)])


def test_nonfinite_gradient_still_names_the_parameter_and_changes_nothing():
    w = nn.Parameter(torch.randn(4, 6))
    b = nn.Parameter(torch.zeros(4))
    opt = Muon([{"params": [("w", w)], "use_muon": True}, {"params": [("b", b)], "use_muon": False}])
    w.grad, b.grad = torch.full((4, 6), 1e20), torch.tensor([0.0, float("inf"), 0.0, 0.0])
    start = [w.detach().clone(), b.detach().clone()]
    with pytest.raises(NonFiniteGradientError, match=r"in b;"):
        opt.step()
    assert torch.equal(start[0], w) and torch.equal(start[1], b) and len(opt.state) == 0
