"""Two-process FSDP2 (ModelParallelStrategy) run with the weight/gradient monitors; launched by
tests/callbacks/test_callbacks.py in a subprocess. Usage: python fsdp2_monitors.py LOG_DIR"""

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_muon.callbacks import PolarMisalignmentMonitor, SpectralEntropyMonitor, StableRankMonitor


def initial_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    return {f"net.{n}": p.detach().clone() for n, p in net.named_parameters()}


class Sharded(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        self.net.load_state_dict({n[4:]: w for n, w in initial_weights().items()})

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g)), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


if __name__ == "__main__":
    torch.set_num_threads(1)
    include = ["net.0.weight", "net.2.weight"]
    pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=3,
        logger=TensorBoardLogger(sys.argv[1], name="", version="run"),
        callbacks=[
            SpectralEntropyMonitor(2, include),
            StableRankMonitor(2, include),
            PolarMisalignmentMonitor(2, include, k=4),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(Sharded())
