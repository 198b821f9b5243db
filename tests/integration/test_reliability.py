"""Exact resume across processes, gradient accumulation, clipping and bf16 precision."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import SCRIPTS
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_muon import Muon, configure_muon


def _run(*args):
    subprocess.run(
        [sys.executable, str(SCRIPTS / "train_tiny_gpt.py"), *map(str, args)],
        check=True,
        capture_output=True,
        timeout=600,
    )


def _assert_same_state(a, b):
    assert a["global_step"] == b["global_step"] and a["lr"] == b["lr"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)


def test_exact_resume_in_a_new_process(tmp_path):
    # 4 epochs (68 steps) uninterrupted vs 2 epochs, checkpoint, new process, 2 more: bitwise equal
    # parameters, Muon momentum, AdamW moments, step counters and scheduled lrs (CPU, fp32,
    # deterministic algorithms, stopped at an epoch boundary).
    _run(tmp_path / "full", 4)
    _run(tmp_path / "half", 2)
    _run(tmp_path / "resumed", 4, tmp_path / "half" / "last.ckpt")
    full = torch.load(tmp_path / "full" / "final.pt")
    resumed = torch.load(tmp_path / "resumed" / "final.pt")
    assert full["global_step"] == 68
    _assert_same_state(full, resumed)


class Counting(L.LightningModule):
    def __init__(self, accumulate):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return configure_muon(self, lr=0.01, adjust_lr="original", adamw_lr=1e-3)


def test_accumulation_orthogonalises_once_per_optimizer_step(tmp_path, monkeypatch):
    import lightning_muon.parallel.buckets as mod  # the bucket loop calls polar_stack there

    calls = []
    real = mod.polar_stack
    monkeypatch.setattr(mod, "polar_stack", lambda M, *a, **k: calls.append(len(M)) or real(M, *a, **k))
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Counting(4), DataLoader(data, batch_size=4))
    # 16 micro-batches / 4 = 4 optimizer steps; one batched call per step (the two hidden
    # matrices have different shapes: (16, 8) and (16, 16), so two buckets per step).
    assert trainer.global_step == 4
    assert len(calls) == 4 * 2


def _fit_teacher(precision):
    """4 epochs on a tanh teacher (16 steps per epoch); returns the fp32 full-data loss before and after."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g))
    torch.manual_seed(0)
    model = Counting(1)
    with torch.no_grad():
        before = nn.functional.mse_loss(model(x), y).item()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=4,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert isinstance(trainer.optimizers[0], Muon) and trainer.global_step == 64
    dtypes = {p.dtype for p in model.parameters()}
    with torch.no_grad():
        after = nn.functional.mse_loss(model.float()(x), y).item()
    return before, after, dtypes


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_reaches_the_fp32_loss(tmp_path, precision):
    # Same init, data and order in fp32 and in bf16. Measured (AMD EPYC AVX2, torch 2.14.1): loss
    # 0.81 -> 0.131 in fp32, 0.127 bf16-mixed, 0.126 bf16-true; tolerance 15% of the fp32 loss.
    before, fp32_loss, _ = _fit_teacher("32-true")
    _, bf16_loss, dtypes = _fit_teacher(precision)
    assert fp32_loss < 0.25 * before  # the reference run learned
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.15)
    if precision == "bf16-true":
        assert dtypes == {torch.bfloat16}  # as trained, before the fp32 evaluation cast
