"""One test per row of docs/bad-inputs.md: each bad input gets a clear error or a documented
behaviour, and on an error no parameter or optimizer state changes."""

import copy

import pytest
import torch
from torch import nn

from lightning_muon import Muon, NonFiniteGradientError, configure_muon, muon_param_groups, route_parameters


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.embed = nn.Embedding(20, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.hidden(self.embed(idx))))


def _trained(model, steps=2, **kw):
    opt = Muon(muon_param_groups(model), lr=0.02, **kw)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.arange(5)).sum().backward()
        opt.step()
    return opt


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _unchanged(model, opt, snap):
    params, state = snap
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    now = opt.state_dict()["state"]
    for k, st in state["state"].items():
        for name, t in st.items():
            assert torch.equal(now[k][name], t)


# rows 1-6: invalid hyperparameters (more cases in test_optimizer.py)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -0.1}, "lr must be a finite number >= 0"),
        ({"weight_decay": -1}, "weight_decay must be"),
        ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\)"),
        ({"ns_steps": 0}, "ns_steps must be an integer >= 1"),
        ({"ns_method": "newton"}, "ns_method must be one of"),
        ({"adjust_lr": "rms"}, "adjust_lr must be one of"),
        ({"adamw_lr": -1}, "Muon: adamw_lr must be a finite number >= 0, got -1"),
        ({"adamw_betas": (0.9, 1.0)}, r"Muon: adamw_betas must be two numbers in \[0, 1\)"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(muon_param_groups(Net()), **kwargs)


def test_invalid_adamw_setting_in_a_param_group_is_named_by_its_key():  # row 1
    model = Net()
    with pytest.raises(ValueError, match=r"param group 0 \('adamw'\): betas must be two numbers in \[0, 1\)"):
        Muon([{"params": [model.head.bias], "use_muon": False, "betas": (0.9, 1.5)}])


def test_non_finite_gradient_raises_and_changes_nothing():  # row 7
    model = Net()
    opt = _trained(model)
    snap = _snapshot(model, opt)
    model(torch.arange(5)).sum().backward()
    model.head.weight.grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match="head.weight"):
        opt.step()
    _unchanged(model, opt, snap)


def test_zero_size_parameter_goes_to_adamw():  # row 8
    model = Net()
    model.empty = nn.Parameter(torch.zeros(0, 8))
    routes = {r.name: r for r in route_parameters(model)}
    assert routes["empty"].group == "adamw" and "empty tensor" in routes["empty"].reason
    twin = Net()
    twin.load_state_dict(model.state_dict(), strict=False)  # the same model without the empty tensor
    opt = Muon(muon_param_groups(model), lr=0.02)
    twin_opt = Muon(muon_param_groups(twin), lr=0.02)
    for _ in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            m(torch.arange(5)).sum().backward()
        model.empty.grad = torch.zeros(0, 8)
        opt.step()
        twin_opt.step()
    # The empty tensor gets empty AdamW state and changes nothing else: every other parameter
    # gets exactly (bitwise) the update it gets without it.
    assert model.empty.shape == (0, 8) and opt.state[model.empty]["exp_avg"].shape == (0, 8)
    named = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        assert torch.equal(named[name], p), name


def test_one_d_tensor_in_muon_group():  # row 9
    with pytest.raises(ValueError, match="'hidden.bias' in Muon group 'muon' cannot be orthogonalised: 1-D"):
        Muon([{"params": [("hidden.bias", nn.Parameter(torch.zeros(4)))], "use_muon": True}])


def test_frozen_parameters_are_left_out():  # row 10
    model = Net()
    model.hidden.weight.requires_grad_(False)
    names = [n for g in muon_param_groups(model) for n, _ in g["params"]]
    assert "hidden.weight" not in names


def test_grad_none_is_skipped_without_state():  # row 11
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    before = b.detach().clone()
    opt = Muon([{"params": [a, b], "use_muon": True}], lr=0.02)
    a.grad = torch.randn(4, 4)
    opt.step()
    assert torch.equal(b, before) and b not in opt.state


def test_same_parameter_in_two_groups():  # row 12
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="more than one parameter group"):
        Muon([{"params": [w], "use_muon": True}, {"params": [w], "use_muon": False}])


def test_complex_parameters():  # row 13
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex dtype"):
        Muon([{"params": [z], "use_muon": True}])
    ref = nn.Parameter(z.detach().clone())
    opt = Muon(
        [{"params": [z], "use_muon": False}], lr=0.01, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, weight_decay=0.01
    )  # AdamW supports complex
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(4, 4, dtype=torch.complex64)
        z.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(z, ref)  # torch's own complex AdamW, bitwise


