"""Muon with Lightning's optimizer-touching features, each in a real (tiny, CPU) ``Trainer.fit``.

Each test asserts values against an independent reference: a manual training loop with the same
batches, ``torch.nn.utils.clip_grad_*_``, the mean of recorded weights, an uninterrupted run, the
logger's own record, or a one-process run of the same global batch. BackboneFinetuning, which
goes through ``add_param_group``, is in ``tests/integration/test_finetuning.py``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import DIST_SCRIPTS, MLPRegressor, cpu_trainer, teacher_data
from lightning.pytorch.callbacks import (
    EarlyStopping,
    GradientAccumulationScheduler,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_muon import Muon, configure_muon, muon_param_groups
from lightning_muon.callbacks import (
    CriticalBatchSizeMonitor,
    PolarMisalignmentMonitor,
    SpectralEntropyMonitor,
    StableRankMonitor,
)

BATCH = 16
N = 64  # 4 batches per epoch


class Net(MLPRegressor):
    """8 -> 24 -> 24 -> head 4: two Muon matrices, an AdamW head, AdamW biases."""

    def __init__(self, lr: float = 0.02, adamw_lr: float | None = None, n: int = N, **muon) -> None:
        super().__init__(8, 24, seed=0)  # every instance starts from the same weights
        self.lr, self.adamw_lr, self.n, self.muon = lr, adamw_lr, n, muon
        self.group_lrs: list[dict[str, float]] = []

    def on_before_optimizer_step(self, optimizer):
        self.group_lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    def train_dataloader(self):
        return DataLoader(teacher_data(self.n, 8), batch_size=BATCH, shuffle=False)

    def configure_optimizers(self):
        kw = dict(ns_dtype="float32", weight_decay=0.0) | self.muon
        return configure_muon(self, lr=self.lr, adamw_lr=self.adamw_lr, **kw)


def _trainer(tmp_path, callbacks=(), **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return cpu_trainer(tmp_path, callbacks=list(callbacks), num_sanity_val_steps=0, **kw)


def _csv_metrics(path: Path, tag: str) -> dict[int, float]:
    with open(path / "metrics.csv") as f:
        return {int(r["step"]): float(r[tag]) for r in csv.DictReader(f) if r.get(tag)}


class EpochEndMetrics(pl.Callback):
    """``trainer.callback_metrics`` at every train batch end and epoch end (placed after the monitors)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.at_batch_end: list[tuple[int, float | None]] = []
        self.at_epoch_end: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get(self.tag)
        self.at_batch_end.append((trainer.global_step, None if value is None else float(value)))

    def on_train_epoch_end(self, trainer, pl_module):
        self.at_epoch_end.append(float(trainer.callback_metrics[self.tag]))


# ------------------------------------------------------------------ monitors -> callback_metrics
TAG = "stable_rank/mean"


def test_monitor_metrics_reach_callback_metrics_with_the_logged_values(tmp_path):
    record = EpochEndMetrics(TAG)
    logger = CSVLogger(tmp_path, name="", version="run")
    trainer = _trainer(
        tmp_path,
        [StableRankMonitor(every_n_steps=3), SpectralEntropyMonitor(every_n_steps=2), record],
        logger=logger,
        max_epochs=2,
        log_every_n_steps=1,
    )
    trainer.fit(Net())
    logged = _csv_metrics(tmp_path / "run", TAG)
    assert sorted(logged) == [0, 3, 6]  # the logger output keeps its steps (every_n_steps=3)
    for step, value in record.at_batch_end:  # after the batch of step s, the value logged at the last logging step < s
        last = max((s for s in logged if s < step), default=None)
        assert value == (None if last is None else pytest.approx(logged[last], rel=1e-6)), (step, value)
    assert {"spectral_entropy/mean", "per_layer/stable_rank/net.2.weight"} <= set(trainer.callback_metrics)


