"""Which parameters Muon should update, and why.

Muon is for hidden weight matrices. Embeddings, the output head (also when tied to the
embedding), gains, biases and tensors that are not really matrices go to AdamW inside the same
optimizer. This module decides, per parameter, and says why, so a user can read the decision once.

Names decide first (``nn.Embedding``, ``*embed*``, ``lm_head``, ``classifier``, ...); where they
do not, the module tree does: the output head is the last layer outside the repeated blocks
(ResNet's ``fc``), the input stem the first layer before them (ResNet's ``conv1``).

Example:
    >>> import torch.nn as nn
    >>> from lightning_muon import muon_param_groups, routing_table
    >>> model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16),
    ...                       nn.LayerNorm(16), nn.Linear(16, 100))
    >>> [(g["name"], len(g["params"])) for g in muon_param_groups(model)]
    [('muon', 2), ('adamw', 2), ('adamw_no_decay', 5)]
    >>> print(routing_table(model))
    parameter  shape   group           reason
    -------------------------------------...
    0.weight   100x16  adamw           embedding (Embedding)
    1.weight   64x16   muon            hidden matrix
    1.bias     64      adamw_no_decay  1-D (gain or bias)
    3.weight   16x64   muon            hidden matrix
    3.bias     16      adamw_no_decay  1-D (gain or bias)
    4.weight   16      adamw_no_decay  1-D (gain or bias)
    4.bias     16      adamw_no_decay  1-D (gain or bias)
    5.weight   100x16  adamw           output head (last layer outside the repeated blocks)
    5.bias     100     adamw_no_decay  1-D (gain or bias)
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from .functional import matrix_shape

__all__ = [
    "Route",
    "DEFAULT_EMBEDDING_NAMES",
    "DEFAULT_HEAD_NAMES",
    "why_not_muon",
    "matching_pattern",
    "route_parameters",
    "route_named_parameters",
    "muon_param_groups",
    "routing_table",
]

#: Name components (of a parameter or its module) that mark an input embedding or a learned lookup
#: table (Swin's and MaxViT's ``relative_position_bias_table``). fnmatch patterns.
DEFAULT_EMBEDDING_NAMES: tuple[str, ...] = (
    "*embed*",
    "wte",
    "wpe",
    "conv_proj",
    "class_token",
    "cls_token",
    "*pos_emb*",
    "*token_emb*",
    "*bias_table*",
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
        >>> import torch
        >>> why_not_muon(torch.zeros(1, 197, 768))
        'vector-like: flattens to 1 x 151296 (e.g. a positional embedding or class token)'
        >>> why_not_muon(torch.zeros(64, 3, 7, 7)) is None  # a conv kernel: a 64 x 147 matrix
        True
    """
    if param.is_complex():
        return "complex dtype (Muon is defined for real matrices)"
    if param.ndim < 2:
        return "scalar" if param.ndim == 0 else "1-D (gain or bias)"
    if param.numel() == 0:
        return f"empty tensor of shape {tuple(param.shape)}"
    rows, cols = matrix_shape(param.shape)
    if rows == 1 or cols == 1:
        return f"vector-like: flattens to {rows} x {cols} (e.g. a positional embedding or class token)"
    return None


def matching_pattern(name: str, patterns: Sequence[str]) -> str | None:
    """The first fnmatch pattern matching the dotted parameter ``name``, one of its components, or a
    module prefix (``"decoder.proj"`` matches ``decoder.proj.weight``); None if none does.

    This is how ``adamw_names``, ``muon_names``, ``embedding_names``, ``head_names`` and the
    monitors' ``include``/``exclude`` read their patterns.

    Example:
        >>> matching_pattern("decoder.proj.weight", ["*embed*", "decoder.proj"])
        'decoder.proj'
        >>> matching_pattern("blocks.0.attn.weight", ["head"]) is None
        True
    """
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(2, len(parts))]
    for pattern in patterns:
        if (
            fnmatch.fnmatchcase(name, pattern)
            or any(fnmatch.fnmatchcase(p, pattern) for p in parts)
            or any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        ):
            return pattern
    return None


@dataclass
class _Layer:
    """A module holding a trainable matrix parameter directly (a Linear, a Conv, an attention's in_proj)."""

    name: str
    module: nn.Module
    out_dim: int
    in_body: bool  # inside a repeated block
    branch_in_body: bool  # inside a repeated block below its top-level child


