"""Fig. 1's ViT control: "AdamW wins in a matched small-ViT/CIFAR-10 control". CIFAR-10 needs a
download, so the control runs on the closest natural images that ship in packages
(:mod:`examples.paper.photos`: 32x32 crops of ten photographs) and, for contrast, on the embedded
8x8 digits; each at a small learning-rate grid, with seeds, recording validation accuracy at three
points of training so that the ranking can be read against data, learning rate and training length.

The model is the ViT example's (torchvision ``VisionTransformer`` inside :class:`examples.vit.LitViT`),
its optimizer built by ``configure_muon`` as in the example; trained in a plain loop.

Example:
    >>> r = train_vit(replace(QUICK, steps=2, checkpoints=(2,)), "photos", "adamw", 1e-3, 0)
    >>> sorted(r["acc"]) == [2]
    True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from examples.paper._report import Claim, Row, Section, figure, save

__all__ = ["QUICK", "VitPlan", "best_by", "train_vit", "vit_claims", "vit_control", "vit_verdict"]


@dataclass(frozen=True)
class VitPlan:
    """The control's size and grid (all our choices: the summary gives none)."""

    num_layers: int = 2
    num_heads: int = 4
    hidden_dim: int = 64
    mlp_dim: int = 256
    patch_size: int = 8  # photos: 32x32 in 16 patches (what the CPU budget allows; CIFAR ViTs often use 4)
    digits_patch: int = 4  # digits: 16x16 in 16 patches
    batch_size: int = 64
    steps: int = 300
    checkpoints: tuple[int, ...] = (50, 150, 300)
    train_per_class: int = 500
    val_per_class: int = 100
    muon_lrs: tuple[float, ...] = (0.01, 0.02, 0.04)
    adamw_lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    seeds: tuple[int, ...] = (0, 1)
    datasets: tuple[str, ...] = ("photos", "digits")


QUICK = VitPlan(steps=6, checkpoints=(3, 6), train_per_class=8, val_per_class=4, muon_lrs=(0.02,), adamw_lrs=(2e-3,),
                seeds=(0,))  # fmt: skip


def _data(name: str, plan: VitPlan, seed: int) -> tuple[tuple, tuple, int, int]:
    if name == "photos":
        from examples.paper.photos import photo_patches

        return (
            photo_patches(plan.train_per_class, "train", seed=0),
            photo_patches(plan.val_per_class, "val", seed=0),
            32,
            3,
        )
    from examples.image_data import DigitsDataModule

    dm = DigitsDataModule(image_size=16, batch_size=plan.batch_size, seed=0)
    dm.setup()
    tr, va = dm.train_set.tensors, dm.val_set.tensors
    return tr, va, 16, 1


def train_vit(plan: VitPlan, dataset: str, optimizer: str, lr: float, seed: int) -> dict[str, Any]:
    """One run: validation loss and accuracy at ``plan.checkpoints``."""
    from examples.common import adamw, muon
    from examples.vit import LitViT
    from lightning_muon import configure_muon

    (xt, yt), (xv, yv), size, channels = _data(dataset, plan, seed)
    torch.manual_seed(seed)
    lit = LitViT(
        image_size=size,
        num_channels=channels,
        num_classes=10,
        patch_size=plan.patch_size if dataset == "photos" else plan.digits_patch,
        num_layers=plan.num_layers,
        num_heads=plan.num_heads,
        hidden_dim=plan.hidden_dim,
        mlp_dim=plan.mlp_dim,
    )
    model = lit.model
    factory = muon(lr=lr, adamw_lr=lr * 0.05, ns_dtype="float32") if optimizer == "muon" else adamw(lr=lr)
    opt = configure_muon(model, optimizer=factory)
    g = torch.Generator().manual_seed(seed)
    acc, loss_at = {}, {}
    t0 = time.process_time()
    for step in range(1, plan.steps + 1):
        idx = torch.randint(0, len(yt), (plan.batch_size,), generator=g)
        model.train()
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in plan.checkpoints:
            model.eval()
            with torch.no_grad():
                logits = torch.cat([model(xv[i : i + 256]) for i in range(0, len(yv), 256)])
            acc[step] = float((logits.argmax(1) == yv).float().mean())
            loss_at[step] = float(F.cross_entropy(logits, yv))
    return dict(
        dataset=dataset,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        acc=acc,
        loss=loss_at,
        train_loss=loss.item(),
        cpu_seconds=time.process_time() - t0,
    )


def _job(args: tuple) -> dict[str, Any]:
    torch.set_num_threads(1)
    return train_vit(*args)


def _sweep(plan: VitPlan, workers: int) -> list[dict[str, Any]]:
    jobs = [
        (plan, ds, opt, lr, s)
        for ds in plan.datasets
        for opt, lrs in (("muon", plan.muon_lrs), ("adamw", plan.adamw_lrs))
        for lr in lrs
        for s in plan.seeds
    ]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            return pool.map(_job, jobs, chunksize=1)
    return [_job(j) for j in jobs]


def best_by(runs: list[dict], dataset: str, optimizer: str, step: int) -> tuple[float, float, float]:
    """The learning rate with the best seed-mean accuracy at ``step``: (lr, mean acc, seed range)."""
    lrs = sorted({r["lr"] for r in runs if r["dataset"] == dataset and r["optimizer"] == optimizer})
    per = {
        lr: [r["acc"][step] for r in runs if r["dataset"] == dataset and r["optimizer"] == optimizer and r["lr"] == lr]
        for lr in lrs
    }
    lr = max(lrs, key=lambda k: sum(per[k]) / len(per[k]))
    return lr, sum(per[lr]) / len(per[lr]), max(per[lr]) - min(per[lr])


