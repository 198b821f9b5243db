"""How :class:`~lightning_muon.Muon` turns what it is given into complete, validated param groups.

Plain torch (no Lightning). A Muon group (``use_muon=True``) holds hidden matrices and Muon's
settings; an AdamW group (``use_muon=False``) holds everything else and AdamW's. :func:`as_groups`
normalises the three accepted forms of ``params`` (group dicts, ``(name, tensor)`` pairs, plain
tensors); :func:`build_groups` routes one group dict (splitting a mixed one), fills the missing
settings from the optimizer's defaults and checks everything before anything changes.

Example:
    >>> import torch
    >>> w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.zeros(4))
    >>> defaults = muon_defaults(lr=0.02) | adamw_defaults(lr=0.02, adamw_lr=1e-3)
    >>> [(g["name"], g["use_muon"], g["lr"]) for g in build_groups({"params": [w, b]}, defaults, [])]
    [('adamw', False, 0.001), ('muon', True, 0.02)]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..parallel.dtensor import check_not_flat_shard, is_dtensor
from ..parallel.groups import AUTO
from ..parallel.placement import check_dtensor_param
from ..routing.matrix_view import MatrixView, matrix_view_for
from ..routing.rules import (
    DEFAULT_EMBEDDING_NAMES,
    DEFAULT_HEAD_NAMES,
    groups_from_routes,
    route_named_parameters,
    why_not_muon,
)
from ..validation import check_bool, check_choice, check_number, check_positive_int, is_number
from .functional import ADJUST_LR
from .newton_schulz import available_methods
from .ns_dtype import NS_DTYPES
from .stochastic_rounding import check_momentum_dtype
from .variants import get_variant

__all__ = [
    "ADAMW_KEYS",
    "MUON_KEYS",
    "adamw_defaults",
    "as_groups",
    "build_groups",
    "check_process_group",
    "check_views",
    "fill",
    "muon_defaults",
    "refuse_unsupported",
    "views",
]

#: Settings of a Muon group (also their keys in ``Muon.defaults``).
MUON_KEYS = (
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "ns_method",
    "ns_steps",
    "ns_dtype",
    "adjust_lr",
    "variant",
    "variant_options",
    "momentum_dtype",
)
_MUON_ONLY = tuple(k for k in MUON_KEYS if k not in ("lr", "weight_decay"))
#: Settings of an AdamW group -> their keys in ``Muon.defaults`` (the constructor's argument names).
ADAMW_KEYS = {
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


def muon_defaults(**settings: Any) -> dict[str, Any]:
    """Muon's group settings: ``Muon.__init__``'s defaults updated with ``settings``, validated.

    Example:
        >>> muon_defaults(lr=0.02)["ns_method"]
        'polar_express'
    """
    out = dict(
        lr=1e-3,
        momentum=0.95,
        nesterov=True,
        weight_decay=0.01,
        ns_method="polar_express",
        ns_steps=5,
        ns_dtype="auto",
        adjust_lr="match_rms_adamw",
        variant="muon",
        variant_options=None,
        momentum_dtype=None,
    )
    unknown = set(settings) - set(out)
    if unknown:
        raise TypeError(f"muon_defaults: unknown settings {sorted(unknown)}; the settings are {sorted(out)}")
    out.update(settings)
    return validate_muon(out, "Muon")


def adamw_defaults(
    lr: float = 1e-3,
    adamw_lr: float | None = None,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    weight_decay: float = 0.01,
    adamw_weight_decay: float | None = None,
    foreach: bool | None = None,
) -> dict[str, Any]:
    """AdamW's group settings under the constructor's names (``adamw_lr``, ...), validated.

    ``adamw_lr`` and ``adamw_weight_decay`` default to Muon's ``lr`` and ``weight_decay``.
    """
    group = dict(
        lr=lr if adamw_lr is None else adamw_lr,
        betas=tuple(adamw_betas),
        eps=adamw_eps,
        weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
        foreach=foreach,
    )
    validate_adamw(group, "Muon", names=ADAMW_KEYS)
    return {ADAMW_KEYS[k]: v for k, v in group.items()}


def refuse_unsupported(settings: Mapping[str, Any], where: str) -> None:
    """ValueError for a torch optimizer option Muon does not implement (``maximize=True``, ...)."""
    for key, instead in _UNSUPPORTED.items():
        if settings.get(key):
            raise ValueError(f"{where}: {key}={settings[key]!r} is not supported by lightning_muon.Muon; {instead}")


def check_process_group(process_group: Any) -> Any:
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


# ---------------------------------------------------------------------------------- validation
def _check_lr_and_decay(group: dict, where: str, names: Mapping[str, str]) -> None:
    """The settings both families have: ``lr`` and ``weight_decay``, reported under ``names``."""
    if isinstance(group["lr"], Tensor):
        raise ValueError(f"{where}: {names['lr']} as a Tensor is not supported; pass a Python float (float(lr))")
    for key in ("lr", "weight_decay"):
        check_number(group[key], names[key], where, low=0)


def validate_muon(group: dict, where: str) -> dict:
    """``group`` with ``momentum_dtype`` and ``variant_options`` normalised; ValueError naming the
    first Muon setting out of range (nothing is changed on failure)."""
    _check_lr_and_decay(group, where, {"lr": "lr", "weight_decay": "weight_decay"})
    check_number(group["momentum"], "momentum", where, low=0, high=1, high_open=True)
    check_choice(group["ns_method"], "ns_method", where, available_methods())
    check_positive_int(group["ns_steps"], "ns_steps", where)
    check_choice(group["ns_dtype"], "ns_dtype", where, NS_DTYPES)
    check_choice(group["adjust_lr"], "adjust_lr", where, ADJUST_LR)
    check_bool(group["nesterov"], "nesterov", where)
    variant = get_variant(group["variant"], where)
    options = group.get("variant_options") or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}: variant_options must be a dict, got {type(options).__name__}")
    group["variant_options"] = variant.check_options(options, where)
    group["momentum_dtype"] = check_momentum_dtype(group["momentum_dtype"], where)
    return group


def validate_adamw(group: dict, where: str, names: Mapping[str, str] | None = None) -> dict:
    """ValueError naming the AdamW setting that is out of range. ``names`` maps a group key to the
    name the user gave it (the constructor's ``adamw_lr``, ...); by default the group's own keys."""
    names = {key: (names or {}).get(key, key) for key in ADAMW_KEYS}
    _check_lr_and_decay(group, where, names)
    betas = group["betas"]
    if len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"{where}: {names['betas']} must be two numbers in [0, 1), got {betas!r}")
    check_number(group["eps"], names["eps"], where, low=0)
    return group


def views(group: Mapping[str, Any]) -> list[tuple[Tensor, MatrixView]]:
    """Each parameter of a Muon group with its matrix view (the group's ``matrix_views`` or the default)."""
    by_name = group.get("matrix_views") or {}
    names = group.get("param_names") or [None] * len(group["params"])
    return [(p, matrix_view_for(tuple(p.shape), by_name.get(n))) for p, n in zip(group["params"], names)]


def check_views(group: Mapping[str, Any], where: str, strict: bool = True) -> None:
    """ValueError unless ``group["matrix_views"]`` maps parameter names of the group to views that
    fit their shapes (``strict=False``: names no longer in the group are ignored)."""
    by_name_view = group.get("matrix_views")
    if not by_name_view:
        return
    if not isinstance(by_name_view, dict):
        raise ValueError(
            f"{where}: matrix_views must be a dict {{parameter name: view}}, got {type(by_name_view).__name__}"
        )
    names = group.get("param_names")
    if names is None:
        raise ValueError(f"{where}: matrix_views name parameters, so the group needs named params (name, tensor)")
    by_name = dict(zip(names, group["params"]))
    unknown = [n for n in by_name_view if n not in by_name]
    if strict and unknown:
        raise ValueError(
            f"{where}: matrix_views names {unknown[:3]} that are not parameters of this group; its "
            f"parameters are {list(by_name)[:3]}{' ...' if len(by_name) > 3 else ''} (or set the views "
            "with muon_param_groups(model, matrix_rules={pattern: view}))"
        )
    for name, spec in by_name_view.items():
        if name in by_name:
            shape = tuple(by_name[name].shape)
            matrix_view_for(shape, spec).check(shape, f"{where}: parameter {name!r}")


def _check_params(group: dict) -> None:
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
        check_views(group, f"Muon param group {group['name']!r}")
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


# ---------------------------------------------------------------------------------- building
#: What the constructor's messages recommend first: routing that reads the module, not only names or shapes.
_PREFER_GROUPS = (
    "Pass lightning_muon.muon_param_groups(model) instead: it routes by module type, name and position "
    "(nn.Embedding and the last layer outside the repeated blocks to AdamW) and names the groups; "
    "print(lightning_muon.routing_table(model)) shows each decision and why"
)


def as_groups(params: Iterable[Any]) -> list[dict]:
    """Normalise the three accepted forms of ``params`` into group dicts with ``use_muon``.

    Plain tensors are routed by shape and ``(name, tensor)`` pairs by name and shape; both warn when
    that may send an embedding or output head to Muon, recommending :func:`muon_param_groups`.
    """
    if isinstance(params, Tensor):
        raise TypeError(
            "Muon: params must be an iterable (of tensors, (name, tensor) pairs or param-group dicts), "
            "got a single Tensor; pass a list such as [weight], or lightning_muon.muon_param_groups(model)"
        )
    items = list(params)
    if not items:
        raise ValueError(
            "Muon: empty parameter list, nothing to optimize (a model.parameters() generator that was "
            "already consumed, or a model whose parameters are all frozen?); pass "
            "lightning_muon.muon_param_groups(model) for a model with trainable parameters"
        )
    if all(isinstance(x, dict) for x in items):
        return items  # routed, filled and validated one by one in Muon.add_param_group
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        routes = route_named_parameters(items)
        _warn_name_only(routes)
        return groups_from_routes(routes)
    if all(isinstance(x, Tensor) for x in items):
        muon = [p for p in items if why_not_muon(p) is None]
        other = [p for p in items if why_not_muon(p) is not None]
        if muon:
            warnings.warn(
                f"Muon received {len(items)} parameters without names (model.parameters(), or "
                f"LightningCLI's top-level optimizer:) and routed them by shape alone: {len(muon)} "
                f"tensors with >= 2 dims to Muon, {len(other)} to AdamW. Shape alone cannot tell an embedding "
                "or output head from a hidden matrix, so those are trained by Muon here. "
                f"{_PREFER_GROUPS} (with LightningCLI: inject the optimizer into the module and return "
                "configure_muon(self, optimizer=self.optimizer)).",
                stacklevel=4,
            )
        groups = [{"name": "muon", "params": muon, "use_muon": True}] if muon else []
        if other:
            groups.append({"name": "adamw", "params": other, "use_muon": False})
        return groups
    kinds = sorted({"dict" if isinstance(x, dict) else type(x).__name__ for x in items})
    raise TypeError(
        f"Muon: params must be all tensors, all (name, tensor) pairs, or all param-group dicts, got a mix "
        f"of {kinds}; pass lightning_muon.muon_param_groups(model), or list(model.named_parameters())"
    )


def _warn_name_only(routes: list) -> None:
    """Warn when ``(name, tensor)`` pairs routed by name alone found no output head or no embedding
    among matrices that go to Muon (names outside the defaults, ``nn.Sequential`` indices)."""
    if not any(r.use_muon for r in routes):
        return
    missing = []
    if not any(r.reason.startswith("output head") for r in routes):
        missing.append(f"an output head (head_names {DEFAULT_HEAD_NAMES})")
    if not any(r.reason.startswith("embedding") for r in routes):
        missing.append(f"an embedding (embedding_names {DEFAULT_EMBEDDING_NAMES})")
    if missing:
        muon = [r.name for r in routes if r.use_muon]
        warnings.warn(
            f"Muon routed {len(routes)} named parameters by name alone (no module types are known from "
            f"(name, tensor) pairs) and no name matched {' nor '.join(missing)}, so if the model has one it "
            f"is among the {len(muon)} matrices trained by Muon ({', '.join(muon[:3])}"
            f"{', ...' if len(muon) > 3 else ''}). {_PREFER_GROUPS}.",
            stacklevel=4,
        )


def _tensors_and_names(raw: Any) -> tuple[list[Tensor], list[str] | None]:
    """A group's ``params`` as tensors and their names (None when given without names)."""
    if isinstance(raw, set):
        raise TypeError("Muon: param group params must be an ordered collection (a list), not a set")
    raw = [raw] if isinstance(raw, Tensor) else list(raw)
    pairs = [isinstance(x, tuple) for x in raw]
    if any(pairs) and not all(pairs):
        raise ValueError(
            "Muon: a param group mixes (name, tensor) pairs and bare tensors; give every parameter of the "
            "group a name, e.g. [(n, p) for n, p in model.named_parameters()], or none"
        )
    names = [x[0] for x in raw] if raw and all(pairs) else None
    tensors = [x[1] for x in raw] if names is not None else raw
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"Muon: can only optimize Tensors, got {type(t).__name__}")
        if not (t.is_leaf or t.retains_grad):
            raise ValueError(
                f"Muon: can't optimize a non-leaf Tensor (shape {tuple(t.shape)}, computed from other "
                "tensors); pass the nn.Parameter itself (e.g. model.weight, not model.weight * 2 or "
                "model.weight.to(...))"
            )
    for label, t in zip(names or [f"of shape {tuple(t.shape)}" for t in tensors], tensors):
        check_not_flat_shard(t, f"parameter {label}")
    return tensors, names


def _split(group: dict, tensors: list, names: list | None, defaults: Mapping[str, Any]) -> list[tuple]:
    """Route a group without ``use_muon``: ``(settings, tensors, names, kind)`` per part, Muon last."""
    if names is not None:
        by_kind: dict[str, list[tuple[str | None, Tensor]]] = {
            g["name"]: g["params"] for g in groups_from_routes(route_named_parameters(list(zip(names, tensors))))
        }
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
                stacklevel=5,
            )
    kinds = [k for k in ("adamw", "adamw_no_decay", "muon") if by_kind.get(k)]
    if not kinds:  # an empty group: AdamW
        kinds, by_kind = ["adamw"], {"adamw": []}
    mixed = len({k == "muon" for k in kinds}) > 1
    parts = []
    for kind in kinds:
        settings = dict(group)
        settings["use_muon"] = kind == "muon"
        if kind != "muon":
            adamw = {k: settings.pop(a) for k, a in ADAMW_KEYS.items() if a in settings and a != k}
            if mixed and "lr" in settings and "lr" not in adamw:  # keep the constructor's adamw_lr / lr ratio
                ratio = defaults["adamw_lr"] / defaults["lr"] if defaults["lr"] else None
                settings["lr"] = settings["lr"] * ratio if ratio is not None else defaults["adamw_lr"]
            settings.update(adamw)
            if kind == "adamw_no_decay":
                settings["weight_decay"] = 0.0
            for k in _MUON_ONLY:
                settings.pop(k, None)
        else:
            for k in set(ADAMW_KEYS.values()) | {"betas", "eps", "foreach"}:
                settings.pop(k, None)
        items = by_kind[kind]
        ts = [t for _, t in items]
        ns = [n for n, _ in items] if names is not None else None
        if settings.get("matrix_views") and kind == "muon":  # the views of this part's tensors
            settings["matrix_views"] = {n: v for n, v in settings["matrix_views"].items() if n in (ns or ())}
        parts.append((settings, ts, ns, kind))
    return parts


