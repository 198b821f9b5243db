"""The two base classes of the monitors: what every monitor shares, and the spectral template.

:class:`MonitorCallback` is what every monitor shares and nothing more: the constructor arguments
``every_n_steps`` / ``include`` / ``exclude`` and the layer selection they drive, logging to
every logger from rank 0 and into ``trainer.callback_metrics`` on every rank, the TensorBoard
custom-scalars layout, the checkpoint policy, and the declaration of what the monitor asks of the
shared spectral cache (:mod:`._cache`). A monitor with its own per-step logic (e.g.
:class:`CriticalBatchSizeMonitor`, which measures inside backward) subclasses it directly.

:class:`SpectralMonitor` adds the template the matrix monitors share: at every ``every_n_steps``
optimizer step, in ``on_before_optimizer_step`` (gradients final: accumulated, unscaled,
all-reduced, not yet clipped), it calls :meth:`SpectralMonitor.compute` and logs what it returns.

A new monitor:

* sets ``prefix`` (headline tags start with it, e.g. ``"my_metric/"``; per-matrix ones with
  ``layer_prefix``, ``"per_layer/my_metric/"``) and optionally ``charts`` (custom-scalars chart
  title -> tag regex, for the headline) and ``layer_metrics`` (the per-layer charts);
* validates its own arguments in ``__init__`` (``ValueError`` at construction) and calls
  ``super().__init__(every_n_steps, include, exclude)``;
* overrides :meth:`MonitorCallback.cache_requests` to declare what it will ask of the cache
  (built with :meth:`MonitorCallback.request`), if it uses the cache;
* lists checkpointed attributes in ``state_attributes`` (see :meth:`MonitorCallback.load_state_dict`);
* implements ``compute(trainer, optimizer, params, cache) -> {tag: value}`` (a
  :class:`SpectralMonitor`), or its own hooks, logging with :meth:`MonitorCallback.log_metrics`.
"""

from __future__ import annotations

import math
import re
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ..diagnostics.attention import QKObserver, find_qk_attention
from ..optim.groups import views as group_views
from ..parallel.dtensor import is_dtensor
from ..routing import matching_pattern, route_parameters, why_not_muon
from ..routing.matrix_view import MatrixView, matrix_view_for
from ..validation import check_patterns, check_positive_int
from .cache import CacheRequest, SpectralCache, declare, drop_cache, step_cache, withdraw

# Custom-scalars categories per TensorBoard writer, merged so that monitors can be combined.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: top-level tag group of every per-matrix value (``per_layer/<monitor>/...``): TensorBoard's Scalars
#: page groups tags by the part before the first ``/``, so the detail gets a group of its own
LAYER_GROUP = "per_layer/"
#: the custom-scalars chart opening the page: the training and validation losses, whatever their names
LOSS_CHART = {"loss": r"^(.*[/_])?loss($|[/_])"}


def layer_role(name: str) -> str:
    """``name`` with its numeric components (block indices) as ``*``: the role of a layer across depth.

    Example:
        >>> layer_role("model.h.3.attn.c_attn.weight/q"), layer_role("net.0.weight")
        ('model.h.*.attn.c_attn.weight/q', 'net.*.weight')
    """
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def layer_depth(name: str, default: int) -> int:
    """The first numeric component of ``name`` (its block index), else ``default``.

    Example:
        >>> layer_depth("model.h.3.mlp.c_fc.weight", 0), layer_depth("head.weight", 7)
        (3, 7)
    """
    return next((int(part) for part in name.split("/")[0].split(".") if part.isdigit()), default)


def role_charts(prefix: str, names: Iterable[str], metrics: Sequence[str] = ("",)) -> dict[str, str]:
    r"""Custom-scalars charts of per-layer tags ``<prefix><metric>/<name>[/<label>]``: one chart per
    metric and layer role (:func:`layer_role`), so that each draws one line per block, not every layer.

    Example:
        >>> role_charts("per_layer/stable_rank/", ["h.0.fc.weight", "h.1.fc.weight"])
        {'h.*.fc.weight': '^per_layer/stable_rank/h\\.\\d+\\.fc\\.weight(/|$)'}
    """
    roles = dict.fromkeys(layer_role(n) for n in names)
    charts = {}
    for metric in metrics:
        head = prefix + (f"{metric}/" if metric else "")
        for role in roles:
            pattern = r"\.".join(r"\d+" if part == "*" else re.escape(part) for part in role.split("."))
            charts[f"{metric}: {role}" if metric else role] = f"^{re.escape(head)}{pattern}(/|$)"
    return charts


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


