"""What every figure returns, the verdict per claim, and the markdown report built from them.

A figure returns a :class:`Section`: its table (:class:`Row`), the claims it tests (:class:`Claim`,
each with the paper's words, our number and a verdict), our choices, notes, a PNG and the raw
numbers (``data``, saved as JSON next to the report so that tests and later reports can read them
without rerunning the experiment).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from examples.paper.quotes import quote

__all__ = [
    "VERDICTS",
    "Claim",
    "Row",
    "Section",
    "figure",
    "load_section",
    "mean_range",
    "save",
    "write_report",
]

#: the four verdicts of the headline table
VERDICTS = ("reproduced", "partly", "not reproduced", "not computable from the summary")


@dataclass
class Row:
    """One line of a figure's table: the paper's words (quoted, or ``"-"``) next to our number."""

    quantity: str
    paper: str
    ours: str
    setting: str
    seeds: str


@dataclass
class Claim:
    """One claim of the paper, our number behind it and the verdict.

    ``quote_key`` names a verbatim quote of :mod:`examples.paper.quotes` (the only place the
    paper's words come from); ``evidence`` is our number; ``verdict`` one of :data:`VERDICTS`.
    """

    figure: str
    quote_key: str
    evidence: str
    verdict: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"Claim: verdict must be one of {VERDICTS}, got {self.verdict!r}")
        quote(self.quote_key)  # raises on an unknown key

    @property
    def paper(self) -> str:
        return quote(self.quote_key)


@dataclass
class Section:
    """A reproduced figure: its table, claims, the choices made, the PNG and raw numbers."""

    key: str
    title: str
    rows: list[Row]
    choices: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    png: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.png:
            lines += [f"![{self.key}]({self.png})", ""]
        if self.claims:
            lines += ["| figure | the paper (verbatim) | ours | verdict |", "|---|---|---|---|"]
            lines += [f"| {c.figure} | {_cell(c.paper)} | {_cell(c.evidence)} | **{c.verdict}** |" for c in self.claims]
            lines.append("")
        lines += ["| quantity | paper | ours | setting | seeds |", "|---|---|---|---|---|"]
        lines += [
            f"| {_cell(r.quantity)} | {_cell(r.paper)} | {_cell(r.ours)} | {_cell(r.setting)} | {r.seeds} |"
            for r in self.rows
        ]
        if self.choices:
            lines += ["", "Our choices (the paper's summary does not state these):", ""]
            lines += [f"- {c}" for c in self.choices]
        if self.notes:
            lines += ["", *self.notes]
        lines += ["", f"_Wall time: {self.seconds:.1f} s; CPU time of this process: {self.cpu_seconds:.1f} s._", ""]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dict(
            key=self.key,
            title=self.title,
            rows=[asdict(r) for r in self.rows],
            choices=self.choices,
            notes=self.notes,
            png=self.png,
            seconds=self.seconds,
            cpu_seconds=self.cpu_seconds,
            data=_jsonable(self.data),
            claims=[asdict(c) for c in self.claims],
        )


def load_section(d: dict[str, Any]) -> Section:
    """The inverse of :meth:`Section.to_json` (``data`` keeps JSON's string keys)."""
    return Section(
        key=d["key"],
        title=d["title"],
        rows=[Row(**r) for r in d["rows"]],
        choices=list(d["choices"]),
        notes=list(d["notes"]),
        png=d["png"],
        seconds=d["seconds"],
        cpu_seconds=d["cpu_seconds"],
        data=d["data"],
        claims=[Claim(**c) for c in d["claims"]],
    )


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    return x


def write_report(sections: list[Section], out: Path, header: str, order: list[str], stamp: str) -> Path:
    """Save each section as ``out/sections/<key>.json`` and rebuild ``report.md`` and
    ``report.json`` from every saved section (in ``order``), so that figures run by separate
    ``--only`` invocations end up in one report with one headline table."""
    folder = out / "sections"
    folder.mkdir(parents=True, exist_ok=True)
    for s in sections:
        (folder / f"{s.key}.json").write_text(json.dumps({**s.to_json(), "run": stamp}, indent=1))
    saved = {k: json.loads((folder / f"{k}.json").read_text()) for k in order if (folder / f"{k}.json").exists()}
    secs = [load_section(d) for d in saved.values()]
    claims = [c for s in secs for c in s.claims]
    counts = {v: sum(c.verdict == v for c in claims) for v in VERDICTS}
    head = [
        "## Headline: every claim, its verdict and the number behind it",
        "",
        "Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ". The paper's words are quoted verbatim "
        "from its summary (`shared/paper/`); the thresholds behind each verdict are stated in its section.",
        "",
        "| figure | the paper (verbatim) | ours | verdict |",
        "|---|---|---|---|",
    ]
    head += [f"| {c.figure} | {_cell(c.paper)} | {_cell(c.evidence)} | **{c.verdict}** |" for c in claims]
    runs = ["", "| section | run (UTC) | wall (s) | CPU (s) |", "|---|---|---|---|"]
    runs += [f"| {k} | {d['run']} | {d['seconds']:.0f} | {d['cpu_seconds']:.0f} |" for k, d in saved.items()]
    path = out / "report.md"
    path.write_text("\n".join([header, *head, *runs, "", *(s.markdown() for s in secs)]))
    (out / "report.json").write_text(json.dumps(saved, indent=1))
    return path


def figure(ncols: int, width: float = 4.6, height: float = 3.6, nrows: int = 1):
    """A matplotlib figure on the Agg backend (no GUI) and its axes, row by row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path.name


def mean_range(values: list[float], digits: int = 3) -> str:
    lo, hi, mean = min(values), max(values), sum(values) / len(values)
    return f"{mean:.{digits}g} ({lo:.{digits}g}-{hi:.{digits}g})"
