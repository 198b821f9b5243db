"""Worker for tests/parallel/test_distributed.py: Muon steps under torch.distributed (gloo), no Lightning.

Every rank builds the same parameters and per-step gradients, runs Muon with plain tensors (DDP
layout) or with DTensors Shard(0) (FSDP2 layout), and writes its final parameters, momentum,
per-step collective counts, the matrices it orthogonalised, and whether a step with a NaN
in one rank's gradient shard was skipped on every rank, to OUT/rank{r}.pt.

Usage: PORT=29500 python raw_step.py OUT_DIR WORLD_SIZE {ddp,fsdp} NS_DTYPE [MUON_KWARGS_JSON]
(The one-process reference runs inside the test, from make() and groups(); MUON_KWARGS_JSON adds
Muon settings, e.g. '{"variant": "normuon", "momentum_dtype": "bfloat16"}', and the NorMuon state
is saved too.)
"""

import json
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from _launch import record_orthogonalized  # noqa: E402

import lightning_muon.parallel.dtensor as lmd  # noqa: E402
from lightning_muon import Muon  # noqa: E402

# Shapes with uneven and empty row shards at 2 and 4 ranks, a conv kernel, and repeated shapes.
SHAPES = [(3, 8), (3, 8), (5, 4), (24, 16), (24, 16), (24, 16), (16, 24), (6, 2, 3, 3), (2,), (7, 5)]
STEPS = 3


def make(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def groups(params):
    return [
        {"params": [p for p in params if p.ndim >= 2], "use_muon": True},
        {"params": [p for p in params if p.ndim < 2], "use_muon": False, "foreach": False},
    ]


def one_process(seed: int, ns_dtype: str, **extra: Any) -> tuple[list[torch.nn.Parameter], Muon]:
    """The reference: the parameters and gradients of ``make(seed)`` stepped by Muon in this process alone."""
    init, grads = make(seed)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Muon(groups(params), lr=0.05, ns_dtype=ns_dtype, weight_decay=0.1, **extra)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    return params, opt


def worker(rank: int, world: int, mode: str, ns_dtype: str, out: str, extra: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    counted = record_orthogonalized()  # (rows, cols) of each matrix this rank orthogonalises
    init, grads = make(0)
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)], src_data_rank=None)) for p in init]
        grads = [[distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None) for g in step] for step in grads]
    else:
        params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Muon(groups(params), lr=0.05, ns_dtype=ns_dtype, weight_decay=0.1, **extra)
    comms = []
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        with CommDebugMode() as mode_:
            opt.step()
        comms.append({str(k): v for k, v in mode_.get_comm_counts().items()})
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    result = {
        "params": [full(p.detach()).clone() for p in params],
        "momentum": [full(opt.state[p]["momentum_buffer"]).clone() for p in params if p.ndim >= 2],
        "second_moment": [opt.state[p]["neuron_second_moment"].clone() for p in params if p.ndim >= 2]
        if extra.get("variant") == "normuon"
        else [],
        "momentum_is_local_shard": all(type(opt.state[p]["momentum_buffer"]) is type(p) for p in params if p.ndim >= 2),
        "comms": comms,
        "orthogonalized": counted,
    }
    if mode == "fsdp":  # a NaN in rank 0's rows only: with nonfinite="skip" every rank skips
        opt.nonfinite = "skip"
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        if rank == 0:
            lmd.local(params[3].grad)[0, 0] = float("nan")
        before = [lmd.local(p).clone() for p in params]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        result["nan_step_skipped"] = all(torch.equal(b, lmd.local(p)) for b, p in zip(before, params))
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world, mode, ns_dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    mp.spawn(worker, args=(world, mode, ns_dtype, out, extra), nprocs=world)
