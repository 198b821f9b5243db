"""CriticalBatchSizeMonitor's estimators and BatchSizeWarmup in real (short, CPU) Trainer runs.

References: per-example gradients from torch.func.vmap(grad) of each example's own loss, the
closed-form noise of linear regression, an uninterrupted run (resume), and a 2-process DDP run.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import ROOT, SCRIPTS
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_muon import configure_muon, muon_critical_batch_size, noise_scale
from lightning_muon.callbacks import BatchSizeWarmup, CriticalBatchSizeMonitor

MICRO = 8


class Net(pl.LightningModule):
    """LayerNorm -> Linear -> Tanh -> Linear -> LayerNorm -> head; Muon on the two hidden matrices."""

    def __init__(self, n=64, manual=False):
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 12)
        self.ln2 = nn.LayerNorm(12, bias=False)
        self.head = nn.Linear(12, 3)
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 5, 6, generator=gen), torch.randn(n, 5, 3, generator=gen)  # 5 tokens
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.head(self.ln2(torch.tanh(self.fc2(torch.tanh(self.fc1(self.ln(x)))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=MICRO, shuffle=False)

    def configure_optimizers(self):
        return configure_muon(self, lr=0.02, ns_method="svd", ns_dtype="float32", adamw_lr=1e-3, weight_decay=0.0)


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_steps", 1)
    kw.setdefault("logger", CSVLogger(tmp_path, name="", version="run"))
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_checkpointing=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _rows(tmp_path):
    with open(tmp_path / "run" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _logged(rows, tag, step=0):
    return float(next(r[tag] for r in rows if r.get(tag) not in (None, "") and int(r["step"]) == step))


def _per_example_grads(model, x, y):
    """g_i: the gradient of example i's own loss (mean over its tokens and outputs)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.mse_loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _reference(model, micro_batches, keys):
    """Small (one example) and large (one micro-batch) squared norms averaged over micro-batches."""
    small, big = 0.0, 0.0
    for x, y in micro_batches:
        g = _per_example_grads(model, x, y)
        flat = torch.cat([g[k].reshape(len(x), -1) for k in keys], 1)
        small += flat.square().sum(1).mean().item() / len(micro_batches)
        big += flat.mean(0).square().sum().item() / len(micro_batches)
    return small, big


