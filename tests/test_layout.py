"""The package layout: public API re-exported with __all__, old module paths deprecated for one release."""

import importlib
import sys
import warnings

import pytest

import lightning_muon
from lightning_muon import _deprecated


def test_every_public_name_is_exported_and_importable():
    assert len(set(lightning_muon.__all__)) == len(lightning_muon.__all__)
    for name in lightning_muon.__all__:
        assert getattr(lightning_muon, name) is not None, name
    for package in ("optim", "parallel", "routing", "diagnostics", "callbacks"):
        module = importlib.import_module(f"lightning_muon.{package}")
        for name in module.__all__:
            assert hasattr(module, name), f"lightning_muon.{package}.{name}"


@pytest.mark.parametrize("old", sorted(_deprecated.MOVED))
def test_old_module_paths_still_import_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    new = [importlib.import_module(n) for n in _deprecated.MOVED[old]]
    for target in new:  # everything public of the new module(s) is reachable through the old path
        for name in getattr(target, "__all__", ()):
            assert getattr(module, name) is getattr(target, name), f"{old}.{name}"
    sys.modules.pop(old, None)


def test_old_attribute_access_on_the_package_warns():
    with pytest.warns(
        DeprecationWarning, match="lightning_muon.newton_schulz moved to lightning_muon.optim.newton_schulz"
    ):
        module = lightning_muon.__getattr__("newton_schulz")
    assert module.orthogonalize is lightning_muon.orthogonalize
    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        lightning_muon.__getattr__("not_a_module")


def test_the_math_imports_no_lightning():
    # Newton–Schulz, the spectral functions and the optimizer are plain torch (DEVELOPERS: math apart from Lightning).
    code = (
        "import sys, lightning_muon.optim, lightning_muon.diagnostics, lightning_muon.parallel, lightning_muon.routing;"
        "print(any(m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')) for m in sys.modules))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("lightning_muon.callbacks")