def aggregates(prefix: str, values: dict[str, float]) -> dict[str, float]:
    """``prefix/mean``, ``prefix/min`` and ``prefix/max`` over the finite per-layer values."""
    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        return {}
    return {f"{prefix}/mean": sum(finite) / len(finite), f"{prefix}/min": min(finite), f"{prefix}/max": max(finite)}


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without NaN or infinite values: what the monitors log (an undefined value, e.g. the
    stable rank of an all-zero matrix, is left out rather than logged as NaN)."""
    return {tag: value for tag, value in metrics.items() if math.isfinite(value)}


def tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    """The Trainer's first TensorBoardLogger, if any (histograms, figures and the layout need one)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _copy(value: Any, cpu: bool) -> Any:
    """A copy of checkpoint state that shares no storage with the live value (tensors to CPU if ``cpu``)."""
    if isinstance(value, Tensor):
        value = value.detach()
        return (value.cpu() if cpu else value).clone()
    if isinstance(value, dict):
        return {k: _copy(v, cpu) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v, cpu) for v in value)
    return value


def save_attributes(source: object, keys: Iterable[str]) -> dict[str, Any]:
    """``{key: copy of source.key}`` for a callback's ``state_dict`` (tensors copied to CPU)."""
    return {k: _copy(getattr(source, k), cpu=True) for k in keys}


def restore_attributes(
    target: object, state_dict: dict[str, Any], keys: Iterable[str], optional: Iterable[str] = ()
) -> None:
    """The checkpoint policy of every callback in this package: lenient, with a warning.

    Each of ``keys`` present in ``state_dict`` is set on ``target`` (a copy). Unknown keys are
    ignored and missing ones keep the attribute's current value, each with a ``rank_zero_warn``
    naming them (a checkpoint of another version still loads; nothing fails mid-resume). Keys in
    ``optional`` may be missing silently (added in a later version; the caller derives them).
    """
    keys, where = tuple(keys), type(target).__name__
    unknown = sorted(set(state_dict) - set(keys))
    missing = [k for k in keys if k not in state_dict and k not in set(optional)]
    if unknown:
        rank_zero_warn(f"{where}: ignoring unknown checkpoint state {unknown}")
    if missing:
        rank_zero_warn(f"{where}: the checkpoint state lacks {missing}; they keep their current values")
    for k in keys:
        if k in state_dict:
            setattr(target, k, _copy(state_dict[k], cpu=False))