@pytest.mark.parametrize("setting", ["default", "accumulate", "manual"])
def test_per_example_step0_matches_vmap_grad(tmp_path, setting):
    # The default single-device Trainer, accumulation (2 micro-batches) and manual optimization
    # (step through self.optimizers()) all give the brute-force one-batch estimate.
    model = Net(manual=setting == "manual")
    n_micro = 2 if setting == "accumulate" else 1
    batches = [(model.x[i * MICRO : (i + 1) * MICRO], model.y[i * MICRO : (i + 1) * MICRO]) for i in range(n_micro)]
    monitor = CriticalBatchSizeMonitor(every_n_steps=1)
    _trainer(tmp_path, [monitor], accumulate_grad_batches=n_micro).fit(model)
    assert monitor.mode == "per_example" and monitor.slots == ["fc1.weight", "fc2.weight"]
    rows = _rows(tmp_path)
    ref_model = Net()
    total = noise_scale(*_reference(ref_model, batches, ["fc1.weight", "fc2.weight"]), 1, MICRO)
    # fp32 model vs fp32 vmap: rel 1e-4
    assert _logged(rows, "critical_batch_size/grad_sq") == pytest.approx(total.grad_sq.item(), rel=1e-4)
    assert _logged(rows, "critical_batch_size/trace_sigma") == pytest.approx(total.trace_sigma.item(), rel=1e-4)
    small, big, valid = monitor._smoothed()  # per layer, one measurement: the raw squared norms
    assert valid.all() and monitor.b_small == 1 and monitor.b_big == MICRO
    weighted = {}  # name -> (b_crit, its nuclear-norm weight) where rank > 0
    for i, name in enumerate(monitor.slots):
        ref_small, ref_big = _reference(ref_model, batches, [name])
        assert small[i].item() == pytest.approx(ref_small, rel=1e-4)
        assert big[i].item() == pytest.approx(ref_big, rel=1e-4)
        # Muon's B_crit with the group's momentum (0.95, Nesterov), from the same pieces, at the
        # optimizer's batch: micro-batch x accumulation (8 or 16 examples; one process)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        G = _per_example_grads(ref_model, x, y)[name].mean(0)  # step 0: the direction is the gradient
        sigma2 = noise_scale(ref_small, ref_big, 1, MICRO).trace_sigma / G.numel()
        est = muon_critical_batch_size(
            G.double(), sigma2.double(), momentum=0.95, nesterov=True, batch_size=MICRO * n_micro
        )
        # noise-dominated at 8-16 examples (r = 0 or 1 above the noise edge): no b_crit when r = 0
        logged = [
            r[f"per_layer/critical_batch_size/b_crit/{name}"]
            for r in rows
            if r.get(f"per_layer/critical_batch_size/b_crit/{name}")
        ]
        if est.rank.item() == 0:
            assert logged == []
        else:
            assert float(logged[0]) == pytest.approx(est.b_crit.item(), rel=1e-3)
            weighted[name] = (est.b_crit.item(), est.nuclear_norm.item())
        assert _logged(rows, f"per_layer/critical_batch_size/sigma2/{name}") == pytest.approx(
            est.sigma2.item(), rel=1e-4
        )
        assert _logged(rows, f"per_layer/critical_batch_size/rank/{name}") == est.rank.item()
        tag = f"per_layer/critical_batch_size/sensitivity/{name}"
        sensitivity = [float(r[tag]) for r in rows if r.get(tag) not in (None, "")]
        # fp32 monitor vs float64 reference from fp32 pieces: rel 1e-4
        assert sensitivity == pytest.approx([est.sensitivity.item()] if est.sensitivity.isfinite() else [], rel=1e-4)
    # The model-level b_crit (what BatchSizeWarmup(source="b_crit") follows): the mean over matrices
    # weighted by the nuclear norm of the singular values each one used (accumulate: two layers with rank > 0)
    total = sum(w for _, w in weighted.values())
    want = sum(b * w for b, w in weighted.values()) / total if weighted else math.nan
    assert monitor.last["b_crit"] == pytest.approx(want, rel=1e-3, nan_ok=True)
    assert len(weighted) == (2 if setting == "accumulate" else 1)
    assert all(not m._forward_hooks for m in model.modules())  # hooks gone after the measured step


def test_layernorm_estimator_matches_vmap_grad(tmp_path):
    model = Net()
    monitor = CriticalBatchSizeMonitor(every_n_steps=1, estimator="layernorm")
    _trainer(tmp_path, [monitor]).fit(model)
    assert monitor.slots == ["ln", "ln2"]
    rows = _rows(tmp_path)
    batches = [(model.x[:MICRO], model.y[:MICRO])]
    keys = ["ln.weight", "ln.bias", "ln2.weight"]
    total = noise_scale(*_reference(Net(), batches, keys), 1, MICRO)
    assert _logged(rows, "critical_batch_size/trace_sigma") == pytest.approx(total.trace_sigma.item(), rel=1e-4)
    assert _logged(rows, "critical_batch_size/grad_sq") == pytest.approx(total.grad_sq.item(), rel=1e-4)
    assert not any(k.startswith("critical_batch_size/b_crit") for k in rows[0])


def test_hooks_only_on_measured_steps(tmp_path):
    model = Net()
    monitor = CriticalBatchSizeMonitor(every_n_steps=4, sample_every_n_steps=2)
    _trainer(tmp_path, [monitor], max_steps=7).fit(model)
    assert monitor.ema_steps == 4  # steps 0, 2, 4, 6
    assert int(monitor.ema_counts.min()) == 4
    rows = _rows(tmp_path)
    assert sorted({int(r["step"]) for r in rows if r.get("per_layer/critical_batch_size/sigma2/fc1.weight")}) == [0, 4]


