"""The four monitors in real (short, CPU) Trainer runs, checked against independent computations.

References: exact SVD of the weights and of a gradient recomputed by hand from the same batches,
the Muon optimizer's own step, a closed-form linear-regression noise covariance, an
uninterrupted run (for resume), and the TensorBoard event files read back.
"""

import copy
import csv
import faulthandler
import math
import os
import re
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from helpers import ROOT, SCRIPTS, cpu_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_muon import adjusted_lr, configure_muon, noise_scale, orthogonalize, sin_theta
from lightning_muon.callbacks import (
    BatchSizeWarmup,
    CacheRequest,
    CriticalBatchSizeMonitor,
    MonitorCallback,
    PolarMisalignmentMonitor,
    SpectralEntropyMonitor,
    SpectralMonitor,
    StableRankMonitor,
)
from lightning_muon.callbacks.cache import declare, step_cache
from lightning_muon.diagnostics.spectral import delta_p

MICRO = 16  # micro-batch size: 2 micro-batches (32 examples) give full-rank 16 x 16 gradients
HIDDEN = ("net.0.weight", "net.2.weight")


class TinyMLP(pl.LightningModule):
    """8 -> 16 -> 16 -> head 4, trained by Muon (exact SVD polar factor: references are exact)."""

    def __init__(self, n: int = 128, lr: float = 0.02) -> None:
        super().__init__()
        torch.manual_seed(0)  # every instance starts from the same weights
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = torch.randn(n, 4, generator=gen)
        self.lr = lr

    def forward(self, x):
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=MICRO, shuffle=False)

    def configure_optimizers(self):
        return configure_muon(self, lr=self.lr, ns_method="svd", ns_dtype="float32", adamw_lr=1e-3, weight_decay=0.0)


def _trainer(tmp_path, callbacks, logger="tb", **kw):
    if logger == "tb":
        logger = TensorBoardLogger(tmp_path, name="", version="run")
    kw.setdefault("max_steps", 3)
    kw.setdefault("log_every_n_steps", 1)
    kw.setdefault("enable_checkpointing", False)
    return cpu_trainer(tmp_path, logger=logger, callbacks=callbacks, num_sanity_val_steps=0, **kw)


def _events(path):
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def _step0_reference(model):
    """Weights and the accumulated gradient of step 0 (two micro-batches), recomputed by hand."""
    ref = copy.deepcopy(model)
    grads, micro_sq = {}, []
    for i in range(2):
        ref.zero_grad()
        x, y = ref.x[i * MICRO : (i + 1) * MICRO], ref.y[i * MICRO : (i + 1) * MICRO]
        nn.functional.mse_loss(ref(x), y).backward()
        micro_sq.append({n: p.grad.square().sum().item() for n, p in ref.named_parameters()})
        for n, p in ref.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad.clone() / 2
    weights = {n: p.detach().clone() for n, p in ref.named_parameters()}
    return weights, grads, micro_sq