def fill(settings: dict, defaults: Mapping[str, Any]) -> dict:
    """A copy of ``settings`` with every missing setting of its family from ``defaults``."""
    part = dict(settings)
    if part["use_muon"]:
        if part.get("variant", defaults["variant"]) != defaults["variant"]:
            part.setdefault("variant_options", {})  # the defaults' options are another variant's
        for key in MUON_KEYS:
            part.setdefault(key, defaults[key])
        if part.get("matrix_views") is None:  # every param with its default view
            part["matrix_views"] = {}
    else:
        for key, default in ADAMW_KEYS.items():
            part.setdefault(key, defaults[default])
    return part


def _unique(name: str, used: set) -> str:
    if name not in used:
        return name
    k = 1
    while f"{name}_{k}" in used:
        k += 1
    return f"{name}_{k}"


def build_groups(
    param_group: dict[str, Any], defaults: Mapping[str, Any], existing: list[dict], process_group: Any = AUTO
) -> list[dict]:
    """The complete, validated group(s) ``param_group`` becomes next to the ``existing`` groups.

    With ``use_muon`` the group is one family; without it the tensors are routed (by name and
    shape, or by shape alone) and a mixed group is split: AdamW part(s) first, the Muon part last.
    Names: parts are named ``muon``, ``adamw``, ... (``"<name>/muon"`` when the dict has a
    ``name``), unique among ``existing``. Nothing is changed; every check runs first.
    """
    if not isinstance(param_group, dict):
        raise TypeError(f"Muon.add_param_group: param_group must be a dict, got {type(param_group).__name__}")
    group = dict(param_group)
    if "params" not in group:
        raise ValueError(
            f"Muon: a param group needs a 'params' key, got keys {sorted(map(str, group))}; "
            "e.g. {'params': [weight], 'use_muon': True}"
        )
    tensors, names = _tensors_and_names(group.pop("params"))
    refuse_unsupported(group, "Muon param group")
    start = len(existing)
    if "use_muon" in group:
        if any(k in group for k in ADAMW_KEYS.values() if k != "foreach"):
            raise ValueError(
                f"Muon: param group {start} sets use_muon and an adamw_* key; set lr, betas, eps, "
                "weight_decay directly in an AdamW group (use_muon=False)"
            )
        parts = [(group, tensors, names, None)]
    else:
        parts = _split(group, tensors, names, defaults)
    out = []
    used = {g.get("name") for g in existing}
    for i, (settings, ts, ns, kind) in enumerate(parts):
        part = fill(settings, defaults)
        part["params"] = list(ts)
        if not part["use_muon"]:
            part.pop("matrix_views", None)
        if ns is not None:
            part["param_names"] = list(ns)
        base = group.get("name")
        if base is None or kind is not None and len(parts) > 1:
            suffix = kind or ("muon" if part["use_muon"] else "adamw")
            part["name"] = _unique(suffix if base is None else f"{base}/{suffix}", used)
        used.add(part["name"])
        where = f"Muon param group {start + i} ({part['name']!r})"
        (validate_muon if part["use_muon"] else validate_adamw)(part, where)
        if part["use_muon"] and process_group is None and any(is_dtensor(p) for p in ts):
            raise ValueError(
                f"{where}: process_group=None (this process alone) but its parameters are "
                "DTensors sharded over a mesh; leave process_group at its default or pass the mesh"
            )
        _check_params(part)
        out.append(part)
    taken = {id(p) for g in existing for p in g["params"]}
    new = [p for part in out for p in part["params"]]
    if len({id(p) for p in new}) != len(new) or taken & {id(p) for p in new}:
        raise ValueError(
            "some parameters appear in more than one parameter group; build the groups with "
            "lightning_muon.muon_param_groups(model), which puts each parameter in exactly one group"
        )
    named = ("param_names" in existing[0]) if existing else ("param_names" in out[0])
    for part in out:
        if named and "param_names" not in part:
            part["param_names"] = [f"<{part['name']} #{i}>" for i in range(len(part["params"]))]
        elif not named:
            if part.get("matrix_views"):
                raise ValueError(
                    f"Muon: group {part['name']!r} sets matrix_views, but this optimizer's groups carry no "
                    "parameter names to key them by; build it from named params (muon_param_groups)"
                )
            part.pop("param_names", None)
    return out
