"""Fig. 5 / Fig. 1: layerwise stable rank, Muon vs AdamW, on the GPT demo (char-level KJV) and a matched
small ViT (embedded digits), read back from the callbacks' TensorBoard event files.

Each run is the example module (``examples.gpt.LitGPT``, ``examples.vit.LitViT``) under a plain
Lightning ``Trainer`` with ``StableRankMonitor`` and ``SpectralEntropyMonitor``; only the
optimizer differs between the two runs of a task (``examples.common.muon()`` or ``adamw()``, injected
as LightningCLI would). Newton–Schulz runs in Muon's ``ns_dtype="auto"``: float32 on CPUs without
native bf16, bf16 where the CPU multiplies it natively.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from examples.common import adamw, muon
from examples.compare import read_scalars
from examples.gpt import GPTDataModule, LitGPT
from examples.image_data import DigitsDataModule
from examples.paper._report import Row, Section, figure, save
from examples.vit import LitViT
from lightning_muon.callbacks import SpectralEntropyMonitor, StableRankMonitor

OPTIMIZERS = ("muon", "adamw")
GPT_STEPS, VIT_STEPS = 60, 80  # what fit the time budget on a shared 2-core CPU; the paper trains 5000


def run(task: str, optimizer: str, steps: int, out: Path, every: int, quick: bool) -> dict:
    """Train one (task, optimizer) pair; returns the scalars read back from its event file."""
    L.seed_everything(0, verbose=False)
    factory = muon(lr=0.02, adamw_lr=1e-3) if optimizer == "muon" else adamw(lr=1e-3, fused=True)
    if task == "gpt":
        data = GPTDataModule(block_size=64, batch_size=16)
        model = LitGPT(
            vocab_size=data.vocab_size,
            block_size=64,
            n_layer=2 if quick else 4,
            n_head=4,
            n_embd=64 if quick else 128,
            optimizer=factory,
            warmup_steps=max(1, steps // 10),
            schedule="cosine",
        )
        val_batches = 4 if quick else 20
    else:
        data = DigitsDataModule(image_size=16, batch_size=64)
        model = LitViT(
            image_size=16,
            num_channels=1,
            num_classes=10,
            patch_size=4,
            num_layers=2 if quick else 4,
            num_heads=4,
            hidden_dim=64 if quick else 128,
            mlp_dim=256 if quick else 512,
            optimizer=factory,
        )
        val_batches = 1.0
    shutil.rmtree(out / f"{task}_{optimizer}", ignore_errors=True)  # no stale event files from an earlier run
    logger = TensorBoardLogger(str(out), name=f"{task}_{optimizer}", version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        logger=logger,
        callbacks=[StableRankMonitor(every_n_steps=every), SpectralEntropyMonitor(every_n_steps=every)],
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
        log_every_n_steps=every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    return read_scalars(Path(logger.log_dir))


def _layers(scalars: dict, prefix: str = "stable_rank/") -> dict[str, float]:
    skip = {"mean", "min", "max"}
    return {
        tag[len(prefix) :]: pts[-1][1]
        for tag, pts in scalars.items()
        if tag.startswith(prefix) and tag[len(prefix) :] not in skip
    }


def fig5(out: Path, quick: bool = False) -> Section:
    t0 = time.perf_counter()
    steps = {"gpt": 6 if quick else GPT_STEPS, "vit": 6 if quick else VIT_STEPS}
    every = 2 if quick else 10
    tb = out / "tb"
    res = {(t, o): run(t, o, steps[t], tb, every, quick) for t in ("gpt", "vit") for o in OPTIMIZERS}

    fig, axes = figure(4, width=4.2)
    for col, task in enumerate(("gpt", "vit")):
        ax = axes[2 * col]
        names = sorted(_layers(res[(task, "muon")]))
        x = torch.arange(len(names)).float()
        for k, opt in enumerate(OPTIMIZERS):
            vals = _layers(res[(task, opt)])
            ax.bar((x + 0.4 * k).tolist(), [vals.get(n, float("nan")) for n in names], width=0.4, label=opt)
        ax.set(title=f"{task}: final stable rank per layer", xlabel="layer (sorted by name)")
        ax.legend(fontsize=8)
        ax2 = axes[2 * col + 1]
        for opt in OPTIMIZERS:
            pts = res[(task, opt)].get("stable_rank/mean", [])
            if pts:
                ax2.plot(*zip(*pts), marker="o", ms=3, label=opt)
        ax2.set(title=f"{task}: mean stable rank over training", xlabel="step")
        ax2.legend(fontsize=8)
    png = save(fig, out / "fig5_layerwise_stable_rank.png")

    rows = []
    summary = {}
    for task in ("gpt", "vit"):
        mu, ad = _layers(res[(task, "muon")]), _layers(res[(task, "adamw")])
        common = sorted(set(mu) & set(ad))
        higher = sum(mu[n] > ad[n] for n in common)
        mean_mu, mean_ad = sum(mu[n] for n in common) / len(common), sum(ad[n] for n in common) / len(common)
        val = {o: res[(task, o)]["val/loss"][-1][1] for o in OPTIMIZERS}
        setting = (
            f"{'2 layers, d=64' if quick else '4 layers, d=128'}, {steps[task]} steps, "
            + ("block 64, batch 16, KJV chars" if task == "gpt" else "digits 16x16, patch 4, batch 64")
            + ", Muon lr 0.02 / AdamW 1e-3, fp32"
        )
        rows.append(
            Row(
                f"{task}: mean final stable rank Muon vs AdamW (layers with Muon higher)",
                "Muon preserves stable rank" if task == "gpt" else "-",
                f"{mean_mu:.2f} vs {mean_ad:.2f} ({higher}/{len(common)} layers)",
                setting,
                "1",
            )
        )
        rows.append(
            Row(
                f"{task}: final val loss Muon vs AdamW",
                "Muon lower" if task == "gpt" else "AdamW wins",
                f"{val['muon']:.4f} vs {val['adamw']:.4f}",
                setting,
                "1",
            )
        )
        if task == "vit":
            acc = {o: res[(task, o)]["val/acc"][-1][1] for o in OPTIMIZERS if "val/acc" in res[(task, o)]}
            if acc:
                rows.append(
                    Row(
                        "vit: final val accuracy Muon vs AdamW",
                        "AdamW wins (CIFAR-10, 5000 steps)",
                        " vs ".join(f"{acc[o]:.3f}" for o in OPTIMIZERS if o in acc),
                        setting,
                        "1",
                    )
                )
        summary[task] = dict(mean_muon=mean_mu, mean_adamw=mean_ad, higher=higher, layers=len(common), val=val)
    notes = [
        f"Trained with {torch.get_num_threads()} torch thread(s) (`--threads`). Scale: the paper trains 5000 "
        f"steps (GPT: context 256, batch 64; ViT: CIFAR-10); these are {steps['gpt']} (GPT) / "
        f"{steps['vit']} (ViT) steps on a 2-core CPU, so the loss comparison is an early-training snapshot, not "
        "the paper's end point. Curves come from the StableRankMonitor's TensorBoard events "
        "(EventAccumulator), tags `stable_rank/<layer>`."
    ]
    choices = [
        "one seed (0); cosine schedule with 10% warmup for GPT, constant for ViT, as in the demo configs; "
        "validation once, at the end."
    ]
    return Section(
        "fig5",
        "Fig. 5 / Fig. 1: layerwise stable rank, Muon vs AdamW (GPT and ViT)",
        rows,
        choices,
        notes,
        png=png,
        seconds=time.perf_counter() - t0,
        data=summary,
    )


__all__ = ["fig5"]
