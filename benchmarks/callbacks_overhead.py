"""Training-time overhead of the four diagnostics callbacks at their defaults vs none.

Trains the example GPT (``examples.gpt.LitGPT``) on random tokens with Muon and ``--accumulate``
micro-batches per step (default 1: a default Trainer; CriticalBatchSizeMonitor then uses its
per-example estimator), and times optimizer steps ``[1, 1 + steps)``, a window with
``steps / every_n_steps`` logging steps. Target: <= 3% overhead. Reports the run-vs-run
difference and, more robust on a shared machine, the share of the run spent inside the monitors'
hooks. On CPU the clock is this process's CPU time; pin ``--threads``.

    python -m benchmarks.callbacks_overhead --steps 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._timing import run_header
from examples.common import muon
from examples.gpt import LitGPT
from lightning_muon.callbacks import (
    CriticalBatchSizeMonitor,
    PolarMisalignmentMonitor,
    SpectralEntropyMonitor,
    StableRankMonitor,
)


def make_model(args):
    return LitGPT(
        block_size=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd, optimizer=muon()
    ), "examples.gpt.LitGPT"


class StepTimer(pl.Callback):
    """CPU time of this process (robust to other jobs on a shared machine; wall time on GPU)
    from the start of optimizer step ``first`` to the end of step ``last - 1``, and the part of
    it spent inside the monitors' Lightning hooks (``inside``)."""

    def __init__(self, first: int, last: int, clock) -> None:
        self.first, self.last, self.clock = first, last, clock
        self.start = self.seconds = None
        self.inside = 0.0

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.first and self.start is None:
            self.start = self.clock()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.last and self.seconds is None:
            self.seconds = self.clock() - self.start

    def wrap(self, callback: pl.Callback) -> pl.Callback:
        """Time ``callback``'s per-step hooks inside the window (Lightning looks hooks up per instance)."""
        hooks = ["on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"]
        if hasattr(callback, "_record"):  # CriticalBatchSizeMonitor's per-example norms, inside backward
            hooks.append("_record")
        for hook in hooks:
            original = getattr(callback, hook)

            def timed(*args, _original=original, **kwargs):
                t0 = self.clock()
                out = _original(*args, **kwargs)
                if self.start is not None and self.seconds is None:
                    self.inside += self.clock() - t0
                return out

            setattr(callback, hook, timed)
        return callback


def run(args, with_callbacks: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    model, _ = make_model(args)
    n = (args.steps + 2) * args.accumulate * args.batch_size
    tokens = torch.randint(0, 256, (n, args.block_size + 1))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=args.batch_size)
    model.train_dataloader = lambda: loader
    clock = time.perf_counter if torch.cuda.is_available() and args.accelerator != "cpu" else time.process_time
    timer = StepTimer(1, 1 + args.steps, clock)
    callbacks = [timer]
    if with_callbacks:
        every = args.every_n_steps
        monitors = [
            SpectralEntropyMonitor(every),
            StableRankMonitor(every),
            PolarMisalignmentMonitor(every),
            CriticalBatchSizeMonitor(every),
        ]
        callbacks += [timer.wrap(m) for m in monitors]
    with tempfile.TemporaryDirectory() as tmp:
        pl.Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_steps=args.steps + 1,
            accumulate_grad_batches=args.accumulate,
            logger=TensorBoardLogger(tmp),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=50,
        ).fit(model)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return timer.seconds, timer.inside


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps")
    p.add_argument("--every-n-steps", type=int, default=100, help="the monitors' every_n_steps (their default: 100)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch size (sequences)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run_header(torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu"), "auto"))
    times: dict[str, list[float]] = {"none": [], "four monitors": []}
    inside: list[float] = []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        times["none"].append(run(args, False)[0])
        total, hooks = run(args, True)
        times["four monitors"].append(total)
        inside.append(hooks / total)
    base, diag = statistics.median(times["none"]), statistics.median(times["four monitors"])
    share = 100 * statistics.median(inside)
    print(
        f"model: {make_model(args)[1]}, {args.steps} timed steps, "
        f"micro-batch {args.batch_size} x {args.accumulate} accumulated"
    )
    for name, ts in times.items():
        print(f"{name:>14}: median {statistics.median(ts):.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
    print(
        f"overhead, run vs run: {100 * (diag - base) / base:+.2f}%; time inside the monitors' hooks "
        f"(same run, incl. the per-example norms): {share:.2f}% (target <= 3%)"
    )
    print(
        json.dumps(
            {
                "base_s": base,
                "with_callbacks_s": diag,
                "overhead_pct": 100 * (diag - base) / base,
                "inside_hooks_pct": share,
                **vars(args),
            }
        )
    )


if __name__ == "__main__":
    main()