def test_all_monitors_log_correct_values_to_tensorboard(tmp_path):
    model = TinyMLP()
    W0, G0, micro_sq = _step0_reference(model)
    callbacks = [  # StableRankMonitor first: it still takes sigma_1 from the shared exact spectrum
        StableRankMonitor(every_n_steps=2),
        SpectralEntropyMonitor(every_n_steps=2),
        PolarMisalignmentMonitor(every_n_steps=2, k=4),
        CriticalBatchSizeMonitor(every_n_steps=2, estimator="two_batch"),
    ]
    _trainer(tmp_path, callbacks, accumulate_grad_batches=2, max_steps=3).fit(model)
    ea = _events(tmp_path / "run")
    scalars = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}

    for name in HIDDEN:
        s = torch.linalg.svdvals(W0[name].double())
        p = s / s.sum()
        # Tolerances: fp32 Gram eigenvalues (1e-4 relative) and float32 logging.
        assert scalars[f"per_layer/spectral_entropy/{name}"][0] == pytest.approx(
            float(-(p * p.log()).sum() / math.log(len(s))), rel=1e-4
        )
        assert scalars[f"per_layer/stable_rank/{name}"][0] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-4)
        assert set(scalars[f"per_layer/stable_rank/{name}"]) == {0, 2}  # every_n_steps=2 within 3 steps
        W, G = W0[name], G0[name]
        assert scalars[f"per_layer/polar_misalignment/grad_sin_theta/{name}"][0] == pytest.approx(
            sin_theta(W.double(), G.double(), 4).item(), abs=1e-3
        )
        U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        assert scalars[f"per_layer/polar_misalignment/grad_delta_p/{name}"][0] == pytest.approx(
            delta_p(W.double(), U @ Vh).item(), rel=1e-4
        )
        # Step 0: the momentum buffer is empty, so Muon's update is a multiple of G.
        assert scalars[f"per_layer/polar_misalignment/update_delta_p/{name}"][0] == pytest.approx(
            scalars[f"per_layer/polar_misalignment/grad_delta_p/{name}"][0], rel=1e-4
        )
        # B_simple per layer from the two micro-batch gradients and their mean (EMA of one step).
        small = (micro_sq[0][name] + micro_sq[1][name]) / 2
        expect = noise_scale(small, G.square().sum().item(), MICRO, 2 * MICRO).b_simple.item()
        assert scalars[f"per_layer/critical_batch_size/b_simple/{name}"][0] == pytest.approx(expect, rel=1e-4)
        for tag in ("b_crit", "rank", "sigma2", "sensitivity"):
            assert f"per_layer/critical_batch_size/{tag}/{name}" in scalars
    for tag in ("spectral_entropy", "stable_rank", "polar_misalignment/grad_sin_theta", "critical_batch_size/b_crit"):
        per_layer = [scalars[f"per_layer/{tag}/{n}"][0] for n in HIDDEN]
        values = [v for v in per_layer if not math.isnan(v)]
        assert scalars[f"{tag}/mean"][0] == pytest.approx(sum(values) / len(values), rel=1e-5)
        assert scalars[f"{tag}/max"][0] == pytest.approx(max(values), rel=1e-6)
    assert "per_layer/stable_rank/head.weight" not in scalars  # the head is AdamW-routed: not a default layer
    assert {f"singular_values/{n}" for n in HIDDEN} <= set(ea.Tags()["histograms"])
    assert "spectral_entropy/spectra" in ea.Tags()["images"]
    assert "custom_scalars__config__" in ea.Tags()["tensors"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(ea.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    stems = ["stable_rank", "spectral_entropy", "polar_misalignment", "critical_batch_size"]  # callback order
    # the loss first, then the headline categories (open), then the per-layer ones (closed)
    assert [c.title for c in layout.category] == ["loss", *stems, *(f"{t} per layer" for t in stems)]
    assert [c.closed for c in layout.category] == [False] * 5 + [True] * 4
    charts = {(cat.title, c.title): c.multiline.tag[0] for cat in layout.category for c in cat.chart}
    headline = {k: v for k, v in charts.items() if not k[0].endswith("per layer")}
    detail = {k: v for k, v in charts.items() if k[0].endswith("per layer")}
    # TensorBoard matches a chart's regex at the start of the tag (re.match)
    for tag in scalars:  # every per-layer tag on exactly one per-layer chart, on no headline chart
        on_detail = [k for k, regex in detail.items() if re.match(regex, tag)]
        on_headline = [k for k, regex in headline.items() if re.match(regex, tag)]
        if tag.startswith("per_layer/"):
            assert len(on_detail) == 1 and not on_headline, (tag, on_detail, on_headline)
        else:
            assert not on_detail, tag
    for tag in ("stable_rank/mean", "spectral_entropy/max", "polar_misalignment/grad_delta_p/vs_chance"):
        assert any(re.match(regex, tag) for regex in headline.values()), tag
    loss = headline[("loss", "loss")]
    assert all(re.match(loss, t) for t in ("train/loss", "val_loss", "loss", "Loss/train".lower()))
    assert not any(re.match(loss, t) for t in scalars)  # none of the monitors' tags
    # the global batch the optimizer saw: micro-batch x accumulate_grad_batches
    assert scalars["critical_batch_size/global_batch"] == {0: 2 * MICRO, 2: 2 * MICRO}


class _WeightsAroundStep(pl.Callback):
    """Records each monitored weight just before and just after every optimizer step."""

    def __init__(self) -> None:
        self.before, self.after, self.grads = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if n in HIDDEN})
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if n in HIDDEN})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if n in HIDDEN})


