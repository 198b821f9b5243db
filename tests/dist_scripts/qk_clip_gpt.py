"""Worker for tests/callbacks/test_qk_clip.py: the example GPT (tiny) trained by Muon with QKClip and
AttentionLogitMonitor under Lightning on CPU/gloo, one process or two (DDP or FSDP2).

Global batch 8 split over the ranks by a non-shuffling DistributedSampler (every world size sees
the same global batches), 2 epochs of 4 optimizer steps. Writes OUT_DIR/result.pt (rank 0): full
parameters, QKClip's clip count, and every metric the monitor and the clip logged, by step.

Usage: python qk_clip_gpt.py OUT_DIR {single,ddp,fsdp} TAU
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from examples.gpt import GPT, GPTConfig  # noqa: E402
from lightning_muon import configure_muon  # noqa: E402
from lightning_muon.callbacks import AttentionLogitMonitor, QKClip  # noqa: E402

VOCAB, CONTEXT, SEQUENCES, GLOBAL_BATCH = 48, 16, 32, 8


class MemoryLogger(Logger):
    """Keeps what is logged, by step (rank 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.setdefault(int(step), {}).update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class Lit(L.LightningModule):
    def __init__(self, fsdp: bool) -> None:
        super().__init__()
        self.fsdp = fsdp
        self.model = GPT(GPTConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=2, n_head=4, n_embd=32))

    def configure_model(self) -> None:
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.h:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return configure_muon(self, lr=0.05, adjust_lr="original", adamw_lr=3e-3, ns_dtype="float32")

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, VOCAB, (SEQUENCES, CONTEXT + 1), generator=g)
        ds = TensorDataset(data[:, :-1], data[:, 1:])
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        world, rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    def on_train_end(self) -> None:  # every rank: full_tensor() is a collective under FSDP2
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        params = {n: full(p.detach()).clone() for n, p in self.named_parameters()}
        if self.trainer.global_rank == 0:
            clip = next(c for c in self.trainer.callbacks if isinstance(c, QKClip))
            result = {"params": params, "clipped_total": clip.clipped_total, "logged": self.trainer.logger.metrics}
            torch.save(result, os.path.join(OUT, "result.pt"))


if __name__ == "__main__":
    OUT, MODE, TAU = sys.argv[1], sys.argv[2], float(sys.argv[3])
    L.seed_everything(0, verbose=False)
    if MODE == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy, devices = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2
    else:
        strategy, devices = ("ddp", 2) if MODE == "ddp" else ("auto", 1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=2,
        use_distributed_sampler=False,
        logger=MemoryLogger(),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[AttentionLogitMonitor(every_n_steps=1), QKClip(tau=TAU)],
    )
    trainer.fit(Lit(fsdp=MODE == "fsdp"))