def vit_verdict(runs: list[dict], dataset: str, step: int) -> str:
    """The paper: AdamW wins. Reproduced when AdamW's best seed-mean accuracy beats Muon's by more
    than the larger seed range; partly when it is ahead within that; else not reproduced."""
    _, a, sa = best_by(runs, dataset, "adamw", step)
    _, m, sm = best_by(runs, dataset, "muon", step)
    return "reproduced" if a - m > max(sa, sm) else "partly" if a > m else "not reproduced"


def vit_claims(runs: list[dict], checkpoints: tuple[int, ...], verdicts: dict) -> list[Claim]:
    """Fig. 1's ViT claim and the abstract's, on the photo crops at the end of training."""
    end = checkpoints[-1]
    lm, m, sm = best_by(runs, "photos", "muon", end)
    la, a, sa = best_by(runs, "photos", "adamw", end)
    muon_ahead = all(
        best_by(runs, ds, "muon", c)[1] > best_by(runs, ds, "adamw", c)[1] for ds in verdicts for c in checkpoints
    )
    ev = (
        f"natural-image crops (not CIFAR-10), {end} steps: best val accuracy Muon {m:.3f} (lr {lm:g}) vs AdamW "
        f"{a:.3f} (lr {la:g}), seed ranges {sm:.3f} / {sa:.3f}"
        + ("; Muon ahead at every checkpoint, on the photos and on the digits" if muon_ahead else "")
    )
    v = verdicts["photos"][end]
    return [Claim("Fig. 1 (ViT)", "fig1_vit", ev, v), Claim("abstract (ViT)", "abstract_vit", ev, v)]


def vit_control(
    out: Path, quick: bool = False, workers: int = 1, full: bool = False, dry_run: bool = False, data: str | None = None
) -> Section:
    t0 = time.perf_counter()
    plan = QUICK if quick else VitPlan()
    if full:
        plan = replace(plan, steps=5000, checkpoints=(500, 2000, 5000), train_per_class=5000, seeds=(0, 1, 2))
    if dry_run:
        print(f"[vit] plan {asdict(plan)}")
        return Section("vit", "dry run", [], data=dict(plan=asdict(plan)))
    runs = _sweep(plan, workers)
    fig, axes = figure(len(plan.datasets))
    rows = []
    verdicts = {}
    for ax, ds in zip(axes, plan.datasets):
        for opt, color in (("muon", "C0"), ("adamw", "C1")):
            lrs = plan.muon_lrs if opt == "muon" else plan.adamw_lrs
            for k, lr in enumerate(lrs):
                rs = [r for r in runs if r["dataset"] == ds and r["optimizer"] == opt and r["lr"] == lr]
                mean = [sum(r["acc"][c] for r in rs) / len(rs) for c in plan.checkpoints]
                ax.plot(plan.checkpoints, mean, "o-", color=color, alpha=0.35 + 0.3 * k, label=f"{opt} lr {lr:g}")
        ax.set(title=f"{ds}: validation accuracy (seed mean)", xlabel="step")
        ax.legend(fontsize=6)
        verdicts[ds] = {c: vit_verdict(runs, ds, c) for c in plan.checkpoints}
        for c in plan.checkpoints:
            lm, m, sm = best_by(runs, ds, "muon", c)
            la, a, sa = best_by(runs, ds, "adamw", c)
            rows.append(
                Row(
                    f"{ds}, step {c}: best val accuracy Muon vs AdamW (lr; seed range)",
                    "AdamW wins in a matched small" if ds == "photos" else "-",
                    f"{m:.3f} (lr {lm:g}; {sm:.3f}) vs {a:.3f} (lr {la:g}; {sa:.3f}) -> "
                    f"{'AdamW' if a > m else 'Muon'} ahead",
                    f"ViT {plan.num_layers} layers, d={plan.hidden_dim}, "
                    f"patch {plan.patch_size if ds == 'photos' else plan.digits_patch}, "
                    f"batch {plan.batch_size}",
                    str(len(plan.seeds)),
                )
            )
    png = save(fig, out / "vit_control.png")
    claims = vit_claims(runs, plan.checkpoints, verdicts)
    choices = [
        "data: 32x32 crops of ten photographs shipped in scikit-image, scikit-learn and matplotlib "
        "(examples/paper/photos.py says how this differs from CIFAR-10), 500 training and 100 validation crops per "
        "class; and scikit-learn's 8x8 digits at 16x16 for contrast.",
        f"ViT: {plan.num_layers} layers, {plan.num_heads} heads, width {plan.hidden_dim}, MLP {plan.mlp_dim}, patch "
        f"{plan.patch_size} on the 32x32 photos (16 patches), {plan.digits_patch} on the 16x16 digits; batch "
        f"{plan.batch_size}, {plan.steps} steps, constant learning rates; Muon lr "
        f"{', '.join(f'{x:g}' for x in plan.muon_lrs)} (its AdamW groups at 0.05 x lr), AdamW lr "
        f"{', '.join(f'{x:g}' for x in plan.adamw_lrs)}; seeds {', '.join(map(str, plan.seeds))}. The paper's ViT "
        "size, steps and settings are not in the summary.",
        "the ranking is read at the best learning rate of each optimizer, at three points of training.",
    ]
    return Section(
        "vit",
        "Fig. 1: the ViT control, Muon vs AdamW, on natural-image crops and on digits",
        rows,
        choices,
        png=png,
        seconds=time.perf_counter() - t0,
        data=dict(runs=runs, verdicts=verdicts, plan=asdict(plan)),
        claims=claims,
    )
