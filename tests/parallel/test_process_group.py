"""``Muon(process_group=...)``: None (this process alone), an explicit group, a 1-D DeviceMesh.

Real 2-process gloo runs (tests/dist_scripts/process_group.py), compared with one process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DIST_SCRIPTS

sys.path.insert(0, str(DIST_SCRIPTS))
import raw_step  # noqa: E402
from _launch import launch  # noqa: E402

pytestmark = pytest.mark.slow


def _single_process(seed: int) -> list[torch.Tensor]:
    params, _ = raw_step.one_process(seed, "float32")
    return [p.detach() for p in params]


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_process_group_none_explicit_group_and_mesh(tmp_path: Path) -> None:
    proc = launch("process_group.py", str(tmp_path))
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"2-process run hung:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # (a) rank 0 alone with process_group=None while rank 1 idles: no hang, the single-process result.
    _close(r0["alone"], _single_process(0))
    # (b) different models per rank, process_group=None: each matches its own single-process run.
    _close(r0["own"], _single_process(10))
    _close(r1["own"], _single_process(11))
    # (c) an explicit group and a 1-D mesh behave like the default DDP path: the work is shared
    # (each matrix orthogonalised once, on one rank) and every rank ends with the same parameters.
    reference = _single_process(0)
    per_step = sum(1 for p in raw_step.make(0)[0] if p.ndim >= 2)
    total = per_step * raw_step.STEPS
    for label in ("auto", "group", "mesh"):
        _close(r0[label], reference)
        assert all(torch.equal(a, b) for a, b in zip(r0[label], r1[label]))
        assert all(torch.equal(a, b) for a, b in zip(r0[label], r0["auto"]))
        counts = (r0[f"{label}_orthogonalized"], r1[f"{label}_orthogonalized"])
        assert sum(counts) == total and min(counts) > 0, (label, counts)
