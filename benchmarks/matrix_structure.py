"""Does splitting fused q/k/v projections change what Muon learns? Val loss of the GPT and ViT demos.

Each seed trains every ``split_qkv`` variant back to back (seed-major, so load drifts hit all
variants alike) with the demo's optimizer settings, shrunk to fit a loaded 2-core CPU:

* GPT (``examples/configs/gpt_demo.yaml``): Muon lr 0.02 (``adjust_lr="original"``), AdamW 1e-3,
  warmup 20, cosine; shrunk to 2 layers, d = 64, 4 heads, context 64, batch 16, ``--steps``
  steps; val loss on 16 fixed batches. The fused ``c_attn`` rows are (head, q/k/v, head_dim),
  declared by the model, so ``split_qkv`` follows them.
* ViT (``examples/configs/vit_demo.yaml``): torchvision ``VisionTransformer`` on the embedded
  digits (16 x 16), Muon lr 0.02, AdamW 1e-3, constant; shrunk to 2 layers, width 64, 4 heads,
  MLP 128, batch 64, ``--steps`` steps; val loss on the whole held-out 20% (360 images).
  ``nn.MultiheadAttention.in_proj_weight`` is split.

Usage: ``OMP_NUM_THREADS=1 python -m benchmarks.matrix_structure --demo gpt vit --seeds 0 1 2 --steps 150``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import lightning as L
import torch

VARIANTS = {"whole": False, "split_qkv": True, "per_head": "per_head"}


class _LastVal(L.Callback):
    def __init__(self) -> None:
        self.loss = float("nan")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.loss = float(trainer.callback_metrics["val/loss"])


def _trainer(steps: int, val_batches: int | None, callback: L.Callback) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )


def run_gpt(split_qkv: bool | str, seed: int, steps: int) -> float:
    from examples.common import muon
    from examples.gpt import GPTDataModule, LitGPT

    L.seed_everything(seed, verbose=False)
    dm = GPTDataModule(block_size=64, batch_size=16)
    model = LitGPT(
        vocab_size=dm.vocab_size,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_embd=64,
        optimizer=muon(lr=0.02, adamw_lr=1e-3),
        warmup_steps=20,
        schedule="cosine",
        split_qkv=split_qkv,
    )
    last = _LastVal()
    _trainer(steps, 16, last).fit(model, datamodule=dm)
    return last.loss


def run_vit(split_qkv: bool | str, seed: int, steps: int) -> float:
    from examples.common import muon
    from examples.image_data import DigitsDataModule
    from examples.vit import LitViT

    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(image_size=16, batch_size=64, seed=0)
    model = LitViT(
        image_size=16,
        num_channels=1,
        num_classes=10,
        patch_size=4,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        optimizer=muon(lr=0.02, adamw_lr=1e-3),
        split_qkv=split_qkv,
    )
    last = _LastVal()
    _trainer(steps, None, last).fit(model, datamodule=dm)
    return last.loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", nargs="+", default=["gpt", "vit"], choices=["gpt", "vit"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runners = {"gpt": run_gpt, "vit": run_vit}
    results: dict = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "steps": args.steps,
        "runs": [],
    }
    for demo in args.demo:
        for seed in args.seeds:
            for name in args.variants:
                t0 = time.perf_counter()
                loss = runners[demo](VARIANTS[name], seed, args.steps)
                seconds = time.perf_counter() - t0
                results["runs"].append({"demo": demo, "variant": name, "seed": seed, "val_loss": loss, "s": seconds})
                print(f"{demo} {name:9} seed {seed}: val loss {loss:.4f} ({seconds:.0f} s)", flush=True)
    print("\n| demo | variant | val loss per seed | mean | diff vs whole (mean, per seed) |")
    print("|---|---|---|---|---|")
    for demo in args.demo:
        base = {r["seed"]: r["val_loss"] for r in results["runs"] if r["demo"] == demo and r["variant"] == "whole"}
        for name in args.variants:
            got = {r["seed"]: r["val_loss"] for r in results["runs"] if r["demo"] == demo and r["variant"] == name}
            diffs = [got[s] - base[s] for s in got if s in base]
            per_seed = ", ".join(f"{got[s]:.4f}" for s in args.seeds)
            diff = f"{statistics.mean(diffs):+.4f} ({', '.join(f'{d:+.4f}' for d in diffs)})" if diffs else "-"
            print(f"| {demo} | {name} | {per_seed} | {statistics.mean(got.values()):.4f} | {diff} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
