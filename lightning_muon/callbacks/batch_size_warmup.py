"""``BatchSizeWarmup``: grow the global batch with the measured gradient noise scale."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from ..validation import check_choice, check_number, check_positive_int
from .base import restore_attributes, save_attributes
from .critical_batch_size import CriticalBatchSizeMonitor

LR_RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
SOURCES = ("b_simple", "b_crit")
_STATE = ("accumulate", "pending", "last_change", "lr_factor", "history", "micro_batch")


class BatchSizeWarmup(Callback):
    """Start with the Trainer's batch and double it, through ``accumulate_grad_batches``, as the
    :class:`CriticalBatchSizeMonitor`'s smoothed estimate grows (McCandlish et al. 2018: training is
    most efficient near the noise scale; Merrill et al. 2025: batch-size warmup).

    After each of the monitor's measurements, every rank computes the target global batch
    ``safety * estimate`` (examples; ``source="b_simple"`` or Muon's model-level ``"b_crit"``,
    taken at the monitor's logging steps) and the largest ``accumulate_grad_batches =
    A0 * 2^k`` whose global batch ``micro_batch * A * world_size`` stays within it and within
    ``max_batch_size``; rank 0's decision is broadcast. The batch only grows (monotone), at most
    once per ``min_interval`` optimizer steps, and only after ``min_measurements`` measurements.

    **Whole accumulation windows.** Lightning steps the optimizer when the epoch's batch count is a
    multiple of ``trainer.accumulate_grad_batches`` (read at every batch), and at the last batch of
    the epoch. So a new value ``A`` is applied right after an optimizer step whose batch count in
    the epoch is a multiple of ``A`` (or at an epoch start): every window after the change has ``A``
    micro-batches, except the last of an epoch whose length is not a multiple of ``A``, which
    Lightning itself steps short (make the epoch length a multiple of the largest ``A``, e.g. with
    ``limit_train_batches``, to avoid it). A change waits at most ``A / A_old - 1`` steps for that.

    **Learning rate.** ``lr_rule`` multiplies every param group's ``lr`` (and the LR schedulers'
    ``base_lrs``, so a schedule keeps its shape) by ``k^p`` when the batch grows ``k``-fold:
    ``"none"`` (p = 0, default: Muon's update has a fixed norm; a larger batch removes noise from
    its direction), ``"sqrt"`` (p = 1/2, the SDE rule for Adam-type updates) or ``"linear"``
    (p = 1, SGD's rule below the critical batch).

    Logs ``batch_size/global`` (and ``batch_size/lr_factor``) through ``pl_module.log`` every step.
    ``max_steps`` counts optimizer steps, which the growth makes larger: for a fixed data budget set
    it in batches (``max_epochs`` / ``limit_train_batches``). State (current and pending
    accumulation, last change, LR factor) is saved in checkpoints and restored on resume;
    optimizer and scheduler state carry the scaled learning rates (checkpoint policy: that of the
    monitors, :meth:`MonitorCallback.load_state_dict`). Needs automatic optimization.

    Args:
        max_batch_size: the largest global batch (examples) it grows to.
        safety: the target global batch is ``safety * estimate``.
        min_interval: optimizer steps between two changes, at least.
        lr_rule: ``"none"``, ``"sqrt"`` or ``"linear"`` learning-rate scaling with the batch.
        source: the estimate followed: ``"b_simple"`` (default: the closest to the critical batch
            size measured by training in ``benchmarks/critical_batch.py``: within 2x in 5 of 8 cases) or
            Muon's ``"b_crit"`` (6-44x low there: the batch would hardly grow).
        min_measurements: the monitor's measurements before the first change.

    Raises:
        ValueError: at construction, an argument out of range or not one of its choices.
        MisconfigurationException: at setup, no :class:`CriticalBatchSizeMonitor` on the Trainer,
            manual optimization, a strategy that handles accumulation itself, or
            ``source="b_crit"`` with the ``"layernorm"`` estimator.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[CriticalBatchSizeMonitor(sample_every_n_steps=10),
        ...                                BatchSizeWarmup(max_batch_size=512)], logger=False)
        >>> trainer.callbacks[1].state_dict()["accumulate"] is None  # set from the Trainer at train start
        True
    """

    def __init__(
        self,
        max_batch_size: int,
        safety: float = 0.5,
        min_interval: int = 50,
        lr_rule: str = "none",
        source: str = "b_simple",
        min_measurements: int = 3,
    ) -> None:
        where = "BatchSizeWarmup"
        check_positive_int(max_batch_size, "max_batch_size (examples)", where)
        check_number(safety, "safety", where, low=0, low_open=True)
        check_positive_int(min_interval, "min_interval", where, minimum=0)
        check_positive_int(min_measurements, "min_measurements", where, minimum=0)
        check_choice(lr_rule, "lr_rule", where, LR_RULES)
        check_choice(source, "source", where, SOURCES)
        self.max_batch_size = max_batch_size
        self.safety = float(safety)
        self.min_interval = min_interval
        self.lr_rule = lr_rule
        self.source = source
        self.min_measurements = min_measurements
        self.accumulate: int | None = None  # current accumulate_grad_batches
        self.pending: int | None = None  # decided, waiting for an aligned step
        self.last_change = 0  # global step of the last change
        self.lr_factor = 1.0
        self.history: list[tuple[int, int]] = []  # (global step, accumulate_grad_batches) at each change
        self.micro_batch: int | None = None
        self._seen = 0
        self._monitor: CriticalBatchSizeMonitor | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(max_batch_size=self.max_batch_size, source=self.source)

    # -------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        monitors = [c for c in trainer.callbacks if isinstance(c, CriticalBatchSizeMonitor)]
        if not monitors:
            raise MisconfigurationException(
                "BatchSizeWarmup: add a CriticalBatchSizeMonitor to the Trainer's callbacks (it measures the estimate)."
            )
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "BatchSizeWarmup: grows accumulate_grad_batches, which only automatic optimization uses."
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise MisconfigurationException(
                f"BatchSizeWarmup: {type(trainer.strategy).__name__} handles accumulation itself; "
                "it cannot change mid-run."
            )
        self._monitor = monitors[0]
        if self.source == "b_crit" and self._monitor.estimator == "layernorm":
            raise MisconfigurationException(
                "BatchSizeWarmup(source='b_crit'): the 'layernorm' estimator gives no b_crit."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.accumulate is None:  # a fresh run: start from the Trainer's value
            self.accumulate = trainer.accumulate_grad_batches
            self.history = [(trainer.global_step, self.accumulate)]
        trainer.accumulate_grad_batches = self.accumulate  # a resumed run: the saved value
        self._seen = self._monitor.ema_steps

    # -------------------------------------------------------------- per batch
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_apply(trainer, ready=0)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.micro_batch is None:
            self.micro_batch = extract_batch_size(batch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if ready % self.accumulate:  # inside an accumulation window: nothing may change
            return
        if self._monitor.ema_steps > self._seen:
            self._seen = self._monitor.ema_steps
            proposal = self.proposal(trainer)
            proposal = int(trainer.strategy.broadcast(proposal, src=0))  # one decision for all ranks
            if proposal > max(self.accumulate, self.pending or 0):
                self.pending = proposal
        self._maybe_apply(trainer, ready)
        pl_module.log("batch_size/global", float(self.global_batch(trainer)), on_step=True, on_epoch=False)
        pl_module.log("batch_size/lr_factor", self.lr_factor, on_step=True, on_epoch=False)

    def global_batch(self, trainer: pl.Trainer, accumulate: int | None = None) -> int:
        """Examples per optimizer step at ``accumulate`` (default: the current value)."""
        return (self.micro_batch or 0) * (accumulate or self.accumulate) * trainer.world_size

    def estimate(self) -> float:
        """The monitor's smoothed estimate this callback follows (examples; NaN if none yet)."""
        return self._monitor.last.get(self.source, float("nan"))

    def proposal(self, trainer: pl.Trainer) -> int:
        """The accumulation the current estimate asks for: ``A * 2^k``, monotone and bounded."""
        A = self.pending or self.accumulate
        estimate = self.estimate()
        if self._monitor.ema_steps < self.min_measurements or not math.isfinite(estimate) or not self.micro_batch:
            return A
        target = min(self.safety * estimate, self.max_batch_size)
        while self.global_batch(trainer, 2 * A) <= target:
            A *= 2
        return A

    def _maybe_apply(self, trainer: pl.Trainer, ready: int) -> None:
        new = self.pending
        if new is None or new <= self.accumulate or ready % new:
            return
        if trainer.global_step - self.last_change < self.min_interval:
            return
        factor = new / self.accumulate
        mult = factor ** LR_RULES[self.lr_rule]
        if mult != 1.0:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= mult
                    if "initial_lr" in group:
                        group["initial_lr"] *= mult
            for config in trainer.lr_scheduler_configs:
                if hasattr(config.scheduler, "base_lrs"):
                    config.scheduler.base_lrs = [lr * mult for lr in config.scheduler.base_lrs]
            self.lr_factor *= mult
        self.accumulate = new
        self.pending = None
        self.last_change = trainer.global_step
        self.history.append((trainer.global_step, new))
        trainer.accumulate_grad_batches = new

    # -------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return save_attributes(self, _STATE)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lenient, with a warning for unknown or missing keys (as the monitors)."""
        restore_attributes(self, state_dict, _STATE)
        self.history = [tuple(h) for h in self.history]
