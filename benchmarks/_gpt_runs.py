"""Train the example GPT for a few steps and record step times and a validation curve.

Shared by ``benchmarks/training.py`` (time per step) and ``benchmarks/convergence.py`` (loss).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from examples.common import adamw, muon
from examples.gpt import GPTDataModule, LitGPT


class _StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward, optimizer step, callbacks)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._t0)


class _ValCurve(L.Callback):
    def __init__(self) -> None:
        self.curve: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.curve.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


@dataclass
class GPTRun:
    step_times: list[float]
    val_curve: list[tuple[int, float]] = field(default_factory=list)


_DATA: dict[tuple, GPTDataModule] = {}


def train_gpt(
    *,
    optimizer: str,
    lr: float,
    adamw_lr: float,
    steps: int,
    n_layer: int = 4,
    n_embd: int = 128,
    block_size: int = 128,
    batch_size: int = 16,
    callbacks: list[L.Callback] | None = None,
    val_every: int | None = None,
    val_batches: int = 8,
    accelerator: str = "auto",
    precision: str = "32-true",
    seed: int = 0,
    muon_kwargs: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> GPTRun:
    """One training run of ``examples.gpt.LitGPT`` on the embedded KJV corpus; ``muon_kwargs`` go to
    Muon (``optimizer="muon"``), ``model_kwargs`` to LitGPT."""
    muon_kwargs = muon_kwargs or {}
    L.seed_everything(seed, verbose=False)
    key = (block_size, batch_size)
    if key not in _DATA:
        _DATA[key] = GPTDataModule(block_size=block_size, batch_size=batch_size)
    dm = _DATA[key]
    factory = muon(lr=lr, adamw_lr=adamw_lr, **muon_kwargs) if optimizer == "muon" else adamw(lr=adamw_lr, fused=True)
    model = LitGPT(
        vocab_size=dm.vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=4,
        n_embd=n_embd,
        optimizer=factory,
        **model_kwargs,
    )
    timer, curve = _StepTimer(), _ValCurve()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=steps,
            precision=precision,
            logger=TensorBoardLogger(tmp, name="bench"),
            log_every_n_steps=10,
            callbacks=[timer, curve, *(callbacks or [])],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            val_check_interval=val_every or steps + 1,
            limit_val_batches=val_batches if val_every else 0,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, datamodule=dm)
    return GPTRun(timer.times, curve.curve)