def test_misalignment_monitor_predicts_the_update_muon_applies(tmp_path):
    """update_delta_p is measured against the polar factor of the step Muon then takes: momentum,
    Nesterov and the group's Newton–Schulz settings included (steps 1 and 2 have momentum)."""
    model = TinyMLP()
    weights = _WeightsAroundStep()
    _trainer(tmp_path, [PolarMisalignmentMonitor(every_n_steps=1, k=4), weights], max_steps=3).fit(model)
    ea = _events(tmp_path / "run")
    scalars = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
    for step in (1, 2):
        for name in HIDDEN:
            W, W_next = weights.before[step][name], weights.after[step][name]
            # weight_decay=0: W_next = W - adjusted_lr * O, O the orthogonalised direction (exact SVD)
            applied = (W - W_next) / adjusted_lr(model.lr, W.shape, "match_rms_adamw")
            torch.testing.assert_close(applied, orthogonalize(applied, "svd"), atol=1e-4, rtol=0)  # fp32 weights
            logged = scalars[f"per_layer/polar_misalignment/update_delta_p/{name}"][step]
            assert logged == pytest.approx(delta_p(W.double(), applied.double()).item(), rel=1e-4)
            # with momentum the update is not the gradient's direction: the comparison can fail
            assert logged != pytest.approx(scalars[f"per_layer/polar_misalignment/grad_delta_p/{name}"][step], rel=1e-3)
    # update_sin_theta: the top-4 frames of the direction Muon orthogonalises, written out from the
    # gradients (EMA buf <- beta buf + (1 - beta) g, Nesterov (1 - beta) g + beta buf), vs the weight's
    group = next(g for g in model.trainer.optimizers[0].param_groups if g.get("use_muon"))
    beta, nesterov = group["momentum"], group["nesterov"]
    for name in HIDDEN:
        buf = torch.zeros_like(weights.grads[0][name], dtype=torch.float64)
        for step in range(3):
            g = weights.grads[step][name].double()
            buf = beta * buf + (1 - beta) * g
            direction = (1 - beta) * g + beta * buf if nesterov else buf
            want = sin_theta(weights.before[step][name].double(), direction, 4).item()
            logged = scalars[f"per_layer/polar_misalignment/update_sin_theta/{name}"][step]
            assert logged == pytest.approx(want, abs=1e-3)  # fp32 top-4 frames: as grad_sin_theta above
            if step > 0:  # and it is not the gradient's
                assert logged != pytest.approx(
                    scalars[f"per_layer/polar_misalignment/grad_sin_theta/{name}"][step], abs=1e-3
                )


def test_stable_rank_power_iteration_alone(tmp_path):
    # Without SpectralEntropyMonitor no spectrum is cached: sigma_1 comes from power iteration.
    model = TinyMLP()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    monitor = StableRankMonitor(every_n_steps=1, num_iters=20, include=["net"])  # component match
    logger = CSVLogger(tmp_path)
    _trainer(tmp_path, [monitor], logger=logger, max_steps=1).fit(model)
    assert monitor.layers == list(HIDDEN)  # the matching biases are skipped
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in HIDDEN:
        s = torch.linalg.svdvals(W0[name].double())
        logged = float(next(r[f"per_layer/stable_rank/{name}"] for r in rows if r.get(f"per_layer/stable_rank/{name}")))
        # Cold start, 80 power steps on 16-wide Gaussian-init matrices: sigma_1 to 1e-3.
        assert logged == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=2e-3)
        assert monitor.vectors[name].shape == (W0[name].shape[1],)  # kept for the warm start


