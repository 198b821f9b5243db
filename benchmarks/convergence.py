"""Muon vs AdamW on the embedded GPT corpus: equal step budgets, a small LR sweep for each.

Reports the final validation loss of every run and how many steps the best Muon run needs to
reach the best AdamW run's final validation loss (target: <= 0.75x the budget).

    python -m benchmarks.convergence                        # CPU defaults, ~10 min on 2 cores
    python -m benchmarks.convergence --steps 1000 --accelerator gpu --n-embd 256
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._gpt_runs import train_gpt
from benchmarks._timing import markdown_table, run_header


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (None if never)."""
    return next((step for step, loss in curve if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()
    common = dict(
        steps=args.steps,
        val_every=args.val_every,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
    )
    print(run_header(torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu"), "auto"))
    runs = {}
    for lr in args.muon_lrs:  # AdamW part of the Muon run (embeddings, gains) at 1e-3
        runs[("muon", lr)] = train_gpt(optimizer="muon", lr=lr, adamw_lr=1e-3, **common)
    for lr in args.adamw_lrs:
        runs[("adamw", lr)] = train_gpt(optimizer="adamw", lr=lr, adamw_lr=lr, **common)
    final = {k: r.val_curve[-1][1] for k, r in runs.items()}
    rows = [(opt, lr, final[(opt, lr)]) for opt, lr in runs]
    print(markdown_table(["optimizer", "lr", f"val loss @ {args.steps}"], rows))
    best_muon = min((k for k in runs if k[0] == "muon"), key=final.get)
    best_adamw = min((k for k in runs if k[0] == "adamw"), key=final.get)
    reach = steps_to_reach(runs[best_muon].val_curve, final[best_adamw])
    ratio = "never" if reach is None else f"{reach / args.steps:.2f}"
    print()
    print(
        markdown_table(
            ["best Muon (lr)", "best AdamW (lr)", "Muon val", "AdamW val", "Muon steps to AdamW's final", "ratio"],
            [(best_muon[1], best_adamw[1], final[best_muon], final[best_adamw], reach, ratio)],
        )
    )


if __name__ == "__main__":
    main()
