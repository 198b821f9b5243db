"""Two processes (gloo, CPU) with CriticalBatchSizeMonitor (per-example) and BatchSizeWarmup.

Usage: python noise_scale_2proc.py OUT_DIR {ddp,fsdp2}. Each rank writes OUT_DIR/rank<r>.json:
the warmup history, (micro-batches, accumulation) per optimizer step, the final smoothed B_simple
and the first measurement's per-layer small/large-batch squared norms. Launched by
tests/callbacks/test_critical_batch_size.py.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_muon.callbacks import BatchSizeWarmup, CriticalBatchSizeMonitor

MICRO = 8


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def data() -> tuple[torch.Tensor, torch.Tensor]:  # 32 micro-batches of 8 per rank
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    return x, 0.1 * x[:, :4] + torch.randn(512, 4, generator=g)  # mostly noise: B_simple in the hundreds


class Model(pl.LightningModule):
    def __init__(self, fsdp: bool) -> None:
        super().__init__()
        self.net, self.fsdp = make_net(), fsdp

    def configure_model(self) -> None:
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        ds = TensorDataset(*data())
        sampler = DistributedSampler(
            ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(ds, batch_size=MICRO, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Record(pl.Callback):
    def __init__(self, monitor: CriticalBatchSizeMonitor) -> None:
        self.monitor, self.windows, self.count, self.first = monitor, [], 0, None

    def on_train_batch_start(self, trainer, *args):
        self.count += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.windows.append((self.count, trainer.accumulate_grad_batches))
        self.count = 0

    def on_train_batch_end(self, trainer, *args):
        if self.first is None and self.monitor.ema_steps == 1:
            small, big, _ = self.monitor._smoothed()
            self.first = {"small": small.tolist(), "big": big.tolist(), "b": [self.monitor.b_small, self.monitor.b_big]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, mode = Path(sys.argv[1]), sys.argv[2]
    fsdp = mode == "fsdp2"
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if fsdp else DDPStrategy()
    monitor = CriticalBatchSizeMonitor(
        every_n_steps=10, include=["net.0.weight", "net.2.weight"], sample_every_n_steps=1
    )
    warmup = BatchSizeWarmup(max_batch_size=128, safety=1.0, min_interval=2)
    record = Record(monitor)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        logger=CSVLogger(out, name="", version="run"),
        callbacks=[monitor, warmup, record],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    trainer.fit(Model(fsdp))
    (out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "history": warmup.history,
                "windows": record.windows,
                "b_simple": monitor.b_simple(),
                "first": record.first,
                "mode": monitor.mode,
            }
        )
    )