@dataclass
class _Structure:
    """What the module tree says: matrix layers in registration order, the stem, the head, aux heads."""

    layers: list[_Layer]
    owner_layer: dict[int, str]  # id(param) -> name of the layer holding it directly
    modules: dict[str, nn.Module]
    stem: tuple[str, str] | None = None  # (layer name, reason)
    head: tuple[str, str] | None = None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _analyse(module: nn.Module) -> _Structure:
    modules = dict(module.named_modules())
    layers: list[tuple[str, nn.Module, int]] = []
    owner_layer: dict[int, str] = {}
    for name, mod in modules.items():
        mats = [p for p in mod.parameters(recurse=False) if p.requires_grad and why_not_muon(p) is None]
        if mats:
            layers.append((name, mod, matrix_shape(mats[0].shape)[0]))
            for p in mats:
                owner_layer.setdefault(id(p), name)
    # Matrix layers below each module (a "block" holds at least two).
    count: dict[str, int] = {}
    for name, _, _ in layers:
        parts = name.split(".") if name else []
        for i in range(len(parts) + 1):
            prefix = ".".join(parts[:i])
            count[prefix] = count.get(prefix, 0) + 1
    # Repeated blocks: blocks of one class seen at least twice (plain containers: of identical structure).
    signatures: dict[int, int] = {}
    interned: dict[tuple, int] = {}

    def signature(m: nn.Module) -> int:
        if id(m) not in signatures:
            key = (type(m).__qualname__, tuple(signature(c) for c in m.children()))
            signatures[id(m)] = interned.setdefault(key, len(interned))
        return signatures[id(m)]

    keys: dict[str, object] = {}
    for name, mod in modules.items():
        if name and count.get(name, 0) >= 2:
            keys[name] = ("structure", signature(mod)) if type(mod) in _CONTAINERS else type(mod)
    seen: dict[object, int] = {}
    for key in keys.values():
        seen[key] = seen.get(key, 0) + 1
    repeated = {name for name, key in keys.items() if seen[key] >= 2}

    def in_repeated(name: str, start: int = 0) -> bool:
        parts = name.split(".")
        return any(".".join(parts[: i + 1]) in repeated for i in range(start, len(parts)))

    out = _Structure(
        [_Layer(n, m, d, bool(n) and in_repeated(n), bool(n) and in_repeated(n, 1)) for n, m, d in layers],
        owner_layer,
        modules,
    )
    if len(out.layers) < 2:
        return out  # one matrix layer: nothing to tell input, hidden and output apart
    first = out.layers[0]
    has_body = any(layer.in_body for layer in out.layers[1:])
    if not first.in_body:
        if has_body:
            out.stem = (first.name, "input stem (first layer, before the repeated blocks)")
        elif isinstance(first.module, nn.modules.conv._ConvNd):
            out.stem = (first.name, "input stem (first layer, a convolution reading the input)")
    outside = [layer for layer in out.layers if not layer.in_body]
    if outside and outside[-1] is not first:
        out.head = (outside[-1].name, "output head (last layer outside the repeated blocks)")
    return out


def _find_aux_heads(structure: _Structure, head: str) -> dict[str, str]:
    """Side branches ending in a layer of the head's kind and output size (GoogLeNet's ``aux1.fc2``).

    A side branch is a top-level child registered after a repeated block, holding at least two
    matrix layers, whose last layer is not inside a repeated block of its own.
    """
    by_name = {layer.name: layer for layer in structure.layers}
    if head not in by_name:
        return {}
    ref = by_name[head]
    last_in_branch: dict[str, _Layer] = {}
    layers_in_branch: dict[str, int] = {}
    after_body: set[str] = set()
    first_body_branch = None  # the branch holding the first repeated block
    for layer in structure.layers:
        branch = layer.name.split(".")[0]
        if "." in layer.name:
            last_in_branch[branch] = layer
            layers_in_branch[branch] = layers_in_branch.get(branch, 0) + 1
            if first_body_branch is not None and branch != first_body_branch:
                after_body.add(branch)
        if layer.in_body and first_body_branch is None:
            first_body_branch = branch
    aux = {}
    for branch, layer in last_in_branch.items():
        if (
            branch != head.split(".")[0]
            and branch in after_body
            and layers_in_branch[branch] >= 2
            and not layer.branch_in_body
            and type(layer.module) is type(ref.module)
            and layer.out_dim == ref.out_dim
        ):
            aux[layer.name] = f"auxiliary output head (last layer of {branch!r}, the head's kind and output size)"
    return aux


