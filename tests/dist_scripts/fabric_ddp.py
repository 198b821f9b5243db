"""Worker for tests/integration/test_ecosystem.py: Muon under Lightning Fabric, 1 process or 2-process DDP (gloo, CPU).

Every rank builds the same model (seed 0), wraps it and a ``Muon`` with ``fabric.setup``, and takes
STEPS steps on its share of each global batch (rank r: rows r, r + world, ...; with 2 ranks DDP's
gradient average equals the full-batch gradient). Rank 0 writes the final parameters to OUT/world{N}.pt.

Usage: MASTER_PORT=29500 python fabric_ddp.py OUT_DIR WORLD_SIZE
(The one-process run is ``run(1)``, called in the test process.)
"""

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lightning.fabric import Fabric  # noqa: E402

from lightning_muon import Muon, muon_param_groups  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 32


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 12)
        self.hidden = nn.Linear(12, 24)
        self.hidden2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 16)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden2(torch.tanh(self.hidden(self.embed(x))))))


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 16, (STEPS, GLOBAL_BATCH), generator=g)
    return x, (3 * x + 1) % 16


def run(world: int) -> dict[str, torch.Tensor]:
    """Train on this process's share; every rank returns the (identical) final parameters."""
    fabric = Fabric(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto")
    fabric.launch()
    torch.manual_seed(0)
    net = Net()
    optimizer = Muon(muon_param_groups(net), lr=0.05, ns_dtype="float32", weight_decay=0.01)
    model, optimizer = fabric.setup(net, optimizer)
    x, y = data()
    for step in range(STEPS):
        xs, ys = x[step, fabric.global_rank :: world], y[step, fabric.global_rank :: world]
        loss = nn.functional.cross_entropy(model(xs), ys)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in net.named_parameters()}  # the wrapper trains these tensors


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, world = sys.argv[1], int(sys.argv[2])
    params = run(world)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(params, os.path.join(out, f"world{world}.pt"))
