"""What a model's module tree says about its layers: repeated blocks, the input stem, the output head.

Plain torch (no Lightning). :func:`analyse` lists the modules that hold a trainable matrix
directly, finds the *repeated blocks* (two or more matrix layers, recurring in the model), and from
them the input stem (the first layer before the blocks) and the output head (the last layer
outside them); :func:`find_aux_heads` finds auxiliary heads, :func:`head_by_name` tells an output
head matched by name from an earlier layer of a head ``nn.Sequential``. :mod:`.rules` decides the
routes from this.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .matrix_view import matrix_shape
from .patterns import matching_pattern, why_not_muon

__all__ = ["Layer", "Structure", "analyse", "find_aux_heads", "head_by_name"]


@dataclass
class Layer:
    """A module holding a trainable matrix parameter directly (a Linear, a Conv, an attention's in_proj)."""

    name: str
    module: nn.Module
    out_dim: int
    in_body: bool  # inside a repeated block
    branch_in_body: bool  # inside a repeated block below its top-level child


@dataclass
class Structure:
    """What the module tree says: matrix layers in registration order, the stem, the head, aux heads."""

    layers: list[Layer]
    owner_layer: dict[int, str]  # id(param) -> name of the layer holding it directly
    modules: dict[str, nn.Module]
    stem: tuple[str, str] | None = None  # (layer name, reason)
    head: tuple[str, str] | None = None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def analyse(module: nn.Module) -> Structure:
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

    out = Structure(
        [Layer(n, m, d, bool(n) and in_repeated(n), bool(n) and in_repeated(n, 1)) for n, m, d in layers],
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


def find_aux_heads(structure: Structure, head: str) -> dict[str, str]:
    """Side branches ending in a layer of the head's kind and output size (GoogLeNet's ``aux1.fc2``).

    A side branch is a top-level child registered after a repeated block, holding at least two
    matrix layers, whose last layer is not inside a repeated block of its own.
    """
    by_name = {layer.name: layer for layer in structure.layers}
    if head not in by_name:
        return {}
    ref = by_name[head]
    last_in_branch: dict[str, Layer] = {}
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


def head_by_name(
    name: str, layer: str | None, structure: Structure, head_names: Sequence[str]
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
