"""``Muon``: one ``torch.optim.Optimizer`` with Muon groups and AdamW groups.

Hidden weight matrices get Muon (momentum orthogonalised by Newton–Schulz); everything else gets
AdamW, in the same optimizer object, so Lightning's automatic optimization, LR schedulers,
gradient clipping, checkpoints and LearningRateMonitor see a single optimizer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_muon import Muon, muon_param_groups
    >>> model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    >>> optimizer = Muon(muon_param_groups(model), lr=0.02, adjust_lr="original", adamw_lr=3e-4)
    >>> [(g["name"], len(g["params"])) for g in optimizer.param_groups]
    [('muon', 1), ('adamw', 2), ('adamw_no_decay', 2)]
    >>> x = torch.tensor([1, 2, 3])
    >>> loss = model(x).sum(); loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw_functional

from .buckets import Bucket, orthogonalize_buckets
from .distributed import (
    AUTO,
    UNSUPPORTED_STRATEGY,
    all_finite,
    check_not_flat_shard,
    is_dtensor,
    local,
    local_grad,
    mesh_domain,
    process_group_of,
)
from .functional import ADJUST_LR, apply_muon_update, muon_direction
from .low_precision import check_momentum_dtype, rounding_key, stochastic_round
from .newton_schulz import METHODS
from .normuon import NORMUON_BETA2, NORMUON_EPS, VARIANTS, neuron_scale
from .precision import NS_DTYPES, agree_ns_dtype, resolve_ns_dtype
from .routing import groups_from_routes, route_named_parameters, why_not_muon
from .sharded import check_dtensor_param, global_index, sum_rows_over_mesh
from .structure import MatrixView, matrix_view_for

__all__ = ["Muon", "NonFiniteGradientError"]

_NONFINITE = ("raise", "skip")
#: Settings of a Muon group (also their keys in ``Muon.defaults``).
_MUON_KEYS = (
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "ns_method",
    "ns_steps",
    "ns_dtype",
    "adjust_lr",
    "variant",
    "normuon_beta2",
    "normuon_eps",
    "momentum_dtype",
)
_MUON_ONLY = tuple(k for k in _MUON_KEYS if k not in ("lr", "weight_decay"))
#: Seed of the stochastic rounding of low-precision momentum (the bits are a hash of it, the
#: parameter's position in the optimizer, its rounding step and each element's global index).
_ROUNDING_SEED = 0x5EED
#: Settings of an AdamW group -> their keys in ``Muon.defaults`` (the constructor's argument names).
_ADAMW_KEYS = {
    "lr": "adamw_lr",
    "betas": "adamw_betas",
    "eps": "adamw_eps",
    "weight_decay": "adamw_weight_decay",
    "foreach": "foreach",
}
#: torch optimizer options Muon does not implement, and what to do instead.
_UNSUPPORTED = {
    "maximize": "minimise the negated objective instead (loss = -objective)",
    "capturable": "CUDA-graph capture of the step is not implemented",
    "differentiable": "differentiating through the step is not implemented",
    "fused": "the AdamW groups already use torch's fused kernel when foreach=None",
}


class NonFiniteGradientError(FloatingPointError):
    """A gradient contained NaN or Inf; no parameter or optimizer state was changed."""


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices and AdamW for the rest, in one optimizer.

    Each param group has a ``use_muon`` flag. ``params`` may be

    * group dicts (e.g. from :func:`lightning_muon.muon_param_groups`); a dict without
      ``use_muon`` is Muon if all its tensors are matrices, AdamW if none is;
    * ``(name, tensor)`` pairs (``model.named_parameters()``): routed by name and shape;
    * plain tensors (``model.parameters()``, as LightningCLI's ``optimizer:`` passes): routed by
      shape only, with a warning, because an embedding or output head cannot be told apart from a
      hidden matrix that way.

    Muon groups: ``buf <- momentum * buf + (1 - momentum) * g``; ``u = lerp(g, buf, momentum)``
    with Nesterov, else ``buf``; ``W <- (1 - lr * weight_decay) W - lr * scale(m, n) * O(u)``
    where ``O`` is :func:`lightning_muon.orthogonalize` and ``scale`` the ``adjust_lr`` rule: the
    functions of :mod:`lightning_muon.functional` (:func:`~lightning_muon.muon_direction`,
    :func:`~lightning_muon.apply_muon_update`), which this class calls per group. Each parameter is
    seen through its matrix view (a Muon group's ``matrix_views``, ``{name: view}``, set by
    :func:`lightning_muon.muon_param_groups`; see :mod:`lightning_muon.structure`): a conv kernel
    flattened to ``(out, rest)``, a stack of matrices or fused q/k/v blocks each orthogonalised and
    scaled on its own. Without a view, weights with more than 2 dims are flattened to
    ``(shape[0], rest)`` (:func:`~lightning_muon.matrix_view`). Same-shape matrices are
    orthogonalised together in one batched call.
    With ``variant="normuon"``, ``O`` is first normalised per row of its matrix view by NorMuon's
    second moment (:func:`lightning_muon.normuon_normalize`, rescaled to ``O``'s Frobenius norm).

    Distributed (see :mod:`lightning_muon.buckets`): under DDP (``torch.distributed``
    initialised with world size > 1) each matrix is orthogonalised on one owner rank and shared
    with one collective per shape bucket; under FSDP2, tensor parallelism, FSDP2 x TP and HSDP
    (DTensor params) momentum stays sharded and each matrix is assembled once, on its owner. FSDP1
    and DeepSpeed ZeRO flat shards are refused.

    AdamW groups run ``torch.optim.AdamW``'s own functional kernel with ``adamw_lr``,
    ``adamw_betas``, ``adamw_eps`` and ``adamw_weight_decay``.

    Defaults and one LR schedule: ``adjust_lr="match_rms_adamw"`` scales every Muon update to an
    RMS of ``0.2 * lr``, about that of an AdamW update, so one ``lr`` and one ``weight_decay``
    serve both kinds of group (``adamw_lr`` and ``adamw_weight_decay`` default to them), and a
    scheduler's multiplicative factor moves both together. For Keller Jordan's convention use
    ``adjust_lr="original"`` with ``lr=0.02`` and an explicit ``adamw_lr`` (e.g. 3e-4 to 1e-3);
    schedulers scale each group's own initial lr, so the ratio between them is kept.

    Args:
        params: see above.
        lr: learning rate of the Muon groups (and of AdamW groups when ``adamw_lr`` is None).
        momentum: Muon momentum ``beta`` in [0, 1).
        nesterov: use the Nesterov form ``lerp(g, buf, beta)``.
        weight_decay: decoupled weight decay (also AdamW's when ``adamw_weight_decay`` is None).
        ns_method: ``"polar_express"``, ``"quintic"``, their Gram Newton–Schulz forms
            ``"gram_polar_express"``, ``"gram_quintic"`` (fewer FLOPs on rectangular matrices, see
            :data:`lightning_muon.GRAM_METHODS`), or ``"svd"``. On CPU in float32/float64 the first
            two already run as their Gram forms on matrices at least 3x as wide as tall or tall as
            wide (:func:`lightning_muon.newton_schulz.default_gram`).
        ns_steps: Newton–Schulz iterations.
        ns_dtype: compute dtype of Newton–Schulz: ``"auto"`` (default: bfloat16 where the device
            computes it natively, float16 on pre-Ampere CUDA, else float32; resolved once per device,
            the same on every rank, see :mod:`lightning_muon.precision` and :meth:`resolved_ns_dtype`),
            or ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"``.
        adjust_lr: ``"original"``, ``"match_rms_adamw"`` or ``"spectral"``.
        variant: ``"muon"`` (default) or ``"normuon"``: NorMuon (arXiv 2510.05491) divides each
            row (output neuron) of the orthogonalised update by the root of an EMA of its mean
            square, then restores the update's Frobenius norm, so ``lr`` and ``adjust_lr`` keep
            their meaning (see :mod:`lightning_muon.normuon`). Extra state: one float32 per row
            (``neuron_second_moment``, kept whole on every rank, also under FSDP2).
        normuon_beta2, normuon_eps: NorMuon's EMA factor (0.95) and the ``eps`` added to the root (1e-8).
        momentum_dtype: dtype of the Muon momentum buffers: None (default) the parameter's,
            ``"float32"``, or ``"bfloat16"`` (half of float32's state), which is updated in float32
            and stored by stochastic rounding so that small changes are not lost (see
            :mod:`lightning_muon.low_precision`); a ``torch.dtype`` is accepted. AdamW groups keep
            their moments in the parameters' dtype (this setting does not apply to them).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW groups' settings.
        nonfinite: what a NaN/Inf gradient does: ``"raise"`` a :class:`NonFiniteGradientError`
            naming the parameters (default) or ``"skip"`` the whole step with a warning. Either
            way no parameter or state changes. Costs one host sync per step.
        foreach: the AdamW kernel. None (default): torch's fused kernel for plain float CPU/CUDA
            tensors (DTensors and other devices: torch decides); True/False: foreach or per-tensor.
        process_group: who shares the orthogonalisation of plain (DDP) matrices. ``"auto"``
            (default): every rank when ``torch.distributed`` runs with world size > 1; a
            ``ProcessGroup`` or 1-D ``DeviceMesh``: those ranks, which must step together; None:
            this process alone, no collective (a model trained on one rank only, or a different
            model per rank). DTensor (FSDP2) parameters always use their own mesh.
        maximize, capturable, differentiable, fused: torch optimizer options Muon does not
            implement; True raises a ValueError saying what to do instead.

    ``self.defaults`` holds both families (Muon settings by name, AdamW settings as ``adamw_lr``,
    ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``, ``foreach``), from which
    :meth:`add_param_group` fills new groups.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.01,
        ns_method: str = "polar_express",
        ns_steps: int = 5,
        ns_dtype: str = "auto",
        adjust_lr: str = "match_rms_adamw",
        variant: str = "muon",
        normuon_beta2: float = NORMUON_BETA2,
        normuon_eps: float = NORMUON_EPS,
        momentum_dtype: str | torch.dtype | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        nonfinite: str = "raise",
        foreach: bool | None = None,
        process_group: Any = AUTO,
        *,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        _refuse_unsupported(
            dict(maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused), "Muon"
        )
        if nonfinite not in _NONFINITE:
            raise ValueError(f"Muon: nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.process_group = _check_process_group(process_group)
        muon_defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_method=ns_method,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            adjust_lr=adjust_lr,
            variant=variant,
            normuon_beta2=normuon_beta2,
            normuon_eps=normuon_eps,
            momentum_dtype=momentum_dtype,
        )
        adamw_defaults = dict(
            lr=lr if adamw_lr is None else adamw_lr,
            betas=tuple(adamw_betas),
            eps=adamw_eps,
            weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            foreach=foreach,
        )
        _validate_muon(muon_defaults, "Muon")
        muon_defaults["momentum_dtype"] = check_momentum_dtype(momentum_dtype, "Muon")
        _validate_adamw(adamw_defaults, "Muon", names=_ADAMW_KEYS)
        # Both families, so add_param_group can fill any new group: Muon settings under their own
        # names, AdamW settings under the constructor's names (adamw_lr, ...; foreach as is).
        defaults = dict(muon_defaults)
        defaults.update({_ADAMW_KEYS[k]: v for k, v in adamw_defaults.items()})
        super().__init__(_as_groups(params), defaults)  # calls self.add_param_group per group

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Route, fill and validate ``param_group`` exactly as the constructor does, then add it.

        ``param_group["params"]`` may hold tensors or ``(name, tensor)`` pairs. With ``use_muon``
        the group is one family and missing settings come from ``self.defaults`` (an AdamW
        group's ``lr``, ``betas``, ``eps``, ``weight_decay`` from ``adamw_lr``, ...). Without it,
        the tensors are routed (by name and shape, or by shape alone) and a group holding both
        kinds is split: AdamW part(s) first, the Muon part last (so code that adjusts the group
        it just added via ``param_groups[-1]``, as Lightning's ``BackboneFinetuning`` does,
        reaches the hidden matrices). In a split group ``lr`` is the Muon part's; the AdamW part
        keeps the constructor's ``adamw_lr / lr`` ratio unless the dict sets ``adamw_lr`` (also
        ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``). Names: when the optimizer's
        groups carry parameter names and the new tensors have none, they are named
        ``"<group #i>"`` (torch refuses mixing); names given to an optimizer without names are
        dropped after routing. Every check runs before the optimizer changes.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            >>> opt = Muon([{"params": [model[1].weight], "use_muon": True}], lr=0.02)
            >>> opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.002})
            >>> [(g["name"], g["use_muon"], g["lr"]) for g in opt.param_groups]
            [('muon', True, 0.02), ('adamw', False, 0.002), ('muon_1', True, 0.002)]
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"Muon.add_param_group: param_group must be a dict, got {type(param_group).__name__}")
        parts = self._route_group(param_group)
        taken = {id(p) for g in self.param_groups for p in g["params"]}
        new = [p for part in parts for p in part["params"]]
        if len({id(p) for p in new}) != len(new) or taken & {id(p) for p in new}:
            raise ValueError("some parameters appear in more than one parameter group")
        named = ("param_names" in self.param_groups[0]) if self.param_groups else ("param_names" in parts[0])
        for part in parts:
            if named and "param_names" not in part:
                part["param_names"] = [f"<{part['name']} #{i}>" for i in range(len(part["params"]))]
            elif not named:
                if part.get("matrix_views"):
                    raise ValueError(
                        f"Muon: group {part['name']!r} sets matrix_views, but this optimizer's groups carry no "
                        "parameter names to key them by; build it from named params (muon_param_groups)"
                    )
                part.pop("param_names", None)
        self.param_groups.extend(parts)

    def _route_group(self, param_group: dict[str, Any]) -> list[dict]:
        """The complete, validated group(s) that ``param_group`` becomes (nothing is changed)."""
        group = dict(param_group)
        if "params" not in group:
            raise ValueError("Muon: a param group needs a 'params' key")
        raw = group.pop("params")
        if isinstance(raw, set):
            raise TypeError("Muon: param group params must be an ordered collection (a list), not a set")
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        pairs = [isinstance(x, tuple) for x in raw]
        if any(pairs) and not all(pairs):
            raise ValueError("Muon: all params of a group should be with/without names (name, tensor)")
        names = [x[0] for x in raw] if raw and all(pairs) else None
        tensors = [x[1] for x in raw] if names is not None else raw
        for t in tensors:
            if not isinstance(t, Tensor):
                raise TypeError(f"Muon: can only optimize Tensors, got {type(t).__name__}")
            if not (t.is_leaf or t.retains_grad):
                raise ValueError("Muon: can't optimize a non-leaf Tensor")
        for label, t in zip(names or [f"of shape {tuple(t.shape)}" for t in tensors], tensors):
            check_not_flat_shard(t, f"parameter {label}")
        _refuse_unsupported(group, "Muon param group")
        start = len(self.param_groups)
        if "use_muon" in group:
            if any(k in group for k in _ADAMW_KEYS.values() if k != "foreach"):
                raise ValueError(
                    f"Muon: param group {start} sets use_muon and an adamw_* key; set lr, betas, eps, "
                    "weight_decay directly in an AdamW group (use_muon=False)"
                )
            parts = [(group, tensors, names, None)]
        else:
            parts = self._split(group, tensors, names)
        out = []
        used = {g.get("name") for g in self.param_groups}
        for i, (settings, ts, ns, kind) in enumerate(parts):
            part = self._fill(settings)
            part["params"] = list(ts)
            if not part["use_muon"]:
                part.pop("matrix_views", None)
            if ns is not None:
                part["param_names"] = list(ns)
            base = group.get("name")
            if base is None or kind is not None and len(parts) > 1:
                suffix = kind or ("muon" if part["use_muon"] else "adamw")
                part["name"] = suffix if base is None else f"{base}/{suffix}"
                part["name"] = _unique(part["name"], used)
            used.add(part["name"])
            where = f"Muon param group {start + i} ({part['name']!r})"
            (_validate_muon if part["use_muon"] else _validate_adamw)(part, where)
            if part["use_muon"]:
                part["momentum_dtype"] = check_momentum_dtype(part["momentum_dtype"], where)
            if part["use_muon"] and self.process_group is None and any(is_dtensor(p) for p in ts):
                raise ValueError(
                    f"{where}: process_group=None (this process alone) but its parameters are "
                    "DTensors sharded over a mesh; leave process_group at its default or pass the mesh"
                )
            _check_group_params(part)
            out.append(part)
        return out

    def _split(self, group: dict, tensors: list, names: list | None) -> list[tuple]:
        """Route a group without ``use_muon``: ``(settings, tensors, names, kind)`` per part, Muon last."""
        if names is not None:
            by_kind: dict[str, list[tuple[str, Tensor]]] = {}
            for g in groups_from_routes(route_named_parameters(list(zip(names, tensors)))):
                by_kind[g["name"]] = g["params"]
        else:
            by_kind = {"muon": [], "adamw": []}
            for t in tensors:
                by_kind["muon" if why_not_muon(t) is None else "adamw"].append((None, t))
            if by_kind["muon"] and by_kind["adamw"]:
                warnings.warn(
                    f"Muon routed {len(tensors)} unnamed parameters of a new param group by shape: "
                    f"{len(by_kind['muon'])} with >= 2 dims to Muon, {len(by_kind['adamw'])} to AdamW. "
                    "Shape alone cannot tell an embedding or output head from a hidden matrix; pass "
                    "(name, tensor) pairs or groups with use_muon to decide.",
                    stacklevel=4,
                )
        kinds = [k for k in ("adamw", "adamw_no_decay", "muon") if by_kind.get(k)]
        if not kinds:  # an empty group: AdamW, as before
            kinds, by_kind = ["adamw"], {"adamw": []}
        parts = []
        mixed = len({k == "muon" for k in kinds}) > 1
        for kind in kinds:
            settings = dict(group)
            settings["use_muon"] = kind == "muon"
            if kind != "muon":
                adamw = {k: settings.pop(a) for k, a in _ADAMW_KEYS.items() if a in settings and a != k}
                if mixed and "lr" in settings and "lr" not in adamw:
                    ratio = self.defaults["adamw_lr"] / self.defaults["lr"] if self.defaults["lr"] else None
                    settings["lr"] = settings["lr"] * ratio if ratio is not None else self.defaults["adamw_lr"]
                settings.update(adamw)
                if kind == "adamw_no_decay":
                    settings["weight_decay"] = 0.0
                for k in _MUON_ONLY:
                    settings.pop(k, None)
            else:
                for k in set(_ADAMW_KEYS.values()) | {"betas", "eps", "foreach"}:
                    settings.pop(k, None)
            items = by_kind[kind]
            ts = [t for _, t in items]
            ns = [n for n, _ in items] if names is not None else None
            if settings.get("matrix_views") and kind == "muon":  # the views of this part's tensors
                settings["matrix_views"] = {n: v for n, v in settings["matrix_views"].items() if n in (ns or ())}
            parts.append((settings, ts, ns, kind))
        return parts

    def _fill(self, settings: dict) -> dict:
        """A copy of ``settings`` with every missing setting of its family from ``self.defaults``."""
        part = dict(settings)
        if part["use_muon"]:
            for key in _MUON_KEYS:
                part.setdefault(key, self.defaults[key])
            if part.get("matrix_views") is None:  # every param with its default view
                part["matrix_views"] = {}
        else:
            for key, default in _ADAMW_KEYS.items():
                part.setdefault(key, self.defaults[default])
        return part

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, process_group=self.process_group)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore (unpickle, ``load_state_dict``): settings an older version lacked are filled in."""
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("process_group", AUTO)
        if "adamw_lr" not in self.defaults:  # pickled when defaults held only use_muon
            self.defaults = _defaults_from_groups(self.param_groups)
        for group in self.param_groups:
            if "use_muon" in group:
                for key, value in self._fill(group).items():
                    group.setdefault(key, value)
                if group["use_muon"] and group.get("matrix_views") is None:
                    group["matrix_views"] = {}
        for param_state in self.state.values():  # an AdamW step saved as a number
            if "step" in param_state and not isinstance(param_state["step"], Tensor):
                param_state["step"] = torch.tensor(float(param_state["step"]), dtype=torch.float32)

    def resolved_ns_dtype(self, device: torch.device | str | None = None) -> torch.dtype:
        """The dtype Newton–Schulz runs in on ``device`` for groups with ``ns_dtype="auto"``.

        Default device: that of the first Muon parameter. After the first step this is the dtype
        the ranks agreed on; before it, this process's own resolution.

        Example:
            >>> opt = Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "use_muon": True}])
            >>> opt.resolved_ns_dtype() in (torch.bfloat16, torch.float16, torch.float32)
            True
        """
        if device is None:
            device = next((p.device for g in self.param_groups if g["use_muon"] for p in g["params"]), "cpu")
        device = torch.device(device)
        return self.__dict__.get("_auto_ns_dtypes", {}).get(device) or resolve_ns_dtype(device)

    def _ns_dtype(self, name: str, method: str, device: torch.device, mesh: Any) -> torch.dtype:
        """A group's ``ns_dtype`` as a dtype; "auto" resolved once per device, agreed over the ranks."""
        if name != "auto":
            return getattr(torch, name)
        if method == "svd":  # torch.linalg.svd has no half-precision kernels
            return torch.float32
        cache = self.__dict__.setdefault("_auto_ns_dtypes", {})
        if device not in cache:  # first step: every rank reaches this with the same buckets
            group = mesh_domain(mesh).group if mesh is not None else process_group_of(self.process_group)
            cache[device] = agree_ns_dtype(resolve_ns_dtype(device), device, group)
        return cache[device]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by ``Muon``; check it fits before changing anything.

        Raises ValueError (and loads nothing) for a state dict from another optimizer, a different
        grouping, or state tensors whose shapes differ from the parameters' (a changed model).
        """
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"Muon.load_state_dict: the state dict has {len(groups)} param groups, this optimizer "
                f"{len(self.param_groups)}; was it saved for another model or routing?"
            )
        for i, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if "use_muon" not in saved:
                raise ValueError(
                    f"Muon.load_state_dict: param group {i} has no 'use_muon' key: this state dict was "
                    "not saved by lightning_muon.Muon (another optimizer's state cannot be converted)"
                )
            if saved["use_muon"] != own["use_muon"] or len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"Muon.load_state_dict: param group {i} ({own['name']!r}) does not match: saved "
                    f"use_muon={saved['use_muon']} with {len(saved['params'])} params, here "
                    f"use_muon={own['use_muon']} with {len(own['params'])}"
                )
            names = own.get("param_names") or [None] * len(own["params"])
            views = None
            if own["use_muon"]:
                views = saved.get("matrix_views") or own.get("matrix_views")
                _check_views({**own, "matrix_views": views}, f"Muon.load_state_dict: param group {i}")
            for key, p, name in zip(saved["params"], own["params"], names):
                view = matrix_view_for(tuple(p.shape), (views or {}).get(name)) if p.ndim >= 2 else None
                for field, value in state_dict["state"].get(key, {}).items():
                    want = _state_shape(field, p, view)
                    if field != "step" and isinstance(value, Tensor) and value.shape != want:
                        label = name or f"#{key}"
                        raise ValueError(
                            f"Muon.load_state_dict: state {field!r} of parameter {label} has shape "
                            f"{tuple(value.shape)} but the parameter needs {tuple(want)}: the model "
                            "changed since the checkpoint was saved"
                        )
        if any(own["use_muon"] and "matrix_views" not in saved for saved, own in zip(groups, self.param_groups)):
            # saved before matrix views existed: keep this optimizer's views
            state_dict = dict(state_dict)
            state_dict["param_groups"] = [
                {**saved, "matrix_views": own["matrix_views"]}
                if own["use_muon"] and "matrix_views" not in saved
                else saved
                for saved, own in zip(groups, self.param_groups)
            ]
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype: Muon's state keeps its own dtypes
        for saved, own in zip(groups, self.param_groups):
            if not own["use_muon"]:
                continue
            for key, p in zip(saved["params"], own["params"]):
                state, loaded = self.state.get(p, {}), state_dict["state"].get(key, {})
                for field, dtype in (
                    ("momentum_buffer", _momentum_dtype(own, p)),
                    ("neuron_second_moment", _wide(p.dtype)),
                ):
                    if field in state and field in loaded:
                        state[field] = loaded[field].to(device=state[field].device, dtype=dtype)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` re-evaluates the loss (Lightning passes one)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._check_grads():
            return loss
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_group(group)
        self._muon_groups([g for g in self.param_groups if g["use_muon"]])
        return loss

    def _check_grads(self) -> bool:
        """Validate every gradient before any update: False means skip the step."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        if any(g.is_sparse for g in grads):
            raise ValueError("Muon: sparse gradients are not supported (use nn.Embedding(sparse=False))")
        for group in self.param_groups:  # DeepSpeed ZeRO-1/2 swap flat partitions in after __init__
            if group["use_muon"] and any(p.ndim < 2 for p in group["params"]):
                what = f"Muon group {group['name']!r} holds a 1-D tensor at step time"
                raise ValueError(UNSUPPORTED_STRATEGY.format(what=what))
        for group in self.param_groups:  # e.g. matrix_views edited after construction
            if group["use_muon"]:
                _check_views(group, f"Muon param group {group['name']!r}", strict=False)
        for group in self.param_groups:  # e.g. a Tensor lr assigned after construction
            if isinstance(group["lr"], Tensor):
                raise ValueError(f"Muon param group {group['name']!r}: lr as a Tensor is not supported; use a float")
        if all_finite(grads):  # under FSDP2 also agreed over the ranks: all skip or none
            return True
        bad = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"]):
                if p.grad is not None and not bool(local(p.grad).isfinite().all()):
                    bad.append(name or f"<{group['name']} param of shape {tuple(p.shape)}>")
        where = f"Muon: non-finite gradient (NaN or Inf) in {', '.join(bad)}"
        advice = (
            "Lower the learning rate, check the loss for overflow (try precision='bf16-mixed' or "
            "gradient clipping), or pass nonfinite='skip' to skip such steps."
        )
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(f"{where}; no parameter or state was changed. {advice}")
        warnings.warn(f"{where}; step skipped, no parameter or state was changed. {advice}", stacklevel=3)
        return False

    def _adamw_group(self, group: dict) -> None:
        live = [p for p in group["params"] if p.grad is not None]
        if not live:
            return
        # torch's fused AdamW kernel for plain float CPU/CUDA tensors unless foreach is set: on
        # CPU about 10x faster than the per-tensor loop torch picks by default (benchmarks/step.py).
        fused = group["foreach"] is None and all(_fusable(p) for p in live)
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in live:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if fused and state["step"].device != p.device:  # the fused kernel wants it on p's device
                state["step"] = state["step"].to(p.device)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _adamw_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if fused else group["foreach"],
            fused=fused or None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            has_complex=any(p.is_complex() for p in params),
        )

    def _muon_groups(self, groups: list[dict]) -> None:
        """Momentum for every Muon param (foreach), one orthogonalisation per bucket, then the update.

        Each direction is seen through its group's matrix view (:mod:`lightning_muon.structure`). A
        plain tensor's matrices join the bucket of their ``(m, n)`` shape; a DTensor's bucket is
        keyed by its global shape, placements and view (its owner assembles the whole tensor).
        """
        buckets: dict[tuple, list[tuple[int, int]]] = defaultdict(list)  # key -> (entry, slot)
        entries: list[tuple[Tensor, int, MatrixView, Any]] = []  # (param, group, view, matrices or direction)
        for g, group in enumerate(groups):
            live = [(p, view) for p, view in self._views(group) if p.grad is not None]
            if not live:
                continue
            for p, view in live:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    dtype = _momentum_dtype(group, p)
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                if group["variant"] == "normuon" and "neuron_second_moment" not in state:
                    state["neuron_second_moment"] = torch.zeros(_rows(p, view), dtype=_wide(p.dtype), device=p.device)
            directions = self._momentum(group, [p for p, _ in live])
            ns = (group["ns_method"], group["ns_steps"], group["ns_dtype"])
            for (p, view), direction in zip(live, directions):
                entry = len(entries)
                if not is_dtensor(p):  # its matrices join the bucket of their shape
                    matrices = view.to_matrices(direction.unsqueeze(0))
                    entries.append((p, g, view, matrices))
                    key = (tuple(matrices.shape[1:]), p.device, p.dtype, None, None, None, *ns)
                    buckets[key].extend((entry, j) for j in range(matrices.shape[0]))
                else:
                    entries.append((p, g, view, direction))
                    layout = (tuple(p.shape), tuple(p.placements))
                    key = (view.matrices(tuple(p.shape))[1:], p.device, p.dtype, p.device_mesh, layout, view, *ns)
                    buckets[key].append((entry, 0))
        plan = [
            Bucket(
                [entries[e][3] if mesh is not None else entries[e][3][j] for e, j in items],
                tuple(shape),
                method,
                steps,
                _compute_dtype(method, self._ns_dtype(ns_dtype, method, device, mesh)),
                mesh,
                layout,
                view,
            )
            for (shape, device, _, mesh, layout, view, method, steps, ns_dtype), items in buckets.items()
        ]
        results: list[list[Any]] = [[None] * (1 if is_dtensor(p) else len(u)) for p, _, _, u in entries]
        for items, ortho in zip(buckets.values(), orthogonalize_buckets(plan, self.process_group)):
            for (e, j), o in zip(items, ortho):
                results[e][j] = o
        done: dict[int, list[tuple[Tensor, Tensor, MatrixView]]] = defaultdict(list)
        for (p, g, view, _), out in zip(entries, results):
            o = out[0] if is_dtensor(p) else view.from_matrices(torch.stack(out), tuple(p.shape))[0]
            done[g].append((p, o, view))
        factors = self._normuon_factors(
            [
                (p, o, view, groups[g])
                for g, items in done.items()
                if groups[g]["variant"] == "normuon"
                for p, o, view in items
            ]
        )
        for g, items in done.items():
            group = groups[g]
            updates = [o for _, o, _ in items]
            if group["variant"] == "normuon":  # each local element scaled by its row's factor
                updates = [(o.reshape(local(p).shape).to(factors[p].dtype) * factors[p]) for p, o, _ in items]
            apply_muon_update(
                [local(p) for p, _, _ in items],
                updates,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                adjust_lr=group["adjust_lr"],
                shapes=[view.scale_shape(tuple(p.shape)) for p, _, view in items],  # each matrix's (fan_out, fan_in)
            )

    def _views(self, group: dict) -> list[tuple[Tensor, MatrixView]]:
        """Each parameter of a Muon group with its matrix view (the group's ``matrix_views`` or the default)."""
        views = group.get("matrix_views") or {}
        names = group.get("param_names") or [None] * len(group["params"])
        return [(p, matrix_view_for(tuple(p.shape), views.get(n))) for p, n in zip(group["params"], names)]

    def _momentum(self, group: dict, live: list[Tensor]) -> list[Tensor]:
        """Update the momentum buffers of ``live`` and return the directions to orthogonalise.

        ``buf <- lerp(buf, g, 1 - beta)``; direction ``lerp(g, buf, beta)`` with Nesterov, else
        ``buf``. Local tensors throughout (under FSDP2 the state stays a sharded DTensor). A
        bfloat16 buffer under ``momentum_dtype="bfloat16"`` is updated in float32 and stored by
        stochastic rounding, its bits keyed by the parameter's position, its ``step`` and each
        element's global index (the same on every rank and world size).
        """
        bufs = [local(self.state[p]["momentum_buffer"]) for p in live]
        rounded = group["momentum_dtype"] == "bfloat16"
        work = [b.float() if rounded else b for b in bufs]
        grads = [local_grad(p).to(b.dtype) for p, b in zip(live, work)]
        updates = muon_direction(grads, work, group["momentum"], group["nesterov"])
        if rounded:
            position = {p: i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
            for p, buf, value in zip(live, bufs, work):
                state = self.state[p]
                step = state.setdefault("step", torch.zeros((), dtype=torch.int64))
                key = rounding_key(_ROUNDING_SEED, position[p], int(step))
                buf.copy_(stochastic_round(value, global_index(p), key))
                step += 1
        return updates

    def _normuon_factors(self, done: list[tuple[Tensor, Tensor, MatrixView, dict]]) -> dict[Tensor, Tensor]:
        """NorMuon's per-element factor (row factor broadcast to this rank's piece) of each param.

        Rows' sums of squares of plain (DDP) updates are computed here (every rank holds the whole
        matrix); those of DTensor pieces are summed over the mesh with one ``all_reduce`` per
        process group (:func:`lightning_muon.sharded.sum_rows_over_mesh`), so every rank updates
        the same whole ``neuron_second_moment`` and scales its own piece exactly as one process
        scales the whole matrix.
        """
        sums: dict[Tensor, Tensor] = {}
        sharded = [(p, o, _columns(p, view)) for p, o, view, _ in done if is_dtensor(p)]
        for p, o, view, _ in done:
            if not is_dtensor(p):
                sums[p] = o.reshape(*_rows(p, view), -1).to(_wide(o.dtype)).square().sum(-1)
        if sharded:
            sums.update(zip([p for p, _, _ in sharded], sum_rows_over_mesh(sharded)))
        factors: dict[Tensor, Tensor] = {}
        for p, _, view, group in done:
            cols = _columns(p, view)
            v = self.state[p]["neuron_second_moment"]
            row = neuron_scale(sums[p].view(v.shape), cols, v, group["normuon_beta2"], group["normuon_eps"])
            if is_dtensor(p):  # this rank's elements, each with its row's factor
                factors[p] = row.reshape(-1)[global_index(p) // cols]
            else:  # rows of the view in storage order: element i is in row i // cols
                factors[p] = row.reshape(-1, 1).expand(-1, cols).reshape(p.shape)
        return factors


def _momentum_dtype(group: dict, p: Tensor) -> torch.dtype:
    """The dtype of ``p``'s momentum buffer in Muon ``group``: ``momentum_dtype``, or ``p``'s own."""
    name = group.get("momentum_dtype")
    return p.dtype if name is None else getattr(torch, name)


def _rows(p: Tensor, view: MatrixView | None) -> tuple[int, ...]:
    """Shape of NorMuon's per-row state of ``p``: the rows of its (global) matrix view in storage
    order, ``(shape[0],)``; for a stack ``(matrices, rows)``, so that each matrix of the stack keeps
    its own Frobenius norm (a split q/k/v weight is rescaled as a whole)."""
    if view is None:
        return ()
    count, m, _ = view.matrices(tuple(p.shape))
    return (count, m) if view.rule == "stack" and count > 1 else (count * m,)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the parameter's dtype when wider (float64): NorMuon's statistics never in half precision."""
    return torch.promote_types(dtype, torch.float32)


def _columns(p: Tensor, view: MatrixView) -> int:
    """Columns of each matrix of ``p``'s (global) matrix view, from its shape alone (no DTensor op)."""
    return view.matrices(tuple(p.shape))[-1]


def _state_shape(field: str, p: Tensor, view: MatrixView | None) -> torch.Size:
    """The shape a Muon/AdamW state tensor ``field`` of parameter ``p`` (seen through ``view``) has."""
    return torch.Size(_rows(p, view)) if field == "neuron_second_moment" else p.shape


def _compute_dtype(method: str, dtype: torch.dtype) -> torch.dtype:
    """Newton–Schulz runs in ``dtype``; an exact SVD always in float32 or wider (no bf16/fp16 kernel)."""
    return torch.promote_types(dtype, torch.float32) if method == "svd" else dtype


def _refuse_unsupported(settings: dict, where: str) -> None:
    for key, instead in _UNSUPPORTED.items():
        if settings.get(key):
            raise ValueError(f"{where}: {key}={settings[key]!r} is not supported by lightning_muon.Muon; {instead}")


def _check_process_group(process_group: Any) -> Any:
    """``"auto"``, None, or a ProcessGroup (a 1-D DeviceMesh is turned into its group)."""
    if process_group is None or (isinstance(process_group, str) and process_group == AUTO):
        return process_group
    if isinstance(process_group, str):
        raise ValueError(
            f"Muon: process_group must be 'auto', None, a ProcessGroup or a 1-D DeviceMesh, got {process_group!r}"
        )
    if type(process_group).__name__ == "DeviceMesh":
        if process_group.ndim != 1:
            raise ValueError(
                f"Muon: process_group must be a 1-D DeviceMesh (the data-parallel ranks), got a "
                f"{process_group.ndim}-D mesh; pass mesh['data_parallel'] or its process group"
            )
        return process_group.get_group()
    if torch.distributed.is_available() and isinstance(process_group, torch.distributed.ProcessGroup):
        return process_group
    raise TypeError(
        f"Muon: process_group must be 'auto', None, a torch.distributed.ProcessGroup or a 1-D DeviceMesh, "
        f"got {type(process_group).__name__}"
    )


def _unique(name: str, used: set) -> str:
    if name not in used:
        return name
    k = 1
    while f"{name}_{k}" in used:
        k += 1
    return f"{name}_{k}"


def _defaults_from_groups(groups: list[dict]) -> dict:
    """Both families' defaults recovered from existing groups (a Muon pickled by an older version)."""
    import inspect

    signature = inspect.signature(Muon.__init__).parameters
    defaults = {key: signature[key].default for key in _MUON_KEYS}
    defaults.update({a: signature[a].default for a in _ADAMW_KEYS.values()})
    defaults["adamw_lr"], defaults["adamw_weight_decay"] = defaults["lr"], defaults["weight_decay"]
    muon = next((g for g in groups if g.get("use_muon")), None)
    adamw = next((g for g in groups if g.get("use_muon") is False), None)
    if muon is not None:
        defaults.update({key: muon[key] for key in _MUON_KEYS if key in muon})
    if adamw is not None:
        defaults.update({a: adamw[k] for k, a in _ADAMW_KEYS.items() if k in adamw})
    return defaults


def _fusable(p: Tensor) -> bool:
    """Whether torch's fused AdamW kernel takes ``p``: a plain (not DTensor) float CPU/CUDA tensor."""
    return (
        not is_dtensor(p)
        and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    )


def _check_views(group: dict, where: str, strict: bool = True) -> None:
    """Raise ValueError unless ``group["matrix_views"]`` maps parameter names of the group to views
    that fit their shapes (``strict=False``: names no longer in the group are ignored)."""
    views = group.get("matrix_views")
    if not views:
        return
    if not isinstance(views, dict):
        raise ValueError(f"{where}: matrix_views must be a dict {{parameter name: view}}, got {type(views).__name__}")
    names = group.get("param_names")
    if names is None:
        raise ValueError(f"{where}: matrix_views name parameters, so the group needs named params (name, tensor)")
    by_name = dict(zip(names, group["params"]))
    unknown = [n for n in views if n not in by_name]
    if strict and unknown:
        raise ValueError(f"{where}: matrix_views names {unknown[:3]} that are not parameters of this group")
    for name, spec in views.items():
        if name in by_name:
            shape = tuple(by_name[name].shape)
            matrix_view_for(shape, spec).check(shape, f"{where}: parameter {name!r}")


def _check_group_params(group: dict) -> None:
    """Tensors a group cannot train: non-matrices in Muon groups, fp16 with a too-small AdamW eps."""
    names = group.get("param_names") or [None] * len(group["params"])
    labels = [repr(n) if n else f"of shape {tuple(p.shape)}" for n, p in zip(names, group["params"])]
    if group["use_muon"]:
        for label, p in zip(labels, group["params"]):
            check_dtensor_param(p, f"parameter {label}")
            if reason := why_not_muon(p):
                raise ValueError(
                    f"Muon: parameter {label} in Muon group {group['name']!r} cannot be "
                    f"orthogonalised: {reason}. Put it in a group with use_muon=False."
                )
        _check_views(group, f"Muon param group {group['name']!r}")
        return
    tiny = torch.finfo(torch.float16).tiny
    half = [label for label, p in zip(labels, group["params"]) if p.dtype == torch.float16]
    if half and group["eps"] < tiny:
        raise ValueError(
            f"Muon: float16 parameters in AdamW group {group['name']!r} ({', '.join(half[:3])}) "
            f"with adamw_eps={group['eps']}: eps underflows in float16 and a zero gradient gives "
            "0/0 = NaN. Keep fp32 weights (precision='16-mixed'), use bfloat16, or set "
            f"adamw_eps >= {tiny:.2g}."
        )


def _as_groups(params: Iterable[Any]) -> list[dict]:
    """Normalise the three accepted forms of ``params`` into group dicts with ``use_muon``."""
    if isinstance(params, Tensor):
        raise TypeError("Muon: params must be an iterable of tensors, (name, tensor) pairs or dicts")
    items = list(params)
    if not items:
        raise ValueError("Muon: empty parameter list; pass model.parameters() or param groups")
    if all(isinstance(x, dict) for x in items):
        return items  # routed, filled and validated one by one in Muon.add_param_group
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return groups_from_routes(route_named_parameters(items))
    if all(isinstance(x, Tensor) for x in items):
        muon = [p for p in items if why_not_muon(p) is None]
        other = [p for p in items if why_not_muon(p) is not None]
        if muon:
            warnings.warn(
                f"Muon received {len(items)} unnamed parameters and routed them by shape: "
                f"{len(muon)} tensors with >= 2 dims to Muon, {len(other)} to AdamW. Shape alone "
                "cannot tell an embedding or output head from a hidden matrix, so those are "
                "trained by Muon here. Pass model.named_parameters() or "
                "lightning_muon.muon_param_groups(model) for name-aware routing.",
                stacklevel=3,
            )
        groups = [{"name": "muon", "params": muon, "use_muon": True}] if muon else []
        if other:
            groups.append({"name": "adamw", "params": other, "use_muon": False})
        return groups
    raise TypeError("Muon: params must be all tensors, all (name, tensor) pairs, or all dicts")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_lr_and_decay(group: dict, where: str, names: dict[str, str]) -> None:
    """The settings both families have: ``lr`` and ``weight_decay``, reported under ``names``."""
    if isinstance(group["lr"], Tensor):
        raise ValueError(f"{where}: {names['lr']} as a Tensor is not supported; pass a Python float (float(lr))")
    for key in ("lr", "weight_decay"):
        if not _number(group[key]) or group[key] < 0:
            raise ValueError(f"{where}: {names[key]} must be a finite number >= 0, got {group[key]!r}")


def _validate_muon(group: dict, where: str) -> None:
    """Raise ValueError naming the Muon setting that is out of range; nothing is constructed on failure."""
    _check_lr_and_decay(group, where, {"lr": "lr", "weight_decay": "weight_decay"})
    steps = group["ns_steps"]
    checks = (
        ("momentum", "in [0, 1)", _number(group["momentum"]) and 0 <= group["momentum"] < 1),
        ("ns_method", f"one of {METHODS}", group["ns_method"] in METHODS),
        ("ns_steps", "an integer >= 1", isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1),
        ("ns_dtype", f"one of {NS_DTYPES}", group["ns_dtype"] in NS_DTYPES),
        ("adjust_lr", f"one of {tuple(ADJUST_LR)}", group["adjust_lr"] in ADJUST_LR),
        ("nesterov", "a bool", isinstance(group["nesterov"], bool)),
        ("variant", f"one of {VARIANTS}", group["variant"] in VARIANTS),
        ("normuon_beta2", "in [0, 1)", _number(group["normuon_beta2"]) and 0 <= group["normuon_beta2"] < 1),
        (
            "normuon_eps",
            "a finite number > 0 (a zero row would divide 0 by 0)",
            _number(group["normuon_eps"]) and group["normuon_eps"] > 0,
        ),
    )
    for key, expected, ok in checks:
        if not ok:
            raise ValueError(f"{where}: {key} must be {expected}, got {group[key]!r}")
    check_momentum_dtype(group["momentum_dtype"], where)


def _validate_adamw(group: dict, where: str, names: dict[str, str] | None = None) -> None:
    """Raise ValueError naming the AdamW setting that is out of range.

    ``names`` maps a group key to the name the user gave it (the constructor's ``adamw_lr``, ...);
    by default the group's own keys.
    """
    names = {key: (names or {}).get(key, key) for key in _ADAMW_KEYS}
    _check_lr_and_decay(group, where, names)
    betas = group["betas"]
    if len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"{where}: {names['betas']} must be two numbers in [0, 1), got {betas!r}")
    if not _number(group["eps"]) or group["eps"] < 0:
        raise ValueError(f"{where}: {names['eps']} must be a finite number >= 0, got {group['eps']!r}")