class Regression(pl.LightningModule):
    """loss = 0.5 mean_i ||W x_i - y_i||^2, y = W* x + e: G = D = W - W*, tr Sigma = (d+1)|D|^2 + k d s^2."""

    def __init__(self, d=8, k=4, noise=0.5, n=4096, lr=0.0, shift=0.3):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.proj = nn.Linear(d, k, bias=False)
        w_star = self.proj.weight.detach() + shift * torch.randn(k, d, generator=gen)
        self.x = torch.randn(n, d, generator=gen)
        self.y = self.x @ w_star.T + noise * torch.randn(n, k, generator=gen)
        D = self.proj.weight.detach() - w_star
        self.true_grad_sq = D.square().sum().item()
        self.true_trace = ((d + 1) * D.square().sum() + k * d * noise**2).item()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self.proj(x) - y).square().sum(1).mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=False)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}


@pytest.mark.parametrize("estimator, accumulate", [("per_example", 1), ("two_batch", 4)])
def test_closed_form_linear_regression(tmp_path, estimator, accumulate):
    # Both estimators, measured every step and smoothed (EMA 0.99), against the closed form.
    model = Regression()
    monitor = CriticalBatchSizeMonitor(
        every_n_steps=250, include=["proj.weight"], ema=0.99, estimator=estimator, sample_every_n_steps=1
    )
    _trainer(tmp_path, [monitor], max_steps=251, accumulate_grad_batches=accumulate).fit(model)
    rows = _rows(tmp_path)
    # Tolerance 15%: the EMA averages ~100 measurements; measured errors 1-7% on this seed.
    assert _logged(rows, "critical_batch_size/trace_sigma", 250) == pytest.approx(model.true_trace, rel=0.15)
    assert _logged(rows, "critical_batch_size/grad_sq", 250) == pytest.approx(model.true_grad_sq, rel=0.15)
    assert _logged(rows, "critical_batch_size/b_simple", 250) == pytest.approx(
        model.true_trace / model.true_grad_sq, rel=0.15
    )


def test_bad_configuration():
    with pytest.raises(ValueError, match="estimator"):
        CriticalBatchSizeMonitor(estimator="ghost")
    with pytest.raises(ValueError, match="sample_every_n_steps"):
        CriticalBatchSizeMonitor(sample_every_n_steps=0)
    with pytest.raises(ValueError, match="method"):
        CriticalBatchSizeMonitor(method="fast")
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchSizeWarmup(max_batch_size=0)
    with pytest.raises(ValueError, match="safety"):
        BatchSizeWarmup(64, safety=0)
    with pytest.raises(ValueError, match="lr_rule"):
        BatchSizeWarmup(64, lr_rule="cubic")
    with pytest.raises(ValueError, match="source"):
        BatchSizeWarmup(64, source="b_noise")
    with pytest.raises(ValueError, match="min_interval"):
        BatchSizeWarmup(64, min_interval=-1)


def test_misconfigured_trainers(tmp_path):
    with pytest.raises(MisconfigurationException, match="manual optimization"):
        _trainer(tmp_path, [CriticalBatchSizeMonitor(estimator="two_batch")], accumulate_grad_batches=1).fit(
            Net(manual=True)
        )
    with pytest.raises(MisconfigurationException, match="add a CriticalBatchSizeMonitor"):
        _trainer(tmp_path, [BatchSizeWarmup(64)]).fit(Net())
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        _trainer(tmp_path, [CriticalBatchSizeMonitor(), BatchSizeWarmup(64)]).fit(Net(manual=True))


