"""Reproduce "The Spectral Dynamics and Noise Geometry of Muon" (arXiv 2606.08388) in one command.

Every figure is rebuilt from ``lightning_muon``'s public API (``orthogonalize``, the spectral
functions, ``configure_muon``, the callbacks' TensorBoard output) and ``examples.matrix_sensing``;
``OUT/report.md`` gets one table per figure (the paper's number, ours, the setting, the seeds), the
choices made where the paper underspecifies, one ablation per choice, and one PNG per figure.

    python -m examples.paper                      # everything, default size (about 3 min of CPU time)
    python -m examples.paper --only fig3 fig7     # a selection
    python -m examples.paper --quick --out /tmp/p # small sizes (tests)

Figures: fig3 (nuclear-norm gap), fig4 (noise geometry: S(mu), AR(1) momentum factor, B_crit),
fig5 (GPT/ViT layerwise stable rank, Muon vs AdamW), fig7 (||sin Theta||_F in matrix sensing),
fig9 (weight decay phase diagram), fig12 (polar misalignment delta_P).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from examples.paper._report import Section, write_report

__all__ = ["FIGURES", "main", "run_figures"]


def _fig(module: str, name: str) -> Callable[[Path, bool], Section]:
    def call(out: Path, quick: bool) -> Section:
        import importlib

        return getattr(importlib.import_module(f"examples.paper.{module}"), name)(out, quick)

    return call


#: figure key -> function(out, quick) -> Section (imported lazily: fig5 needs Lightning)
FIGURES: dict[str, Callable[[Path, bool], Section]] = {
    "fig3": _fig("sensing", "fig3"),
    "fig4": _fig("noise", "fig4"),
    "fig5": _fig("nets", "fig5"),
    "fig7": _fig("sensing", "fig7"),
    "fig9": _fig("sensing", "fig9"),
    "fig12": _fig("sensing", "fig12"),
}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_figures(keys: list[str], out: Path, quick: bool = False) -> list[Section]:
    """Run the selected figures into ``out``; returns their sections (the report is not written)."""
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for k in keys:
        cpu = time.process_time()
        sec = FIGURES[k](out, quick)
        sec.cpu_seconds = time.process_time() - cpu
        print(f"[paper] {k}: {sec.seconds:.1f} s wall, {sec.cpu_seconds:.1f} s CPU", flush=True)
        sections.append(sec)
    return sections


def main(argv: list[str] | None = None) -> list[Section]:
    ap = argparse.ArgumentParser(
        prog="python -m examples.paper",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--only",
        nargs="+",
        default=list(FIGURES),
        metavar="FIG",
        help=f"figures to run (default: all of {', '.join(FIGURES)}); commas also separate",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and few seeds (for tests)")
    ap.add_argument("--out", type=Path, default=Path("runs/paper"))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every figure (1 is fastest for the small matrices; fig5 may gain from more)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    keys = [k for item in args.only for k in item.split(",") if k]
    if any(k not in FIGURES for k in keys):
        ap.error(f"--only: unknown figure in {keys}; choose from {list(FIGURES)}")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    sections = run_figures(keys, args.out, args.quick)
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    header = "\n".join(
        [
            '# Reproducing "The Spectral Dynamics and Noise Geometry of Muon" (arXiv 2606.08388)',
            "",
            "Every figure below was run by `python -m examples.paper` (the table says when; figures run by separate "
            "`--only` invocations into the same `--out` are collected here). Last invocation:  ",
            f"`{' '.join(['python -m examples.paper', *argv])}` at {stamp} UTC on {_cpu()} "
            f"({os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}, {args.threads} torch thread(s)"
            f"{' (quick sizes)' if args.quick else ''}: {total:.0f} s wall, {cpu:.0f} s CPU time of this process; "
            f"1-minute load average at the end {load:.1f} (wall time is inflated by other processes when the load "
            "exceeds the core count; CPU time is not).",
            "",
        ]
    )
    path = write_report(sections, args.out, header, stamp, list(FIGURES))
    print(f"[paper] wrote {path} ({total:.0f} s)")
    return sections
