"""Timing helpers shared by the benchmarks: medians after warmup, interleaved rounds, matmul peak.

Every benchmark measures the machine's own matmul throughput in the same run and dtype, in the
same rounds as the code under test, so a shared or throttled machine slows both alike and the
reported fraction of peak stays meaningful.

Example:
    >>> import torch
    >>> from benchmarks._timing import interleaved_medians, matmul_probe
    >>> mm, mm_flops = matmul_probe(512, torch.float32, torch.device("cpu"))
    >>> medians = interleaved_medians({"mm": mm}, warmup=1, repeats=3, device=torch.device("cpu"))
    >>> mm_flops / medians["mm"] > 0
    True
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from lightning_muon.optim.ns_dtype import describe_device, ns_dtype_choice, resolve_ns_dtype

__all__ = [
    "add_common_args",
    "run_header",
    "setup",
    "synchronize",
    "interleaved_medians",
    "matmul_probe",
    "markdown_table",
    "state_bytes",
]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``, ``--repeats``, ``--warmup``, ``--threads``, ``--mm-size``."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="compute dtype of Newton–Schulz and of the matmul peak probe (default: auto, "
        "what ns_dtype='auto' resolves to on the device)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the repeats")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's choice)"
    )
    parser.add_argument(
        "--mm-size",
        type=int,
        default=None,
        help="side of the square torch.mm that measures peak (default 2048 CPU, 8192 GPU)",
    )


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, int]:
    """Validate the common arguments; returns (device, dtype, mm_size)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    mm_size = args.mm_size or (2048 if device.type == "cpu" else 8192)
    return device, resolve_ns_dtype(device, args.dtype), mm_size


def command_line() -> str:
    """How this benchmark was started, for the printed header: ``python -m ... args``."""
    return " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv])


def run_header(device: torch.device, ns_dtype: str = "auto") -> str:
    """What a benchmark ran on: hardware, torch, threads, load, and the Newton–Schulz dtype chosen.

    Every benchmark prints it first, so a recorded number always names its CPU (or GPU).
    """
    choice = ns_dtype_choice(device)
    resolved = resolve_ns_dtype(device, ns_dtype)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    how = f"auto -> {choice.dtype} ({choice.reason})" if ns_dtype == "auto" else f"{resolved} (explicit)"
    return (
        f"machine: {describe_device(device)}; torch {torch.__version__}; "
        f"load average (1 min) {load:.2f}\nns_dtype: {how}"
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (one call of each per round).

    Interleaving spreads a noisy neighbour's load over all candidates instead of penalising
    whichever one happened to run during the burst.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_probe(size: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], torch.Tensor], int]:
    """One large square ``torch.mm`` and its FLOP count: the machine's matmul throughput."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), 2 * size**3


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def cell(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in an optimizer's per-parameter state."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
