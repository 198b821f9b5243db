"""Worker for tests/optim/test_ns_dtype.py: ranks whose hardware resolves different ``ns_dtype="auto"``.

Rank 0 is told its CPU has native bf16 (AVX512-BF16), rank 1 that it has only AVX2; both run
Muon steps under DDP (plain tensors), then FSDP2 (DTensors Shard(0)), with the default
ns_dtype="auto", and write the dtype each resolved on its own, the agreed one, and the final
parameters to OUT/{ddp,fsdp}_rank{r}.pt.

Usage: PORT=29500 python mixed_hardware.py OUT_DIR
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning_muon.optim.ns_dtype as precision  # noqa: E402
from lightning_muon import Muon  # noqa: E402

SHAPES = [(8, 12), (8, 12), (12, 8), (5, 4)]
FLAGS = [{"capability": "AVX512", "avx512_f": True, "avx512_bf16": True}, {"capability": "AVX2", "avx2": True}]


def make(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(2)]
    return params, grads


def worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    precision._cpu_flags = lambda: dict(FLAGS[rank])  # this rank's (pretended) CPU
    for mode in ("ddp", "fsdp"):
        run(rank, mode, out)
    dist.barrier()  # both ranks done (the last full_tensor gathers included) before gloo is torn down
    dist.destroy_process_group()


def run(rank: int, mode: str, out: str) -> None:
    init, grads = make()
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)], src_data_rank=None)) for p in init]
        grads = [[distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None) for g in step] for step in grads]
    else:
        params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Muon([{"params": params, "use_muon": True}], lr=0.05, weight_decay=0.0)
    own = precision.resolve_ns_dtype("cpu")
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    torch.save(
        {
            "own": own,
            "agreed": opt.resolved_ns_dtype(torch.device("cpu")),
            "params": [full(p.detach()).clone() for p in params],
        },
        os.path.join(out, f"{mode}_rank{rank}.pt"),
    )


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
