"""Worker for tests/parallel/test_process_group.py: ``Muon(process_group=...)`` in a 2-rank gloo world.

In one launch, in order:

* ``alone``: rank 0 trains with ``process_group=None`` while rank 1 does nothing (the default
  would make rank 0 wait in a collective that rank 1 never joins);
* ``own``: each rank trains its own model (seed 10 + rank) with ``process_group=None``;
* ``auto`` / ``group`` / ``mesh``: both ranks train the same model with the default, an explicit
  ``dist.new_group([0, 1])`` and a 1-D DeviceMesh, recording how many matrices each orthogonalised.

Writes OUT/rank{r}.pt. Usage: PORT=29500 python process_group.py OUT_DIR
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import raw_step  # noqa: E402  (parameters, gradients and groups shared with tests/parallel/test_distributed.py)
from _launch import record_orthogonalized  # noqa: E402

from lightning_muon import Muon  # noqa: E402

WORLD = 2


def run(seed: int, process_group) -> list[torch.Tensor]:
    """Muon steps on raw_step's parameters and gradients of ``seed``; the final parameters."""
    init, grads = raw_step.make(seed)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Muon(raw_step.groups(params), lr=0.05, ns_dtype="float32", weight_decay=0.1, process_group=process_group)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    counted = record_orthogonalized()  # one entry per matrix this rank orthogonalises
    result = {}
    if rank == 0:
        result["alone"] = run(0, None)
    result["own"] = run(10 + rank, None)
    dist.barrier()
    for label, group in [
        ("auto", "auto"),
        ("group", dist.new_group([0, 1])),
        ("mesh", init_device_mesh("cpu", (WORLD,))),
    ]:
        counted.clear()
        result[label] = run(0, group)
        result[f"{label}_orthogonalized"] = len(counted)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD)