class FrobeniusNormMonitor(SpectralMonitor):
    """A monitor written against the base as a user would: ``||W||_F`` per layer."""

    prefix = "frobenius/"

    def __init__(self, every_n_steps):
        super().__init__(every_n_steps)
        self.calls = []

    def compute(self, trainer, optimizer, params, cache):
        self.calls.append((trainer.global_step, type(optimizer).__name__, list(params)))
        return {f"{self.prefix}{n}": float(cache.matrix("weight", n, p).norm()) for n, p in params.items()}


def test_a_new_spectral_monitor_gets_compute_at_its_logging_steps(tmp_path):
    model = TinyMLP()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    monitor = FrobeniusNormMonitor(every_n_steps=2)
    logger = CSVLogger(tmp_path)
    trainer = _trainer(tmp_path, [monitor], logger=logger, max_steps=3)
    trainer.fit(model)
    assert monitor.calls == [(0, "Muon", list(HIDDEN)), (2, "Muon", list(HIDDEN))]  # unwrapped optimizer
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"frobenius/{HIDDEN[0]}")]
    assert [int(r["step"]) for r in rows] == [0, 2]
    for name in HIDDEN:
        expect = torch.linalg.matrix_norm(W0[name].double()).item()
        assert float(rows[0][f"frobenius/{name}"]) == pytest.approx(expect, rel=1e-6)
        assert f"frobenius/{name}" in trainer.callback_metrics  # published for EarlyStopping / ModelCheckpoint


def test_only_spectral_monitors_follow_the_compute_template():
    with pytest.raises(TypeError, match="compute"):  # abstract: caught at construction, not at step 0
        type("NoCompute", (SpectralMonitor,), {"prefix": "x/"})()
    for monitor in (SpectralEntropyMonitor(), StableRankMonitor(), PolarMisalignmentMonitor()):
        assert isinstance(monitor, SpectralMonitor)
    cbs = CriticalBatchSizeMonitor()
    assert isinstance(cbs, MonitorCallback) and not isinstance(cbs, SpectralMonitor)
    assert not hasattr(cbs, "compute")


def test_sigma_max_comes_from_a_spectrum_another_monitor_declared():
    class Owner:  # any two objects: the cache keys by trainer and by declaring monitor
        pass

    trainer, entropy_like = Owner(), Owner()
    declare(trainer, entropy_like, [CacheRequest("weight", "spectrum", ("a",), every_n_steps=2)])
    W = _with_gap(12, 9)
    exact = torch.linalg.matrix_norm(W.double(), ord=2).item()
    vectors = {}
    cache = step_cache(trainer, 0)  # step 0: the spectrum is declared, no power iteration
    cache.matrix("weight", "a", W)
    assert cache.sigma_max("weight", ["a"], vectors, num_iters=1)["a"].item() == pytest.approx(exact, rel=1e-5)
    assert vectors == {}
    cache = step_cache(trainer, 1)  # step 1: not declared, power iteration (4 cold steps: a lower bound)
    cache.matrix("weight", "a", W)
    assert cache.sigma_max("weight", ["a"], vectors, num_iters=1)["a"].item() <= exact * (1 + 1e-6)
    assert vectors["a"].shape == (9,)
    with pytest.raises(ValueError, match="product"):  # bad-inputs row 52
        CacheRequest("weight", "eigenvalues", ("a",), 1)


def _with_gap(m, n):
    gen = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(m, n, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    return U @ torch.diag(torch.linspace(3.0, 0.1, n)) @ V.T


@pytest.mark.parametrize("entropy_first", [False, True])
def test_stable_rank_shares_the_spectrum_whatever_the_callback_order(tmp_path, entropy_first):
    model = TinyMLP()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    stable, entropy = StableRankMonitor(every_n_steps=1), SpectralEntropyMonitor(every_n_steps=1, log_spectra=False)
    callbacks = [entropy, stable] if entropy_first else [stable, entropy]
    trainer = _trainer(tmp_path, callbacks, logger=CSVLogger(tmp_path), max_steps=1)
    trainer.fit(model)
    assert stable.vectors == {}  # sigma_1 read off the declared spectrum: no power iteration ran
    for name in HIDDEN:
        s = torch.linalg.svdvals(W0[name].double())
        logged = trainer.callback_metrics[f"per_layer/stable_rank/{name}"].item()
        assert logged == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-4)  # exact spectrum, fp32


