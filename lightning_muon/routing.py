"""Which parameters Muon should update, and why.

Muon is for hidden weight matrices. Embeddings, the output head (also when tied to the
embedding), gains, biases and tensors that are not really matrices go to AdamW inside the same
optimizer. This module decides, per parameter, and says why, so a user can read the decision once.

Example:
    >>> import torch.nn as nn
    >>> from lightning_muon import muon_param_groups, routing_table
    >>> model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 16), nn.LayerNorm(16))
    >>> [(g["name"], len(g["params"])) for g in muon_param_groups(model)]
    [('muon', 1), ('adamw', 1), ('adamw_no_decay', 2)]
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = [
    "Route",
    "DEFAULT_EMBEDDING_NAMES",
    "DEFAULT_HEAD_NAMES",
    "why_not_muon",
    "route_parameters",
    "route_named_parameters",
    "muon_param_groups",
    "routing_table",
]

#: Name components (of a parameter or its module) that mark an input embedding. fnmatch patterns.
DEFAULT_EMBEDDING_NAMES: tuple[str, ...] = (
    "*embed*", "wte", "wpe", "conv_proj", "class_token", "cls_token", "*pos_emb*", "*token_emb*",
)
#: Name components that mark the output head or classifier. fnmatch patterns.
DEFAULT_HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "heads", "classifier", "fc_out", "out_head")

MUON, ADAMW, ADAMW_NO_DECAY = "muon", "adamw", "adamw_no_decay"


@dataclass(frozen=True)
class Route:
    """The routing decision for one parameter."""

    name: str
    param: Tensor = field(repr=False, compare=False)
    group: str  # "muon", "adamw" or "adamw_no_decay"
    reason: str

    @property
    def use_muon(self) -> bool:
        return self.group == MUON


def why_not_muon(param: Tensor) -> str | None:
    """Why ``param`` cannot be a Muon matrix judging by the tensor alone, or ``None`` if it can.

    A tensor is a Muon matrix when, flattened to ``(shape[0], rest)`` as conv kernels are, both
    sides exceed 1 and it is real-valued and non-empty.

    Example:
        >>> why_not_muon(torch.zeros(1, 197, 768))
        'vector-like: flattens to 1 x 151296 (e.g. a positional embedding or class token)'
    """
    if param.is_complex():
        return "complex dtype (Muon is defined for real matrices)"
    if param.ndim < 2:
        return "scalar" if param.ndim == 0 else "1-D (gain or bias)"
    if param.numel() == 0:
        return f"empty tensor of shape {tuple(param.shape)}"
    rows = param.shape[0]
    cols = param.numel() // rows
    if rows == 1 or cols == 1:
        return (
            f"vector-like: flattens to {rows} x {cols} (e.g. a positional embedding or class token)"
        )
    return None


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    """First pattern matching the full dotted name or one of its components."""
    parts = name.split(".")
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or any(fnmatch.fnmatchcase(p, pattern) for p in parts):
            return pattern
    return None


def _route_one(
    names: Sequence[str],
    param: Tensor,
    module: nn.Module | None,
    *,
    embedding_names: Sequence[str],
    head_names: Sequence[str],
    adamw_names: Sequence[str],
    muon_names: Sequence[str],
) -> Route:
    name = names[0]
    aliases = f" (tied: {', '.join(names[1:])})" if len(names) > 1 else ""
    not_matrix = why_not_muon(param)
    for n in names:
        if pattern := _matches(n, adamw_names):
            group = ADAMW_NO_DECAY if param.ndim < 2 else ADAMW
            return Route(name, param, group, f"adamw_names pattern {pattern!r}{aliases}")
    for n in names:
        if pattern := _matches(n, muon_names):
            if not_matrix:
                raise ValueError(
                    f"lightning_muon routing: parameter {n!r} of shape {tuple(param.shape)} matched "
                    f"muon_names pattern {pattern!r} but cannot be a Muon matrix: {not_matrix}. "
                    "Remove it from muon_names."
                )
            return Route(name, param, MUON, f"muon_names pattern {pattern!r}{aliases}")
    if not_matrix:
        return Route(name, param, ADAMW_NO_DECAY if param.ndim < 2 else ADAMW, not_matrix + aliases)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return Route(name, param, ADAMW, f"embedding ({type(module).__name__}){aliases}")
    for n in names:
        if pattern := _matches(n, embedding_names):
            return Route(name, param, ADAMW, f"embedding (name matches {pattern!r}){aliases}")
    for n in names:
        if pattern := _matches(n, head_names):
            return Route(name, param, ADAMW, f"output head (name matches {pattern!r}){aliases}")
    if param.ndim > 2:
        rest = param.numel() // param.shape[0]
        return Route(name, param, MUON, f"hidden {param.ndim}-D kernel, flattened to {param.shape[0]} x {rest}")
    return Route(name, param, MUON, "hidden matrix")


def _warn_suspicious(routes: list[Route], head_found: bool, has_modules: bool) -> None:
    if has_modules and not head_found and any(r.use_muon for r in routes):
        warnings.warn(
            "lightning_muon: no output head or classifier was recognised by name "
            f"(patterns {DEFAULT_HEAD_NAMES}); if the model has one it is being trained by Muon. "
            "Pass adamw_names=['<head name>'] to route it to AdamW.",
            stacklevel=3,
        )
    for r in routes:
        if r.use_muon:
            rows = r.param.shape[0]
            cols = r.param.numel() // rows
            if max(rows, cols) >= 16 * min(rows, cols) and max(rows, cols) >= 1024:
                warnings.warn(
                    f"lightning_muon: {r.name} ({rows} x {cols}) is routed to Muon but its shape "
                    "looks like an embedding or output head (one side >= 16x the other). If it is "
                    f"one, pass adamw_names=[{r.name!r}].",
                    stacklevel=3,
                )


def route_parameters(
    module: nn.Module,
    *,
    embedding_names: Sequence[str] = DEFAULT_EMBEDDING_NAMES,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    adamw_names: Sequence[str] = (),
    muon_names: Sequence[str] = (),
    warn: bool = True,
) -> list[Route]:
    """Route every trainable parameter of ``module`` (frozen ones are left out).

    Rules, first match wins: ``adamw_names`` / ``muon_names`` overrides (fnmatch patterns on the
    dotted name or any of its components); tensors that are not matrices (see
    :func:`why_not_muon`) to AdamW, without weight decay when 1-D; ``nn.Embedding`` weights and
    names matching ``embedding_names`` to AdamW; names matching ``head_names`` to AdamW (a head
    tied to the embedding is one tensor and is matched through either name); everything else,
    conv kernels included, to Muon.
    """
    owner: dict[int, nn.Module] = {}
    for mod in module.modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), mod)
    aliases: dict[int, list[str]] = {}
    params: dict[int, Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    routes: list[Route] = []
    head_found = False
    for key, names in aliases.items():
        p = params[key]
        if not p.requires_grad:
            continue
        if any(_matches(n, head_names) for n in names):
            head_found = True
        routes.append(
            _route_one(
                names, p, owner.get(key),
                embedding_names=embedding_names, head_names=head_names,
                adamw_names=adamw_names, muon_names=muon_names,
            )
        )
    head_found = head_found or any(_matches(n, adamw_names) for key in aliases for n in aliases[key])
    if warn:
        _warn_suspicious(routes, head_found, has_modules=True)
    return routes


def route_named_parameters(
    named_params: Iterable[tuple[str, Tensor]],
    *,
    embedding_names: Sequence[str] = DEFAULT_EMBEDDING_NAMES,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
) -> list[Route]:
    """Route ``(name, tensor)`` pairs by name and shape alone (no module types are known)."""
    return [
        _route_one(
            [name], p, None, embedding_names=embedding_names, head_names=head_names,
            adamw_names=(), muon_names=(),
        )
        for name, p in named_params
    ]


def groups_from_routes(routes: Iterable[Route]) -> list[dict]:
    """Param-group dicts (named params, ``name`` and ``use_muon`` set) for non-empty groups."""
    by_group: dict[str, list[tuple[str, Tensor]]] = {MUON: [], ADAMW: [], ADAMW_NO_DECAY: []}
    for r in routes:
        by_group[r.group].append((r.name, r.param))
    groups = []
    for name, params in by_group.items():
        if not params:
            continue
        group: dict = {"name": name, "params": params, "use_muon": name == MUON}
        if name == ADAMW_NO_DECAY:
            group["weight_decay"] = 0.0
        groups.append(group)
    return groups


def muon_param_groups(
    module: nn.Module,
    *,
    embedding_names: Sequence[str] = DEFAULT_EMBEDDING_NAMES,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    adamw_names: Sequence[str] = (),
    muon_names: Sequence[str] = (),
    verbose: bool = False,
) -> list[dict]:
    """Param groups for :class:`lightning_muon.Muon`: ``muon``, ``adamw``, ``adamw_no_decay``.

    Each group has a ``name`` (LearningRateMonitor logs groups apart by it), ``use_muon`` and
    named params. Gains and biases go to ``adamw_no_decay`` (weight decay 0). See
    :func:`route_parameters` for the rules and :func:`routing_table` to print them.

    Example:
        >>> groups = muon_param_groups(model, adamw_names=["decoder.proj"], verbose=True)
        >>> optimizer = Muon(groups, lr=0.02)
    """
    routes = route_parameters(
        module, embedding_names=embedding_names, head_names=head_names,
        adamw_names=adamw_names, muon_names=muon_names,
    )
    if verbose:
        print(routing_table(routes))
    return groups_from_routes(routes)


def routing_table(routes: Iterable[Route] | nn.Module) -> str:
    """A plain-text table: parameter, shape, group and the reason, one row per parameter."""
    if isinstance(routes, nn.Module):
        routes = route_parameters(routes, warn=False)
    rows = [("parameter", "shape", "group", "reason")]
    rows += [(r.name, "x".join(map(str, r.param.shape)) or "scalar", r.group, r.reason) for r in routes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
