"""``CriticalBatchSizeMonitor``: the gradient noise scale B_simple and Muon's B_crit per layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ..diagnostics.critical_batch import NoiseScale, momentum_noise_factor, muon_critical_batch_size, noise_scale
from ..diagnostics.per_example import (
    LINEAR_METHODS,
    PerExampleNorms,
    conv_grad_norms,
    embedding_grad_norms,
    linear_grad_norms,
    norm_grad_norms,
)
from ..parallel.dtensor import full
from ..routing.layers import is_transposed_linear
from ..validation import check_choice, check_number, check_positive_int
from .base import MonitorCallback, aggregates, finite
from .cache import CacheRequest, SpectralCache, step_cache, view_keys

ESTIMATORS = ("auto", "per_example", "layernorm", "two_batch")
_NORMS = (nn.LayerNorm, nn.RMSNorm)
#: where :func:`tokens_per_example` looks for the sequence length, after ``pl_module.tokens_per_example``
TOKEN_HPARAMS = ("tokens_per_example", "sequence_length", "seq_len", "block_size", "context_length", "max_seq_length")


def tokens_per_example(pl_module: nn.Module) -> int | None:
    """The tokens of one example (a sequence), if the module says: its ``tokens_per_example``
    attribute, else the first of :data:`TOKEN_HPARAMS` in its ``hparams``; None when neither is an
    integer > 1 (the monitors then log examples only).

    Example:
        >>> import lightning as L
        >>> class LM(L.LightningModule):
        ...     def __init__(self, block_size=256):
        ...         super().__init__()
        ...         self.save_hyperparameters()
        >>> tokens_per_example(LM()), tokens_per_example(L.LightningModule())
        (256, None)
    """
    value = getattr(pl_module, "tokens_per_example", None)
    if value is None:
        hparams = getattr(pl_module, "hparams", None) or {}
        value = next((hparams[k] for k in TOKEN_HPARAMS if k in hparams), None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 1:
        return None
    return value


class CriticalBatchSizeMonitor(MonitorCallback):
    """Estimate the critical batch size during training, from one batch or from two batch sizes.

    ``estimator`` chooses how the gradient noise is measured:

    * ``"per_example"``: inside one micro-batch, small batch = one example, large batch = the
      micro-batch (``B`` examples). Each monitored weight's per-example gradient norms come from
      its input activations and output gradients (forward and backward hooks, see
      :mod:`lightning_muon.diagnostics.per_example`), for ``nn.Linear``, ``nn.Conv1d/2d/3d``,
      Hugging Face's ``Conv1D`` and ``nn.Embedding`` weights. Needs nothing of the Trainer: one
      device, no accumulation, DDP, FSDP2 (activations are local: no gather), manual optimization.
      Other layers (a transposed conv, a 3-D expert bank, ``nn.MultiheadAttention``'s ``in_proj``)
      get no estimate, with one warning; so does a layer whose computation fails, from then on.
    * ``"layernorm"``: the same for the gains and biases of the model's ``nn.LayerNorm`` /
      ``nn.RMSNorm`` layers only (Gray et al., NeurIPS 2024: their noise scale tracks the whole
      transformer's), at ``O(B T d)`` per layer. No per-matrix noise, so no ``b_crit``.
    * ``"two_batch"``: small batch = one micro-batch on one device (squared gradient norm read by a
      tensor hook before accumulation and before DDP's all-reduce), large batch = the gradient the
      optimizer sees (``B = b * accumulate_grad_batches * world_size``). Needs
      ``accumulate_grad_batches >= 2`` or >= 2 DDP processes, automatic optimization, no FSDP2.
    * ``"auto"`` (default): ``"per_example"`` when every monitored layer has a per-example form,
      else ``"two_batch"`` where it applies (it covers every layer), else ``"per_example"`` on the
      layers that have one, else ``"layernorm"`` when the model has affine norms; else it measures
      nothing. Whenever it leaves a layer out it warns once, saying why and what covers it.
      ``"auto"`` never stops ``fit``.

    **Units.** Examples are the rows of the batch: a sequence is one example, its tokens are summed
    over. When the LightningModule knows its sequence length (:func:`tokens_per_example`: a
    ``tokens_per_example`` attribute, or ``block_size``/``seq_len``/... in its hparams) the
    model-level estimates and the global batch are also logged in tokens (``b_simple_tokens``,
    ``b_crit_tokens``, ``global_batch_tokens``).

    **Cost.** Hooks are registered only for the micro-batches of a measured step (every
    ``sample_every_n_steps`` steps, default ``every_n_steps``) and removed after it. Per-example
    norms cost about one extra weight-gradient matmul per Linear layer on those steps (or the ghost
    norm for short sequences); the two-batch hook one squared norm per parameter per micro-batch.

    Each measured step gives the two unbiased pieces (small- and large-batch squared norms, reduced
    across processes: every rank holds the same values); they are smoothed by bias-corrected EMAs
    (decay ``ema`` per measurement) and their ratio is taken at logging steps. Logged (headline
    tags under ``critical_batch_size/``, per-layer ones under ``per_layer/critical_batch_size/``;
    a value that is undefined at a step is left out, never NaN):

    * ``global_batch``: the batch the optimizer sees at this step, in examples (micro-batch x
      ``accumulate_grad_batches`` x processes), to read the estimates against.
    * ``b_simple``, ``grad_sq``, ``trace_sigma`` over all measured layers, and per layer
      ``b_simple/<name>``: McCandlish et al.'s B_simple = tr(Sigma) / |G|^2, in examples. It is the
      SGD-geometry estimate: the batch size beyond which SGD's steps stop getting better with more
      data. It means something once training has left the initial transient and |G|^2 is well
      above its noise; while either smoothed piece is <= 0 (noise-dominated, or a layer whose
      gradient is exactly zero) ``b_simple`` is not logged (``grad_sq`` and ``trace_sigma`` are,
      as measured).
    * ``b_crit`` (model level) and per layer ``b_crit/<key>`` per matrix of the optimizer's view of each
      parameter (``<key>``: the name, or ``<name>/<label>`` for each expert of a stack or each
      q/k/v block or head, as in :class:`StableRankMonitor`), with ``b_crit/{mean,min,max}``, in
      examples: Muon's critical batch size, the batch at which gradient noise halves the progress
      of Muon's step (:func:`lightning_muon.muon_critical_batch_size`, saturating form; derivation
      in ``docs/muon-theory.md``). Per matrix ``b_crit = momentum_factor * sigma2 * sensitivity``,
      with the per-layer inputs ``rank/<key>`` (singular values above the noise edge),
      ``sensitivity/<key>``, ``sigma2/<name>`` (= tr(Sigma_layer) / numel: the noise is taken uniform over a parameter's
      matrices) and the headline ``momentum_factor/<group>`` (:func:`lightning_muon.momentum_noise_factor`,
      stationary, Nesterov or EMA as the group says; 1 for non-Muon optimizers). The mean gradient
      is the direction Muon orthogonalises (its momentum, Nesterov or not, divided by the sum of
      its weights; the gradient for other optimizers), whose noise at step ``t`` is the momentum
      factor after ``t`` gradients over the global batch. The model-level ``b_crit`` weights each
      matrix by the nuclear norm of its mean gradient (one learning rate for all). A matrix with
      nothing above the noise (``rank`` 0: noise-dominated at this batch) logs no ``b_crit``.
      Not with ``"layernorm"``.

    **Manual optimization** works with ``"per_example"`` / ``"layernorm"``: step through the
    ``LightningOptimizer`` (``self.optimizers().step()``, which runs ``on_before_optimizer_step``).
    B_simple does not depend on how the loss is scaled; ``grad_sq``, ``trace_sigma`` and ``b_crit``
    assume the backpropagated loss is the batch mean (divide it by n to accumulate n batches by
    hand and they come out n^2 too small). Not with activation checkpointing (a layer run twice in
    one forward gets no estimate). EMA state is saved in checkpoints (``state_attributes``).

    It shares with the spectral monitors only :class:`MonitorCallback` (layer selection, logging,
    state); its steps are its own: hooks on measured steps, EMAs every measurement, metrics at
    logging steps (from the shared cache: the gradients' spectra).

    Args:
        every_n_steps: log at every ``every_n_steps``-th optimizer step (from step 0).
        include: fnmatch patterns of the matrices to monitor (default: the Muon-routed ones).
        exclude: patterns removed from that selection.
        ema: decay of the EMAs of the squared norms, per measurement, in ``[0, 1)``.
        batch_size: micro-batch size for ``"two_batch"`` (default: read from the batch).
        estimator: ``"auto"``, ``"per_example"``, ``"layernorm"`` or ``"two_batch"`` (above).
        sample_every_n_steps: measure at every ``sample_every_n_steps``-th step (default:
            ``every_n_steps``).
        method: per-example norm method of :func:`lightning_muon.linear_grad_norms`.

    Raises:
        ValueError: at construction, an argument out of range or not one of its choices.
        MisconfigurationException: at setup, a Trainer without a logger or no layer selected; at
            fit start, an estimator you chose that cannot run: ``"two_batch"`` on a Trainer it
            cannot run on, ``"layernorm"`` without affine norms, ``"per_example"`` without a layer
            that has a per-example form. Each message says what to pass instead.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[CriticalBatchSizeMonitor()], logger=False)  # any Trainer (+ a logger)
        >>> trainer.callbacks[0].estimator, trainer.callbacks[0].sample_every_n_steps
        ('auto', 100)
    """

    prefix = "critical_batch_size/"
    charts = {
        "global batch vs B_simple and B_crit (examples)": r"^critical_batch_size/(global_batch|b_simple|b_crit)$",
        "in tokens": r"^critical_batch_size/(global_batch|b_simple|b_crit)_tokens$",
        "Muon B_crit over matrices: mean, min, max": r"^critical_batch_size/b_crit/(mean|min|max)$",
        "inputs: |G|^2, tr Sigma": r"^critical_batch_size/(grad_sq|trace_sigma)$",
        "inputs: momentum factor": r"^critical_batch_size/momentum_factor/",
    }
    layer_metrics = ("b_simple", "b_crit", "rank", "sensitivity", "sigma2")
    state_attributes = ("ema_small", "ema_big", "ema_steps", "b_small", "b_big", "ema_counts")
    optional_state = ("ema_counts",)  # checkpoints from before per-slot counts: derived from ema_steps

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        ema: float = 0.9,
        batch_size: int | None = None,
        estimator: str = "auto",
        sample_every_n_steps: int | None = None,
        method: str = "auto",
    ) -> None:
        super().__init__(every_n_steps, include, exclude)
        where = "CriticalBatchSizeMonitor"
        check_number(ema, "ema", where, low=0, high=1, high_open=True)
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size", where)
        check_choice(estimator, "estimator", where, ESTIMATORS)
        if sample_every_n_steps is not None:
            check_positive_int(sample_every_n_steps, "sample_every_n_steps", where)
        check_choice(method, "method", where, LINEAR_METHODS)
        self.ema = float(ema)
        self.batch_size = batch_size
        self.estimator = estimator
        self.sample_every_n_steps = sample_every_n_steps or every_n_steps
        self.method = method
        self.mode = estimator  # resolved in on_fit_start
        self.slots: list[str] = []  # what is measured: parameter names, or norm-module names
        self.ema_small: Tensor | None = None  # per slot, EMA of the small-batch squared norm
        self.ema_big: Tensor | None = None  # per slot, EMA of the large-batch squared norm
        self.ema_steps = 0  # measurements so far
        self.b_small = float("nan")  # the two batch sizes of the last measurement (examples)
        self.b_big = float("nan")
        self.last: dict[str, float] = {}  # the last logged b_simple and b_crit/mean (for schedulers)
        self._modules: list[nn.Module | None] = []
        self._kinds: list[str | None] = []  # per slot: "linear", "conv", "embedding", "norm", or None
        self._failed: set[int] = set()  # slots whose per-example computation failed: left out
        self._handles: list[Any] = []
        self._measuring = False
        self._small: Tensor | None = None
        self._big: Tensor | None = None
        self._calls: Tensor | None = None
        self._examples: Tensor | None = None
        self._micro_sizes: list[int] = []
        self._window = -1  # the global step whose micro-batches are being measured
        self.ema_counts: Tensor | None = None  # per slot, measurements that gave a finite value

    @property
    @override
    def state_key(self) -> str:  # two monitors with different estimators can share a Trainer
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, include=self.include, exclude=self.exclude, estimator=self.estimator
        )

    # -------------------------------------------------------------- setup
    def _two_batch_ok(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Why the two-batch estimator cannot run on this Trainer (None: it can)."""
        if isinstance(trainer.strategy, ModelParallelStrategy):
            return "FSDP2 (ModelParallelStrategy) shards gradients before a hook can read a micro-batch's"
        if not pl_module.automatic_optimization:
            return "manual optimization: the loss scaling of an accumulated step is unknown"
        if trainer.accumulate_grad_batches * trainer.world_size < 2:
            return "it needs two batch sizes: Trainer(accumulate_grad_batches >= 2) or >= 2 DDP processes"
        return None

    @override
    def cache_requests(self) -> list[CacheRequest]:
        return [self.request("mean_gradient", "spectrum")] if self.estimator != "layernorm" else []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        named = dict(pl_module.named_modules())
        norms = _norm_modules(named)
        self._failed = set()
        self.slots = list(self.layers)
        found = [per_example_layer(named, n) for n in self.slots]
        missing = [n for n, f in zip(self.slots, found) if f is None]
        types = _types(named, missing)
        two_batch = self._two_batch_ok(trainer, pl_module)
        choice = f"CriticalBatchSizeMonitor(estimator={self.estimator!r})"
        if self.estimator == "layernorm":
            if not norms:
                raise MisconfigurationException(
                    f"{choice}: the model has no nn.LayerNorm or nn.RMSNorm with a gain or bias. "
                    + self._advice(trainer, pl_module, found, norms, "instead")
                )
            self._use_norms(named, norms)
            return
        if self.estimator == "two_batch":
            if two_batch is not None:
                raise MisconfigurationException(
                    f"{choice}: {two_batch}. " + self._advice(trainer, pl_module, found, norms, "instead")
                )
            self._use_layers("two_batch", found)
            return
        if self.estimator == "per_example":
            if len(missing) == len(self.slots):
                raise MisconfigurationException(
                    f"{choice}: none of the monitored layers has a per-example form ({types}; {_SUPPORTED} have "
                    "one). " + self._advice(trainer, pl_module, found, norms, "instead")
                )
            if missing:
                rank_zero_warn(
                    f"{choice}: no per-example estimate for {missing} ({types}: no per-example form); they are left "
                    "out. " + self._advice(trainer, pl_module, found, norms, "cover", missing)
                )
            self._use_layers("per_example", found)
            return
        # "auto", the default: say what it chose whenever it is not the per-example form of every layer
        auto = "CriticalBatchSizeMonitor(estimator='auto', the default)"
        if not missing:
            self._use_layers("per_example", found)
        elif two_batch is None:
            rank_zero_info(
                f"{auto} chose 'two_batch': {missing} ({types}) have no per-example form, and this Trainer "
                f"accumulates {trainer.accumulate_grad_batches} micro-batches over {trainer.world_size} process(es)."
            )
            self._use_layers("two_batch", found)
        elif len(missing) < len(self.slots):
            rank_zero_warn(
                f"{auto} chose 'per_example' for the layers that have a per-example form; {missing} ({types}) have "
                f"none and get no estimate, because 'two_batch', which covers every layer, cannot run here: "
                f"{two_batch}. " + self._advice(trainer, pl_module, found, norms, "cover", missing)
            )
            self._use_layers("per_example", found)
        elif norms:
            rank_zero_warn(
                f"{auto} chose 'layernorm' (the model's {len(norms)} affine norms, no per-matrix B_crit): none of "
                f"the monitored layers has a per-example form ({types}), and 'two_batch' cannot run here: "
                f"{two_batch}. " + self._advice(trainer, pl_module, found, [], "cover", missing)
            )
            self._use_norms(named, norms)
        else:
            rank_zero_warn(
                f"{auto} measures nothing: none of the monitored layers has a per-example form ({types}), the "
                f"model has no affine norms, and 'two_batch' cannot run here: {two_batch}. "
                + self._advice(trainer, pl_module, found, [], "cover", missing)
            )
            self.mode, self._modules, self._kinds = "off", [], []

    def _use_layers(self, mode: str, found: list[tuple[nn.Module, str] | None]) -> None:
        self.mode = mode
        self._modules = [f[0] if f is not None else None for f in found]
        self._kinds = [f[1] if f is not None else None for f in found]

    def _use_norms(self, named: dict[str, nn.Module], norms: list[str]) -> None:
        self.mode, self.slots = "layernorm", list(norms)
        self._modules, self._kinds = [named[n] for n in norms], ["norm"] * len(norms)

    def _advice(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        found: list[tuple[nn.Module, str] | None],
        norms: list[str],
        goal: str,
        missing: Sequence[str] = (),
    ) -> str:
        """One thing that works when followed: ``goal="instead"`` (an estimator that runs here) or
        ``"cover"`` (what measures the ``missing`` layers too, else how to silence the warning)."""
        two_batch = self._two_batch_ok(trainer, pl_module)
        fixable = isinstance(trainer.strategy, ModelParallelStrategy) is False and pl_module.automatic_optimization
        if goal == "cover":
            if two_batch is None:  # only with estimator='per_example': 'auto' would have picked it
                return "To measure them too, use estimator='two_batch', which covers every layer on this Trainer."
            if fixable and not _has_accumulation_scheduler(trainer):
                if self.estimator == "auto":
                    return (
                        "To measure them too, pass Trainer(accumulate_grad_batches=2): 'auto' then picks 'two_batch', "
                        "which covers every layer."
                    )
                return (
                    "To measure them too, use estimator='two_batch' with Trainer(accumulate_grad_batches=2), which "
                    "covers every layer."
                )
            if len(missing) == len(found):
                return "Nothing can measure these layers on this Trainer: remove the monitor to silence this warning."
            return f"To measure only the others without this warning, pass exclude={list(missing)}."
        if any(f is not None for f in found):
            return "Use estimator='per_example' (or the default 'auto'), which measures these layers on any Trainer."
        if two_batch is None:
            return "Use estimator='two_batch', which runs on this Trainer."
        if norms:
            return "Use estimator='layernorm' (the model's affine norms), which runs on any Trainer."
        if fixable and not _has_accumulation_scheduler(trainer):
            return "Use estimator='two_batch' with Trainer(accumulate_grad_batches=2)."
        return "Use estimator='auto' (the default), which warns and measures nothing for this model and Trainer."

    # -------------------------------------------------------------- hooks (measured steps only)
    def _measured(self, step: int) -> bool:
        return step % self.sample_every_n_steps == 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.mode == "off" or not self._measured(step):
            return
        if self._window != step:  # first micro-batch of this step: fresh accumulators
            self._window = step
            device = next(iter(pl_module.parameters())).device
            n = len(self.slots)
            self._small, self._big = torch.zeros(n, device=device), torch.zeros(n, device=device)
            self._calls, self._examples = torch.zeros(n, device=device), torch.zeros(n, device=device)
            self._micro_sizes = []
        self._micro_sizes.append(self.batch_size or extract_batch_size(batch) if self.mode == "two_batch" else 0)
        if self._handles or self.mode == "off":
            return
        if self.mode == "two_batch":
            params = self.params(pl_module)
            self._handles = [params[n].register_hook(self._param_hook(i)) for i, n in enumerate(self.slots)]
        else:
            self._handles = [
                m.register_forward_hook(self._forward_hook(i))
                for i, m in enumerate(self._modules)
                if m is not None and i not in self._failed
            ]

    def _param_hook(self, i: int):
        def record(grad: Tensor) -> None:  # no full-size temporary: the norm accumulates in fp32 in one kernel
            self._small[i] += torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()
            self._calls[i] += 1

        return record

    def _forward_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad and args):
                return
            x = args[0]
            output.register_hook(lambda g: self._record(i, module, x, g))

        return hook

    @torch.no_grad()
    def _record(self, i: int, module: nn.Module, x: Tensor, g: Tensor) -> None:
        if i in self._failed:
            return
        try:
            norms = _per_example_norms(self._kinds[i], module, x, g, self.method)
        except Exception as err:  # never stop training: this layer is left out from now on
            self._failed.add(i)
            rank_zero_warn(
                f"CriticalBatchSizeMonitor: the per-example norms of {self.slots[i]!r} ({type(module).__name__}) "
                f"failed ({type(err).__name__}: {err}); it gets no estimate from now on. To skip it without this "
                f"warning, pass exclude=[{self.slots[i]!r}]."
            )
            return
        B = norms.per_example_sq.shape[0]
        self._small[i] += B * B * norms.per_example_sq.mean()  # |g_i|^2 with g_i = B c_i: one example's gradient
        self._big[i] += norms.batch_sq  # the micro-batch mean gradient, sum_i c_i
        self._calls[i] += 1
        self._examples[i] += B

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        super().teardown(trainer, pl_module, stage)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()  # registered again by the next micro-batch of a measured step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # -------------------------------------------------------------- per step
    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if self._window == step and self._small is not None:
            self._measure(trainer, pl_module)
            self._window = -1
        if not self.is_logging_step(step) or self.ema_steps == 0:
            return
        params = self.params(pl_module)
        if self.takes_part(trainer, params):  # FSDP2: every rank takes part in the gradient gathers
            optimizer = getattr(optimizer, "optimizer", optimizer)
            metrics = self._metrics(trainer, params, optimizer, step_cache(trainer, step))
            self.last["b_crit"] = metrics.get(f"{self.prefix}b_crit", float("nan"))
            self.log_metrics(trainer, finite(metrics))

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Turn this step's accumulators into small/large-batch squared norms; update the EMAs."""
        n_micro = max(1, len(self._micro_sizes))
        accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16: hooks saw scaled grads
        factor = (accumulate / (float(scaler.get_scale()) if scaler is not None else 1.0)) ** 2
        if self.mode == "two_batch":
            params = self.params(pl_module)
            small = self._small * factor / n_micro
            big = torch.stack([_sq_norm(params[n].grad, small) for n in self.slots])
            ok = self._calls == n_micro
            b = sum(self._micro_sizes) / n_micro
            sizes = torch.tensor([b, b * trainer.accumulate_grad_batches * trainer.world_size], device=small.device)
        else:
            ok = self._calls == n_micro  # a layer run twice in one forward (or not at all) has no estimate
            calls = self._calls.clamp_min(1)
            small, big = self._small * factor / calls, self._big * factor / calls
            B = (self._examples[ok] / self._calls[ok]).mean() if ok.any() else small.new_tensor(float("nan"))
            sizes = torch.stack([small.new_tensor(1.0), B])
        nan = small.new_tensor(float("nan"))
        small, big = torch.where(ok, small, nan), torch.where(ok, big, nan)
        packed = torch.cat([small, big, sizes])
        if trainer.world_size > 1:  # every rank ends with the same numbers (NaN anywhere stays NaN)
            packed = trainer.strategy.reduce(packed, reduce_op="mean")
        n = len(self.slots)
        small, big, (b_small, b_big) = packed[:n], packed[n : 2 * n], packed[2 * n :].tolist()
        if self.ema_small is None or self.ema_small.shape != small.shape:
            self.ema_small, self.ema_big = torch.zeros_like(small), torch.zeros_like(big)
            self.ema_counts, self.ema_steps = torch.zeros_like(small), 0
        self.ema_small, self.ema_big, self.ema_counts = (
            t.to(small.device) for t in (self.ema_small, self.ema_big, self.ema_counts)
        )
        fresh = small.isfinite() & big.isfinite()
        self.ema_small = torch.where(fresh, self.ema_small.lerp(small, 1 - self.ema), self.ema_small)
        self.ema_big = torch.where(fresh, self.ema_big.lerp(big, 1 - self.ema), self.ema_big)
        self.ema_counts = self.ema_counts + fresh
        self.ema_steps += 1
        if math.isfinite(b_small) and math.isfinite(b_big):
            self.b_small, self.b_big = b_small, b_big
        self.last["b_simple"] = self.b_simple()

    def _smoothed(self) -> tuple[Tensor, Tensor, Tensor]:
        """Bias-corrected EMAs of the small- and large-batch squared norms, and which slots have any."""
        counts = self.ema_counts
        valid = counts > 0
        correction = torch.where(valid, 1 - self.ema**counts, torch.ones_like(counts))
        return self.ema_small / correction, self.ema_big / correction, valid

    def b_simple(self) -> float:
        """The smoothed B_simple over all measured layers, in examples (NaN until it is positive).

        Every rank holds the same value (the measurements are reduced across processes).
        """
        if self.ema_small is None or not self.b_small < self.b_big:
            return float("nan")
        small, big, valid = self._smoothed()
        if not valid.any():
            return float("nan")
        return _ratio(noise_scale(small[valid].sum(), big[valid].sum(), self.b_small, self.b_big))

    def _metrics(
        self, trainer: pl.Trainer, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, cache: SpectralCache
    ) -> dict[str, float]:
        b, B = self.b_small, self.b_big
        if not b < B:
            return {}
        small, big, valid = self._smoothed()
        p, q = self.prefix, self.layer_prefix
        total = noise_scale(small[valid].sum(), big[valid].sum(), b, B)
        per_slot = noise_scale(small, big, b, B)
        # the batch the optimizer sees now (examples): micro-batch x accumulation x processes
        global_batch = B if self.mode == "two_batch" else B * trainer.accumulate_grad_batches * trainer.world_size
        metrics = {  # the two unbiased pieces as they are (either can be negative), the ratio if both > 0
            f"{p}b_simple": _ratio(total),
            f"{p}grad_sq": float(total.grad_sq),
            f"{p}trace_sigma": float(total.trace_sigma),
            f"{p}global_batch": float(global_batch),
        }
        tokens = tokens_per_example(trainer.lightning_module)
        if tokens is not None:
            metrics[f"{p}global_batch_tokens"] = float(global_batch) * tokens
        for i, n in enumerate(self.slots):
            if valid[i]:
                metrics[f"{q}b_simple/{n}"] = _ratio(NoiseScale(*(x[i] for x in per_slot)))
        if self.mode == "layernorm":
            return _with_tokens(metrics, p, tokens)
        # Muon's B_crit per matrix: the direction the optimizer orthogonalises, the per-example noise per entry
        groups = {id(q): g for g in optimizer.param_groups for q in g["params"]}
        views = self.matrix_views(trainer.lightning_module, optimizer, params)
        names = [n for i, n in enumerate(self.slots) if valid[i] and params[n].grad is not None]
        noise: dict[str, tuple[float, bool, float]] = {}  # name -> (beta, nesterov, factor of the mean's noise)
        for n in names:  # a gather under FSDP2: every rank
            mean, noise[n] = _mean_gradient(params[n], groups.get(id(params[n]), {}), optimizer, trainer.global_step)
            cache.matrices("mean_gradient", n, mean, views[n])
        if not trainer.is_global_zero:
            return {}
        index = {n: i for i, n in enumerate(self.slots)}
        buckets: dict[tuple, list[tuple[str, str]]] = {}  # (shape, beta, nesterov) -> [(key, name)]
        for n in names:
            beta, nesterov, _ = noise[n]
            for key in view_keys(n, views[n], tuple(params[n].shape)):
                shape = tuple(cache.matrix("mean_gradient", key).shape)
                buckets.setdefault((shape, beta, nesterov), []).append((key, n))
            metrics[f"{q}sigma2/{n}"] = float(per_slot.trace_sigma[index[n]]) / params[n].numel()
            group = groups.get(id(params[n]), {})
            if group.get("use_muon"):
                metrics[f"{p}momentum_factor/{group.get('name', 'muon')}"] = momentum_noise_factor(beta, nesterov)
        b_crit: dict[str, float] = {}
        weight: dict[str, float] = {}
        for (_, beta, nesterov), members in buckets.items():
            keys = [key for key, _ in members]
            spectra = cache.spectra("mean_gradient", keys)
            sigma2 = torch.tensor([float(per_slot.trace_sigma[index[n]]) / params[n].numel() for _, n in members])
            batch = torch.tensor([global_batch / noise[n][2] for _, n in members])
            est = muon_critical_batch_size(
                torch.stack([cache.matrix("mean_gradient", key) for key in keys]),
                sigma2.clamp_min(0),
                momentum=beta,
                nesterov=nesterov,
                batch_size=batch,
                singular_values_=torch.stack([spectra[key] for key in keys]),
            )
            for j, key in enumerate(keys):
                metrics[f"{q}rank/{key}"] = float(est.rank[j])
                metrics[f"{q}sensitivity/{key}"] = _num(est.sensitivity[j])
                value = _num(est.b_crit[j])
                if math.isfinite(value) and sigma2[j] > 0:
                    b_crit[f"{q}b_crit/{key}"], weight[key] = value, float(est.nuclear_norm[j])
        metrics.update(b_crit)
        metrics.update(aggregates(f"{p}b_crit", b_crit))
        total = sum(weight.values())
        if total > 0:
            metrics[f"{p}b_crit"] = sum(weight[k] * b_crit[f"{q}b_crit/{k}"] for k in weight) / total
        return _with_tokens(metrics, p, tokens)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the EMAs (policy: :meth:`MonitorCallback.load_state_dict`); a checkpoint from
        before per-slot counts gets ``ema_counts`` from ``ema_steps``."""
        super().load_state_dict(state_dict)
        if state_dict.get("ema_counts") is None:
            self.ema_counts = None if self.ema_small is None else torch.full_like(self.ema_small, float(self.ema_steps))
        self.last["b_simple"] = self.b_simple()


_SUPPORTED = "nn.Linear, nn.Conv1d/2d/3d, Hugging Face Conv1D and nn.Embedding weights"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def per_example_layer(named: dict[str, nn.Module], param_name: str) -> tuple[nn.Module, str] | None:
    """``(module, kind)`` when parameter ``param_name`` is a weight with a per-example norm form
    (kind ``"linear"``, ``"conv"`` or ``"embedding"``), else None.

    A conv subclass with its own ``forward`` (e.g. one that pads dynamically) is not trusted to
    compute what its attributes say, nor an embedding that rescales its gradient by frequency.

    Example:
        >>> named = dict(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2)).named_modules())
        >>> per_example_layer(named, "0.weight")[1], per_example_layer(named, "1.weight")
        ('conv', None)
    """
    owner, _, attr = param_name.rpartition(".")
    module = named.get(owner)
    if attr != "weight" or module is None:
        return None
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return module, "linear"
    if isinstance(module, _CONVS) and type(module).forward in tuple(c.forward for c in _CONVS):
        return module, "conv"
    plain_embedding = isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
    if plain_embedding and not (module.scale_grad_by_freq or module.sparse):
        return module, "embedding"
    return None


def _per_example_norms(kind: str, module: nn.Module, x: Tensor, g: Tensor, method: str) -> PerExampleNorms:
    if kind == "norm":
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return norm_grad_norms(
            x,
            g,
            len(module.normalized_shape),
            eps,
            rms=isinstance(module, nn.RMSNorm),
            weight=getattr(module, "weight", None) is not None,
            bias=getattr(module, "bias", None) is not None,
        )
    if kind == "conv":
        return conv_grad_norms(
            x,
            g,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            method=method,
        )
    if kind == "embedding":
        return embedding_grad_norms(x, g, module.padding_idx)
    return linear_grad_norms(x, g, method)


def _norm_modules(named: dict[str, nn.Module]) -> list[str]:
    return [
        n
        for n, m in named.items()
        if isinstance(m, _NORMS) and (getattr(m, "weight", None) is not None or getattr(m, "bias", None) is not None)
    ]


def _types(named: dict[str, nn.Module], names: Sequence[str]) -> str:
    """``"ConvTranspose2d: up.weight"``-style summary of the layer types of ``names``."""
    by_type: dict[str, list[str]] = {}
    for n in names:
        module = named.get(n.rpartition(".")[0])
        by_type.setdefault(type(module).__name__ if module is not None else "a bare parameter", []).append(n)
    return "; ".join(f"{t}: {len(ns)} layer(s)" for t, ns in by_type.items()) or "no layer"


def _has_accumulation_scheduler(trainer: pl.Trainer) -> bool:
    return any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks)


def _mean_gradient(
    param: Tensor, group: dict, optimizer: torch.optim.Optimizer, step: int
) -> tuple[Tensor, tuple[float, bool, float]]:
    """The mean-gradient estimate behind Muon's B_crit and the noise it carries.

    For a Muon parameter: the direction the optimizer is about to orthogonalise, ``lerp(buf, g,
    1 - beta)`` and with Nesterov ``lerp(g, buf', beta)`` (as :func:`lightning_muon.muon_direction`,
    on copies), divided by the sum of its weights over the gradients so far (``step + 1``, or 1
    without a buffer yet), so that its noise is ``momentum_noise_factor(beta, nesterov, t)`` times
    one batch's. Elsewhere the gradient itself (``beta = 0``). Returns ``(mean, (beta, nesterov,
    factor))``; gathers a DTensor (every rank)."""
    grad = full(param.grad.detach()).float()
    if not group.get("use_muon"):
        return grad, (0.0, False, 1.0)
    beta, nesterov = float(group.get("momentum", 0.0)), bool(group.get("nesterov", False))
    buf = optimizer.state.get(param, {}).get("momentum_buffer")
    t = 1 if buf is None else step + 1
    buf = torch.zeros_like(grad) if buf is None else full(buf.detach()).float()
    buf = buf.lerp(grad, 1 - beta)
    direction = grad.lerp(buf, beta) if nesterov else buf
    total = 1 - beta ** (t + 1 if nesterov else t)
    return direction / total, (beta, nesterov, momentum_noise_factor(beta, nesterov, t))


def _sq_norm(grad: Tensor | None, like: Tensor) -> Tensor:
    """Squared norm of a gradient (a DTensor's full norm), NaN when there is none."""
    if grad is None:
        return like.new_tensor(float("nan"))
    return torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square().to(like.device)


def _with_tokens(metrics: dict[str, float], prefix: str, tokens: int | None) -> dict[str, float]:
    """``metrics`` with ``b_simple_tokens`` and ``b_crit_tokens`` (the estimates x ``tokens``), if known."""
    if tokens is not None:
        for tag in ("b_simple", "b_crit"):
            if math.isfinite(metrics.get(f"{prefix}{tag}", math.nan)):
                metrics[f"{prefix}{tag}_tokens"] = metrics[f"{prefix}{tag}"] * tokens
    return metrics


def _num(x: Tensor | float) -> float:
    """A float for the loggers; a negative estimate (noise-dominated difference) becomes NaN (not logged)."""
    x = float(x)
    return x if math.isfinite(x) and x >= 0 else float("nan")


def _ratio(est: NoiseScale) -> float:
    """B_simple, or NaN while |G|^2 or tr(Sigma) is estimated <= 0 (noise-dominated; not logged)."""
    if not (float(est.grad_sq) > 0 and float(est.trace_sigma) > 0):
        return float("nan")
    return float(est.b_simple)