class UpNet(Net):
    """A 1-D transposed conv in front of the Linear layers: a layer type with no per-example form."""

    def __init__(self, manual=False):
        super().__init__(manual=manual)
        self.up = nn.ConvTranspose1d(6, 6, 1)

    def forward(self, x):
        return super().forward(self.up(x.mT).mT)


class UpOnly(Regression):
    """Only a transposed conv, no norm: nothing has a per-example form."""

    def __init__(self, manual=False):
        super().__init__(n=64)
        del self.proj
        self.up = nn.ConvTranspose1d(8, 4, 1, bias=False)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = 0.5 * (self.up(x.unsqueeze(-1)).squeeze(-1) - y).square().sum(1).mean()
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss


def _fit(tmp_path, monitor, model, **kw):
    kw.setdefault("max_steps", 2)
    _trainer(tmp_path, [monitor], **kw).fit(model)
    return monitor


def _one_warning(record, match):
    """The monitor's warnings in ``record``: exactly one, matching ``match``; returns its text."""
    mine = [str(w.message) for w in record if "CriticalBatchSizeMonitor" in str(w.message)]
    assert len(mine) == 1 and re.search(match, mine[0]), mine
    return mine[0]


def _no_warning(record):
    assert not [str(w.message) for w in record if "CriticalBatchSizeMonitor" in str(w.message)]


def test_conv_layers_get_per_example_estimates_at_the_defaults(tmp_path):
    # A CNN on one device without accumulation: 'auto' measures the conv kernels themselves.
    class CNN(Net):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(6, 6, 3, padding=1)

        def forward(self, x):
            return super().forward(self.conv(x.mT).mT)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(
            tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, include=["conv.weight", "fc1.weight"]), CNN()
        )
    _no_warning(record)
    assert monitor.mode == "per_example" and monitor.ema_counts.tolist() == [2.0, 2.0]


def test_auto_leaves_out_what_has_no_per_example_form_and_its_advice_covers_it(tmp_path):
    include = ["up.weight", "fc1.weight"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, include=include), UpNet())
    text = _one_warning(record, r"estimator='auto', the default\) chose 'per_example'")
    assert "['up.weight'] (ConvTranspose1d: 1 layer(s))" in text and "needs two batch sizes" in text
    assert monitor.mode == "per_example"
    assert dict(zip(monitor.slots, monitor.ema_counts.tolist())) == {"up.weight": 0.0, "fc1.weight": 2.0}
    # the advice: accumulate two micro-batches; 'auto' then covers every layer, without a warning
    assert "pass Trainer(accumulate_grad_batches=2)" in text
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(
            tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, include=include), UpNet(), accumulate_grad_batches=2
        )
    _no_warning(record)
    assert monitor.mode == "two_batch" and monitor.ema_counts.tolist() == [2.0, 2.0]


def test_auto_under_manual_optimization_advises_exclude(tmp_path):
    include = ["up.weight", "fc1.weight"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, include=include), UpNet(manual=True))
    text = _one_warning(record, "manual optimization")
    assert "pass exclude=['up.weight']" in text
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(
            tmp_path,
            CriticalBatchSizeMonitor(every_n_steps=1, include=include, exclude=["up.weight"]),
            UpNet(manual=True),
        )
    _no_warning(record)
    assert monitor.slots == ["fc1.weight"] and monitor.ema_counts.tolist() == [2.0]


def test_auto_with_no_per_example_layer_falls_back_to_the_norms_then_to_nothing(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, include=["up.weight"]), UpNet())
    text = _one_warning(record, r"chose 'layernorm'")
    assert monitor.mode == "layernorm" and monitor.slots == ["ln", "ln2"] and monitor.ema_steps == 2
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1), UpOnly())
    text2 = _one_warning(record, "measures nothing")
    assert monitor.mode == "off" and monitor.ema_steps == 0
    for advice in (text, text2):  # both say: accumulate, and 'auto' picks 'two_batch'
        assert "pass Trainer(accumulate_grad_batches=2)" in advice
    monitor = _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1), UpOnly(), accumulate_grad_batches=2)
    assert monitor.mode == "two_batch" and monitor.ema_counts.tolist() == [2.0]
    with warnings.catch_warnings(record=True) as record:  # manual optimization: nothing can measure it
        warnings.simplefilter("always")
        _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1), UpOnly(manual=True))
    assert "remove the monitor" in _one_warning(record, "measures nothing")


