"""Start the worker scripts of this folder as subprocesses (each spawns its own gloo ranks), wait for them,
and compare what they save; and, inside a worker, record which matrices its rank orthogonalises."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).parent
ROOT = SCRIPTS.parents[1]


def free_port() -> str:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(script: str, *args: str) -> subprocess.Popen:
    """Run ``script`` (a file of this folder) with this repository first on the path, one thread per rank."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PORT=free_port(), MASTER_PORT=free_port(), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    """Wait for every process; fail with the end of its output if one exits non-zero."""
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-4000:]


def assert_same_training(got: Path, want: Path, epoch: int) -> None:
    """Parameters, momentum and AdamW moments saved at ``epoch`` by two runs agree to 1e-5.

    The runs (one process vs several) differ only in float32 summation order (gradient all-reduce or
    reduce-scatter, tensor-parallel partial sums; NS in float32): measured <= 5.4e-7.
    """
    a = torch.load(want / f"epoch{epoch}.pt", weights_only=False)
    b = torch.load(got / f"epoch{epoch}.pt", weights_only=False)
    assert a.keys() == b.keys() and any(k.startswith("momentum_buffer.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)


def record_orthogonalized() -> list[tuple[int, int]]:
    """Record, from now on in this process, the ``(rows, cols)`` of every matrix that Muon's bucket loop
    (``lightning_muon.parallel.buckets``, through ``polar_stack``) orthogonalises on this rank, one entry
    per matrix, in the returned list.

    The patched function calls through, so results are unchanged.
    """
    import lightning_muon.parallel.buckets as buckets

    record: list[tuple[int, int]] = []
    original = buckets.polar_stack

    def recording(matrices, *args, **kwargs):  # a (batch, m, n) stack or a list of (m, n) matrices
        record.extend([tuple(matrices[0].shape[-2:])] * len(matrices))
        return original(matrices, *args, **kwargs)

    buckets.polar_stack = recording
    return record