def test_early_stopping_and_model_checkpoint_on_a_monitor_metric(tmp_path):
    # Reference: 5 epochs, stable rank of both Muon matrices logged every step, the best epoch kept.
    record = EpochEndMetrics(TAG)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=TAG, mode="max", save_top_k=1, filename="{epoch}")
    _trainer(
        tmp_path,
        [StableRankMonitor(every_n_steps=1), record, ckpt],
        enable_checkpointing=True,
        logger=CSVLogger(tmp_path, name="", version="ref"),
        max_epochs=5,
        log_every_n_steps=1,
    ).fit(Net())
    values = record.at_epoch_end
    logged = _csv_metrics(tmp_path / "ref", TAG)
    assert values == pytest.approx([logged[4 * e + 3] for e in range(5)], rel=1e-6)  # last step of each epoch
    best = max(range(5), key=values.__getitem__)
    assert ckpt.best_model_score.item() == pytest.approx(values[best], rel=1e-6)
    assert Path(ckpt.best_model_path).name == f"epoch={best}.ckpt"
    assert torch.load(ckpt.best_model_path, weights_only=False)["global_step"] == 4 * (best + 1)

    # EarlyStopping with a threshold that the value crosses first at the end of epoch 2.
    stop = 2
    before = values[:stop]
    if values[stop] > max(before):
        mode, threshold = "max", (values[stop] + max(before)) / 2
    else:
        assert values[stop] < min(before), values  # a strictly monotone start in either direction
        mode, threshold = "min", (values[stop] + min(before)) / 2
    early = EarlyStopping(monitor=TAG, mode=mode, stopping_threshold=threshold, patience=100)
    trainer = _trainer(
        tmp_path,
        [StableRankMonitor(every_n_steps=1), early],
        logger=CSVLogger(tmp_path, name="", version="es"),
        max_epochs=5,
    )
    trainer.fit(Net())
    assert early.stopped_epoch == stop and trainer.global_step == 4 * (stop + 1)


class RankMetrics(pl.Callback):
    """Writes each rank's callback metric at every epoch end to OUT/rank{r}.json."""

    def __init__(self, out: str) -> None:
        self.out, self.values = out, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.values.append(float(trainer.callback_metrics[TAG]))

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"values": self.values, "epoch": trainer.current_epoch, "step": trainer.global_step}, f)


@pytest.mark.slow
def test_ddp_every_rank_gets_the_monitor_metric_and_stops_together(tmp_path):
    # Rank 0 computes the metric; without the broadcast rank 1 has none (its EarlyStopping raises).
    # patience=1 with an unreachable min_delta: epoch 0 sets the best, epoch 1 does not improve -> stop.
    # With CriticalBatchSizeMonitor under a GradientAccumulationScheduler (two batch sizes from 2 ranks):
    # epoch 0 takes 4 steps (accumulate 1), epoch 1 takes 2 (accumulate 2).
    early = EarlyStopping(monitor=TAG, mode="max", min_delta=1e9, patience=1, strict=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=TAG, mode="max", save_top_k=1, filename="{epoch}")
    callbacks = [
        GradientAccumulationScheduler({0: 1, 1: 2}),
        StableRankMonitor(every_n_steps=1),
        CriticalBatchSizeMonitor(every_n_steps=1),
        RankMetrics(str(tmp_path)),
        early,
        ckpt,
    ]
    trainer = _trainer(
        tmp_path,
        callbacks,
        logger=CSVLogger(tmp_path, name="", version="run"),
        enable_checkpointing=True,
        log_every_n_steps=1,
        max_epochs=5,
        devices=2,
        strategy="ddp_spawn",
    )
    trainer.fit(Net(n=2 * N))  # 2 ranks x 4 batches of 16
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the same values, bit for bit, on both ranks
    assert ranks[0]["epoch"] == 2 and ranks[0]["step"] == 6  # stopped after epoch 1 on both
    logged = _csv_metrics(tmp_path / "run", TAG)
    assert ranks[0]["values"] == pytest.approx([logged[3], logged[5]], rel=1e-6)
    assert sorted(_csv_metrics(tmp_path / "run", "critical_batch_size/grad_sq")) == list(range(6))
    assert Path(ckpt.best_model_path).name == f"epoch={max(range(2), key=ranks[0]['values'].__getitem__)}.ckpt"


