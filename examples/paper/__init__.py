"""Reproduce "The Spectral Dynamics and Noise Geometry of Muon" (arXiv 2606.08388) in one command.

Every experiment is rebuilt from ``lightning_muon``'s public API (``orthogonalize``, ``sin_theta``,
``delta_p``, ``polar_sensitivity``, ``Muon``, ``configure_muon``, the callbacks) and
:mod:`examples.matrix_sensing`. ``OUT/report.md`` opens with a headline table (each claim of the
paper quoted verbatim, our number, and a verdict: reproduced / partly / not reproduced / not
computable from the summary), then one section per figure with its table, our choices, ablations
and a PNG. ``OUT/report.json`` and ``OUT/sections/*.json`` hold the numbers the report is built
from (the tests read the committed copy, ``docs/paper_report.json``).

    python -m examples.paper                          # everything, default size (~10 min on 2 cores)
    python -m examples.paper --only fig3 fig7         # a selection (sections collect in one report)
    python -m examples.paper --quick --out /tmp/p     # small sizes (tests)
    python -m examples.paper --only plateau --full --data /data/train.bin   # the paper's GPT scale, GPU

Figures: fig2 (R_pw geometry), fig3 (nuclear-norm gap, every reading of the family), fig4 (noise
geometry), plateau (GPT learning-rate sweep, Muon vs AdamW: Fig. 5 and the abstract's plateau),
vit (Fig. 1's ViT control on natural-image patches and on digits), fig6 (measurement ensembles),
fig7 (sin Theta of W vs G), fig8 (sum alpha q), fig9 (weight decay), fig11 (diagnostics panel),
fig12 (delta_P).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from examples.paper._report import Section, write_report

__all__ = ["FIGURES", "main", "run_figures"]

#: figure key -> (module, function); each function is ``f(out, quick, workers, **options) -> Section``
FIGURES: dict[str, tuple[str, str]] = {
    "fig2": ("geometry", "fig2"),
    "fig3": ("sensing", "fig3"),
    "fig4": ("noise", "fig4"),
    "plateau": ("plateau", "plateau"),
    "vit": ("vit_control", "vit_control"),
    "fig6": ("geometry", "fig6"),
    "fig7": ("alignment", "fig7"),
    "fig8": ("alignment", "fig8"),
    "fig9": ("sensing", "fig9"),
    "fig11": ("alignment", "fig11"),
    "fig12": ("alignment", "fig12"),
}


def _function(key: str) -> Callable[..., Section]:
    module, name = FIGURES[key]
    return getattr(importlib.import_module(f"examples.paper.{module}"), name)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_figures(keys: list[str], out: Path, quick: bool = False, workers: int = 1, **options) -> list[Section]:
    """Run the selected figures into ``out``; returns their sections (the report is not written)."""
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for k in keys:
        cpu, wall = time.process_time(), time.perf_counter()
        fn = _function(k)
        sec = fn(out, quick, workers, **options) if k in ("plateau", "vit") else fn(out, quick, workers)
        sec.cpu_seconds = time.process_time() - cpu
        sec.seconds = max(sec.seconds, time.perf_counter() - wall)
        print(f"[paper] {k}: {sec.seconds:.1f} s wall, {sec.cpu_seconds:.1f} s CPU of this process", flush=True)
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
    ap.add_argument("--full", action="store_true", help="plateau/vit at the paper's scale (GPU; see --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="with --full: print the plan and its estimated cost only")
    ap.add_argument("--data", default=None, help="plateau --full: a .bin of uint16 GPT-2 tokens (default: KJV chars)")
    ap.add_argument("--out", type=Path, default=Path("runs/paper"))
    ap.add_argument("--rebuild", action="store_true", help="run nothing: rebuild the report from --out's sections")
    ap.add_argument(
        "--publish",
        type=Path,
        default=None,
        metavar="DOCS",
        help="also copy the report to DOCS/paper_report.{md,json} and its PNGs to DOCS/img/paper_*.png",
    )
    ap.add_argument("--workers", type=int, default=2, help="processes for independent runs (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    keys = [k for item in args.only for k in item.split(",") if k]
    if any(k not in FIGURES for k in keys):
        ap.error(f"--only: unknown figure in {keys}; choose from {list(FIGURES)}")
    if args.threads < 1 or args.workers < 1:
        ap.error("--threads and --workers must be >= 1")
    if args.rebuild and (args.full or args.dry_run or args.quick):
        ap.error("--rebuild runs nothing: --full, --dry-run and --quick do not apply")
    if (args.full or args.dry_run) and not set(keys) & {"plateau", "vit"}:
        ap.error("--full and --dry-run apply to plateau and vit: add --only plateau (or vit)")
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    options = dict(full=args.full, dry_run=args.dry_run, data=args.data)
    sections = [] if args.rebuild else run_figures(keys, args.out, args.quick, args.workers, **options)
    if args.dry_run:
        return sections
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    header = "\n".join(
        [
            '# Reproducing "The Spectral Dynamics and Noise Geometry of Muon" (arXiv 2606.08388)',
            "",
            "Built by `python -m examples.paper` from the sections saved under `--out` (figures run by separate "
            "`--only` invocations are collected; each section says when it ran). Last invocation:  ",
            f"`{' '.join(['python -m examples.paper', *argv])}` at {stamp} UTC on {cpu_name()} "
            f"({os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}, {args.workers} worker process(es) of 1 torch thread"
            f"{' (quick sizes)' if args.quick else ''}: {total:.0f} s wall, {cpu:.0f} s CPU time of the main "
            f"process (workers not counted); 1-minute load average at the end {load:.1f}.",
            "",
            "Nothing in the 'paper' columns comes from anywhere but the paper's summary (`shared/paper/`), quoted "
            "verbatim (`examples/paper/quotes.py`); every other setting is ours and listed under each section.",
            "",
        ]
    )
    previous = args.out / "report.md"
    if args.rebuild and previous.exists() and "## Headline" in previous.read_text():
        header = previous.read_text().split("## Headline", 1)[0].rstrip("\n") + "\n"  # the last run's header
    path = write_report(sections, args.out, header, list(FIGURES), stamp)
    print(f"[paper] wrote {path} ({total:.0f} s)")
    if args.publish is not None:
        publish(args.out, args.publish)
        print(f"[paper] published to {args.publish}/paper_report.md")
    return sections


def publish(out: Path, docs: Path) -> None:
    """Copy ``out/report.{md,json}`` to ``docs/paper_report.{md,json}`` and every PNG the report
    shows to ``docs/img/paper_<name>.png``, rewriting the links."""
    import shutil

    (docs / "img").mkdir(parents=True, exist_ok=True)
    text = (out / "report.md").read_text()
    for png in sorted(out.glob("*.png")):
        if f"]({png.name})" in text:
            shutil.copyfile(png, docs / "img" / f"paper_{png.name}")
            text = text.replace(f"]({png.name})", f"](img/paper_{png.name})")
    (docs / "paper_report.md").write_text(text)
    shutil.copyfile(out / "report.json", docs / "paper_report.json")
