"""Muon variants: what a variant changes in the update after orthogonalisation, and its state.

A Muon group's ``variant`` names an entry of :data:`VARIANTS` and ``variant_options`` holds its
options. The optimizer orthogonalises every Muon matrix the same way, then hands each variant the
orthogonalised updates of its groups (:meth:`Variant.transform`) before scaling and applying them.
A new variant is one new module here: a :class:`Variant` subclass, registered with
:func:`register_variant` (see :mod:`.normuon`, the first one).

Example:
    >>> import torch
    >>> class Halve(Variant):  # a toy variant: half the orthogonalised update, no state
    ...     name = "halve"
    ...     def transform(self, items, state):
    ...         return [0.5 * item.update for item in items]
    >>> _ = register_variant(Halve())
    >>> from lightning_muon import Muon
    >>> opt = Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "use_muon": True}], variant="halve")
    >>> opt.param_groups[0]["variant"], opt.param_groups[0]["variant_options"]
    ('halve', {})
    >>> del VARIANTS["halve"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...routing.matrix_view import MatrixView

__all__ = ["VARIANTS", "PlainMuon", "Variant", "VariantItem", "get_variant", "register_variant"]


@dataclass
class VariantItem:
    """One parameter's orthogonalised update, as a variant sees it.

    ``update`` has the shape of the parameter's local piece (the whole tensor, or this rank's
    shard of a DTensor ``param``); ``view`` is the parameter's matrix view (of its global shape);
    ``options`` its group's validated ``variant_options``.
    """

    param: Tensor
    update: Tensor
    view: MatrixView
    options: Mapping[str, Any]


class Variant:
    """What a Muon variant changes after orthogonalisation. Subclass it and override what differs.

    ``name`` is what a group's ``variant`` setting names; ``defaults`` are its options and their
    default values (a group's ``variant_options`` is completed from them and checked by
    :meth:`check_options`).
    """

    name: str = ""
    defaults: Mapping[str, Any] = {}

    def check_options(self, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The group's options completed from :attr:`defaults`; ValueError for an unknown name or a bad value."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(self.defaults) or "none"
            raise ValueError(f"{where}: variant {self.name!r} has no option {unknown[0]!r} (its options: {known})")
        return {**self.defaults, **options}

    def state_shapes(self, param: Tensor, view: MatrixView) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Extra optimizer state per parameter: ``{field: (shape, dtype)}``, created zero before the first step."""
        return {}

    def transform(self, items: Sequence[VariantItem], state: Mapping[Tensor, dict[str, Any]]) -> list[Tensor]:
        """The updates to apply, one per item (called once per step with every item of this variant;
        ``state`` is the optimizer's, holding the fields of :meth:`state_shapes`). Every rank calls it
        with the same parameters, so a variant may use collectives for DTensor items."""
        return [item.update for item in items]


class PlainMuon(Variant):
    """Muon itself: the orthogonalised update as it is."""

    name = "muon"


#: Registered variants by name (``Muon(variant=...)``).
VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Make ``variant`` available as ``Muon(variant=variant.name)``; returns it.

    Raises:
        ValueError: the name is empty or already taken by another variant.
    """
    if not isinstance(variant, Variant) or not isinstance(variant.name, str) or not variant.name:
        raise ValueError(f"register_variant: expected a Variant instance with a name, got {variant!r}")
    if VARIANTS.get(variant.name, variant) is not variant:
        raise ValueError(f"register_variant: a variant named {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant
    return variant


def get_variant(name: Any, where: str) -> Variant:
    """The registered variant ``name``; ValueError listing the registered ones otherwise."""
    if not isinstance(name, str) or name not in VARIANTS:
        raise ValueError(f"{where}: variant must be one of {tuple(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


register_variant(PlainMuon())

from . import normuon  # noqa: E402,F401  (registers "normuon")