# ------------------------------------------------------------------ StochasticWeightAveraging
class WeightsAtEpochStart(pl.Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_swa_averages_the_epoch_weights_and_keeps_the_lr_ratio_with_a_list(tmp_path):
    # swa_lrs in group order (muon, adamw, adamw_no_decay): each family anneals to its own SWA lr.
    swa_lrs = [0.01, 1e-3, 1e-3]
    record = WeightsAtEpochStart()
    swa = StochasticWeightAveraging(swa_lrs=swa_lrs, swa_epoch_start=2, annealing_epochs=1)
    model = Net(lr=0.02, adamw_lr=3e-3, adjust_lr="original")
    _trainer(tmp_path, [record, swa], max_epochs=4).fit(model)
    # swa_epoch_start=2 counts from 1: SWA epochs are 1, 2, 3 (0-based). Lightning averages the
    # weights seen at the start of each SWA epoch and copies the mean into the model at the end.
    assert (swa.swa_start, swa.swa_end, int(swa.n_averaged)) == (1, 3, 3)
    for name, p in model.named_parameters():
        mean = sum(record.weights[e][name] for e in (1, 2, 3)) / 3
        torch.testing.assert_close(p.detach(), mean, rtol=1e-6, atol=1e-7)
    assert not torch.equal(record.weights[2]["net.2.weight"], record.weights[3]["net.2.weight"])
    assert model.group_lrs[3] == {"muon": 0.02, "adamw": 3e-3, "adamw_no_decay": 3e-3}  # before SWA
    # annealing_epochs=1: SWALR reaches the SWA lrs after one epoch step
    assert model.group_lrs[-1] == pytest.approx({"muon": 0.01, "adamw": 1e-3, "adamw_no_decay": 1e-3})


def test_swa_with_one_float_sets_every_group_to_it(tmp_path):
    # Lightning's documented behaviour: a float swa_lrs applies to every param group, so the Muon
    # and AdamW families end at the same lr. docs/lightning.md: pass a list to keep the ratio.
    model = Net(lr=0.02, adamw_lr=3e-3, adjust_lr="original")
    _trainer(
        tmp_path, [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=1)], max_epochs=3
    ).fit(model)
    assert model.group_lrs[-1] == pytest.approx({"muon": 0.01, "adamw": 0.01, "adamw_no_decay": 0.01})


# ------------------------------------------------------------------ Tuner.lr_find
def test_lr_find_with_one_lr_for_both_families(tmp_path):
    # Default adjust_lr="match_rms_adamw" with adamw_lr=None: one lr serves both families (ratio 1),
    # which is exactly what lr_find sweeps; the suggestion is that one lr.
    model = Net(lr=0.02)
    trainer = _trainer(tmp_path, max_epochs=10, max_steps=4)  # lr_find runs its own 30 steps
    result = Tuner(trainer).lr_find(model, min_lr=1e-5, max_lr=1.0, num_training=30)
    suggestion = result.suggestion()
    assert suggestion is not None and math.isfinite(suggestion) and 1e-5 < suggestion < 1.0
    assert model.lr == suggestion  # update_attr: the module's `lr` attribute
    sweep = model.group_lrs[:30]
    assert all(len(set(lrs.values())) == 1 for lrs in sweep)  # every group at the sweep lr
    assert sweep[0]["muon"] == pytest.approx(1e-5) and sweep[-1]["muon"] == pytest.approx(1.0)
    assert result.results["lr"] == pytest.approx([lrs["muon"] for lrs in sweep])
    model.group_lrs.clear()
    trainer.fit(model)  # the real run: configure_optimizers again, with the suggestion for both
    assert model.group_lrs[0] == pytest.approx({"muon": suggestion, "adamw": suggestion, "adamw_no_decay": suggestion})


class RatioNet(Net):
    """The recipe for a separate AdamW lr (docs/lightning.md): derive it from ``self.lr``, to follow lr_find."""

    def configure_optimizers(self):
        return configure_muon(
            self, lr=self.lr, adamw_lr=0.015 * self.lr, adjust_lr="original", ns_dtype="float32", weight_decay=0.0
        )


def test_lr_find_sweeps_every_group_at_the_same_lr(tmp_path):
    # With a separate adamw_lr, Lightning's lr_find still sets every group to the same sweep lr:
    # the Muon/AdamW ratio is NOT kept during the sweep (docs/lightning.md, "Works with": lr_find) ...
    model = RatioNet(lr=0.02)
    trainer = _trainer(tmp_path, max_epochs=10, max_steps=1)
    result = Tuner(trainer).lr_find(model, min_lr=1e-4, max_lr=0.1, num_training=20, early_stop_threshold=None)
    assert [len(set(lrs.values())) for lrs in model.group_lrs] == [1] * 20
    assert result.suggestion() is not None
    # ... but the fit after it keeps the ratio when adamw_lr is derived from the suggested lr.
    assert model.lr == result.suggestion()
    model.group_lrs.clear()
    trainer.fit(model)
    lrs = model.group_lrs[0]
    assert lrs["muon"] == pytest.approx(result.suggestion()) and lrs["adamw"] == pytest.approx(0.015 * lrs["muon"])


