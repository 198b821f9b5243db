"""2-process DDP (gloo, CPU) training of a tiny GPT with Muon; checkpoints every epoch.

Usage: python tests/scripts/ddp_train.py OUT_DIR MAX_EPOCHS [--kill-rank R --kill-at-step S] [--resume]
With --kill-*, rank R SIGKILLs itself when global_step reaches S. With --resume the run restarts
from OUT_DIR/ckpt/last.ckpt. Rank 0 writes OUT_DIR/final.pt (params, optimizer state, the step
the run started from).
"""

import argparse
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.common import muon  # noqa: E402
from examples.gpt import LitGPT, TokenBlocks  # noqa: E402


class Tiny(LitGPT):
    def train_dataloader(self):
        tokens = np.random.default_rng(0).integers(0, 40, size=16 * 16 + 1).astype(np.uint16)
        ds = TokenBlocks(tokens, 16)  # 16 samples: 2 ranks x batch 2 -> 4 steps per epoch
        sampler = DistributedSampler(
            ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(ds, batch_size=2, sampler=sampler)


class Recorder(L.Callback):
    def __init__(self, kill_rank, kill_at_step):
        self.kill_rank, self.kill_at_step, self.start_step = kill_rank, kill_at_step, None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.kill_rank and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("max_epochs", type=int)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-at-step", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(3, verbose=False)
    model = Tiny(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32, optimizer=muon(lr=0.02), warmup_steps=3)
    recorder = Recorder(args.kill_rank, args.kill_at_step)
    ckpt = ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_epochs=args.max_epochs,
        use_distributed_sampler=False,
        logger=False,
        callbacks=[recorder, ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    trainer.fit(model, ckpt_path="last" if args.resume else None)
    if trainer.global_rank == 0:
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "optimizer": trainer.optimizers[0].state_dict(),
                "start_step": recorder.start_step,
                "global_step": trainer.global_step,
            },
            args.out / "final.pt",
        )


if __name__ == "__main__":
    main()
