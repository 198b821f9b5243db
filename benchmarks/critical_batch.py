"""The critical batch size, measured (McCandlish et al. 2018) next to what CriticalBatchSizeMonitor predicts.

Three phases, each rerunnable alone from the JSON the previous one wrote:

* ``measure``: for each task (the example GPT on the embedded KJV text, the example ViT on
  scikit-learn's 8x8 digits) and each optimizer (``lightning_muon.Muon`` and ``torch.optim.AdamW``,
  both through ``configure_muon``'s routing, as ``examples.common`` builds them), train from the
  same initialisation at each batch size until a fixed loss on a fixed evaluation set, with the
  learning rate tuned per batch size on a factor-2 grid (below); record the loss curve of every
  run. Plain PyTorch loop (no Trainer): the example LightningModule's network and its
  ``configure_optimizers()``, the package's data, one thread per process.
* ``predict``: at the reference batch size and its tuned learning rate, train the same module in a
  real Lightning ``Trainer`` with ``CriticalBatchSizeMonitor()`` at its defaults (only how often
  it measures is set) until the same target, and record what it logs: ``b_simple``, Muon's
  model-level ``b_crit`` and ``b_crit / momentum_factor`` (the momentum-free value), at the early
  and at the final target.
* ``report``: fit ``S = S_min (1 + B_noise / B)`` to the steps-to-target of each (task,
  optimizer, target) (``benchmarks/critical_batch_fit.py``), read ``B_crit = E_min / S_min``, and
  print the table of measured vs predicted; save the plot (steps vs examples with the fitted
  curves; predicted vs measured).

Learning rate, our choice: the centre of the grid follows a scaling rule from the reference batch,
``lr(B) = lr_ref * (B / B_ref) ** p`` (Muon's ``lr`` and ``adamw_lr`` alike; ``p = 1/2``, except
AdamW on the GPT, ``p = 0``: in a pilot its square-root-rule LR stalled on a plateau at B = 64), and
the grid is ``centre * 2^k`` for ``k`` in 0, -1, 1, extended to -2 / +2 when the best is at an
edge. The runs of one batch size race: after the first, each stops once it has taken as many steps
as the best so far (it cannot win). Constant LR, no warmup, no weight decay. A run whose loss is
not finite or rises above 1.5x its initial value is stopped as diverged.

Target losses, our choice (per task, the same for both optimizers): the final target is a loss
every batch size reaches with both optimizers within the step cap at this model size (from pilot
runs); the early target one the reference runs pass after about a sixth (GPT) to a half (ViT) of
their steps to the final one. Both are read from the same runs: ``report`` fits any target the
curves reach without training again.

The full run, and how to re-measure only the monitor (e.g. after its estimators change) on the
recorded runs (the committed ``benchmarks/critical_batch_results.json``; a few CPU minutes):

    python -m benchmarks.critical_batch --jobs 2 --json runs/critical_batch.json --plot docs/img/critical_batch.png
    python -m benchmarks.critical_batch --phase predict --json benchmarks/critical_batch_results.json \
        --plot docs/img/critical_batch.png
    python -m benchmarks.critical_batch --phase report --json benchmarks/critical_batch_results.json
    python -m benchmarks.critical_batch --quick --json /tmp/cb.json     # tiny settings, no LR tuning: a test

The full run took 1,224 s of CPU time (2 processes of 1 thread); its wall time depends on the
machine's load (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.critical_batch_fit import StepsFit, fit_steps, steps_to_target

OPTIMIZERS = ("muon", "adamw")
PHASES = ("measure", "predict", "report", "all")

# The monitor's tags this benchmark records and reads (CriticalBatchSizeMonitor's names; the only
# place to change if they are renamed: the predict phase keeps every tag under TAG_PREFIX).
TAG_PREFIX = "critical_batch_size/"
B_SIMPLE = TAG_PREFIX + "b_simple"
B_CRIT = TAG_PREFIX + "b_crit"  # model level: the per-matrix values weighted by nuclear norm
MOMENTUM_FACTOR = TAG_PREFIX + "momentum_factor/"  # + the Muon group's name


# ----------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class Task:
    """One model + data set, the batch sizes it is trained at and the targets (our choices)."""

    name: str
    kind: str  # "gpt" or "vit"
    model: dict[str, Any]  # LitGPT / LitViT keyword arguments (architecture)
    data: dict[str, Any]  # the data set's settings
    batch_sizes: dict[str, tuple[int, ...]]  # per optimizer (each spans 32x or more)
    ref_batch: int  # the LR rule's reference, and where the monitor runs
    lr: dict[str, float]  # per optimizer, at ref_batch (Muon: lr; its AdamW groups at adamw_lr, scaled alike)
    lr_exponent: dict[str, float]  # the grid's centre follows lr * (B / ref_batch) ** exponent
    adamw_lr_in_muon: float  # Muon's adamw_lr at ref_batch
    targets: tuple[float, float]  # (early, final) loss on the evaluation set
    eval_examples: int  # evaluate every ~this many training examples
    max_steps: int  # step cap of a run at the smallest batch; max_steps * B_min / B, >= max_steps / 4, above
    max_examples: int  # and at most this many examples per run (bounds the wall time)
    monitor_every: int = 5  # CriticalBatchSizeMonitor every_n_steps = sample_every_n_steps
    unit: str = "examples"

    def lr_for(self, optimizer: str, batch_size: int, k: int) -> float:
        """The grid's ``k``-th learning rate at ``batch_size``: the scaling rule from ``ref_batch``, times ``2^k``."""
        return self.lr[optimizer] * (batch_size / self.ref_batch) ** self.lr_exponent[optimizer] * 2.0**k

    def step_cap(self, optimizer: str, batch_size: int) -> int:
        smallest = min(self.batch_sizes[optimizer])
        return max(
            min(max(self.max_steps * smallest // batch_size, self.max_steps // 4), self.max_examples // batch_size), 1
        )


TASKS = {
    "gpt": Task(
        name="gpt",
        kind="gpt",
        model=dict(n_layer=2, n_head=4, n_embd=64, block_size=64),
        data=dict(eval_sequences=64),
        # AdamW's critical batch is smaller on this task (pilot): its range starts lower
        batch_sizes={"muon": (4, 8, 16, 32, 64, 128), "adamw": (2, 4, 8, 16, 32, 64)},
        ref_batch=16,
        lr={"muon": 0.02, "adamw": 4e-3},
        # AdamW: a constant centre (pilot: at B = 64 the square-root rule's 8e-3 stalled on a plateau)
        lr_exponent={"muon": 0.5, "adamw": 0.0},
        adamw_lr_in_muon=2e-3,
        targets=(2.5, 2.1),
        eval_examples=64,
        max_steps=6000,
        max_examples=50_000,
        unit="sequences of 64 characters",
    ),
    "vit": Task(
        name="vit",
        kind="vit",
        model=dict(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=256),
        data=dict(eval_examples=512),
        batch_sizes={"muon": (4, 8, 16, 32, 64, 128, 256), "adamw": (4, 8, 16, 32, 64, 128, 256)},
        ref_batch=16,
        lr={"muon": 0.02, "adamw": 2e-3},
        lr_exponent={"muon": 0.5, "adamw": 0.5},
        adamw_lr_in_muon=2e-3,
        targets=(1.2, 0.4),
        eval_examples=128,
        max_steps=3000,
        max_examples=60_000,
        unit="images",
    ),
}

QUICK = {  # --quick: tiny models and easy targets (the end-to-end test; seconds)
    "gpt": replace(
        TASKS["gpt"],
        model=dict(n_layer=1, n_head=2, n_embd=16, block_size=16),
        data=dict(eval_sequences=16),
        batch_sizes={"muon": (2, 4, 8), "adamw": (2, 4, 8)},
        ref_batch=4,
        lr={"muon": 0.05, "adamw": 1e-2},
        adamw_lr_in_muon=1e-2,
        targets=(3.9, 3.6),
        eval_examples=8,
        max_steps=150,
        monitor_every=2,
        unit="sequences of 16 characters",
    ),
    "vit": replace(
        TASKS["vit"],
        model=dict(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32),
        data=dict(eval_examples=64),
        batch_sizes={"muon": (2, 4, 8), "adamw": (2, 4, 8)},
        ref_batch=4,
        lr={"muon": 0.05, "adamw": 1e-2},
        adamw_lr_in_muon=1e-2,
        targets=(2.2, 2.0),
        eval_examples=8,
        max_steps=150,
        monitor_every=2,
    ),
}


class GPTData:
    """Character-level KJV (``examples.gpt.GPTDataModule``, its 90/10 split): random windows of the
    training text, i.i.d. per batch; a fixed evaluation set of windows evenly spaced in the held-out text."""

    def __init__(self, task: Task) -> None:
        from examples.gpt import GPTDataModule

        T = task.model["block_size"]
        dm = GPTDataModule(block_size=T)
        tokens = torch.from_numpy(np.asarray(dm.tokens, dtype=np.int64))
        cut = int(len(tokens) * (1 - dm.val_fraction))
        self.train, val = tokens[:cut], tokens[cut:]
        self.block, self.vocab_size = T, dm.vocab_size
        n = task.data["eval_sequences"]
        starts = torch.linspace(0, len(val) - T - 2, n).long()
        windows = torch.stack([val[s : s + T + 1] for s in starts.tolist()])
        self.eval = windows[:, :-1], windows[:, 1:]

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        offsets = torch.arange(self.block + 1)
        while True:
            starts = torch.randint(0, len(self.train) - self.block - 1, (batch_size, 1), generator=g)
            windows = self.train[starts + offsets]
            yield windows[:, :-1], windows[:, 1:]

    @staticmethod
    def loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten())


class DigitsData:
    """scikit-learn's digits (``examples.image_data.DigitsDataModule``: its standardisation and its
    80/20 split); training batches from reshuffled epochs of the training images; the evaluation set
    is a fixed subset of the training images (an optimisation target: the data set is small and
    runs make several passes)."""

    def __init__(self, task: Task) -> None:
        from examples.image_data import DigitsDataModule

        dm = DigitsDataModule(image_size=task.model["image_size"], seed=0)
        dm.setup("fit")
        self.x, self.y = dm.train_set.tensors
        n = task.data["eval_examples"]
        self.eval = self.x[:n], self.y[:n]

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(self.y), generator=g)
            for i in range(0, len(perm) - batch_size + 1, batch_size):
                idx = perm[i : i + batch_size]
                yield self.x[idx], self.y[idx]

    @staticmethod
    def loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(net(x), y)


