"""Training-step time of the example GPT: Muon vs AdamW (the callbacks' overhead is measured by
``benchmarks/callbacks_overhead.py``).

Runs in one process, same data and model, configurations interleaved over ``--rounds`` so a
shared machine slows all alike; reports the median step time (after ``--skip`` warmup steps).

    python -m benchmarks.training                          # CPU, demo-size GPT
    python -m benchmarks.training --accelerator gpu --n-embd 768 --n-layer 12 --block-size 1024
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks._gpt_runs import train_gpt
from benchmarks._timing import markdown_table, run_header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="warmup steps left out of the median")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    size = dict(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        block_size=args.block_size,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        precision=args.precision,
        steps=args.steps,
    )
    configs = {
        "adamw": dict(optimizer="adamw", lr=1e-3, adamw_lr=1e-3),
        "muon": dict(optimizer="muon", lr=0.02, adamw_lr=1e-3),
    }
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    print(run_header(device, "auto"))
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            run = train_gpt(**size, **cfg)
            times[name].extend(run.step_times[args.skip :])
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [
        ("adamw", med["adamw"] * 1e3, 1.0, ""),
        ("muon", med["muon"] * 1e3, med["muon"] / med["adamw"], "target <= 1.10x AdamW"),
    ]
    print(
        f"GPT n_layer={args.n_layer} n_embd={args.n_embd} block={args.block_size} batch={args.batch_size}, "
        f"{args.rounds} rounds x {args.steps - args.skip} timed steps"
    )
    print(markdown_table(["config", "median step (ms)", "ratio to AdamW", "note"], rows))


if __name__ == "__main__":
    main()