def test_checkpoint_state_loads_leniently_with_a_warning():  # bad-inputs row 53
    stable = StableRankMonitor()
    stable.vectors = {"w": torch.ones(3)}
    state = stable.state_dict()
    assert set(state) == {"vectors"}
    state["vectors"]["w"].add_(1)  # a copy: the monitor keeps its own
    assert stable.vectors["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.warns(UserWarning, match=r"ignoring unknown checkpoint state \['bogus'\]"):
        stable.load_state_dict({**state, "bogus": 1})
    assert stable.vectors["w"].tolist() == [2.0, 2.0, 2.0]
    with pytest.warns(UserWarning, match=r"lacks \['vectors'\]; they keep their current values"):
        stable.load_state_dict({})
    assert stable.vectors["w"].tolist() == [2.0, 2.0, 2.0]

    cbs = CriticalBatchSizeMonitor(ema=0.5)
    state = cbs.state_dict()
    assert list(state) == ["ema_small", "ema_big", "ema_steps", "b_small", "b_big", "ema_counts"]
    legacy = {"ema_small": torch.tensor([1.5]), "ema_big": torch.tensor([0.75]), "ema_steps": 2}
    legacy.update(b_small=1.0, b_big=4.0)  # a checkpoint from before per-slot counts: no warning
    cbs.load_state_dict(legacy)
    assert cbs.ema_counts.tolist() == [2.0]
    # bias-corrected EMAs 2 and 1 with b = 1, B = 4: |G|^2 = (4 - 2) / 3, tr Sigma = 1 / 0.75
    assert cbs.last["b_simple"] == pytest.approx((1 / 0.75) / (2 / 3), rel=1e-6)
    with pytest.warns(UserWarning, match=r"lacks \['ema_small', 'ema_big'\]"):
        CriticalBatchSizeMonitor().load_state_dict({"ema_steps": 0, "b_small": 1.0, "b_big": 2.0})

    warmup = BatchSizeWarmup(max_batch_size=64)
    warmup.accumulate, warmup.history = 2, [(0, 1), (10, 2)]
    state = warmup.state_dict()
    restored = BatchSizeWarmup(max_batch_size=64)
    restored.load_state_dict({**state, "history": [list(h) for h in state["history"]]})  # as a JSON round trip
    assert restored.state_dict() == state
    with pytest.warns(UserWarning, match=r"lacks \['micro_batch'\]"):
        restored.load_state_dict({k: v for k, v in state.items() if k != "micro_batch"})


class LinearRegression(pl.LightningModule):
    """loss = 0.5 * mean_i ||W x_i - y_i||^2 with y = W* x + e; W fixed (lr 0)."""

    def __init__(self, d=8, k=4, noise=0.5, n=40000):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.proj = nn.Linear(d, k, bias=False)
        w_star = self.proj.weight.detach() + 0.3 * torch.randn(k, d, generator=gen)
        self.x = torch.randn(n, d, generator=gen)
        self.y = self.x @ w_star.T + noise * torch.randn(n, k, generator=gen)
        D = self.proj.weight.detach() - w_star
        self.true_b_simple = (((d + 1) * D.square().sum() + k * d * noise**2) / D.square().sum()).item()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self.proj(x) - y).square().sum(1).mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=MICRO, shuffle=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_critical_batch_size_linear_regression_closed_form(tmp_path):
    # Per-example gradient covariance in closed form: tr Sigma = (d + 1)||D||^2 + k d s^2, G = D.
    model = LinearRegression()
    monitor = CriticalBatchSizeMonitor(
        every_n_steps=400, include=["proj.weight"], ema=0.995, estimator="two_batch", sample_every_n_steps=1
    )
    _trainer(tmp_path, [monitor], max_steps=401, accumulate_grad_batches=4).fit(model)
    scalars = {e.step: e.value for e in _events(tmp_path / "run").Scalars("critical_batch_size/b_simple")}
    assert scalars[400] == pytest.approx(model.true_b_simple, rel=0.2)  # 400-step EMA: 20% covers its noise


