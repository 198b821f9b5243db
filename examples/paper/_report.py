"""What every figure returns, and the markdown report built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One line of a figure's table: the paper's number next to ours."""

    quantity: str
    paper: str
    ours: str
    setting: str
    seeds: str


@dataclass
class Section:
    """A reproduced figure: its table, the choices made, the PNG and raw numbers (for tests)."""

    key: str
    title: str
    rows: list[Row]
    choices: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    png: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [
            f"## {self.title}",
            "",
            *([f"![{self.key}]({self.png})", ""] if self.png else []),
            "| quantity | paper | ours | setting | seeds |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r.quantity} | {r.paper} | {r.ours} | {r.setting} | {r.seeds} |" for r in self.rows]
        if self.choices:
            lines += ["", "Choices where the paper underspecifies:", ""] + [f"- {c}" for c in self.choices]
        if self.notes:
            lines += ["", *self.notes]
        lines += ["", f"_Wall time: {self.seconds:.1f} s; CPU time of this process: {self.cpu_seconds:.1f} s._", ""]
        return "\n".join(lines)


def summary_line(s: Section, stamp: str) -> str:
    return f"| {s.key} | {stamp} | {s.seconds:.0f} | {s.cpu_seconds:.0f} | {s.rows[0].quantity}: {s.rows[0].ours} |"


def write_report(sections: list[Section], out: Path, header: str, stamp: str, order: list[str]) -> Path:
    """Save each section under ``out/sections/`` and rebuild ``report.md`` from every saved section
    (in ``order``), so figures run by separate ``--only`` invocations end up in one report."""
    folder = out / "sections"
    folder.mkdir(parents=True, exist_ok=True)
    for s in sections:
        (folder / f"{s.key}.md").write_text(s.markdown())
        (folder / f"{s.key}.summary").write_text(summary_line(s, stamp))
    keys = [k for k in order if (folder / f"{k}.md").exists()]
    table = ["| figure | run (UTC) | wall (s) | CPU (s) | headline (ours) |", "|---|---|---|---|---|"]
    table += [(folder / f"{k}.summary").read_text() for k in keys]
    path = out / "report.md"
    bodies = "\n".join((folder / f"{k}.md").read_text() for k in keys)
    path.write_text(header + "\n" + "\n".join(table) + "\n\n" + bodies)
    return path


def figure(ncols: int, width: float = 4.6, height: float = 3.6):
    """A matplotlib figure on the Agg backend (no GUI)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path.name


def mean_range(values: list[float], digits: int = 3) -> str:
    lo, hi, mean = min(values), max(values), sum(values) / len(values)
    return f"{mean:.{digits}g} ({lo:.{digits}g}-{hi:.{digits}g})"
