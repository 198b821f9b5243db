"""Module paths from before the packages (``lightning_muon.newton_schulz``, ...), kept for one release.

``import lightning_muon.newton_schulz`` (or ``from lightning_muon.spectral import ...``) still
works and warns with a ``DeprecationWarning`` naming the new place. A module that moved whole is
the new module itself; one that was split is a read-only merge of the modules it became.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module -> the module(s) its contents now live in
MOVED: dict[str, tuple[str, ...]] = {
    "lightning_muon.optimizer": ("lightning_muon.optim.muon",),
    "lightning_muon.functional": ("lightning_muon.optim.functional", "lightning_muon.routing.matrix_view"),
    "lightning_muon.newton_schulz": ("lightning_muon.optim.newton_schulz",),
    "lightning_muon.precision": ("lightning_muon.optim.ns_dtype",),
    "lightning_muon.low_precision": ("lightning_muon.optim.stochastic_rounding",),
    "lightning_muon.normuon": ("lightning_muon.optim.variants.normuon",),
    "lightning_muon.factory": ("lightning_muon.configure",),
    "lightning_muon.buckets": ("lightning_muon.parallel.buckets",),
    "lightning_muon.sharded": ("lightning_muon.parallel.placement",),
    "lightning_muon.distributed": ("lightning_muon.parallel.dtensor", "lightning_muon.parallel.groups"),
    "lightning_muon.structure": ("lightning_muon.routing.matrix_view",),
    "lightning_muon.spectral": ("lightning_muon.diagnostics.spectral", "lightning_muon.diagnostics.critical_batch"),
    "lightning_muon.per_example": ("lightning_muon.diagnostics.per_example",),
    "lightning_muon.qk_clip": ("lightning_muon.diagnostics.attention", "lightning_muon.optim.qk_clip"),
    "lightning_muon.callbacks._base": ("lightning_muon.callbacks.base",),
    "lightning_muon.callbacks._cache": ("lightning_muon.callbacks.cache",),
}


def _warn(old: str, new: tuple[str, ...], stacklevel: int) -> None:
    warnings.warn(
        f"{old} moved to {' and '.join(new)}; the old path works until the next release. "
        "Import from lightning_muon (the public API) or the new module.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def load(old: str, stacklevel: int = 2) -> types.ModuleType:
    """The module that replaces ``old`` (a merge when it was split), with a DeprecationWarning."""
    new = MOVED[old]
    _warn(old, new, stacklevel + 1)
    targets = [importlib.import_module(name) for name in new]
    if len(targets) == 1:
        return targets[0]
    merged = types.ModuleType(old, f"Deprecated: the contents of {' and '.join(new)}.")
    for target in targets:
        merged.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
    merged.__all__ = [n for t in targets for n in getattr(t, "__all__", ())]
    return merged


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths and hands out what replaced them."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):  # noqa: D102
        return load(spec.name, stacklevel=4)

    def exec_module(self, module):  # noqa: D102
        pass


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
