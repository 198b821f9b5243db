"""Batch-size warmup from the measured noise scale vs fixed small and large batches, at a fixed token budget.

Trains the example GPT (``examples.gpt``: char-level KJV, Muon on the hidden matrices, constant LR
after a short warmup) on the same number of micro-batches (so the same tokens) three ways, for
each seed: a fixed small batch (``accumulate_grad_batches=1``), a fixed large batch (``--max-accumulate``)
and ``BatchSizeWarmup`` growing from 1 to ``--max-accumulate`` as ``CriticalBatchSizeMonitor``'s
smoothed B_simple grows. Prints optimizer steps, wall time and final validation loss (mean +- std over
seeds), and saves a plot (training loss and global batch vs tokens) next to ``--plot``.

``--compare-estimators`` instead runs one training with both estimators attached (per-example and
two-batch, measured every step, same weights and batches) and prints their B_simple side by side.

    python -m benchmarks.batch_size_warmup --seeds 0 1 2
    python -m benchmarks.batch_size_warmup --compare-estimators
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from examples.common import muon
from examples.gpt import GPTDataModule, LitGPT
from lightning_muon.callbacks import BatchSizeWarmup, CriticalBatchSizeMonitor


class _Curve(L.Callback):
    """(tokens seen, training loss) per micro-batch and (tokens, global batch) per optimizer step."""

    def __init__(self, tokens_per_batch: int) -> None:
        self.tokens_per_batch, self.loss, self.batch, self.seen = tokens_per_batch, [], [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += self.tokens_per_batch
        self.loss.append((self.seen, float(trainer.callback_metrics["train/loss"])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.batch.append((self.seen + self.tokens_per_batch, trainer.accumulate_grad_batches))


def _model(args, dm: GPTDataModule) -> LitGPT:
    return LitGPT(
        vocab_size=dm.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=4,
        n_embd=args.n_embd,
        optimizer=muon(lr=args.lr, adamw_lr=args.adamw_lr),
        warmup_steps=args.warmup_steps,
        schedule="constant",
    )


def _trainer(args, tmp: str, callbacks: list, accumulate: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        max_steps=-1,
        limit_train_batches=args.batches,
        accumulate_grad_batches=accumulate,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp),
        log_every_n_steps=10,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def run(args, dm: GPTDataModule, config: str, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    model = _model(args, dm)
    curve = _Curve(args.batch_size * args.block_size)
    callbacks: list[L.Callback] = [curve]
    accumulate = args.max_accumulate if config == "large" else 1
    warmup = None
    if config == "warmup":
        monitor = CriticalBatchSizeMonitor(
            every_n_steps=args.sample_every, sample_every_n_steps=args.sample_every, ema=args.ema
        )
        warmup = BatchSizeWarmup(
            max_batch_size=args.batch_size * args.max_accumulate,
            safety=args.safety,
            min_interval=args.min_interval,
            lr_rule=args.lr_rule,
        )
        callbacks += [monitor, warmup]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(args, tmp, callbacks, accumulate)
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        wall = time.perf_counter() - t0
        val = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    return {
        "config": config,
        "seed": seed,
        "steps": trainer.global_step,
        "wall_s": wall,
        "val_loss": float(val),
        "history": warmup.history if warmup else [(0, accumulate)],
        "loss": curve.loss,
        "batch": curve.batch,
    }


def compare_estimators(args, dm: GPTDataModule) -> list[tuple[int, float, float]]:
    """One run, both estimators attached: (step, per-example B_simple, two-batch B_simple)."""
    L.seed_everything(0, verbose=False)
    model = _model(args, dm)
    per_example = CriticalBatchSizeMonitor(
        every_n_steps=10**9, sample_every_n_steps=1, ema=args.ema, estimator="per_example"
    )
    two_batch = CriticalBatchSizeMonitor(
        every_n_steps=10**9, sample_every_n_steps=1, ema=args.ema, estimator="two_batch"
    )
    rows: list[tuple[int, float, float]] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, *a) -> None:
            step = trainer.global_step
            if step % 10 == 0 and (not rows or rows[-1][0] != step):
                rows.append((step, per_example.b_simple(), two_batch.b_simple()))

    with tempfile.TemporaryDirectory() as tmp:
        _trainer(args, tmp, [per_example, two_batch, Probe()], args.max_accumulate).fit(model, datamodule=dm)
    return rows


def _plot(results: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"small": "C0", "large": "C1", "warmup": "C2"}
    for r in results:
        tokens, loss = zip(*r["loss"])
        k = max(1, len(loss) // 40)  # moving average over ~40 points
        smooth = [statistics.fmean(loss[max(0, i - k) : i + 1]) for i in range(len(loss))]
        ax1.plot(
            tokens,
            smooth,
            color=colors[r["config"]],
            alpha=0.7,
            label=r["config"] if r["seed"] == args.seeds[0] else None,
        )
        t, acc = zip(*r["batch"])
        ax2.step(
            t,
            [a * args.batch_size for a in acc],
            where="post",
            color=colors[r["config"]],
            alpha=0.7,
            label=r["config"] if r["seed"] == args.seeds[0] else None,
        )
    ax1.set(xlabel="tokens", ylabel="training loss (moving average)", title="loss at a fixed token budget")
    ax2.set(xlabel="tokens", ylabel="global batch (sequences)", yscale="log", title="batch size")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=384, help="micro-batches per run (the token budget)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch (sequences)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--adamw-lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--max-accumulate", type=int, default=8, help="large batch = micro x this; the warmup's maximum")
    p.add_argument("--sample-every", type=int, default=5, help="the monitor's measurement interval (steps)")
    p.add_argument("--ema", type=float, default=0.8)
    p.add_argument("--safety", type=float, default=1.0)
    p.add_argument("--min-interval", type=int, default=10)
    p.add_argument("--lr-rule", default="none", choices=["none", "sqrt", "linear"])
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--plot", default="docs/img/batch_size_warmup.png")
    p.add_argument("--compare-estimators", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = GPTDataModule(block_size=args.block_size, batch_size=args.batch_size)
    if args.compare_estimators:
        rows = compare_estimators(args, dm)
        print(
            f"B_simple (sequences), micro-batch {args.batch_size} x {args.max_accumulate} accumulated, EMA {args.ema}"
        )
        print(f"{'step':>5} {'per_example':>12} {'two_batch':>10} {'ratio':>6}")
        for step, a, b in rows:
            print(f"{step:>5} {a:>12.1f} {b:>10.1f} {a / b if b else math.nan:>6.2f}")
        print(json.dumps({"rows": rows, **vars(args)}))
        return
    results = []
    for seed in args.seeds:  # interleaved: load drift hits every configuration alike
        for config in ("small", "large", "warmup"):
            results.append(run(args, dm, config, seed))
            r = results[-1]
            print(
                f"seed {seed} {config:>6}: {r['steps']} steps, {r['wall_s']:.1f} s, val {r['val_loss']:.4f}, "
                f"accumulation {r['history']}",
                flush=True,
            )
    tokens = args.batches * args.batch_size * args.block_size
    print(
        f"\nGPT {args.n_layer}x{args.n_embd}, block {args.block_size}, {tokens} tokens "
        f"({args.batches} micro-batches of {args.batch_size}), seeds {args.seeds}"
    )
    print(f"| {'schedule':<26} | {'optimizer steps':>15} | {'wall s':>12} | {'final val loss':>16} |")
    print(f"|{'-' * 28}|{'-' * 17}:|{'-' * 14}:|{'-' * 18}:|")
    names = {
        "small": f"fixed small ({args.batch_size})",
        "large": f"fixed large ({args.batch_size * args.max_accumulate})",
        "warmup": f"warmup ({args.batch_size} -> <= {args.batch_size * args.max_accumulate})",
    }
    summary = {}
    for config in ("small", "large", "warmup"):
        rs = [r for r in results if r["config"] == config]
        steps = [r["steps"] for r in rs]
        wall = [r["wall_s"] for r in rs]
        val = [r["val_loss"] for r in rs]
        sd = statistics.stdev(val) if len(val) > 1 else 0.0
        summary[config] = {"steps": steps, "wall_s": wall, "val_loss": val}
        print(
            f"| {names[config]:<26} | {statistics.fmean(steps):>15.1f} | {statistics.fmean(wall):>12.1f} | "
            f"{statistics.fmean(val):>8.4f} +- {sd:.4f} |"
        )
    _plot(results, args.plot, args)
    print(f"plot: {args.plot}")
    print(
        json.dumps(
            {
                "summary": summary,
                "histories": {f"{r['config']}/{r['seed']}": r["history"] for r in results},
                **vars(args),
            }
        )
    )


if __name__ == "__main__":
    main()