_DATA: dict[tuple[str, str], Any] = {}


def task_data(task: Task) -> GPTData | DigitsData:
    """The task's data, built once per process."""
    key = (task.kind, repr(sorted(task.model.items())) + repr(sorted(task.data.items())))
    if key not in _DATA:
        _DATA[key] = GPTData(task) if task.kind == "gpt" else DigitsData(task)
    return _DATA[key]


def optimizer_factory(task: Task, optimizer: str, lr: float, ns_dtype: str):
    """``examples.common``'s Muon (hidden matrices; AdamW groups at a proportional lr) or AdamW."""
    from examples.common import adamw, muon

    if optimizer == "muon":
        adamw_lr = task.adamw_lr_in_muon * lr / task.lr["muon"]
        return muon(lr=lr, adamw_lr=adamw_lr, ns_dtype=ns_dtype)
    return adamw(lr=lr)


def build_module(task: Task, optimizer: str, lr: float, seed: int, ns_dtype: str):
    """The example LightningModule (``LitGPT`` / ``LitViT``), seeded, with its optimizer factory."""
    factory = optimizer_factory(task, optimizer, lr, ns_dtype)
    torch.manual_seed(seed)
    if task.kind == "gpt":
        from examples.gpt import LitGPT

        return LitGPT(vocab_size=task_data(task).vocab_size, optimizer=factory, **task.model)
    from examples.vit import LitViT

    return LitViT(num_channels=1, num_classes=10, optimizer=factory, **task.model)