@pytest.mark.parametrize(
    "estimator, kw, model, match, advice, follow",
    [
        # two_batch on one device without accumulation: per_example measures these layers
        ("two_batch", {}, "Net", "needs two batch sizes", "estimator='per_example'", {"estimator": "per_example"}),
        (
            "two_batch",
            {"include": ["up.weight"]},
            "UpNet",
            "needs two batch sizes",
            "estimator='layernorm'",
            {"estimator": "layernorm"},
        ),
        (
            "two_batch",
            {},
            "UpOnly",
            "needs two batch sizes",
            "Trainer(accumulate_grad_batches=2)",
            {"estimator": "two_batch", "accumulate_grad_batches": 2},
        ),
        (
            "two_batch",
            {},
            "Net(manual=True)",
            "manual optimization",
            "estimator='per_example'",
            {"estimator": "per_example"},
        ),
        (
            "per_example",
            {"include": ["up.weight"]},
            "UpNet",
            "none of the monitored layers",
            "estimator='layernorm'",
            {"estimator": "layernorm"},
        ),
        (
            "per_example",
            {},
            "UpOnly",
            "none of the monitored layers",
            "Trainer(accumulate_grad_batches=2)",
            {"estimator": "two_batch", "accumulate_grad_batches": 2},
        ),
        ("layernorm", {}, "Regression()", "no nn.LayerNorm", "estimator='per_example'", {"estimator": "per_example"}),
    ],
)
def test_every_refusal_names_the_choice_and_its_advice_works(tmp_path, estimator, kw, model, match, advice, follow):
    build = {
        "Net": Net,
        "UpNet": UpNet,
        "UpOnly": UpOnly,
        "Net(manual=True)": lambda: Net(manual=True),
        "Regression()": Regression,
    }[model]
    with pytest.raises(MisconfigurationException, match=match) as err:
        _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, estimator=estimator, **kw), build())
    text = str(err.value)
    assert f"CriticalBatchSizeMonitor(estimator={estimator!r})" in text and advice in text
    follow = dict(follow)
    trainer_kw = (
        {"accumulate_grad_batches": follow.pop("accumulate_grad_batches")}
        if "accumulate_grad_batches" in follow
        else {}
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, **{**kw, **follow}), build(), **trainer_kw)
    assert monitor.mode == follow["estimator"] and monitor.ema_steps == 2
    if estimator != "per_example" or model != "UpNet":
        _no_warning(record)


def test_per_example_choice_warns_once_for_what_it_leaves_out_and_two_batch_covers_it(tmp_path):
    include = ["up.weight", "fc1.weight"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, include=include, estimator="per_example"), UpNet())
    text = _one_warning(record, r"estimator='per_example'\): no per-example estimate for \['up.weight'\]")
    assert "use estimator='two_batch' with Trainer(accumulate_grad_batches=2)" in text
    monitor = _fit(
        tmp_path,
        CriticalBatchSizeMonitor(every_n_steps=1, include=include, estimator="two_batch"),
        UpNet(),
        accumulate_grad_batches=2,
    )
    assert monitor.ema_counts.tolist() == [2.0, 2.0]


