"""Every zoo model trains under Lightning with ``configure_muon`` and the four monitors at their defaults.

Per model (tiny config, random init, 2 fixed batches of 4): a 2-epoch run that checkpoints at every
epoch end; its epoch-1 checkpoint, loaded with ``torch.load(..., weights_only=True)``, resumed to 2
epochs, must end bit for bit where the uninterrupted run ended (an epoch boundary: the loader
restarts from its first batch either way). Asserted: the training loss goes down (each batch's loss
in the last epoch below its loss in the first), every monitor logged finite values at step 0,
the critical-batch-size monitor measured every layer that has a per-example form and warned (once)
only for the layers listed here.
"""

from __future__ import annotations

import csv
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset
from zoo_models import SPECS, Spec

from lightning_muon import configure_muon
from lightning_muon.callbacks import (
    CriticalBatchSizeMonitor,
    PolarMisalignmentMonitor,
    SpectralEntropyMonitor,
    StableRankMonitor,
)

pytestmark = pytest.mark.slow
BATCH, EPOCHS = 4, 2

#: parameters the critical-batch-size monitor leaves out at its defaults (no per-example form), by model
NO_PER_EXAMPLE = {
    "hf_mixtral": r"experts\.(gate_up|down)_proj",  # a 3-D bank of experts, applied per routed token
    "hf_qwen3_moe": r"experts\.(gate_up|down)_proj",
}


class ZooModule(pl.LightningModule):
    """What a new user writes: the model, its loss, ``configure_muon(self, lr=...)``."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.net = spec.build()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.spec.loss(self.net, batch)
        self.losses.append(float(loss.detach()))
        return loss

    def train_dataloader(self):
        return DataLoader(TensorDataset(*self.spec.data(n=2 * BATCH)), batch_size=BATCH, shuffle=False)

    def configure_optimizers(self):
        return configure_muon(self, lr=0.02, adamw_lr=3e-3, ns_dtype="float32")


def _monitors() -> list[pl.Callback]:
    return [SpectralEntropyMonitor(), StableRankMonitor(), PolarMisalignmentMonitor(), CriticalBatchSizeMonitor()]


def _fit(module: ZooModule, tmp_path, version: str, ckpt: str | None = None) -> pl.Trainer:
    every_epoch = ModelCheckpoint(dirpath=tmp_path / version, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        callbacks=[*_monitors(), every_epoch],
        logger=CSVLogger(tmp_path, name="", version=version),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, ckpt_path=ckpt)
    return trainer


def _logged(tmp_path, version: str) -> dict[str, float]:
    with open(tmp_path / version / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for r in rows if r["step"] == "0" for k, v in r.items() if v not in ("", None) and k != "step"}


@pytest.mark.parametrize("name", list(SPECS))
def test_fits_resumes_and_logs_at_the_defaults(name, tmp_path):
    import re

    spec = SPECS[name]
    pytest.importorskip(spec.library, reason=f"the zoo extra ({spec.library}) is not installed")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        full = ZooModule(spec)
        trainer = _fit(full, tmp_path, "full")
    # the loss goes down: each batch, last epoch vs first
    first, last = full.losses[:2], full.losses[-2:]
    assert len(full.losses) == 2 * EPOCHS and all(b < a for a, b in zip(first, last)), (first, last)
    # the monitors at their defaults logged at step 0, finite values
    logged = _logged(tmp_path, "full")
    for prefix in ("spectral_entropy/", "stable_rank/", "polar_misalignment/"):
        values = {k: v for k, v in logged.items() if k.startswith(prefix)}
        assert values and all(math.isfinite(v) for v in values.values()), (prefix, values)
    for tag in ("critical_batch_size/grad_sq", "critical_batch_size/trace_sigma"):
        assert math.isfinite(logged[tag]), tag
    monitor = next(c for c in trainer.callbacks if isinstance(c, CriticalBatchSizeMonitor))
    measured = dict(zip(monitor.slots, monitor.ema_counts.tolist()))
    left_out = {n for n, c in measured.items() if c == 0}
    pattern = NO_PER_EXAMPLE.get(name)
    assert left_out == {n for n in measured if pattern and re.search(pattern, n)}, left_out
    mine = [str(w.message) for w in record if "CriticalBatchSizeMonitor" in str(w.message)]
    assert len(mine) == (1 if pattern else 0), mine
    assert monitor.mode == "per_example"

    # resume from the epoch-1 checkpoint (a plain weights_only load works): bit for bit the same end
    path = tmp_path / "full" / "epoch=0.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert {"state_dict", "optimizer_states", "callbacks"} <= set(ckpt) and ckpt["global_step"] == 2
    resumed = ZooModule(spec)
    _fit(resumed, tmp_path, "resumed", ckpt=str(path))
    assert resumed.losses == full.losses[2:]
    for (n, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), n