def _optimizer(module) -> torch.optim.Optimizer:
    config = module.configure_optimizers()  # configure_muon's routing and groups
    return config["optimizer"] if isinstance(config, dict) else config


@torch.no_grad()
def eval_loss(task: Task, net: nn.Module) -> float:
    data = task_data(task)
    return float(data.loss(net, *data.eval))


# ----------------------------------------------------------------------------- phase 1: measure


def train_run(
    task: Task, optimizer: str, batch_size: int, k: int, seed: int, cap: int, ns_dtype: str, threads: int
) -> dict[str, Any]:
    """Train at ``batch_size`` with the grid's ``k``-th learning rate until the final target, ``cap``
    steps or divergence; the evaluated loss curve ``[(step, loss), ...]``."""
    torch.set_num_threads(threads)
    data = task_data(task)
    lr = task.lr_for(optimizer, batch_size, k)
    module = build_module(task, optimizer, lr, seed, ns_dtype)
    opt = _optimizer(module)
    every = max(1, round(task.eval_examples / batch_size))
    first = eval_loss(task, module)
    curve, status = [(0, first)], "cap"
    batches = data.batches(batch_size, seed + 1)
    t0 = time.perf_counter()
    for step in range(1, cap + 1):
        x, y = next(batches)
        loss = data.loss(module, x, y)
        if not math.isfinite(float(loss.detach())):
            status = "diverged"
            break
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == cap:
            value = eval_loss(task, module)
            curve.append((step, value))
            if not math.isfinite(value) or value > 1.5 * first:
                status = "diverged"
                break
            if value <= task.targets[1]:
                status = "target"
                break
    return {
        "batch_size": batch_size,
        "k": k,
        "lr": lr,
        "status": status,
        "curve": curve,
        "wall_s": time.perf_counter() - t0,
    }


