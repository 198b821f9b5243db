"""A training progress bar that counts optimizer steps, so its total and ETA hold under accumulation.

Lightning's bars count batches but cap the total at ``max_steps``, which counts optimizer steps:
with ``accumulate_grad_batches=2`` and ``max_steps=300`` the bar reads ``100% 300/300`` halfway
through, then ``301/?`` with no total or ETA. :class:`StepProgressBar` (tqdm) and
:class:`RichStepProgressBar` (rich) count ``trainer.global_step`` instead: the total is the optimizer
steps of the epoch (``ceil(batches / accumulate_grad_batches)``, capped by what ``max_steps``
leaves), the rate is in steps per second, the ETA follows. A change of accumulation during the run
(``GradientAccumulationScheduler``, ``BatchSizeWarmup``) takes effect at the next epoch's total.
:func:`step_progress_bar` picks the one Lightning would pick (rich when installed).

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(accumulate_grad_batches=2, max_steps=300, callbacks=[StepProgressBar()], logger=False)
    >>> type(trainer.progress_bar_callback).__name__
    'StepProgressBar'
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

__all__ = ["RichStepProgressBar", "StepProgressBar", "step_progress_bar"]


class _CountsSteps:
    """Shared by both bars: the epoch's total in optimizer steps and the steps done in it."""

    _epoch_start_step: int = 0

    @property
    def total_train_batches(self) -> int | float:
        """Optimizer steps in this epoch (the name is Lightning's: its bars read this property)."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        steps = math.ceil(batches / accumulate) if math.isfinite(batches) else math.inf
        if trainer.max_steps is not None and trainer.max_steps > 0:
            steps = min(steps, trainer.max_steps - self._epoch_start_step)
        return steps

    def _steps_done(self, trainer: pl.Trainer) -> int:
        return trainer.global_step - self._epoch_start_step


class StepProgressBar(_CountsSteps, TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps (``step/s``, ETA in steps); arguments as
    ``TQDMProgressBar``."""

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._epoch_start_step = trainer.global_step
        super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the parent shows batch_idx + 1: hand it the optimizer steps done instead
        super().on_train_batch_end(trainer, pl_module, outputs, batch, self._steps_done(trainer) - 1)


class RichStepProgressBar(_CountsSteps, RichProgressBar):
    """Lightning's rich bar, counting optimizer steps; arguments as ``RichProgressBar`` (needs ``rich``)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start_step = trainer.global_step
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, self._steps_done(trainer) - 1)

    def configure_columns(self, trainer: pl.Trainer) -> list:
        columns = super().configure_columns(trainer)
        from rich.text import Text

        at = [i for i, c in enumerate(columns) if type(c).__name__ == "ProcessingSpeedColumn"]
        if not at:
            return columns
        speed = columns[at[0]]
        bar = self

        class _Speed(type(speed)):  # "step/s" on the training bar, Lightning's "it/s" on the others
            def render(self, task: Any) -> Any:
                text = super().render(task)
                if task.id == bar.train_progress_bar_id:
                    return Text(str(text).replace("it/s", "step/s"), style=self.style)
                return text

        columns[at[0]] = _Speed(style=speed.style)
        return columns

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 0/-2" when max_epochs is -1 (a max_steps run): say the unit instead
        epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        return f"{text} · optimizer steps"


def step_progress_bar(**kwargs: Any) -> ProgressBar:
    """:class:`RichStepProgressBar` when ``rich`` is installed (as Lightning's own default), else
    :class:`StepProgressBar`; ``kwargs`` go to the bar."""
    if importlib.util.find_spec("rich") is not None:
        return RichStepProgressBar(**kwargs)
    return StepProgressBar(**kwargs)
