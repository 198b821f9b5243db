"""Small models, data and Trainers that several test files share (imported as ``helpers``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

#: tests/, the repository root, and the folders of the scripts tests start as subprocesses
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DIST_SCRIPTS = TESTS / "dist_scripts"
SCRIPTS = TESTS / "scripts"


def teacher_data(n: int, d: int, seed: int = 0) -> TensorDataset:
    """``n`` examples ``x ~ N(0, I_d)`` with targets ``tanh(x @ T)`` for a fixed random teacher ``T`` (d x 4)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, torch.tanh(x @ torch.randn(d, 4, generator=g)))


class MLPRegressor(pl.LightningModule):
    """``d -> width -> width -> head 4`` with an MSE loss: two hidden matrices for Muon, an AdamW head
    and AdamW biases. Records every training loss in ``losses``. ``seed``: initialise from it (every
    instance then starts from the same weights). Subclasses add data and ``configure_optimizers``."""

    def __init__(self, d: int, width: int, activation: type[nn.Module] = nn.Tanh, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, width), activation(), nn.Linear(width, width), activation())
        self.head = nn.Linear(width, 4)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss


def cpu_trainer(tmp_path: Path, **kw) -> pl.Trainer:
    """A one-device CPU Trainer writing under ``tmp_path``, without progress bar or model summary."""
    kw.setdefault("devices", 1)
    kw.setdefault("default_root_dir", tmp_path)
    return pl.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
