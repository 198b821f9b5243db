import os
import warnings

import pytest
import torch
from packaging.version import Version

# Scripts that tests launch as subprocesses: not test modules, and importing them (as
# --doctest-modules would) runs their module-level setup (e.g. torch.set_num_threads(1)).
collect_ignore_glob = ["dist_scripts/*", "scripts/*"]

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# No test's verdict may depend on the CPU that runs it. ns_dtype="auto" reads the CPU's flags, so the
# suite resolves it as on the kind LIGHTNING_MUON_CPU_KIND names (default: avx2, i.e. float32), in
# this process and in every subprocess a test starts. Tests about the dtype paths are marked
# cpu_kinds; .ci/run runs them again under each kind, with oneDNN limited as on that CPU.
os.environ.setdefault("LIGHTNING_MUON_CPU_KIND", "avx2")


def pytest_runtest_setup(item):
    # @pytest.mark.requires_torch("2.9", "torch.optim.Muon"): skipped, with the reason, on an older
    # torch (the floor run, tests/compat/run_floor.sh, installs the oldest supported one).
    for mark in item.iter_markers("requires_torch"):
        version, why = mark.args
        if Version(torch.__version__).release < Version(version).release:
            pytest.skip(f"needs torch >= {version} ({why}); this is torch {torch.__version__}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_sessionfinish(session, exitstatus):
    # "no tests collected" (exit 5) must fail CI; pytest already exits non-zero, make it loud.
    if session.testscollected == 0:
        warnings.warn("pytest collected no tests", stacklevel=1)
