"""Worker for tests/parallel/test_tensor_parallel.py: Muon steps on DTensors of 2-D meshes (gloo), no Lightning.

Every rank builds the same parameters and per-step gradients and places each on a (dp, tp) mesh
with the layouts of FSDP2 x tensor parallelism (column-wise, row-wise, replicated over tp, on the
dp sub-mesh only, on the tp sub-mesh only) and HSDP (Replicate x Shard). Then:

  run:    STEPS Muon steps (float32 Newton-Schulz); writes OUT/rank{r}.pt with full parameters,
          momentum, collectives per step, the matrices this rank orthogonalised, and a DCP
          checkpoint of parameters + optimizer state in OUT/dcp (after the steps).
  resume: loads CKPT into this layout (or into plain tensors with one process and no process
          group), takes one more step, writes OUT/rank{r}.pt.

Usage: PORT=29500 python tp_step.py OUT DP TP {run,resume} [CKPT]
The one-process reference is computed in the test from make(), CASES and groups().
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from _launch import record_orthogonalized  # noqa: E402

import lightning_muon.parallel.dtensor as lmd  # noqa: E402
from lightning_muon import Muon  # noqa: E402

# (shape, mesh, placements by name). "dp"/"tp": the sub-mesh; "2d": the whole (dp, tp) mesh.
# Odd sizes give uneven and empty pieces. "SS0" is FSDP2's _StridedShard(0, split_factor=tp).
CASES = [
    ((8, 6), "2d", ("SS0", "S0")),  # column-wise TP under FSDP2 (as fully_shard makes it)
    ((8, 6), "2d", ("SS0", "S0")),
    ((6, 8), "2d", ("S0", "S1")),  # row-wise TP under FSDP2
    ((6, 7), "2d", ("S0", "S1")),  # uneven columns
    ((5, 6), "2d", ("S0", "R")),  # replicated over tp, sharded over dp
    ((8, 6), "2d", ("S0", "S0")),  # DTensor's own left-to-right nesting
    ((7, 5), "2d", ("R", "S0")),  # HSDP: replicate over "dp", shard over "tp"
    ((4, 2, 3, 3), "2d", ("S0", "S1")),  # a conv kernel, in-channels split over tp
    ((6, 6), "dp", ("S0",)),  # FSDP2 only (a matrix left out of tensor parallelism)
    ((6, 6), "tp", ("S1",)),  # TP only
    ((3, 5), "2d", ("R", "R")),  # its gradient arrives as (Replicate(), Partial()): a pending sum over tp
    ((6,), "2d", ("S0", "R")),  # a vector: AdamW
]
STEPS = 2


def make(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s, _, _ in CASES]
    grads = [[torch.randn(s, generator=g) for s, _, _ in CASES] for _ in range(STEPS + 1)]
    return params, grads


def groups(params):
    return [
        {"params": [p for p in params if p.ndim >= 2], "use_muon": True},
        {"params": [p for p in params if p.ndim < 2], "use_muon": False, "foreach": False},
    ]


def settings():
    return dict(lr=0.05, ns_dtype="float32", weight_decay=0.1)


def placements(names, tp):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    table = {"S0": Shard(0), "S1": Shard(1), "R": Replicate(), "SS0": _StridedShard(0, split_factor=tp)}
    return [table[n] for n in names]


def distribute(t, mesh2d, case, tp):
    from torch.distributed.tensor import distribute_tensor

    _, which, names = case
    mesh = mesh2d if which == "2d" else mesh2d[which]
    return distribute_tensor(t, mesh, placements(names, tp), src_data_rank=None)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def worker(rank: int, world: int, dp: int, tp: int, mode: str, out: str, ckpt: str | None) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    distributed = world > 1 or mode == "run"
    if distributed:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    counted = record_orthogonalized()  # (rows, cols) of each matrix this rank orthogonalises
    init, grads = make(0)
    if distributed:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        params = [torch.nn.Parameter(distribute(p, mesh, c, tp)) for p, c in zip(init, CASES)]
        grads = [[distribute(g, mesh, c, tp) for g, c in zip(step, CASES)] for step in grads]
        from torch.distributed.tensor import DTensor, Partial, Replicate

        partial = next(i for i, c in enumerate(CASES) if c[2] == ("R", "R"))
        for step in grads:  # each tp rank holds half of the gradient; Muon must sum before using it
            step[partial] = DTensor.from_local(step[partial].to_local() / tp, mesh, [Replicate(), Partial()])
    else:
        params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Muon(groups(params), **settings())
    comms, result = [], {}
    if mode == "run":
        for step in grads[:STEPS]:
            for p, g in zip(params, step):
                p.grad = g
            with CommDebugMode() as comm:
                opt.step()
            comms.append({str(k): v for k, v in comm.get_comm_counts().items()})
        state = {"params": {str(i): p for i, p in enumerate(params)}, "optim": opt.state_dict()}
        dcp.save(state, checkpoint_id=os.path.join(out, "dcp"))
        if dp * tp == 4:  # a NaN in one rank's piece: with nonfinite="skip" every rank skips
            opt.nonfinite = "skip"
            for p, g in zip(params, grads[STEPS]):
                p.grad = g.clone()
            if rank == 3:
                lmd.local(params[2].grad).view(-1)[0] = float("nan")
            before = [lmd.local(p).clone() for p in params]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            result["nan_step_skipped"] = all(torch.equal(b, lmd.local(p)) for b, p in zip(before, params))
            opt.nonfinite = "raise"
            # the checkpoint is from before this skipped step, and nothing changed: the state matches it
    else:
        for p in params:  # a template of the saved structure, filled in place by dcp.load
            if p.ndim >= 2:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
            else:
                opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state = {"params": {str(i): p.detach() for i, p in enumerate(params)}, "optim": opt.state_dict()}
        dcp.load(state, checkpoint_id=ckpt)
        opt.load_state_dict(state["optim"])
        for p, g in zip(params, grads[STEPS]):
            p.grad = g
        opt.step()
    result.update(
        params=[full(p.detach()).clone() for p in params],
        momentum=[full(opt.state[p]["momentum_buffer"]).clone() for p in params if p.ndim >= 2],
        comms=comms,
        orthogonalized=counted,
        momentum_is_local_shard=all(type(opt.state[p]["momentum_buffer"]) is type(p) for p in params if p.ndim >= 2),
    )
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    out, dp, tp, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ckpt = sys.argv[5] if len(sys.argv) > 5 else None
    if dp * tp == 1 and mode == "resume":
        worker(0, 1, 1, 1, mode, out, ckpt)
    else:
        mp.spawn(worker, args=(dp * tp, dp, tp, mode, out, ckpt), nprocs=dp * tp)