def _head_by_name(
    name: str, layer: str | None, structure: _Structure, head_names: Sequence[str]
) -> tuple[str, str] | None:
    """``(kind, pattern)`` if a head pattern matches ``name``: kind "head", or "hidden" for an earlier layer of a
    head ``nn.Sequential`` (VGG's ``classifier.0``: only the container's last layer is the output)."""
    if pattern := matching_pattern(name, head_names):
        parts = name.split(".")
        if (
            layer is None
            or not name.startswith(layer + ".")
            or not any(fnmatch.fnmatchcase(p, pattern) for p in parts[:-1])
        ):
            return "head", pattern
        start = next(i for i, p in enumerate(parts[:-1]) if fnmatch.fnmatchcase(p, pattern))
        lparts = layer.split(".")
        for i in range(start + 1, len(lparts)):
            parent = structure.modules.get(".".join(lparts[:i]))
            if isinstance(parent, nn.Sequential):
                later = [c for c, _ in parent.named_children()]
                after = later[later.index(lparts[i]) + 1 :]
                prefix = ".".join(lparts[:i])
                if any(
                    any(m.name == f"{prefix}.{c}" or m.name.startswith(f"{prefix}.{c}.") for m in structure.layers)
                    for c in after
                ):
                    return "hidden", pattern
        return "head", pattern
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
    head_verdict: tuple[str, str] | None = None,
    role: str | None = None,
) -> Route:
    name = names[0]
    aliases = f" (tied: {', '.join(names[1:])})" if len(names) > 1 else ""
    not_matrix = why_not_muon(param)
    for n in names:
        if pattern := matching_pattern(n, adamw_names):
            group = ADAMW_NO_DECAY if param.ndim < 2 else ADAMW
            return Route(name, param, group, f"adamw_names pattern {pattern!r}{aliases}")
    for n in names:
        if pattern := matching_pattern(n, muon_names):
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
        if pattern := matching_pattern(n, embedding_names):
            return Route(name, param, ADAMW, f"embedding (name matches {pattern!r}){aliases}")
    if head_verdict is None:
        head_verdict = next((("head", p) for n in names if (p := matching_pattern(n, head_names))), None)
    if head_verdict is not None:
        kind, pattern = head_verdict
        if kind == "head":
            return Route(name, param, ADAMW, f"output head (name matches {pattern!r}){aliases}")
        return Route(
            name,
            param,
            MUON,
            f"hidden matrix inside the head {pattern!r} (an nn.Sequential whose last layer is the output){aliases}",
        )
    if role is not None:
        return Route(name, param, ADAMW, role + aliases)
    if param.ndim > 2:
        rows, cols = matrix_shape(param.shape)
        return Route(name, param, MUON, f"hidden {param.ndim}-D kernel, flattened to {rows} x {cols}")
    return Route(name, param, MUON, "hidden matrix")