# ------------------------------------------------------------------ GradientAccumulationScheduler
class GradsAtStep(pl.Callback):
    """The gradients Muon used at each step: read by a step post-hook (Lightning's closure runs the
    backward inside ``step``, after any pre-hook; Muon leaves ``.grad`` untouched)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}

        def hook(optimizer, args, kwargs):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.grads.append({names[id(p)]: p.grad.clone() for p in params if p.grad is not None})

        self.handle = trainer.optimizers[0].register_step_post_hook(hook)

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()


def _manual_run(model: Net, accumulate: list[int], clip=None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The reference: the same batches, loss / accumulate summed by backward, one Muon step."""
    model = copy.deepcopy(model)
    opt = model.configure_optimizers()
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    batches = list(model.train_dataloader())
    grads = []
    for k in accumulate:  # one entry per epoch
        for i in range(0, len(batches), k):
            for x, y in batches[i : i + k]:
                (nn.functional.mse_loss(model(x), y) / k).backward()
            if clip is not None:
                clip(params)
            grads.append({names[id(p)]: p.grad.clone() for p in params})
            opt.step()
            opt.zero_grad()
    return grads, {n: p.detach() for n, p in model.named_parameters()}


def test_gradient_accumulation_scheduler_with_the_monitors(tmp_path):
    record = GradsAtStep()
    monitors = [
        StableRankMonitor(every_n_steps=1),
        SpectralEntropyMonitor(every_n_steps=1),
        PolarMisalignmentMonitor(every_n_steps=1, k=2),
    ]
    model = Net()
    reference = copy.deepcopy(model)
    scheduler = GradientAccumulationScheduler({0: 1, 1: 2, 2: 4})  # 4, 2, 1 steps in epochs 0, 1, 2
    _trainer(
        tmp_path,
        [scheduler, *monitors, record],
        logger=CSVLogger(tmp_path, name="", version="run"),
        log_every_n_steps=1,
        max_epochs=3,
    ).fit(model)
    grads, weights = _manual_run(reference, [1, 2, 4])
    assert len(record.grads) == len(grads) == 7
    for got, want in zip(record.grads, grads):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], rtol=1e-5, atol=1e-6)
    for tag in ("stable_rank/mean", "spectral_entropy/mean", "per_layer/polar_misalignment/grad_delta_p/net.2.weight"):
        assert sorted(_csv_metrics(tmp_path / "run", tag)) == list(range(7)), tag  # logged at every step


def test_two_batch_estimator_refuses_a_gradient_accumulation_scheduler_alone(tmp_path):
    # The two-batch estimator needs two batch sizes at setup; the scheduler changes
    # accumulate_grad_batches only when an epoch starts (and requires Trainer(accumulate_grad_batches=1)).
    # Under DDP it works (2 ranks).
    monitor = CriticalBatchSizeMonitor(every_n_steps=1, estimator="two_batch")
    trainer = _trainer(
        tmp_path, [GradientAccumulationScheduler({0: 2}), monitor], logger=CSVLogger(tmp_path), max_epochs=1
    )
    with pytest.raises(MisconfigurationException, match="needs two batch sizes"):
        trainer.fit(Net())


def test_default_estimator_works_under_a_gradient_accumulation_scheduler_alone(tmp_path):
    # The default (per-example norms inside one batch) needs neither accumulation nor processes.
    trainer = _trainer(
        tmp_path,
        [GradientAccumulationScheduler({0: 2}), CriticalBatchSizeMonitor(every_n_steps=1)],
        logger=CSVLogger(tmp_path, name="", version="run"),
        max_epochs=1,
    )
    trainer.fit(Net())
    values = _csv_metrics(tmp_path / "run", "critical_batch_size/trace_sigma")
    assert values and all(math.isfinite(v) and v > 0 for v in values.values())


# ------------------------------------------------------------------ gradient clipping
CLIPS = {
    "norm": (0.05, lambda params: torch.nn.utils.clip_grad_norm_(params, 0.05)),
    "value": (0.002, lambda params: torch.nn.utils.clip_grad_value_(params, 0.002)),
}


@pytest.mark.parametrize("algorithm", sorted(CLIPS))
def test_gradient_clipping_reaches_the_optimizer(tmp_path, algorithm):
    value, clip = CLIPS[algorithm]
    record = GradsAtStep()
    model = Net(lr=0.02, adamw_lr=3e-3, adjust_lr="original")
    reference = copy.deepcopy(model)
    _trainer(tmp_path, [record], max_epochs=1, gradient_clip_val=value, gradient_clip_algorithm=algorithm).fit(model)
    grads, weights = _manual_run(reference, [1], clip=clip)
    for got, want in zip(record.grads, grads, strict=True):
        flat = torch.cat([g.flatten() for g in got.values()])
        if algorithm == "norm":
            assert flat.norm().item() == pytest.approx(value, rel=1e-5)  # the unclipped norm is larger
        else:
            assert flat.abs().max().item() == pytest.approx(value) and (flat.abs() == value).sum() > 10
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], rtol=1e-5, atol=1e-6)
    _, unclipped = _manual_run(reference, [1])
    assert not torch.allclose(unclipped["net.2.weight"], weights["net.2.weight"], atol=1e-4)  # clipping mattered


