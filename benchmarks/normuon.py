"""NorMuon vs Muon, and bfloat16 vs float32 momentum, on the example GPT: final val loss, step time, state bytes.

Three configurations of ``examples.gpt.LitGPT`` (Muon at ``lr``, AdamW at ``adamw_lr`` for the
rest), one process, same data; configurations interleaved within each seed so a shared machine
slows all alike:

* ``muon``: plain Muon, float32 momentum;
* ``normuon``: ``variant="normuon"`` (same lr: NorMuon keeps the update's Frobenius norm);
* ``muon, bf16 momentum``: ``momentum_dtype="bfloat16"`` (stochastic rounding).

Reports per configuration the final validation loss (mean and each seed), the median step time
and its ratio to Muon, and the optimizer state bytes of the demo-size model.

    python -m benchmarks.normuon                                   # CPU, demo GPT shrunk for 2 cores
    python -m benchmarks.normuon --seeds 0 1 2 --steps 300 --n-layer 4 --n-embd 128 --block-size 128
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks._gpt_runs import train_gpt
from benchmarks._timing import markdown_table, run_header, state_bytes
from examples.gpt import LitGPT

CONFIGS = {
    "muon": {},
    "normuon": {"variant": "normuon"},
    "muon, bf16 momentum": {"momentum_dtype": "bfloat16"},
}


def state_table(n_layer: int, n_embd: int, block_size: int) -> list[tuple]:
    """Optimizer state bytes of each configuration after one step of a LitGPT of that size."""
    rows = []
    for name, extra in CONFIGS.items():
        torch.manual_seed(0)
        model = LitGPT(vocab_size=256, block_size=block_size, n_layer=n_layer, n_embd=n_embd, **extra)
        opt = model.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        loss = model(torch.randint(0, 256, (2, 8))).float().square().mean()
        loss.backward()
        opt.step()
        muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
        muon_bytes = sum(
            v.nbytes for p, s in opt.state.items() if id(p) in muon for v in s.values() if isinstance(v, torch.Tensor)
        )
        rows.append((name, muon_bytes, state_bytes(opt) - muon_bytes, state_bytes(opt)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=10, help="warmup steps left out of the median step time")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--adamw-lr", type=float, default=1e-3)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    print(run_header(torch.device("cpu"), "auto"))
    size = dict(n_layer=args.n_layer, n_embd=args.n_embd, block_size=args.block_size, batch_size=args.batch_size)
    print(
        f"GPT n_layer={args.n_layer} n_embd={args.n_embd} block={args.block_size} batch={args.batch_size}, "
        f"{args.steps} steps, lr={args.lr} (Muon), adamw_lr={args.adamw_lr}, seeds {args.seeds}, "
        f"val loss on {args.val_batches} batches at the last step"
    )
    losses: dict[str, list[float]] = {c: [] for c in args.configs}
    times: dict[str, list[float]] = {c: [] for c in args.configs}
    for seed in args.seeds:
        for name in args.configs:
            run = train_gpt(
                optimizer="muon",
                lr=args.lr,
                adamw_lr=args.adamw_lr,
                steps=args.steps,
                val_every=args.steps,
                val_batches=args.val_batches,
                accelerator="cpu",
                seed=seed,
                **size,
                muon_kwargs=CONFIGS[name],
            )
            losses[name].append(run.val_curve[-1][1])
            times[name].extend(run.step_times[args.skip :])
            print(f"  seed {seed} {name}: val {losses[name][-1]:.4f}", flush=True)
    base = statistics.median(times[args.configs[0]])
    rows = [
        (
            name,
            statistics.mean(losses[name]),
            statistics.stdev(losses[name]) if len(losses[name]) > 1 else float("nan"),
            " / ".join(f"{v:.3f}" for v in losses[name]),
            statistics.median(times[name]) * 1e3,
            statistics.median(times[name]) / base,
        )
        for name in args.configs
    ]
    header = ["config", "val loss (mean)", "std", "per seed", "median step (ms)", f"vs {args.configs[0]}"]
    print(markdown_table(header, rows))
    print(f"\nOptimizer state after one step, GPT n_layer={args.n_layer} n_embd={args.n_embd}:")
    print(
        markdown_table(
            ["config", "Muon groups (bytes)", "AdamW groups (bytes)", "total (bytes)"],
            state_table(args.n_layer, args.n_embd, args.block_size),
        )
    )


if __name__ == "__main__":
    main()