def _steps(run: dict[str, Any], target: float) -> float | None:
    steps, losses = zip(*run["curve"])
    return steps_to_target(steps, losses, target)


def tune_batch_size(
    task: Task, optimizer: str, batch_size: int, seed: int, ns_dtype: str, threads: int, grid: tuple[int, ...]
) -> list[dict[str, Any]]:
    """The LR race at one batch size: centre, then one step down and up (extended at an edge)."""
    runs: list[dict[str, Any]] = []
    best: float | None = None
    tried: set[int] = set()
    queue = list(grid)
    while queue:
        k = queue.pop(0)
        tried.add(k)
        cap = task.step_cap(optimizer, batch_size) if best is None else max(1, math.ceil(best))
        runs.append(train_run(task, optimizer, batch_size, k, seed, cap, ns_dtype, threads))
        s = _steps(runs[-1], task.targets[1])
        if s is not None and (best is None or s < best):
            best = s
        if not queue and best is not None and len(grid) > 1:  # extend the grid at an edge, up to +-2
            k_best = best_k(runs, batch_size, task.targets[1])
            step = 1 if k_best == max(tried) else -1 if k_best == min(tried) else 0
            if step and abs(k_best + step) <= 2 and k_best + step not in tried:
                queue.append(k_best + step)
    return runs


def _unit(job: tuple) -> tuple[str, str, int, list[dict[str, Any]]]:
    task, optimizer, batch_size, seed, ns_dtype, threads, grid = job
    t0 = time.perf_counter()
    runs = tune_batch_size(task, optimizer, batch_size, seed, ns_dtype, threads, grid)
    best = [(r["k"], _steps(r, task.targets[1])) for r in runs]
    print(
        f"  {task.name} {optimizer:>5} B={batch_size:<4} {len(runs)} runs, (k, steps to target): {best}, "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return task.name, optimizer, batch_size, runs


def measure(args: argparse.Namespace, tasks: dict[str, Task]) -> dict[str, Any]:
    jobs = [
        (task, optimizer, B, args.seed, args.ns_dtype, args.threads, tuple(args.grid))
        for task in tasks.values()
        for optimizer in args.optimizers
        for B in task.batch_sizes[optimizer]
    ]
    jobs.sort(key=lambda job: (job[0].kind != "gpt", -job[2]))  # longest first (GPT, large batches): balanced workers
    results: dict[str, Any] = {
        name: {"task": asdict(task), "runs": {o: [] for o in args.optimizers}} for name, task in tasks.items()
    }
    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_unit, jobs))
    else:
        done = [_unit(job) for job in jobs]
    for name, optimizer, _, runs in done:
        results[name]["runs"][optimizer].extend(runs)
    return results


# ----------------------------------------------------------------------------- phase 2: predict


def best_k(runs: list[dict[str, Any]], batch_size: int, target: float) -> int | None:
    """The grid index of the fastest run at ``batch_size`` to ``target`` (None: none reached it)."""
    reached = [(s, r["k"]) for r in runs if r["batch_size"] == batch_size and (s := _steps(r, target)) is not None]
    return min(reached)[1] if reached else None


