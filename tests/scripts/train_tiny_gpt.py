"""Train a tiny GPT with Muon for a number of epochs, optionally resuming; save params + state.

Usage: python tests/scripts/train_tiny_gpt.py OUT_DIR MAX_EPOCHS [RESUME_CKPT]
Writes OUT_DIR/final.pt ({"params": ..., "optimizer": ...}) and OUT_DIR/last.ckpt.
"""

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.common import muon  # noqa: E402
from examples.gpt import LitGPT, TokenBlocks  # noqa: E402


def main() -> None:
    out, max_epochs = Path(sys.argv[1]), int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    L.seed_everything(7, verbose=False)
    tokens = np.random.default_rng(0).integers(0, 40, size=16 * 4 * 17 + 1).astype(np.uint16)
    loader = DataLoader(TokenBlocks(tokens, 16), batch_size=4, shuffle=False)
    model = LitGPT(
        vocab_size=40,
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=32,
        optimizer=muon(lr=0.02),
        warmup_steps=5,
        schedule="constant",
    )  # a schedule independent of max_epochs
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, train_dataloaders=loader, ckpt_path=resume)
    out.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(out / "last.ckpt")
    opt = trainer.optimizers[0]
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "optimizer": opt.state_dict(),
            "global_step": trainer.global_step,
            "lr": [g["lr"] for g in opt.param_groups],
        },
        out / "final.pt",
    )


if __name__ == "__main__":
    main()