def test_a_layer_whose_norms_fail_is_left_out_and_training_goes_on(tmp_path, monkeypatch):
    import lightning_muon.callbacks.critical_batch_size as cbs

    real = cbs._per_example_norms

    def flaky(kind, module, x, g, method):
        if module.out_features == 12 and module.in_features == 6:  # fc1
            raise RuntimeError("unexpected layout")
        return real(kind, module, x, g, method)

    monkeypatch.setattr(cbs, "_per_example_norms", flaky)
    include = ["fc1.weight", "fc2.weight"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, include=include), Net(), max_steps=3)
    text = _one_warning(record, r"per-example norms of 'fc1.weight' \(Linear\) failed \(RuntimeError")
    assert dict(zip(monitor.slots, monitor.ema_counts.tolist())) == {"fc1.weight": 0.0, "fc2.weight": 3.0}
    assert "pass exclude=['fc1.weight']" in text
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = _fit(
            tmp_path, CriticalBatchSizeMonitor(every_n_steps=1, include=include, exclude=["fc1.weight"]), Net()
        )
    _no_warning(record)


def test_tensorboard_layout_puts_the_batch_next_to_the_estimates(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    monitor = CriticalBatchSizeMonitor(every_n_steps=2, sample_every_n_steps=1)
    logger = TensorBoardLogger(tmp_path, name="", version="tb")
    _trainer(tmp_path, [monitor, BatchSizeWarmup(64, min_interval=0)], max_steps=6, logger=logger).fit(Net())
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    layout = layout_pb2.Layout.FromString(ea.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {c.title: c.multiline.tag for cat in layout.category for c in cat.chart}
    regex = charts["global batch vs B_simple and B_crit (examples)"][0]
    import re

    for tag in ("critical_batch_size/global_batch", "critical_batch_size/b_simple", "critical_batch_size/b_crit"):
        assert re.match(regex, tag)
    for tag in ("per_layer/critical_batch_size/b_simple/fc1.weight", "critical_batch_size/b_crit/mean"):
        assert not re.match(regex, tag)
    # the monitor's own global batch is the one BatchSizeWarmup set (logged after the step) at each logging step
    warmup = {e.step: e.value for e in ea.Scalars("batch_size/global")}
    logged = {e.step: e.value for e in ea.Scalars("critical_batch_size/global_batch")}
    assert sorted(logged) == [0, 2, 4]
    assert logged == {step: warmup[step + 1] for step in logged}


# ----------------------------------------------------------------------------- BatchSizeWarmup


class Windows(pl.Callback):
    """Micro-batches per optimizer step, and the accumulation in force when the step was taken."""

    def __init__(self):
        self.windows, self.count, self.lrs = [], 0, []

    def on_train_batch_start(self, trainer, *args):
        self.count += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.windows.append((self.count, trainer.accumulate_grad_batches))
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.count = 0


def _warmup_run(tmp_path, name, max_batch_size=1024, lr_rule="none", epochs=2, ckpt=None, save=None, **kw):
    # B_simple = tr Sigma / |G|^2, about 400 examples here (closed form: Regression.true_*)
    model = Regression(n=2048, lr=1e-3, shift=0.05, noise=1.0)
    monitor = CriticalBatchSizeMonitor(every_n_steps=1000, include=["proj.weight"], sample_every_n_steps=1, ema=0.9)
    warmup = BatchSizeWarmup(max_batch_size=max_batch_size, safety=1.0, min_interval=3, lr_rule=lr_rule, **kw)
    windows = Windows()
    trainer = _trainer(
        tmp_path / name,
        [monitor, warmup, windows],
        max_steps=-1,
        max_epochs=epochs,
        logger=CSVLogger(tmp_path / name, name="", version="run"),
        default_root_dir=tmp_path / name,
    )
    trainer.fit(model, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return model, warmup, windows, trainer


def test_warmup_grows_monotonically_to_the_noise_scale_with_whole_windows(tmp_path):
    model, warmup, windows, trainer = _warmup_run(tmp_path, "a", epochs=1)
    true_b = model.true_trace / model.true_grad_sq
    accs = [a for _, a in warmup.history]
    assert accs == sorted(accs) and len(accs) > 1  # it grew, monotonically, in doublings
    assert all(b == 2 * a or b % a == 0 for a, b in zip(accs, accs[1:]))
    final = 16 * accs[-1]
    assert final <= true_b * 1.3 and 2 * final > true_b * 0.7  # the largest doubling below B_simple (+-30%)
    assert all(n == a for n, a in windows.windows)  # every window held the accumulation in force
    steps = [s for s, _ in warmup.history]
    assert all(b - a >= 3 for a, b in zip(steps, steps[1:]))  # min_interval
    logged = [float(r["batch_size/global"]) for r in _rows(tmp_path / "a") if r.get("batch_size/global")]
    assert logged == sorted(logged) and logged[-1] == final


def test_warmup_respects_the_maximum_and_the_lr_rule(tmp_path):
    _, warmup, windows, _ = _warmup_run(tmp_path, "b", max_batch_size=32, lr_rule="sqrt", epochs=1)
    assert warmup.accumulate == 2  # 16 x 2 = 32 = the maximum
    assert warmup.lr_factor == pytest.approx(math.sqrt(2))
    assert windows.lrs[-1] == pytest.approx(1e-3 * math.sqrt(2))  # the scheduler's base_lrs carry it
    _, warmup, windows, _ = _warmup_run(tmp_path, "c", max_batch_size=64, lr_rule="linear", epochs=1)
    assert warmup.accumulate == 4 and windows.lrs[-1] == pytest.approx(4e-3)


def test_warmup_resumes_from_a_checkpoint_like_an_uninterrupted_run(tmp_path):
    _, full, full_windows, _ = _warmup_run(tmp_path, "full", epochs=2, lr_rule="sqrt")
    _warmup_run(tmp_path, "first", epochs=1, lr_rule="sqrt", save=tmp_path / "e1.ckpt")
    _, resumed, windows, trainer = _warmup_run(tmp_path, "resumed", epochs=2, lr_rule="sqrt", ckpt=tmp_path / "e1.ckpt")
    assert resumed.history == full.history and resumed.accumulate == full.accumulate
    assert resumed.lr_factor == pytest.approx(full.lr_factor)
    assert windows.windows == full_windows.windows[-len(windows.windows) :]  # the second epoch's windows
    assert windows.lrs == pytest.approx(full_windows.lrs[-len(windows.lrs) :])


def _two_processes(tmp_path, mode):
    script = SCRIPTS / "noise_scale_2proc.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / mode
    done = subprocess.run(
        [sys.executable, str(script), str(out), mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _two_process_reference():
    """The first measurement by hand: rank r's first micro-batch is examples r, r + 2, ..., r + 14."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from noise_scale_2proc import MICRO as micro
        from noise_scale_2proc import data, make_net
    finally:
        sys.path.pop(0)
    net, (x, y) = make_net(), data()
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.mse_loss(functional_call(net, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    small, big = torch.zeros(2), torch.zeros(2)
    for rank in range(2):
        idx = torch.arange(rank, 2 * micro, 2)
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[idx], y[idx])
        for i, name in enumerate(("0.weight", "2.weight")):
            flat = g[name].reshape(micro, -1)
            small[i] += flat.square().sum(1).mean() / 2
            big[i] += flat.mean(0).square().sum() / 2
    return small, big


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_per_example_and_warmup_agree(tmp_path, mode):
    # Real 2-process runs (gloo): per-example norms from local activations, reduced across ranks;
    # the warmup decision broadcast: every rank holds the same estimate, history and windows.
    ranks = _two_processes(tmp_path, mode)
    assert ranks[0]["mode"] == "per_example"
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) > 1
    assert ranks[0]["windows"] == ranks[1]["windows"]
    assert all(n == a for n, a in ranks[0]["windows"])  # whole accumulation windows
    assert ranks[0]["b_simple"] == ranks[1]["b_simple"]  # reduced: identical on every rank
    small, big = _two_process_reference()
    first = ranks[0]["first"]
    assert first["b"] == [1.0, 8.0]
    torch.testing.assert_close(torch.tensor(first["small"]), small, rtol=1e-4, atol=0)  # fp32 vs fp32 vmap
    torch.testing.assert_close(torch.tensor(first["big"]), big, rtol=1e-4, atol=0)


@pytest.mark.slow
def test_warmup_benchmark_prints_the_table_and_saves_a_plot(tmp_path, capsys):
    from benchmarks import batch_size_warmup

    plot = tmp_path / "p.png"
    batch_size_warmup.main(
        [
            "--seeds",
            "0",
            "--batches",
            "16",
            "--n-layer",
            "1",
            "--n-embd",
            "16",
            "--block-size",
            "16",
            "--val-batches",
            "2",
            "--max-accumulate",
            "2",
            "--plot",
            str(plot),
        ]
    )
    out = capsys.readouterr().out
    assert "| fixed small (8)" in out and "| fixed large (16)" in out and "| warmup (8 -> <= 16)" in out
    assert "|            16.0 |" in out and "|             8.0 |" in out  # optimizer steps: 16 small, 8 large
    assert plot.stat().st_size > 0


# ------------------------------------------------------- BatchSizeWarmup's decision rule, step by step
def _decider(estimates, measurements, micro=16, **kw):
    """A warmup wired to a stand-in monitor (its smoothed estimates and measurement count)."""
    warmup = BatchSizeWarmup(max_batch_size=1 << 20, **kw)
    warmup._monitor = types.SimpleNamespace(last=dict(estimates), ema_steps=measurements)
    warmup.micro_batch, warmup.accumulate = micro, 1
    return warmup


def _largest_doubling(micro, target):
    """Reference: the largest A = 2^k with micro * A <= target (A = 1 at least)."""
    return max([1] + [2**k for k in range(30) if micro * 2**k <= target])


@pytest.mark.parametrize(
    "kw, source_value",
    [({}, 1000.0), ({"safety": 1.0}, 1000.0), ({"safety": 0.25}, 1000.0), ({"source": "b_crit"}, 300.0)],
)
def test_warmup_target_is_the_largest_doubling_below_safety_times_the_estimate(kw, source_value):
    # The default safety is 0.5; source="b_crit" follows the monitor's model-level b_crit (not b_simple).
    trainer = types.SimpleNamespace(world_size=1)
    warmup = _decider({"b_simple": 1000.0, "b_crit": 300.0}, measurements=3, **kw)
    safety = kw.get("safety", 0.5)
    assert warmup.estimate() == source_value
    assert warmup.proposal(trainer) == _largest_doubling(16, safety * source_value)
    # two processes: the global batch is micro x accumulation x world
    assert warmup.proposal(types.SimpleNamespace(world_size=2)) == _largest_doubling(32, safety * source_value)


def test_warmup_waits_exactly_min_measurements_and_min_interval():
    trainer = types.SimpleNamespace(world_size=1, global_step=0, accumulate_grad_batches=1)
    trainer.optimizers, trainer.lr_scheduler_configs = [], []
    warmup = _decider({"b_simple": 1000.0}, measurements=2, min_measurements=3, min_interval=5)
    assert warmup.proposal(trainer) == 1  # 2 measurements: too few
    warmup._monitor.ema_steps = 3
    assert warmup.proposal(trainer) == 16  # the 3rd: 16 x 16 = 256 <= 0.5 x 1000
    warmup.pending = 16
    for step in range(5):  # steps 0..4: fewer than min_interval since the start (last change at 0)
        trainer.global_step = step
        warmup._maybe_apply(trainer, ready=0)
        assert warmup.accumulate == 1 and trainer.accumulate_grad_batches == 1
    trainer.global_step = 5  # exactly min_interval steps later: applied
    warmup._maybe_apply(trainer, ready=0)
    assert warmup.accumulate == 16 and trainer.accumulate_grad_batches == 16 and warmup.history[-1] == (5, 16)
