"""Muon vs AdamW on the GPT and ViT demos with equal budgets: a side-by-side report with plots.

Each run is the demo config, alone (Muon) or followed by ``examples/configs/adamw.yaml`` (AdamW), the
same steps, data, schedule and seed; the curves are read back from the runs' TensorBoard event
files. Writes ``OUT/report.md`` (final validation loss, ViT accuracy, mean stable rank) and
``OUT/compare.png`` (validation loss and mean stable rank over steps, per task and optimizer).

    python -m examples.compare --out runs/compare                 # both demos, CPU defaults
    python -m examples.compare --tasks gpt --steps 1000 --out runs/compare_gpt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TASKS = {
    "gpt": ("examples.gpt", "examples/configs/gpt_demo.yaml"),
    "vit": ("examples.vit", "examples/configs/vit_demo.yaml"),
}
OPTIMIZERS = ("muon", "adamw")
ADAMW_CONFIG = "examples/configs/adamw.yaml"  # the overlay that injects torch.optim.AdamW


def run(task: str, optimizer: str, steps: int, val_every: int, out: Path) -> Path:
    """Train one demo through its LightningCLI; returns the TensorBoard run directory."""
    import importlib

    module, config = TASKS[task]
    name = f"{task}_{optimizer}"
    # val_check_interval counts micro-batches; the configs accumulate gradients
    accumulate = yaml.safe_load(Path(config).read_text())["trainer"].get("accumulate_grad_batches", 1)
    importlib.import_module(module).cli_main(
        [
            "fit",
            "--config",
            config,
            *(["--config", ADAMW_CONFIG] if optimizer == "adamw" else []),
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={val_every * accumulate}",
            "--trainer.check_val_every_n_epoch=null",
            f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.logger.init_args.version=0",
            f"--trainer.default_root_dir={out / name}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return out / name / "version_0"


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def report(curves: dict[tuple[str, str], dict], out: Path) -> str:
    lines = [
        "| task | optimizer | final val/loss | best val/loss | final val/acc | final mean stable rank |",
        "|---|---|---|---|---|---|",
    ]
    for (task, opt), s in curves.items():
        loss = s.get("val/loss", [])
        acc = s.get("val/acc", [])
        srank = s.get("stable_rank/mean", [])
        lines.append(
            f"| {task} | {opt} | {loss[-1][1]:.4f} | {min(v for _, v in loss):.4f} | "
            f"{f'{acc[-1][1]:.3f}' if acc else '-'} | {f'{srank[-1][1]:.2f}' if srank else '-'} |"
        )
    table = "\n".join(lines)
    (out / "report.md").write_text(
        "# Muon vs AdamW on the demos (equal step budgets)\n\n" + table + "\n\n![curves](compare.png)\n"
    )
    return table


def plot(curves: dict[tuple[str, str], dict], tasks: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, (tag, label) in enumerate([("val/loss", "validation loss"), ("stable_rank/mean", "mean stable rank")]):
            ax = axes[row][col]
            for opt in OPTIMIZERS:
                points = curves.get((task, opt), {}).get(tag, [])
                if points:
                    ax.plot(*zip(*points), marker="o", ms=3, label=opt)
            ax.set_title(f"{task}: {label}")
            ax.set_xlabel("step")
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.val_every < 1:
        parser.error("--steps and --val-every must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    curves = {
        (t, o): read_scalars(run(t, o, args.steps, args.val_every, args.out)) for t in args.tasks for o in OPTIMIZERS
    }
    plot(curves, args.tasks, args.out)
    print(report(curves, args.out))
    print(f"\nwrote {args.out / 'report.md'} and {args.out / 'compare.png'}")


if __name__ == "__main__":
    main()