def _warn_suspicious(routes: list[Route], head_found: bool, has_modules: bool) -> None:
    if has_modules and not head_found and any(r.use_muon for r in routes):
        warnings.warn(
            "lightning_muon: no output head or classifier was recognised, neither by name "
            f"(patterns {DEFAULT_HEAD_NAMES}) nor by structure (a last layer outside the repeated blocks); "
            "if the model has one it is being trained by Muon. "
            "Pass adamw_names=['<head name>'] to route it to AdamW.",
            stacklevel=3,
        )
    for r in routes:
        if r.use_muon and r.param.ndim == 2:  # embeddings and heads are 2-D; conv kernels never warn
            rows, cols = r.param.shape
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
    structure: bool = True,
    warn: bool = True,
) -> list[Route]:
    """Route every trainable parameter of ``module`` (frozen ones are left out).

    Rules, first match wins:

    1. ``adamw_names`` / ``muon_names`` overrides (fnmatch patterns on the dotted name, any of
       its components, or a module prefix such as ``"decoder.proj"``);
    2. tensors that are not matrices (see :func:`why_not_muon`) to AdamW, without weight decay
       when 1-D;
    3. ``nn.Embedding`` weights and names matching ``embedding_names`` to AdamW;
    4. names matching ``head_names`` to AdamW (a head tied to the embedding is one tensor, matched
       through either name); when the match is an ``nn.Sequential`` of several layers (VGG's
       ``classifier``), only its last layer is the output head, the earlier ones are hidden;
    5. with ``structure=True``, what the module tree says where names do not settle it. A
       *repeated block* holds two or more matrix layers and recurs in the model (same class; plain
       containers: identical structure): ResNet's ``BasicBlock``, a transformer layer. Then

       * **output head**: when no name matched, the last matrix layer outside the repeated blocks
         (ResNet's and RegNet's ``fc``);
       * **auxiliary heads**: the last layer of another top-level branch, of the head's kind and
         output size (GoogLeNet's ``aux1.fc2``, Inception's ``AuxLogits.fc``);
       * **input stem**: the first matrix layer when repeated blocks follow it (ResNet's
         ``conv1``) or when it is a convolution (VGG's ``features.0``), to AdamW as Keller
         Jordan keeps the first layer off Muon. A flat MLP's first ``Linear`` stays on Muon.

       A model with a single matrix layer has no head, stem or hidden layer to tell apart;

    6. everything else, conv kernels included, to Muon ("hidden matrix").

    Example:
        >>> import torch.nn as nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv1 = nn.Conv2d(3, 8, 3)
        ...         block = lambda: nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))  # noqa: E731
        ...         self.blocks = nn.Sequential(block(), block())
        ...         self.fc = nn.Linear(8, 10)
        >>> for r in route_parameters(Net()):
        ...     if r.name.endswith("weight"):
        ...         print(f"{r.name:18} {r.group:6} {r.reason}")
        conv1.weight       adamw  input stem (first layer, before the repeated blocks)
        blocks.0.0.weight  muon   hidden 4-D kernel, flattened to 8 x 72
        blocks.0.1.weight  muon   hidden 4-D kernel, flattened to 8 x 72
        blocks.1.0.weight  muon   hidden 4-D kernel, flattened to 8 x 72
        blocks.1.1.weight  muon   hidden 4-D kernel, flattened to 8 x 72
        fc.weight          adamw  output head (last layer outside the repeated blocks)
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
    trainable = [key for key in aliases if params[key].requires_grad]
    tree = _analyse(module) if structure else None
    # Name verdicts first: the structural head is only sought where no name matched.
    verdicts: dict[int, tuple[str, str]] = {}
    named_head_layer = None
    for key in trainable:
        layer = tree.owner_layer.get(key) if tree else None
        for n in aliases[key]:
            if tree is not None:
                verdict = _head_by_name(n, layer, tree, head_names)
            else:
                verdict = ("head", pat) if (pat := matching_pattern(n, head_names)) else None
            if verdict:
                verdicts[key] = verdict
                if verdict[0] == "head" and named_head_layer is None and layer is not None:
                    named_head_layer = layer
                break
    head_found = any(v[0] == "head" for v in verdicts.values())
    roles: dict[str, str] = {}
    if tree is not None:
        if tree.stem:
            roles[tree.stem[0]] = tree.stem[1]
        head_layer = named_head_layer
        if not head_found and tree.head:
            head_layer = tree.head[0]
            roles[head_layer] = tree.head[1]
            head_found = True
        if head_layer is not None:
            roles.update(_find_aux_heads(tree, head_layer))
    routes: list[Route] = []
    for key in trainable:
        names, p = aliases[key], params[key]
        layer = tree.owner_layer.get(key) if tree else None
        routes.append(
            _route_one(
                names,
                p,
                owner.get(key),
                embedding_names=embedding_names,
                head_names=head_names,
                adamw_names=adamw_names,
                muon_names=muon_names,
                head_verdict=verdicts.get(key),
                role=roles.get(layer) if layer is not None else None,
            )
        )
    head_found = head_found or any(matching_pattern(n, adamw_names) for key in aliases for n in aliases[key])
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
            [name],
            p,
            None,
            embedding_names=embedding_names,
            head_names=head_names,
            adamw_names=(),
            muon_names=(),
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
        >>> from lightning_muon import Muon
        >>> model = nn.ModuleDict({"encoder": nn.Linear(8, 8), "decoder": nn.ModuleDict({"proj": nn.Linear(8, 8)}),
        ...                        "out": nn.Linear(8, 3)})
        >>> groups = muon_param_groups(model, adamw_names=["decoder.proj"], verbose=True)
        parameter            shape  group           reason
        ---------------------...
        encoder.weight       8x8    muon            hidden matrix
        encoder.bias         8      adamw_no_decay  1-D (gain or bias)
        decoder.proj.weight  8x8    adamw           adamw_names pattern 'decoder.proj'
        decoder.proj.bias    8      adamw_no_decay  adamw_names pattern 'decoder.proj'
        out.weight           3x8    adamw           output head (last layer outside the repeated blocks)
        out.bias             3      adamw_no_decay  1-D (gain or bias)
        >>> optimizer = Muon(groups, lr=0.02)
    """
    routes = route_parameters(
        module,
        embedding_names=embedding_names,
        head_names=head_names,
        adamw_names=adamw_names,
        muon_names=muon_names,
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
