"""What the four monitors share: layer selection, the logging interval, logging, TensorBoard layout."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from ..distributed import is_dtensor
from ..routing import matching_pattern, route_parameters, why_not_muon
from ._cache import SpectralCache, drop_cache, step_cache

# Custom-scalars categories per TensorBoard writer, merged so that monitors can be combined.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def select_layers(
    module: torch.nn.Module, include: Sequence[str] | None, exclude: Sequence[str], where: str
) -> list[str]:
    """Names of the matrices to monitor: the Muon-routed ones, or the matrices (see
    :func:`lightning_muon.why_not_muon`) matching ``include`` (fnmatch patterns on the dotted
    name or one of its components; biases and gains that match are skipped), minus ``exclude``."""
    if include is None:
        names = [r.name for r in route_parameters(module, warn=False) if r.use_muon]
        source = "the Muon-routed matrices (lightning_muon.route_parameters)"
    else:
        names = [n for n, p in module.named_parameters() if matching_pattern(n, include) and why_not_muon(p) is None]
        source = f"the matrices matching include={list(include)}"
    names = [n for n in names if not matching_pattern(n, exclude)]
    if not names:
        raise MisconfigurationException(
            f"{where}: no layer selected from {source}"
            + (f" after exclude={list(exclude)}" if exclude else "")
            + ". Pass include=['<pattern>'] with fnmatch patterns on the names of weight matrices "
            "(see model.named_parameters())."
        )
    return names


def _check_patterns(value: Sequence[str] | None, arg: str, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {arg} must be a list of fnmatch patterns (strings), got {value!r}")
    return tuple(value)


def aggregates(prefix: str, values: dict[str, float]) -> dict[str, float]:
    """``prefix/mean``, ``prefix/min`` and ``prefix/max`` over the finite per-layer values."""
    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        return {}
    return {f"{prefix}/mean": sum(finite) / len(finite), f"{prefix}/min": min(finite), f"{prefix}/max": max(finite)}


def tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class SpectralMonitor(Callback):
    """Base class: subclasses set ``prefix`` and implement :meth:`compute` (rank 0 only)."""

    prefix: str = ""
    #: chart title -> tag regex, for the custom-scalars layout (one category per monitor)
    charts: dict[str, str] = {}

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        where = type(self).__name__
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"{where}: every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.include = _check_patterns(include, "include", where)
        self.exclude = _check_patterns(exclude, "exclude", where) or ()
        self.layers: list[str] = []
        self._unpublished: dict[str, float] = {}  # rank 0: logged, not yet in callback_metrics
        self._published_until = 0  # global_step at the previous batch end

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, include=self.include, exclude=self.exclude)

    # -------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        where = type(self).__name__
        if not trainer.loggers:
            raise MisconfigurationException(
                f"{where}: the Trainer has no logger; pass logger=TensorBoardLogger(...) (or any logger)."
            )
        if any(True for _ in pl_module.parameters()):  # else: layers made in configure_model
            self.layers = select_layers(pl_module, self.include, self.exclude, where)
        tb = tensorboard(trainer)
        if tb is not None and trainer.is_global_zero:
            self._write_layout(tb)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.layers:
            self.layers = select_layers(pl_module, self.include, self.exclude, type(self).__name__)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unpublished, self._published_until = {}, trainer.global_step

    def _write_layout(self, tb: TensorBoardLogger) -> None:
        writer = tb.experiment
        layout = _LAYOUTS.setdefault(writer, {})
        category = self.prefix.rstrip("/")
        layout[category] = {title: ["Multiline", [regex]] for title, regex in self.charts.items()}
        writer.add_custom_scalars(dict(layout))

    # -------------------------------------------------------------- per step
    def params(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        named = dict(pl_module.named_parameters())
        return {n: named[n] for n in self.layers}

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        params = self.params(pl_module)
        sharded = any(is_dtensor(p) for p in params.values())
        if not (trainer.is_global_zero or sharded):
            return  # DDP: rank 0 holds the same all-reduced tensors and does the work
        cache = step_cache(trainer, step)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
        self.log_metrics(trainer, self.compute(trainer, pl_module, optimizer, params, cache))

    def log_metrics(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Send ``metrics`` to every logger at ``trainer.global_step``, from rank 0 only, and keep
        them for ``trainer.callback_metrics`` (published to every rank after the batch)."""
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._unpublished.update(metrics)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        drop_cache(trainer)  # after the optimizer step: free the stored matrices
        self._publish(trainer, pl_module)

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the metrics computed since the last batch into ``trainer.callback_metrics`` on every
        rank, so that EarlyStopping and ModelCheckpoint(monitor=...) can use them.

        Rank 0 computed them; under DDP/FSDP one broadcast gives every rank the same values (the
        stop and save decisions must agree). The decision to broadcast depends only on
        ``global_step``, which all ranks share: it is taken when an optimizer step at a logging
        step (``step % every_n_steps == 0``) ran since the previous batch end. The values go
        through ``pl_module.log(..., logger=False)``: the loggers already got them, at their step.
        """
        done, now = self._published_until, trainer.global_step
        self._published_until = now
        if -(-done // self.every_n_steps) * self.every_n_steps >= now:  # no logging step in [done, now)
            return
        metrics, self._unpublished = self._unpublished, {}
        if trainer.world_size > 1:
            metrics = trainer.strategy.broadcast(metrics, src=0)
        for tag, value in metrics.items():
            pl_module.log(tag, float(value), on_step=True, on_epoch=False, logger=False, sync_dist=False, batch_size=1)

    def compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        cache: SpectralCache,
    ) -> dict[str, float]:
        """Metrics ``{tag: value}`` for this step. Runs on rank 0, and on every rank when weights
        are sharded (gather with ``cache.matrix`` on every rank; return ``{}`` off rank 0)."""
        raise NotImplementedError
