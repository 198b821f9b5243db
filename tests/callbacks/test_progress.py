"""The step-counting progress bars: total, position and rate in optimizer steps under gradient
accumulation, checked against the closed form ceil(batches / accumulation), capped by max_steps."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_muon.callbacks import RichStepProgressBar, StepProgressBar, step_progress_bar


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(20, 4, generator=g), torch.randn(20, 1, generator=g)), batch_size=4)


def _recording(cls):
    class Recording(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: list[tuple[int, int, int, float]] = []  # (epoch, global_step, shown, total)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if hasattr(self.train_progress_bar, "n"):  # tqdm
                shown, total = self.train_progress_bar.n, self.train_progress_bar.total
            else:
                task = self.train_progress_bar
                shown, total = task.completed, task.total
            self.seen.append((trainer.current_epoch, trainer.global_step, shown, total))

    return Recording


BARS = [StepProgressBar]
try:
    import rich  # noqa: F401

    BARS.append(RichStepProgressBar)
except ImportError:  # pragma: no cover - rich is optional
    pass


def _fit(bar, tmp_path, **trainer_kwargs):
    trainer = L.Trainer(
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(Tiny())
    return trainer


@pytest.mark.parametrize("cls", BARS, ids=lambda c: c.__name__)
def test_max_steps_run_counts_optimizer_steps_to_the_end(cls, tmp_path):
    bar = _recording(cls)()
    trainer = _fit(bar, tmp_path, max_steps=7, accumulate_grad_batches=2)  # 5 batches an epoch: 3 steps
    assert trainer.global_step == 7
    shown = [s for _, _, s, _ in bar.seen]
    assert shown[-1] == 7 - 6  # the last epoch holds step 7 alone: it started at step 6
    for epoch, step, position, total in bar.seen:
        start = 3 * epoch  # ceil(5 / 2) steps per epoch
        assert total == min(math.ceil(5 / 2), 7 - start)
        assert position == step - start <= total


@pytest.mark.parametrize("cls", BARS, ids=lambda c: c.__name__)
def test_max_epochs_run_total_is_ceil_batches_over_accumulation(cls, tmp_path):
    bar = _recording(cls)()
    _fit(bar, tmp_path, max_epochs=2, accumulate_grad_batches=2)
    assert [(s, t) for e, _, s, t in bar.seen if e == 0] == [(0, 3), (1, 3), (1, 3), (2, 3), (3, 3)]
    assert bar.seen[-1][2:] == (3, 3)  # both epochs end full, never past the total


def test_lightnings_own_bar_overshoots_under_accumulation(tmp_path):
    """The problem these bars solve (if Lightning fixes it, this test says so)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    bar = _recording(TQDMProgressBar)()
    _fit(bar, tmp_path, max_steps=2, max_epochs=-1, accumulate_grad_batches=2)
    assert max(shown for _, _, shown, _ in bar.seen) > bar.seen[0][3]  # past its total: 100%, then more


def test_tqdm_bar_rate_is_in_steps_and_factory_prefers_rich():
    bar = StepProgressBar()
    assert bar.init_train_tqdm().unit == "step"
    expected = RichStepProgressBar if RichStepProgressBar in BARS else StepProgressBar
    assert type(step_progress_bar()) is expected