def test_fp16_parameters():  # row 14
    model = Net().half()
    with pytest.raises(ValueError, match="float16 parameters in AdamW group 'adamw' .*eps underflows"):
        Muon(muon_param_groups(model), lr=0.02)
    ref = copy.deepcopy(model).float()  # the same weights in fp32
    start = [p.detach().clone() for p in ref.parameters()]
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_eps=1e-4)
    ref_opt = Muon(muon_param_groups(ref), lr=0.02, adamw_eps=1e-4)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(torch.arange(5)).float().sum().backward()
            o.step()
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert opt.state[model.hidden.weight]["momentum_buffer"].dtype == torch.float16
    # fp16 weights follow the fp32 run: measured within 5% of how far the weights moved (fp16
    # rounding of weights and gradients); tolerance 10%.
    for a, b, w0 in zip(model.parameters(), ref.parameters(), start):
        assert (a.float() - b).norm() <= 0.1 * (b - w0).norm()


def test_resume_with_a_different_model_shape():  # row 15
    saved = _trained(Net(width=8)).state_dict()
    model = Net(width=16)
    opt = _trained(model)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match="has shape .* the model changed"):
        opt.load_state_dict(saved)
    _unchanged(model, opt, snap)


@pytest.mark.requires_torch("2.9", "torch.optim.Muon")
def test_state_dict_from_another_optimizer():  # row 16
    model = Net()
    adamw = torch.optim.AdamW(model.parameters())
    opt = _trained(model)
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(adamw.state_dict())
    other = torch.optim.Muon(
        [{"params": [model.hidden.weight]}, {"params": [model.embed.weight]}, {"params": [model.head.weight]}]
    )
    with pytest.raises(ValueError, match="not saved by lightning_muon.Muon"):
        opt.load_state_dict(other.state_dict())


def test_sparse_gradient():  # row 17
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon([{"params": [emb.weight], "use_muon": False}])
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_forced_muon_name_on_a_vector():  # row 18
    with pytest.raises(ValueError, match="cannot be a Muon matrix: 1-D"):
        route_parameters(Net(), muon_names=["hidden.bias"])


def test_decaying_schedule_without_max_steps():  # row 19
    with pytest.raises(ValueError, match="needs max_steps"):
        configure_muon(Net(), schedule="cosine")


def test_a_single_tensor_instead_of_an_iterable():  # row 20
    with pytest.raises(TypeError, match="iterable"):
        Muon(nn.Parameter(torch.randn(3, 3)))


def test_unnamed_parameters_warn():  # row 21
    with pytest.warns(UserWarning, match="Shape alone cannot tell an embedding"):
        Muon(Net().parameters())


def test_callbacks_with_a_logger_that_is_not_tensorboard(tmp_path):  # row 28
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_muon.callbacks import SpectralEntropyMonitor, StableRankMonitor

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16))
            self.head = nn.Linear(16, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.head(self.body(x)), y)

        def configure_optimizers(self):
            return configure_muon(self, lr=0.01)

    data = DataLoader(TensorDataset(torch.randn(32, 6), torch.randn(32, 1)), batch_size=8)
    logger = CSVLogger(tmp_path)
    L.Trainer(
        max_steps=4,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[SpectralEntropyMonitor(every_n_steps=2), StableRankMonitor(every_n_steps=2)],
    ).fit(Lit(), data)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def steps(tag):
        return {int(r["step"]): float(r[tag]) for r in rows if r.get(tag)}

    assert sorted(steps("stable_rank/mean")) == [0, 2]  # scalars reach any logger
    entropy = steps("spectral_entropy/mean")
    assert sorted(entropy) == [0, 2] and all(0 < v <= 1 for v in entropy.values())


# rows 68-71: NorMuon and low-precision momentum settings, at construction and in added groups
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "adamuon"}, r"variant must be one of \('muon', 'normuon'\)"),
        (
            {"variant": "normuon", "variant_options": {"beta2": 1.0}},
            r"variant_options\['beta2'\] \(NorMuon\) must be a number in \[0, 1\)",
        ),
        ({"variant": "normuon", "variant_options": {"eps": 0.0}}, r"'eps'\] \(NorMuon\) must be a finite number > 0"),
        (
            {"variant": "normuon", "variant_options": {"eps": float("nan")}},
            r"'eps'\] \(NorMuon\) must be a finite number > 0",
        ),
        (
            {"variant": "normuon", "variant_options": {"beta": 0.9}},
            r"variant 'normuon' has no option 'beta' \(its options: beta2, eps\)",
        ),
        ({"variant_options": {"beta2": 0.9}}, r"variant 'muon' has no option 'beta2' \(its options: none\)"),
        ({"momentum_dtype": torch.float16}, "momentum_dtype must be None, 'float32' or 'bfloat16'.*float16's range"),
    ],
)
def test_invalid_normuon_and_momentum_dtype_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(muon_param_groups(Net()), **kwargs)
    model = Net()
    opt = _trained(model)
    snap = _snapshot(model, opt)
    extra = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [extra.weight], "use_muon": True, **kwargs})
    assert len(opt.param_groups) == 3
    _unchanged(model, opt, snap)