def predict_one(task: Task, optimizer: str, k: int, seed: int, ns_dtype: str, threads: int) -> dict[str, Any]:
    """Train at the reference batch in a Lightning Trainer with ``CriticalBatchSizeMonitor`` at its
    defaults; record its logged values and the evaluated loss."""
    import lightning as L
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, IterableDataset

    from lightning_muon.callbacks import CriticalBatchSizeMonitor

    torch.set_num_threads(threads)
    data = task_data(task)
    B = task.ref_batch
    module = build_module(task, optimizer, task.lr_for(optimizer, B, k), seed, ns_dtype)

    class Batches(IterableDataset):
        def __iter__(self):
            return data.batches(B, seed + 1)

    class Capture(Logger):
        """Every metric the monitor sends to the loggers, by step."""

        def __init__(self) -> None:
            super().__init__()
            self.logged: dict[int, dict[str, float]] = {}

        name, version = "capture", 0  # type: ignore[assignment]

        def log_hyperparams(self, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            row = {t: float(v) for t, v in metrics.items() if t.startswith(TAG_PREFIX)}
            if row:
                self.logged.setdefault(int(step), {}).update(row)

    every = max(1, round(task.eval_examples / B))
    curve: list[tuple[int, float]] = []

    class EvalStop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % every == 0 or step == 1:
                value = eval_loss(task, pl_module)
                curve.append((step, value))
                if value <= task.targets[1] or not math.isfinite(value):
                    trainer.should_stop = True

    monitor = CriticalBatchSizeMonitor(every_n_steps=task.monitor_every, sample_every_n_steps=task.monitor_every)
    capture = Capture()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=task.step_cap(optimizer, B),
        logger=capture,
        callbacks=[monitor, EvalStop()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=10**6,
    )
    curve.append((0, eval_loss(task, module)))
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(Batches(), batch_size=None))
    return {
        "batch_size": B,
        "k": k,
        "lr": task.lr_for(optimizer, B, k),
        "estimator": monitor.mode,
        "monitor": {"every_n_steps": monitor.every_n_steps, "ema": monitor.ema, "estimator": monitor.estimator},
        "curve": sorted(set(curve)),
        "logged": logged_table(capture.logged),
        "wall_s": time.perf_counter() - t0,
    }


def _predict_unit(job: tuple) -> tuple[str, str, dict[str, Any]]:
    task, optimizer, k, seed, ns_dtype, threads = job
    result = predict_one(task, optimizer, k, seed, ns_dtype, threads)
    print(
        f"  predict {task.name} {optimizer}: {len(result['logged']['steps'])} logging steps, {result['wall_s']:.0f} s",
        flush=True,
    )
    return task.name, optimizer, result


def predict(args: argparse.Namespace, results: dict[str, Any]) -> None:
    jobs = []
    for name, entry in results.items():
        task = _task(entry)
        for optimizer, runs in entry["runs"].items():
            k = best_k(runs, task.ref_batch, task.targets[1])
            if k is None:
                print(f"  predict {name} {optimizer}: no run at B={task.ref_batch} reached the target; skipped")
                continue
            jobs.append((task, optimizer, k, args.seed, args.ns_dtype, args.threads))
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_predict_unit, jobs))
    else:
        done = [_predict_unit(job) for job in jobs]
    for name, optimizer, result in done:
        results[name].setdefault("predict", {})[optimizer] = result


# ----------------------------------------------------------------------------- phase 3: report


def _task(entry: dict[str, Any]) -> Task:
    fields = dict(entry["task"])
    fields["targets"] = tuple(fields["targets"])
    fields["batch_sizes"] = {o: tuple(b) for o, b in fields["batch_sizes"].items()}
    return Task(**fields)


@dataclass
class Row:
    """One (task, optimizer, target): the measured fit and the monitor's values at that loss."""

    task: str
    optimizer: str
    target: float
    which: str  # "early" or "final"
    points: list[tuple[int, float]] = field(default_factory=list)  # (batch size, steps) of the best LR
    lrs: list[float] = field(default_factory=list)  # that best LR, per point
    missing: list[int] = field(default_factory=list)  # batch sizes that never reached the target
    fit: StepsFit | None = None
    b_simple: float = float("nan")
    b_simple_range: list[float] = field(default_factory=lambda: [math.nan, math.nan])  # last fifth of the steps
    b_crit: float = float("nan")  # the model-level b_crit (nuclear-norm weighted over the matrices)
    b_crit_range: list[float] = field(default_factory=lambda: [math.nan, math.nan])
    b_crit_free: float = float("nan")  # b_crit / momentum_factor: the momentum-free value
    b_crit_free_range: list[float] = field(default_factory=lambda: [math.nan, math.nan])
    momentum_factor: float = float("nan")  # the logged factor at that step (1 under AdamW)
    step: float = float("nan")  # the reference run's step at this loss


