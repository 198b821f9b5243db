"""Per-rank Muon step time and Newton–Schulz time at world size 1 vs 2 (gloo on CPU).

GPT-small's Muon matrices (d = 768, 12 layers: qkv 2304x768, attention out 768x768, MLP
3072x768 and 768x3072) with random gradients; no model, so the table is the optimizer alone.
"ddp" shares the NS work by owner rank (one all_gather per shape bucket); "fsdp" holds the
params as DTensors Shard(0) (one all_to_all to the owners and one back per bucket); "tp" splits
them over a 1 x 2 (data, tensor) mesh Megatron-style (qkv and MLP-in Shard(0), the two output
projections Shard(1)); "fsdp_tp" over a 2 x 2 mesh with FSDP2's placements on top (4 processes).
"MB sent" is what this rank sends to other ranks per step (all_to_all / all_gather). The per-rank
NS time should fall towards 1/W of the world-size-1 time; the rest of a step is momentum, the
update and communication. Run it on a quiet machine: wall times on shared cores mostly measure
the other load (the CPU-time column is robust to it).

Usage (about 1-2 minutes with the defaults on a 2-core CPU):
    python -m benchmarks.distributed_step
    python -m benchmarks.distributed_step --layers 4 --steps 3 --modes ddp
    python -m benchmarks.distributed_step --layers 2 --ns-dtype float32 --modes ddp,fsdp,tp,fsdp_tp
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_muon.parallel.buckets as lmb
from benchmarks._timing import run_header
from lightning_muon import Muon

D = 768
SHAPES = [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)]  # per layer: qkv, attn out, mlp fc, mlp proj


def worker(rank: int, world: int, mode: str, args: argparse.Namespace, port: str, queue) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=g) for _ in range(args.layers) for s in SHAPES]
    grads = [torch.randn(s, generator=g) for _ in range(args.layers) for s in SHAPES]
    if mode == "fsdp" and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        shard = lambda t: distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)  # noqa: E731
        params = [torch.nn.Parameter(shard(p)) for p in full]
        grads = [shard(x) for x in grads]
    elif mode in ("tp", "fsdp_tp") and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard

        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        dp0 = Shard(0) if world == 2 else _StridedShard(0, split_factor=2)  # FSDP2 over column-wise TP
        layouts = [[dp0, Shard(0)], [Shard(0), Shard(1)], [dp0, Shard(0)], [Shard(0), Shard(1)]] * args.layers
        place = lambda t, lay: distribute_tensor(t, mesh, lay, src_data_rank=None)  # noqa: E731
        params = [torch.nn.Parameter(place(p, lay)) for p, lay in zip(full, layouts)]
        grads = [place(x, lay) for x, lay in zip(grads, layouts)]
    else:
        params = [torch.nn.Parameter(p) for p in full]
    for p, x in zip(params, grads):
        p.grad = x
    opt = Muon([{"params": params, "use_muon": True}], lr=0.02, ns_dtype=args.ns_dtype)

    ns_time = [0.0, 0.0]  # wall, CPU time of this process (robust to other load on the machine)
    ns_count = [0]
    original = lmb.orthogonalize

    def timed(G, *a, **k):
        t, c = time.perf_counter(), time.process_time()
        out = original(G, *a, **k)
        ns_time[0] += time.perf_counter() - t
        ns_time[1] += time.process_time() - c
        ns_count[0] += G.shape[0]
        return out

    lmb.orthogonalize = timed
    sent = [0]  # bytes this rank sends to other ranks
    if world > 1:
        all_to_all, all_gather = dist.all_to_all_single, dist.all_gather_into_tensor

        def counted_all_to_all(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **k):
            me = dist.get_rank(group)
            sizes = input_split_sizes or [input.numel() // dist.get_world_size(group)] * dist.get_world_size(group)
            sent[0] += (sum(sizes) - sizes[me]) * input.element_size()
            return all_to_all(output, input, output_split_sizes, input_split_sizes, group=group, **k)

        def counted_all_gather(output, input, group=None, **k):
            sent[0] += input.numel() * input.element_size() * (dist.get_world_size(group) - 1)
            return all_gather(output, input, group=group, **k)

        dist.all_to_all_single, dist.all_gather_into_tensor = counted_all_to_all, counted_all_gather
    opt.step()  # warm-up: allocates momentum, first-touch memory
    if world > 1:
        dist.barrier()
    ns_time[:], ns_count[0], sent[0] = [0.0, 0.0], 0, 0
    step_times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - t)
    ns_wall, ns_cpu = (x / args.steps for x in ns_time)
    queue.put((mode, world, rank, min(step_times), ns_wall, ns_cpu, ns_count[0] // args.steps, sent[0] / args.steps))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--ns-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--modes", default="ddp,fsdp", help="comma-separated: ddp, fsdp, tp (1x2), fsdp_tp (2x2)")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    configs = [("ddp", 1)] + [(mode, 4 if mode == "fsdp_tp" else 2) for mode in args.modes.split(",")]
    rows = []
    for mode, world in configs:
        mp.spawn(worker, args=(world, mode, args, _free_port(), queue), nprocs=world)
        rows += sorted(queue.get() for _ in range(world))
    torch.set_num_threads(args.threads)
    print(run_header(torch.device("cpu"), args.ns_dtype))
    print(
        f"Muon step on GPT-small matrices: {args.layers} layers x {len(SHAPES)} = "
        f"{args.layers * len(SHAPES)} matrices, ns_dtype={args.ns_dtype}, {args.threads} thread(s)/rank, "
        f"gloo on CPU, best of {args.steps} steps"
    )
    base = next(r[5] for r in rows if r[1] == 1)
    print("NS ms: wall time inside orthogonalize per step; NS cpu ms: this process's CPU time there")
    print(
        f"{'mode':<8}{'world':>5}{'rank':>5}{'step ms':>10}{'NS ms':>10}{'NS cpu ms':>11}{'cpu / W=1':>11}"
        f"{'matrices':>10}{'MB sent':>9}"
    )
    for mode, world, rank, step, wall, cpu, count, sent in rows:
        label = "single" if world == 1 else mode
        print(
            f"{label:<8}{world:>5}{rank:>5}{step * 1e3:>10.1f}{wall * 1e3:>10.1f}{cpu * 1e3:>11.1f}"
            f"{cpu / base:>11.2f}{count:>10}{sent / 2**20:>9.2f}"
        )


if __name__ == "__main__":
    main()
