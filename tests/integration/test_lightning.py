"""configure_muon under a real Lightning Trainer, and both LightningCLI optimizer paths."""

import copy

import lightning as L
import pytest
import torch
from helpers import MLPRegressor, cpu_trainer, teacher_data
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader

from lightning_muon import Muon, configure_muon, lr_lambda


def _data():
    return teacher_data(256, 16)


class Regressor(MLPRegressor):
    def __init__(self, schedule: str = "constant", warmup_steps: int = 0):
        super().__init__(16, 64, activation=nn.GELU)
        self.save_hyperparameters()

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=32, shuffle=True)

    def configure_optimizers(self):
        return configure_muon(
            self,
            lr=0.02,
            adjust_lr="original",
            adamw_lr=3e-3,
            schedule=self.hparams.schedule,
            warmup_steps=self.hparams.warmup_steps,
        )


def _trainer(tmp_path, **kw):
    kw.setdefault("max_epochs", 6)
    return cpu_trainer(tmp_path, **kw)


def test_tiny_module_loss_goes_down_with_clipping_and_lr_monitor(tmp_path):
    model = Regressor(schedule="cosine", warmup_steps=5)
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = _trainer(
        tmp_path,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="norm",
        callbacks=[monitor],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    trainer.fit(model)
    first, last = sum(model.losses[:8]) / 8, sum(model.losses[-8:]) / 8
    assert last < 0.5 * first, (first, last)
    assert isinstance(trainer.optimizers[0], Muon)
    # LearningRateMonitor logs each named group apart; one schedule drives both.
    keys = sorted(monitor.lrs)
    assert keys == ["lr-Muon/adamw", "lr-Muon/adamw_no_decay", "lr-Muon/muon"], keys
    muon_lrs, adamw_lrs = monitor.lrs["lr-Muon/muon"], monitor.lrs["lr-Muon/adamw"]
    f = lr_lambda("cosine", 5, trainer.global_step)
    assert muon_lrs[0] == pytest.approx(0.02 * f(0)) and adamw_lrs[0] == pytest.approx(3e-3 * f(0))
    assert [a / m for m, a in zip(muon_lrs, adamw_lrs)] == pytest.approx([3e-3 / 0.02] * len(muon_lrs))


def test_gradient_clip_by_value(tmp_path):
    # One step under Lightning's value clipping must equal Muon stepping on the gradient clamped to
    # [-0.01, 0.01] by hand (same weights, batch and optimizer; fp32 round-off: atol 1e-6), and
    # differ from the unclipped step (Muon's polar map is scale-free, but clamping changes it).
    model = Regressor()
    ref_clipped, ref_raw = copy.deepcopy(model), copy.deepcopy(model)
    data = _data()
    _trainer(
        tmp_path,
        max_steps=1,
        gradient_clip_val=0.01,
        gradient_clip_algorithm="value",
        logger=False,
        enable_checkpointing=False,
    ).fit(model, DataLoader(data, batch_size=32))
    x, y = data.tensors[0][:32], data.tensors[1][:32]
    for ref, clip in ((ref_clipped, True), (ref_raw, False)):
        opt = ref.configure_optimizers()
        nn.functional.mse_loss(ref(x), y).backward()
        assert max(p.grad.abs().max() for p in ref.parameters()) > 0.01  # clipping has work to do
        if clip:
            for p in ref.parameters():
                p.grad.clamp_(-0.01, 0.01)
        opt.step()
    for a, b in zip(model.parameters(), ref_clipped.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert max((a - b).abs().max() for a, b in zip(model.parameters(), ref_raw.parameters())) > 1e-3


def test_configure_muon_return_values():
    model = Regressor()
    assert isinstance(configure_muon(model, lr=0.01), Muon)
    out = configure_muon(model, lr=0.01, warmup_steps=3, schedule="linear", max_steps=10)
    assert set(out) == {"optimizer", "lr_scheduler"} and out["lr_scheduler"]["interval"] == "step"
    sched = out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(12):
        lrs.append(out["optimizer"].param_groups[0]["lr"])
        out["optimizer"].step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.01 / 4, 0.02 / 4, 0.03 / 4, 0.01])
    assert lrs[10] == pytest.approx(0.0) and lrs[6] == pytest.approx(0.01 * (1 - 3 / 7))
    with pytest.raises(ValueError, match="needs max_steps"):
        configure_muon(model, schedule="cosine")
    with pytest.raises(ValueError, match="schedule must be one of"):
        configure_muon(model, schedule="step", max_steps=10)
    with pytest.raises(ValueError, match="cannot be combined"):
        configure_muon(model, optimizer=lambda g: Muon(g), momentum=0.9)


class CallableModule(Regressor):
    """The OptimizerCallable pattern: LightningCLI injects a factory, we pass named groups."""

    def __init__(self, optimizer: OptimizerCallable = Muon):
        super().__init__()
        self.optimizer_factory = optimizer

    def configure_optimizers(self):
        return configure_muon(self, optimizer=self.optimizer_factory)


class PlainModule(Regressor):
    def configure_optimizers(self):  # replaced by LightningCLI's top-level optimizer
        raise AssertionError("LightningCLI should have provided the optimizer")


def _cli_args(tmp_path):
    return [
        "fit",
        "--trainer.max_steps=4",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def test_lightning_cli_top_level_optimizer_routes_by_shape(tmp_path):
    args = _cli_args(tmp_path) + ["--optimizer=lightning_muon.Muon", "--optimizer.lr=0.02"]
    with pytest.warns(UserWarning, match="routed them by shape"):
        cli = LightningCLI(PlainModule, args=args, save_config_callback=None)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, Muon) and opt.param_groups[0]["lr"] == 0.02
    assert [len(g["params"]) for g in opt.param_groups] == [3, 3]  # head weight is Muon here
    assert cli.trainer.global_step == 4


def test_lightning_cli_optimizer_callable_routes_by_name(tmp_path):
    args = _cli_args(tmp_path) + [
        "--model.optimizer=lightning_muon.Muon",
        "--model.optimizer.lr=0.03",
        "--model.optimizer.adjust_lr=original",
    ]
    cli = LightningCLI(CallableModule, args=args, save_config_callback=None)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, Muon)
    names = {g["name"]: g["param_names"] for g in opt.param_groups}
    assert names["muon"] == ["net.0.weight", "net.2.weight"] and names["adamw"] == ["head.weight"]
    assert opt.param_groups[0]["lr"] == 0.03 and opt.param_groups[0]["adjust_lr"] == "original"