def logged_table(by_step: dict[int, dict[str, float]]) -> dict[str, Any]:
    """What the monitor logged, as ``{"steps": [...], "values": {tag: [value or NaN per step]}}``
    (tag names once: the per-layer tags are long), values to 5 significant digits."""
    steps = sorted(by_step)
    tags = sorted({t for row in by_step.values() for t in row})
    return {
        "steps": steps,
        "values": {t: [float(f"{by_step[s].get(t, math.nan):.5g}") for s in steps] for t in tags},
    }


def logged_series(result: dict[str, Any], tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one logged tag (NaN where it was not logged)."""
    values = result["logged"]["values"].get(tag, [math.nan] * len(result["logged"]["steps"]))
    return list(zip(result["logged"]["steps"], values))


def momentum_factor_series(result: dict[str, Any]) -> list[tuple[int, float]]:
    """``(step, factor)``: the ``momentum_factor/<group>`` the monitor logged at each step, when
    every group logged the same value (NaN otherwise: several Muon groups with different momenta
    have no single factor to divide the model-level ``b_crit`` by)."""
    tags = [t for t in result["logged"]["values"] if t.startswith(MOMENTUM_FACTOR)]
    series = []
    for k, step in enumerate(result["logged"]["steps"]):
        values = {v for t in tags if math.isfinite(v := result["logged"]["values"][t][k])}
        series.append((step, values.pop() if len(values) == 1 else math.nan))
    return series


def momentum_free_series(result: dict[str, Any]) -> list[tuple[int, float]]:
    """``(step, b_crit / momentum_factor)``: the model-level ``b_crit`` without the momentum's noise
    reduction, at each logging step (NaN where either is missing)."""
    factors = dict(momentum_factor_series(result))
    return [(s, v / factors[s] if factors[s] > 0 else math.nan) for s, v in logged_series(result, B_CRIT)]


def _value_at(series: list[tuple[int, float]], step: float) -> tuple[float, float, float]:
    """The last finite value of ``series`` at or before ``step`` (a tag missing at a step was not
    logged there: the value a user saw is the previous one), and the range of its finite values
    over the logging steps in the last fifth of the way there (how much it moves)."""
    finite = [(s, v) for s, v in series if s <= step and math.isfinite(v)]
    last = finite[-1][1] if finite else math.nan
    window = [v for s, v in finite if s >= 0.8 * step]
    return last, min(window, default=math.nan), max(window, default=math.nan)


def analyse(results: dict[str, Any]) -> list[Row]:
    rows = []
    for name, entry in results.items():
        task = _task(entry)
        for optimizer, runs in entry["runs"].items():
            for which, target in zip(("early", "final"), task.targets):
                row = Row(name, optimizer, target, which)
                for B in task.batch_sizes[optimizer]:
                    steps = [
                        (s, r["lr"]) for r in runs if r["batch_size"] == B and (s := _steps(r, target)) is not None
                    ]
                    if steps:
                        best, lr = min(steps)
                        row.points.append((B, best))
                        row.lrs.append(lr)
                    elif any(r["batch_size"] == B for r in runs):
                        row.missing.append(B)
                if len(row.points) >= 2:
                    row.fit = fit_steps(*zip(*row.points))
                pred = entry.get("predict", {}).get(optimizer)
                if pred is not None:
                    steps, losses = zip(*pred["curve"])
                    reached = steps_to_target(steps, losses, target)
                    if reached is not None:
                        row.step = reached
                        row.b_simple, *row.b_simple_range = _value_at(logged_series(pred, B_SIMPLE), reached)
                        row.b_crit, *row.b_crit_range = _value_at(logged_series(pred, B_CRIT), reached)
                        row.b_crit_free, *row.b_crit_free_range = _value_at(momentum_free_series(pred), reached)
                        row.momentum_factor, *_ = _value_at(momentum_factor_series(pred), reached)
                rows.append(row)
    return rows


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def _range(values: list[float]) -> str:
    return f"[{_fmt(values[0])}, {_fmt(values[1])}]"


def table(rows: list[Row]) -> str:
    """The measured fit next to the monitor's ``b_simple``, model-level ``b_crit`` and
    ``b_crit / momentum_factor`` (each with its range over the last fifth of the logging steps)."""
    head = (
        "| task | optimizer | target loss | batch sizes reached | S_min | E_min | measured B_crit [90% interval] "
        "| fit rms | monitor step | b_simple [range, last fifth] | b_simple / B_crit | b_crit [range] "
        "| b_crit / B_crit | momentum factor | b_crit / factor [range] | (b_crit / factor) / B_crit |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = r.fit
        measured = f.b_crit if f else float("nan")
        interval = f"[{_fmt(f.interval[0])}, {_fmt(f.interval[1])}]" if f else ""
        reached = ",".join(str(b) for b, _ in r.points) + (
            f" (not: {','.join(map(str, r.missing))})" if r.missing else ""
        )
        lines.append(
            f"| {r.task} | {r.optimizer} | {r.which} {r.target:g} | {reached} | {_fmt(f.s_min if f else math.nan)} "
            f"| {_fmt(f.e_min if f else math.nan)} | {_fmt(measured)} {interval} | {_fmt(f.rms if f else math.nan, 2)} "
            f"| {_fmt(r.step)} | {_fmt(r.b_simple)} {_range(r.b_simple_range)} "
            f"| {_fmt(r.b_simple / measured, 2)} | {_fmt(r.b_crit)} {_range(r.b_crit_range)} "
            f"| {_fmt(r.b_crit / measured, 2)} | {_fmt(r.momentum_factor)} "
            f"| {_fmt(r.b_crit_free)} {_range(r.b_crit_free_range)} | {_fmt(r.b_crit_free / measured, 2)} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5.2 * (len(tasks) + 1), 4.4))
    colors = {"muon": "C0", "adamw": "C1"}
    for ax, name in zip(axes, tasks):
        for r in (r for r in rows if r.task == name):
            if not r.points:
                continue
            B, S = (np.asarray(v, dtype=float) for v in zip(*r.points))
            style = dict(color=colors.get(r.optimizer, "k"), alpha=1.0 if r.which == "final" else 0.45)
            label = f"{r.optimizer}, loss {r.target:g}"
            ax.plot(B * S, S, "o", **style, label=label)
            f = r.fit
            if f and math.isfinite(f.b_crit):
                grid = np.geomspace(B.min() / 2, B.max() * 2, 100)
                s_fit = f.s_min * (1 + f.b_crit / grid)
                ax.plot(grid * s_fit, s_fit, "-", **style)
                ax.plot([2 * f.e_min], [2 * f.s_min], "*", ms=12, **style)  # B = B_crit: twice both minima
        ax.set(xscale="log", yscale="log", xlabel="examples to target E", ylabel="steps to target S")
        ax.set_title(f"{name}: S vs E, fit S = S_min(1 + B_crit/B) (star: B = B_crit)", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[-1]
    markers = {"b_simple": "o", "b_crit": "s", "b_crit_free": "^"}
    measured = []
    for r in rows:
        if not (r.fit and math.isfinite(r.fit.b_crit)):
            continue
        measured.append(r.fit.b_crit)
        for key in markers:
            if key == "b_crit_free" and r.momentum_factor == 1:  # no momentum in the direction (AdamW): = b_crit
                continue
            pred = getattr(r, key)
            if math.isfinite(pred) and pred > 0:
                lo, hi = (min(v, 1e12) for v in r.fit.interval)
                xerr = [[r.fit.b_crit - lo], [hi - r.fit.b_crit]] if math.isfinite(lo) else None
                ax.errorbar(
                    r.fit.b_crit,
                    pred,
                    xerr=xerr,
                    fmt=markers[key],
                    color=colors.get(r.optimizer, "k"),
                    alpha=1.0 if r.which == "final" else 0.45,
                    mfc="none" if r.task != tasks[0] else None,
                    elinewidth=0.8,
                )
    if measured:
        line = np.geomspace(min(measured) / 3, max(measured) * 3, 10)
        ax.plot(line, line, "k-", lw=0.8)
        ax.fill_between(line, line / 2, line * 2, color="0.85", zorder=0)
    from matplotlib.lines import Line2D

    proxies = [
        Line2D([], [], color="0.85", lw=6, label="estimate = measured, within 2x"),
        Line2D([], [], marker="o", ls="", color="k", label="b_simple"),
        Line2D([], [], marker="s", ls="", color="k", label="b_crit (model level)"),
        Line2D([], [], marker="^", ls="", color="k", label="b_crit / momentum_factor (Muon)"),
        *(Line2D([], [], marker="o", ls="", color=c, label=o) for o, c in colors.items()),
        Line2D([], [], marker="o", ls="", color="k", mfc="none", label=", ".join(tasks[1:]) or "-"),
        Line2D([], [], marker="o", ls="", color="k", alpha=0.45, label="early target"),
    ]
    ax.set(xscale="log", yscale="log", xlabel="measured B_crit (90% interval)", ylabel="monitor's estimate")
    ax.set_title(f"monitor at the reference batch vs measured (filled: {tasks[0]})", fontsize=9)
    ax.legend(handles=proxies, fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict[str, Any], plot_path: str | None) -> list[Row]:
    rows = analyse(results)
    units = {name: _task(entry).unit for name, entry in results.items()}
    print("\nbatch sizes and B_crit in " + "; ".join(f"{n}: {u}" for n, u in units.items()))
    print(table(rows))
    print("\nsteps to the target at each batch size (the best learning rate of the grid)")
    for r in rows:
        cells = ", ".join(f"{B}: {S:.0f} ({lr:.2g})" for (B, S), lr in zip(r.points, r.lrs))
        print(f"- {r.task} {r.optimizer} {r.which} {r.target:g}: {cells}")
    if plot_path:
        plot(rows, plot_path)
        print(f"plot: {plot_path}")
    return rows


# ----------------------------------------------------------------------------- command line


def machine() -> str:
    from lightning_muon.optim.ns_dtype import describe_device

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{describe_device(torch.device('cpu'))}; torch {torch.__version__}; load average (1 min) {load:.2f}"


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=PHASES, default="all")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument(
        "--json",
        default=None,
        help="raw results, written by measure/predict (default runs/critical_batch[_quick].json)",
    )
    p.add_argument("--plot", default=None, help="save the plot here (report)")
    p.add_argument("--jobs", type=int, default=1, help="processes (one thread each by default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--grid", type=int, nargs="+", default=None, help="LR grid exponents k (lr * 2^k), in order; default 0 -1 1"
    )
    p.add_argument("--ns-dtype", default="float32", help="Muon's ns_dtype (fixed: results do not depend on the CPU)")
    p.add_argument("--quick", action="store_true", help="tiny models, 3 batch sizes, no LR tuning (a test)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    tasks = {n: (QUICK if args.quick else TASKS)[n] for n in args.tasks}
    if args.grid is None:
        args.grid = [0] if args.quick else [0, -1, 1]
    torch.set_num_threads(args.threads)
    command = " ".join(["python -m benchmarks.critical_batch", *(sys.argv[1:] if argv is None else argv)])
    print(f"machine: {machine()}\ncommand: {command}")
    path = Path(args.json or ("runs/critical_batch_quick.json" if args.quick else "runs/critical_batch.json"))
    t0 = time.perf_counter()
    if args.phase in ("measure", "all"):
        results = measure(args, tasks)
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "python": platform.python_version(),
            "args": vars(args),
            "command": command,
            "measure_wall_s": round(time.perf_counter() - t0),
        }
        results = {"meta": meta, "tasks": results}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
        print(f"measure: {time.perf_counter() - t0:.0f} s, raw results in {path}", flush=True)
    else:
        if not path.exists():
            p.error(f"--phase {args.phase} reads {path}, which does not exist: run --phase measure first")
        results = json.loads(path.read_text())
    if args.phase in ("predict", "all"):
        t1 = time.perf_counter()
        predict(args, results["tasks"])
        results["meta"].pop(
            "predict_wall_s", None
        )  # an earlier predict's (files from before meta["predict"]["wall_s"])
        results["meta"]["predict"] = {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "command": command,
            "wall_s": round(time.perf_counter() - t1),
        }
        path.write_text(json.dumps(results))
        print(f"predict: {time.perf_counter() - t1:.0f} s", flush=True)
    rows = report(results["tasks"], args.plot)
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
