"""``CriticalBatchSizeMonitor``: the gradient noise scale B_simple and Muon's B_crit per layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from ..spectral import NoiseScale, muon_critical_batch_size, noise_scale
from ._base import SpectralMonitor, aggregates
from ._cache import SpectralCache, step_cache

_STATE = ("ema_small", "ema_big", "ema_steps")


class CriticalBatchSizeMonitor(SpectralMonitor):
    """Estimate the critical batch size from two batch sizes, during training.

    Small batch: one micro-batch on one device (``b`` examples); its squared gradient norm is read
    per layer by a tensor hook during backward, before accumulation and before DDP's all-reduce.
    Large batch: the gradient the optimizer sees (``B = b * accumulate_grad_batches * world_size``).
    So it needs ``accumulate_grad_batches >= 2`` or >= 2 DDP processes. Squared norms are smoothed
    by two separate bias-corrected EMAs (decay ``ema``) every step; the ratio is taken at logging
    steps (per-rank EMAs are averaged across ranks then: one small all-reduce).

    Logged (tags under ``critical_batch_size/``):

    * ``b_simple``, ``grad_sq``, ``trace_sigma`` over all monitored layers, and
      ``b_simple/<param name>``: McCandlish et al.'s B_simple = tr(Sigma) / |G|^2, in examples
      (rows of the batch; multiply by the sequence length for tokens). It is the SGD-geometry
      estimate: the batch size beyond which SGD's steps stop getting better with more data. It
      means something once training has left the initial transient and |G|^2 is well above its
      noise (it is estimated as a difference; early or near convergence it can be negative: NaN).
    * ``b_crit/<param name>`` with its inputs ``rank/``, ``sigma2/`` and ``sensitivity/``: the
      paper's Muon-specific B_crit = 2 sigma^2 S(mu) / r * (1 - beta) / (1 + beta), with
      sigma^2 = tr(Sigma_layer) / (m n), mu the large-batch gradient (singular values below the
      noise edge ``sqrt(sigma^2 / B) (sqrt m + sqrt n)`` dropped) and beta Muon's momentum (0 for
      other optimizers). It holds in the paper's regime (the polar map's noise sensitivity of a
      square-ish gradient); small singular values dominate S, so read it with r and S.

    Assumes automatic optimization (Lightning divides the loss by ``accumulate_grad_batches``) and
    equal micro-batch sizes (``batch_size``, else inferred from each batch). Not supported with
    FSDP2 (ModelParallelStrategy). EMA state is saved in checkpoints (under DDP, rank 0's: on
resume every rank continues from it).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[CriticalBatchSizeMonitor()])
    """

    prefix = "critical_batch_size/"
    charts = {
        "B_simple (SGD noise scale)": r"^critical_batch_size/b_simple",
        "Muon B_crit": r"^critical_batch_size/b_crit/",
        "inputs: |G|^2, tr Sigma": r"^critical_batch_size/(grad_sq|trace_sigma)$",
        "inputs: rank r": r"^critical_batch_size/rank/",
        "inputs: sigma^2": r"^critical_batch_size/sigma2/",
        "inputs: S(mu)": r"^critical_batch_size/sensitivity/",
    }

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        ema: float = 0.99,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, include, exclude)
        if not isinstance(ema, (int, float)) or isinstance(ema, bool) or not 0 <= ema < 1:
            raise ValueError(f"CriticalBatchSizeMonitor: ema must be a decay in [0, 1), got {ema!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"CriticalBatchSizeMonitor: batch_size must be an integer >= 1 or None, got {batch_size!r}")
        self.ema = float(ema)
        self.batch_size = batch_size
        self.ema_small: Tensor | None = None  # per layer, this rank's micro-batch ||g_b||^2
        self.ema_big: Tensor | None = None  # per layer, ||G_B||^2
        self.ema_steps = 0
        self._handles: list[Any] = []
        self._micro_sq: Tensor | None = None
        self._micro_sizes: list[int] = []
        self._b = float("nan")  # mean micro-batch size of the last step

    # -------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if isinstance(trainer.strategy, ModelParallelStrategy):
            raise MisconfigurationException("CriticalBatchSizeMonitor: FSDP2 (ModelParallelStrategy) is not supported; use DDP.")
        if not pl_module.automatic_optimization:
            raise MisconfigurationException("CriticalBatchSizeMonitor: needs automatic optimization (it undoes Lightning's loss / accumulate_grad_batches).")
        if trainer.accumulate_grad_batches * trainer.world_size < 2:
            raise MisconfigurationException(
                "CriticalBatchSizeMonitor: needs two batch sizes; set Trainer(accumulate_grad_batches >= 2) "
                "or train on >= 2 devices (DDP)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        params = self.params(pl_module)
        first = next(iter(params.values()))
        self._micro_sq = torch.zeros(len(params), device=first.device)
        for i, p in enumerate(params.values()):
            self._handles.append(p.register_hook(self._hook(i)))

    def _hook(self, i: int):
        def record(grad: Tensor) -> None:
            # no full-size temporary: the norm accumulates in fp32 inside one kernel
            self._micro_sq[i] += torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()

        return record

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._micro_sizes.append(self.batch_size or extract_batch_size(batch))

    # -------------------------------------------------------------- per step
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = self.params(pl_module)
        n_micro = max(1, len(self._micro_sizes))
        accumulate = trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16: hooks saw scaled grads
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        small = self._micro_sq * (accumulate / scale) ** 2 / n_micro
        big = torch.stack([p.grad.detach().float().square().sum() if p.grad is not None else small.new_zeros(()) for p in params.values()])
        if self.ema_small is None or self.ema_small.shape != small.shape:
            self.ema_small, self.ema_big, self.ema_steps = torch.zeros_like(small), torch.zeros_like(big), 0
        self.ema_small = self.ema_small.to(small.device).lerp(small, 1 - self.ema)
        self.ema_big = self.ema_big.to(big.device).lerp(big, 1 - self.ema)
        self.ema_steps += 1
        self._b = sum(self._micro_sizes) / n_micro if self._micro_sizes else float("nan")
        self._micro_sq.zero_()
        self._micro_sizes = []
        if trainer.global_step % self.every_n_steps:
            return
        small, big, b, B = self._estimates(trainer)  # a collective under DDP: every rank calls it
        if trainer.is_global_zero:
            cache = step_cache(trainer, trainer.global_step)
            optimizer = getattr(optimizer, "optimizer", optimizer)
            self.log_metrics(trainer, self._metrics(params, optimizer, cache, small, big, b, B))

    def _estimates(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor, float, float]:
        """Bias-corrected EMAs of the small- and large-batch squared norms, and b, B."""
        correction = 1 - self.ema**self.ema_steps
        small = self.ema_small / correction
        if trainer.world_size > 1:
            small = trainer.strategy.reduce(small.clone(), reduce_op="mean")
        return small, self.ema_big / correction, self._b, self._b * trainer.accumulate_grad_batches * trainer.world_size

    def _metrics(
        self, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, cache: SpectralCache,
        small: Tensor, big: Tensor, b: float, B: float,
    ) -> dict[str, float]:
        if not b < B:
            return {}
        p = self.prefix
        total = noise_scale(small.sum(), big.sum(), b, B)
        per_layer = noise_scale(small, big, b, B)
        metrics = {  # the two unbiased pieces as they are (either can be negative), the ratio if both > 0
            f"{p}b_simple": _ratio(total), f"{p}grad_sq": float(total.grad_sq), f"{p}trace_sigma": float(total.trace_sigma),
        }
        groups = {id(q): g for g in optimizer.param_groups for q in g["params"]}
        names = [n for n, q in params.items() if q.grad is not None]
        for n in names:
            cache.matrix("grad", n, params[n].grad)
        spectra = cache.spectra("grad", names)
        b_crit: dict[str, float] = {}
        for i, n in enumerate(params):
            metrics[f"{p}b_simple/{n}"] = _ratio(NoiseScale(*(x[i] for x in per_layer)))
            if n not in spectra:
                continue
            G = cache.matrix("grad", n)
            group = groups.get(id(params[n]), {})
            beta = group.get("momentum", 0.0) if group.get("use_muon") else 0.0
            sigma2 = per_layer.trace_sigma[i] / G.numel()
            est = muon_critical_batch_size(G, sigma2, momentum=beta, batch_size=B, singular_values_=spectra[n])
            b_crit[f"{p}b_crit/{n}"] = _num(est.b_crit)
            metrics.update({f"{p}rank/{n}": _num(est.rank), f"{p}sigma2/{n}": _num(est.sigma2), f"{p}sensitivity/{n}": _num(est.sensitivity)})
        metrics.update(b_crit)
        metrics.update(aggregates(f"{p}b_crit", b_crit))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in ((k, getattr(self, k)) for k in _STATE)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in _STATE:
            setattr(self, k, state_dict[k])


def _num(x: Tensor | float) -> float:
    """A float for the loggers; a negative estimate (noise-dominated difference) becomes NaN."""
    x = float(x)
    return x if math.isfinite(x) and x >= 0 else float("nan")


def _ratio(est: NoiseScale) -> float:
    """B_simple, or NaN while |G|^2 or tr(Sigma) is estimated <= 0 (noise-dominated)."""
    if not (float(est.grad_sq) > 0 and float(est.trace_sigma) > 0):
        return float("nan")
    return float(est.b_simple)