def test_misconfiguration_is_reported(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps"):
        StableRankMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="include"):
        StableRankMonitor(include="net.*")
    with pytest.raises(ValueError, match="ema"):
        CriticalBatchSizeMonitor(ema=1.0)
    with pytest.raises(ValueError, match="log_spectra must be True or False"):  # bad-inputs row 52
        SpectralEntropyMonitor(log_spectra="yes")
    with pytest.raises(MisconfigurationException, match="no logger"):
        _trainer(tmp_path, [StableRankMonitor()], logger=False).fit(TinyMLP())
    with pytest.raises(MisconfigurationException, match="no layer selected"):
        _trainer(tmp_path, [StableRankMonitor(include=["decoder.*"])]).fit(TinyMLP())
    with pytest.raises(MisconfigurationException, match="no layer selected"):
        _trainer(tmp_path, [StableRankMonitor(include=["*.bias"])]).fit(TinyMLP())  # only non-matrices
    with pytest.raises(MisconfigurationException, match="after exclude"):
        _trainer(tmp_path, [StableRankMonitor(exclude=["net"])]).fit(TinyMLP())
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches"):
        _trainer(tmp_path, [CriticalBatchSizeMonitor(estimator="two_batch")]).fit(TinyMLP())


def _resumable(tmp_path, name):
    return [StableRankMonitor(every_n_steps=1), CriticalBatchSizeMonitor(every_n_steps=1)], dict(
        default_root_dir=tmp_path / name, accumulate_grad_batches=2, max_steps=-1, logger=CSVLogger(tmp_path / name)
    )


def test_checkpoint_round_trip_resumes_like_an_uninterrupted_run(tmp_path):
    # 128 examples / (16 x 2) = 4 optimizer steps per epoch; stop at an epoch boundary.
    full, kw = _resumable(tmp_path, "full")
    _trainer(tmp_path, full, max_epochs=2, **kw).fit(TinyMLP())
    first, kw = _resumable(tmp_path, "first")
    trainer = _trainer(tmp_path, first, max_epochs=1, **kw)
    trainer.fit(TinyMLP())
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {first[0].state_key, first[1].state_key} <= set(saved)
    resumed, kw = _resumable(tmp_path, "resumed")
    _trainer(tmp_path, resumed, max_epochs=2, **kw).fit(TinyMLP(), ckpt_path=ckpt)
    assert resumed[1].ema_steps == full[1].ema_steps == 8
    # Same data and weights, EMA continued from the checkpoint: equal up to fp32 round-off.
    torch.testing.assert_close(resumed[1].ema_small, full[1].ema_small, rtol=1e-5, atol=0)
    torch.testing.assert_close(resumed[1].ema_big, full[1].ema_big, rtol=1e-5, atol=0)
    for name in HIDDEN:
        torch.testing.assert_close(resumed[0].vectors[name].abs(), full[0].vectors[name].abs(), atol=1e-4, rtol=0)