# ------------------------------------------------------------------ precision
@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    model = Net()
    _trainer(tmp_path_factory.mktemp("fp32"), max_epochs=3, precision="32-true").fit(model)
    return model.losses


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_track_fp32(tmp_path, precision, fp32_losses):
    model = Net()
    trainer = _trainer(tmp_path, max_epochs=3, precision=precision)
    trainer.fit(model)
    assert trainer.precision == precision
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32})
    assert fp32_losses[-1] < 0.8 * fp32_losses[0]  # the reference learns
    # bf16 has an 8-bit mantissa: the same trajectory within a few percent after 12 steps.
    assert model.losses[-1] == pytest.approx(fp32_losses[-1], rel=0.05)
    assert model.losses[0] == pytest.approx(fp32_losses[0], rel=0.01)


def test_fp16_mixed_on_cpu_falls_back_to_bf16(tmp_path, fp32_losses):
    # Lightning has no fp16 AMP on CPU: it warns and trains with bf16-mixed instead (documented).
    model = Net()
    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
        trainer = _trainer(tmp_path, max_epochs=3, precision="16-mixed")
    assert trainer.precision == "bf16-mixed"
    trainer.fit(model)
    assert model.losses[-1] == pytest.approx(fp32_losses[-1], rel=0.05)


# ------------------------------------------------------------------ torch.compile
class Tokens(pl.LightningModule):
    """An embedding, two hidden matrices and a head, compiled as one module (names get ``_orig_mod.``)."""

    def __init__(self, compile: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        body = nn.Module()
        body.embed = nn.Embedding(32, 16)
        body.mlp = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        body.head = nn.Linear(16, 32)
        body.forward = lambda x: body.head(body.mlp(body.embed(x)))
        self.body = torch.compile(body) if compile else body
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.body(x), y)
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self):
        x = torch.randint(0, 32, (64,), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, (7 * x) % 32), batch_size=16)

    def configure_optimizers(self):
        return configure_muon(self, lr=0.02, ns_dtype="float32")


@pytest.mark.slow
def test_compiled_module_routes_embedding_and_head_to_adamw(tmp_path):
    model = Tokens(compile=True)
    groups = {g["name"]: [n for n, _ in g["params"]] for g in muon_param_groups(model)}
    assert groups["muon"] == ["body._orig_mod.mlp.0.weight", "body._orig_mod.mlp.2.weight"]
    assert groups["adamw"] == ["body._orig_mod.embed.weight", "body._orig_mod.head.weight"]
    eager = Tokens(compile=False)
    _trainer(tmp_path, max_steps=4).fit(eager)
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.fit(model)  # the compiled forward (about 20 s on a 2-core CPU)
    assert {g["name"]: g["param_names"] for g in trainer.optimizers[0].param_groups} == groups
    assert model.losses == pytest.approx(eager.losses, rel=1e-4)


# ------------------------------------------------------------------ Lightning Fabric
sys.path.insert(0, str(DIST_SCRIPTS))
import fabric_ddp  # noqa: E402
from _launch import launch as _launch  # noqa: E402
from _launch import wait as _wait  # noqa: E402


def test_fabric_single_process_matches_plain_torch():
    fabric_params = fabric_ddp.run(1)
    torch.manual_seed(0)
    model = fabric_ddp.Net()
    opt = Muon(muon_param_groups(model), lr=0.05, ns_dtype="float32", weight_decay=0.01)
    x, y = fabric_ddp.data()
    for step in range(fabric_ddp.STEPS):
        nn.functional.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fabric_params[name], p.detach(), rtol=0, atol=0)


@pytest.mark.slow
def test_fabric_two_process_ddp_matches_one_process(tmp_path):
    _wait([_launch("fabric_ddp.py", str(tmp_path), "2")], timeout=300)
    two = torch.load(tmp_path / "world2.pt")
    one = fabric_ddp.run(1)
    assert sorted(two) == sorted(one)
    for name in one:  # DDP's averaged half-batch gradients = the full-batch gradient (fp32 rounding)
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    assert not torch.allclose(two["hidden.weight"], fabric_ddp.Net().hidden.weight)  # it trained