class MonitorCallback(Callback):
    """What every monitor shares: layer selection, logging cadence, logging, layout, state.

    Subclasses set ``prefix``, ``charts`` and ``state_attributes``, may override
    :meth:`cache_requests`, and log with :meth:`log_metrics` from their own hooks (or subclass
    :class:`SpectralMonitor`, which calls ``compute`` at each logging step).

    Args:
        every_n_steps: log at optimizer steps ``0, every_n_steps, 2 * every_n_steps, ...``.
        include: fnmatch patterns on parameter names (or one of their dotted components) of the
            matrices to monitor; ``None``: the matrices :func:`lightning_muon.route_parameters`
            sends to Muon.
        exclude: patterns removed from that selection.

    Raises:
        ValueError: at construction, ``every_n_steps < 1`` or patterns that are not a list of strings.
        MisconfigurationException: at setup, a Trainer without a logger, or no layer selected.

    Example:
        >>> from lightning_muon.callbacks import MonitorCallback
        >>> class GradNormMonitor(MonitorCallback):  # own hook, no spectral template
        ...     prefix = "grad_norm/"
        ...     def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        ...         if self.is_logging_step(trainer.global_step):
        ...             norms = {f"{self.prefix}{n}": float(p.grad.norm()) for n, p in self.params(pl_module).items()}
        ...             self.log_metrics(trainer, norms)
        >>> GradNormMonitor(every_n_steps=10).state_key
        "GradNormMonitor{'every_n_steps': 10, 'include': None, 'exclude': ()}"
    """

    #: tags start with this (e.g. ``"stable_rank/"``); its stem names the custom-scalars category
    prefix: str = ""
    #: chart title -> tag regex, for the custom-scalars layout (one category per monitor: the headline)
    charts: dict[str, str] = {}
    #: the metrics logged per layer under :attr:`layer_prefix` (``""``: one, ``<layer_prefix><name>``);
    #: their charts (:meth:`layer_charts`) form a second category, closed when the page opens
    layer_metrics: tuple[str, ...] = ()
    #: attributes saved in checkpoints (see :meth:`load_state_dict`)
    state_attributes: tuple[str, ...] = ()
    #: of those, the ones an older checkpoint may lack (no warning; the subclass derives them)
    optional_state: tuple[str, ...] = ()
    #: whether setup refuses a Trainer without a logger (a monitor has nothing else to do)
    requires_logger: bool = True

    def __init__(
        self,
        every_n_steps: int = 100,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        where = type(self).__name__
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps", where)
        self.include = check_patterns(include, "include", where)
        self.exclude = check_patterns(exclude, "exclude", where) or ()
        self.layers: list[str] = []
        self._route_views: dict[str, str | None] | None = None  # the default routing's views (fallback)
        self._unpublished: dict[str, float] = {}  # rank 0: logged, not yet in callback_metrics
        self._published_until = 0  # global_step at the previous batch end

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, include=self.include, exclude=self.exclude)

    @property
    def layer_prefix(self) -> str:
        """Where the per-layer tags go: ``per_layer/<prefix>`` (e.g. ``per_layer/stable_rank/``), a
        top-level group of its own on TensorBoard's Scalars page, apart from the headline numbers."""
        return LAYER_GROUP + self.prefix

    def layer_charts(self) -> dict[str, str]:
        """Custom-scalars charts of the per-layer tags: one per metric of :attr:`layer_metrics` and
        layer role (:func:`role_charts`), or one for all when the layers are not known yet."""
        if not self.layer_metrics:
            return {}
        if not self.layers:
            return {
                m or "per layer": f"^{re.escape(self.layer_prefix + (m + '/' if m else ''))}"
                for m in self.layer_metrics
            }
        return role_charts(self.layer_prefix, self.layers, self.layer_metrics)

    # -------------------------------------------------------------- what a subclass provides
    def cache_requests(self) -> list[CacheRequest]:
        """What this monitor will ask of the shared spectral cache (default: nothing).

        Declared at setup, once :attr:`layers` is known; the cache serves each request the
        cheapest way given every monitor's requests (e.g. sigma_1 from a spectrum that another
        monitor asked for at this step). Build entries with :meth:`request`.
        """
        return []

    def request(self, kind: str, product: str) -> CacheRequest:
        """A request for ``product`` (``"spectrum"``, ``"sigma_max"`` or ``"frames"``) of the
        ``kind`` matrices (``"weight"``, ``"grad"``, ``"update"``) of :attr:`layers`, at this
        monitor's logging steps."""
        return CacheRequest(kind, product, tuple(self.layers), self.every_n_steps)

    def select(self, pl_module: pl.LightningModule) -> list[str]:
        """The names of what this callback watches (default: the matrices of :func:`select_layers`);
        called at setup, or at fit start when the layers are made in ``configure_model``."""
        return select_layers(pl_module, self.include, self.exclude, type(self).__name__)

    # -------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        where = type(self).__name__
        if self.requires_logger and not trainer.loggers:
            raise MisconfigurationException(
                f"{where}: the Trainer has no logger; pass logger=TensorBoardLogger(...) (or any logger)."
            )
        if any(True for _ in pl_module.parameters()):  # else: layers made in configure_model
            self.layers = self.select(pl_module)
            declare(trainer, self, self.cache_requests())
        self._write_layout(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._route_views = None
        if not self.layers:
            self.layers = self.select(pl_module)
            declare(trainer, self, self.cache_requests())
            self._write_layout(trainer)  # the per-layer charts, now that the layers are known

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unpublished, self._published_until = {}, trainer.global_step

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        withdraw(trainer, self)

    def _write_layout(self, trainer: pl.Trainer) -> None:
        """Add this monitor's categories to the TensorBoard custom-scalars layout (rank 0).

        The page opens on the loss (:data:`LOSS_CHART`), then every monitor's headline category,
        then the per-layer categories (``<stem> per layer``), closed until clicked.
        """
        tb = tensorboard(trainer)
        if tb is None or not trainer.is_global_zero:
            return
        writer = tb.experiment
        headline, detail = _LAYOUTS.setdefault(writer, ({"loss": LOSS_CHART}, {}))
        stem = self.prefix.rstrip("/")
        headline[stem] = self.charts
        if self.layer_metrics:
            detail[f"{stem} per layer"] = self.layer_charts()
        _add_layout(writer, headline, detail)

    # -------------------------------------------------------------- per step
    def is_logging_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` is one this monitor logs at."""
        return step % self.every_n_steps == 0

    def params(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The monitored parameters, by name, in :attr:`layers` order."""
        named = dict(pl_module.named_parameters())
        return {n: named[n] for n in self.layers}

    def matrix_views(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, params: dict[str, Tensor]
    ) -> dict[str, MatrixView]:
        """How each monitored parameter is seen as matrices: its Muon group's matrix view (what the
        optimizer orthogonalises: each expert of a stack, each q/k/v block or head, a conv kernel's
        ``(out, rest)``), else the view the default routing gives it (:func:`lightning_muon.route_parameters`,
        e.g. under an AdamW baseline), else one ``(shape[0], rest)`` matrix."""
        by_id = {
            id(p): view
            for g in getattr(optimizer, "param_groups", ())
            if g.get("use_muon")
            for p, view in group_views(g)
        }
        if any(id(p) not in by_id for p in params.values()) and self._route_views is None:
            self._route_views = {r.name: r.matrix for r in route_parameters(pl_module, warn=False)}
        return {
            n: by_id.get(id(p)) or matrix_view_for(tuple(p.shape), (self._route_views or {}).get(n))
            for n, p in params.items()
        }

    @staticmethod
    def takes_part(trainer: pl.Trainer, params: dict[str, Tensor]) -> bool:
        """Whether this rank computes: rank 0 (DDP ranks hold the same all-reduced tensors), or
        every rank when the weights are sharded (gathering them is a collective)."""
        return trainer.is_global_zero or any(is_dtensor(p) for p in params.values())

    def log_metrics(self, trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
        """Send ``metrics`` to every logger at ``step`` (default ``trainer.global_step``), from rank 0
        only, and keep them for ``trainer.callback_metrics`` (published to every rank after the batch)."""
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step if step is None else step)
            self._unpublished.update(metrics)

    @override
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

    # -------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """A copy of the ``state_attributes`` (tensors on CPU)."""
        return save_attributes(self, self.state_attributes)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the ``state_attributes``, leniently: unknown keys are ignored and missing ones
        keep their current value, each with a warning (see :func:`restore_attributes`)."""
        restore_attributes(self, state_dict, self.state_attributes, self.optional_state)


class SpectralMonitor(MonitorCallback, ABC):
    """The template of the matrix monitors: :meth:`compute` at each logging step, its metrics logged.

    At optimizer step ``s`` with ``s % every_n_steps == 0``, in ``on_before_optimizer_step``,
    :meth:`compute` gets the optimizer (unwrapped from Lightning's ``LightningOptimizer``), the
    monitored parameters and the step's shared :class:`~lightning_muon.callbacks.cache.SpectralCache`;
    what it returns goes to :meth:`log_metrics` (NaN and infinite values left out: an undefined
    value is not logged). It runs on rank 0, and on every rank when the weights are sharded.
    :meth:`MonitorCallback.matrix_views` says how the optimizer sees each parameter as matrices;
    ``cache.matrices(kind, name, tensor, view)`` stores them, one key per matrix.
    Arguments and errors: :class:`MonitorCallback`.

    Example:
        >>> from lightning_muon.callbacks import SpectralMonitor
        >>> class TopSingularValueMonitor(SpectralMonitor):
        ...     prefix = "sigma_max/"
        ...     def cache_requests(self):
        ...         return [self.request("weight", "sigma_max")]
        ...     def compute(self, trainer, optimizer, params, cache):
        ...         for name, p in params.items():
        ...             cache.matrix("weight", name, p)  # gathers a sharded weight: every rank
        ...         if not trainer.is_global_zero:
        ...             return {}
        ...         sigma = cache.sigma_max("weight", params, vectors={}, num_iters=30)
        ...         return {f"{self.prefix}{n}": float(s) for n, s in sigma.items()}
        >>> TopSingularValueMonitor(every_n_steps=50).every_n_steps
        50
    """

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if not self.is_logging_step(step):
            return
        params = self.params(pl_module)
        if not self.takes_part(trainer, params):
            return  # DDP: rank 0 holds the same all-reduced tensors and does the work
        cache = step_cache(trainer, step)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
        self.log_metrics(trainer, finite(self.compute(trainer, optimizer, params, cache)))

    @abstractmethod
    def compute(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        cache: SpectralCache,
    ) -> dict[str, float]:
        """Metrics ``{tag: value}`` for this step.

        Args:
            trainer: the Trainer (``global_step``, ``is_global_zero``, loggers).
            optimizer: the optimizer about to step (``param_groups``, ``state``).
            params: the monitored parameters by name; gradients are final.
            cache: this step's shared cache: store a matrix with ``cache.matrix(kind, name,
                tensor)`` on every rank that takes part (a gather when sharded), then read
                ``spectra`` / ``sigma_max`` / ``frames`` on rank 0 and return ``{}`` elsewhere.
        """


class AttentionCallback(MonitorCallback):
    """The base of the callbacks that watch attention logits (:class:`AttentionLogitMonitor`, :class:`QKClip`).

    It watches the attention modules of the model (``include``/``exclude`` are fnmatch patterns on
    their names; default: every module :func:`lightning_muon.find_qk_attention` finds) with a
    :class:`~lightning_muon.diagnostics.attention.QKObserver`: forward hooks record each head's
    largest logit over the training forward passes of the steps :meth:`observes`; after such an
    optimizer step the maxima, MAX all-reduced over the ranks (every rank takes part and gets the
    same values), go to :meth:`on_step_maxima`.
    """

    def __init__(self, every_n_steps: int, include: Sequence[str] | None = None, exclude: Sequence[str] = ()):
        super().__init__(every_n_steps, include, exclude)
        self.observer: QKObserver | None = None
        self._step = -1

    def select(self, pl_module: pl.LightningModule) -> list[str]:
        found = find_qk_attention(pl_module)
        selected = [
            n
            for n in found
            if (self.include is None or matching_pattern(n, self.include)) and not matching_pattern(n, self.exclude)
        ]
        if not selected:
            raise MisconfigurationException(
                f"{type(self).__name__}: no attention module to watch"
                + (f" among {list(found)} with include={self.include}, exclude={list(self.exclude)}" if found else "")
                + ". Supported: torch.nn.MultiheadAttention, Hugging Face attention (Llama-style q_proj/k_proj, "
                "BERT's query/key, GPT-2's c_attn) and modules implementing the QK-clip protocol "
                "(n_head, qk_logit_max(args, kwargs), qk_clip_rows(); see lightning_muon.diagnostics.attention "
                "and docs/qk-clip.md)."
            )
        return selected

    def observes(self, step: int) -> bool:
        """Whether the forward passes of optimizer step ``step`` are watched (default: logging steps)."""
        return self.is_logging_step(step)

    def on_step_maxima(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, maxima: dict[str, Tensor]
    ) -> None:
        """What to do with each watched head's largest logit of optimizer step ``step`` (``-inf``: not called)."""

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        found = find_qk_attention(pl_module)
        self.observer = QKObserver({n: found[n] for n in self.layers})

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.observer is not None:
            self.observer.remove()
            self.observer = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._step = trainer.global_step
        if self.observer is not None:
            self.observer.enabled = self.observes(self._step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        obs = self.observer
        if obs is not None:
            obs.enabled = False
            if trainer.global_step != self._step and self.observes(self._step):  # the optimizer stepped
                maxima = obs.reduced(_all_reduce_max(trainer))
                obs.reset()
                self.on_step_maxima(trainer, pl_module, self._step, maxima)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _add_layout(writer: Any, headline: dict[str, dict[str, str]], detail: dict[str, dict[str, str]]) -> None:
    """Write the custom-scalars layout: ``headline`` categories open, ``detail`` ones closed."""
    layout = {
        category: {title: ["Multiline", [regex]] for title, regex in charts.items()}
        for category, charts in {**headline, **detail}.items()
        if charts
    }
    try:
        from tensorboard.plugins.custom_scalar import layout_pb2
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import custom_scalars
    except ImportError:  # pragma: no cover - tensorboardX's writer: every category open
        writer.add_custom_scalars(layout)
        return
    if not isinstance(writer, SummaryWriter):  # pragma: no cover - tensorboardX's writer
        writer.add_custom_scalars(layout)
        return
    summary = custom_scalars(layout)
    tensor = summary.value[0].tensor
    proto = layout_pb2.Layout.FromString(tensor.string_val[0])
    for category in proto.category:
        category.closed = category.title in detail
    tensor.string_val[0] = proto.SerializeToString()
    writer._get_file_writer().add_summary(summary)


def _all_reduce_max(trainer: pl.Trainer):
    """A function MAX-reducing a tensor over all ranks (``None`` on one process)."""
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None

    def reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    return reduce