class ShardedMLP(TinyMLP):
    """Each of the ranks gets every world_size-th example, unshuffled (a reproducible split)."""

    def train_dataloader(self):
        ds = TensorDataset(self.x, self.y)
        sampler = DistributedSampler(
            ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(ds, batch_size=MICRO, sampler=sampler)


@pytest.mark.slow
def test_ddp_two_processes_log_once_with_local_vs_reduced_noise_scale(tmp_path):
    model = ShardedMLP()
    ref = copy.deepcopy(model)
    local_sq, grads = [], {}
    for rank in range(2):  # rank r's first micro-batch: examples r, r + 2, ...
        ref.zero_grad()
        idx = torch.arange(rank, 2 * MICRO, 2)
        nn.functional.mse_loss(ref(ref.x[idx]), ref.y[idx]).backward()
        local_sq.append({n: p.grad.square().sum().item() for n, p in ref.named_parameters()})
        for n, p in ref.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad.clone() / 2  # DDP averages over ranks
    callbacks = [
        SpectralEntropyMonitor(every_n_steps=2),
        StableRankMonitor(every_n_steps=2),
        PolarMisalignmentMonitor(every_n_steps=2, k=4),
        CriticalBatchSizeMonitor(every_n_steps=2, estimator="two_batch"),
    ]
    faulthandler.dump_traceback_later(300, exit=True)  # a deadlock fails the run instead of hanging it
    try:
        _trainer(
            tmp_path,
            callbacks,
            max_steps=3,
            devices=2,
            strategy="ddp_spawn",
            use_distributed_sampler=False,
        ).fit(model)
    finally:
        faulthandler.cancel_dump_traceback_later()
    ea = _events(tmp_path / "run")
    tags = ea.Tags()["scalars"]
    for prefix in (
        "per_layer/spectral_entropy/",
        "per_layer/stable_rank/",
        "per_layer/polar_misalignment/grad_delta_p/",
        "per_layer/critical_batch_size/sigma2/",  # (b_simple/<name> is left out while its estimate is not positive)
    ):
        for name in HIDDEN:
            assert [e.step for e in ea.Scalars(prefix + name)] == [0, 2]  # logged once per logging step
    # Rank-local micro-batch gradients vs the all-reduced one, summed over the monitored layers.
    small = sum(local_sq[r][n] for r in range(2) for n in HIDDEN) / 2
    big = sum(grads[n].square().sum().item() for n in HIDDEN)
    expect = noise_scale(small, big, MICRO, 2 * MICRO)
    # Two unbiased pieces, logged raw; fp32 gradients on the same data split (rel 1e-4).
    assert ea.Scalars("critical_batch_size/grad_sq")[0].value == pytest.approx(expect.grad_sq.item(), rel=1e-4)
    assert ea.Scalars("critical_batch_size/trace_sigma")[0].value == pytest.approx(expect.trace_sigma.item(), rel=1e-4)
    assert "critical_batch_size/b_simple" in tags


@pytest.mark.slow
def test_fsdp2_two_processes_gather_and_log_once(tmp_path):
    script = SCRIPTS / "fsdp2_monitors.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, str(script.parent))
    try:
        from fsdp2_monitors import initial_weights
    finally:
        sys.path.pop(0)
    W0 = initial_weights()
    ea = _events(tmp_path / "run")
    for name in HIDDEN:
        assert [e.step for e in ea.Scalars(f"per_layer/stable_rank/{name}")] == [0, 2]  # once, from rank 0
        s = torch.linalg.svdvals(W0[name].double())
        # The gathered (full) weight at step 0 is the initial one; fp32 Gram eigenvalues.
        assert ea.Scalars(f"per_layer/stable_rank/{name}")[0].value == pytest.approx(
            float((s**2).sum() / s[0] ** 2), rel=1e-4
        )
        assert f"per_layer/polar_misalignment/update_delta_p/{name}" in ea.Tags()["scalars"]


def test_spectra_figure_colours_layers_by_depth_with_a_colour_bar_and_a_role_legend():
    pytest.importorskip("matplotlib")
    from matplotlib import colormaps

    from lightning_muon.callbacks.spectral_entropy import spectra_figure

    g = torch.Generator().manual_seed(0)
    spectra = {  # 3 blocks x 2 roles, plus an all-zero matrix (left out) and a layer without a block index
        f"h.{i}.{role}.weight": torch.linalg.svdvals(torch.randn(8, 6, generator=g))
        for i in range(3)
        for role in ("attn", "mlp")
    }
    spectra["h.1.zero.weight"] = torch.zeros(6)
    fig = spectra_figure(spectra, step=7)
    ax, bar = fig.axes  # the plot and its colour bar
    lines = ax.get_lines()
    assert len(lines) == 6
    viridis = colormaps["viridis"]
    for line, key in zip(lines, [k for k in spectra if "zero" not in k]):
        depth = int(key.split(".")[1])
        assert line.get_color() == pytest.approx(viridis(depth / 2))  # depth 0..2 over the whole colour map
        s = spectra[key]
        assert list(line.get_ydata()) == pytest.approx((s / s[0]).tolist())
        assert line.get_linestyle() == ("-" if ".attn." in key else "--")
    assert bar.get_ylabel() == "depth (block index)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["h.*.attn.weight", "h.*.mlp.weight"]
