"""Muon on DTensors of 2-D meshes: tensor parallelism, FSDP2 x TP and HSDP, on CPU/gloo.

Layouts are checked in process against DTensor's own splitting code; the multi-process runs
(4 gloo processes as a 2 x 2 mesh, 2 as 1 x 2) are subprocess scripts from tests/dist_scripts/,
compared with one process on the same global batch, all started together in module fixtures.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import DIST_SCRIPTS
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from lightning_muon import Muon, ns_flops
from lightning_muon.parallel.placement import check_placements, chunk_indices

sys.path.insert(0, str(DIST_SCRIPTS))
import tp_step  # noqa: E402  (the worker's parameters, gradients and layouts, for the reference)
from _launch import assert_same_training as _assert_same_training  # noqa: E402
from _launch import launch as _launch  # noqa: E402
from _launch import wait as _wait  # noqa: E402

# Tensor parallelism was verified on torch 2.14.1; on torch 2.9.1 DTensor splits _StridedShard layouts
# differently and the TP runs do not match one process (docs/installing.md).
pytestmark = pytest.mark.requires_torch("2.14", "tensor parallelism, verified on torch 2.14.1 only")


def _reference_piece(full: torch.Tensor, mesh_shape, coordinate, placements) -> torch.Tensor:
    """The piece DTensor itself cuts for ``coordinate``: its placements' own splitting, left to right."""
    piece = full
    for size, c, p in zip(mesh_shape, coordinate, placements):
        if not p.is_replicate():
            piece = p._split_tensor(piece, size, with_padding=False)[0][c]
    return piece


PLACEMENT_CASES = [
    ((2, 2), [Shard(0), Shard(1)]),
    ((2, 2), [Shard(0), Shard(0)]),
    ((2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    ((3, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    ((2, 2), [Replicate(), Shard(0)]),
    ((2, 3), [Shard(0), Replicate()]),
    ((4,), [Shard(1)]),
    ((2, 2), [Shard(1), Shard(1)]),
]


@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (3, 9), (1, 4), (4, 2, 3, 3)])
@pytest.mark.parametrize("mesh_shape,placements", PLACEMENT_CASES)
def test_chunk_indices_match_dtensor_splitting(shape, mesh_shape, placements) -> None:
    full = torch.arange(math.prod(shape)).view(shape)
    for coordinate in itertools.product(*(range(s) for s in mesh_shape)):
        want = _reference_piece(full, mesh_shape, coordinate, placements)
        index = chunk_indices(shape, mesh_shape, coordinate, placements)
        got = full[torch.meshgrid(*index, indexing="ij")] if all(len(i) for i in index) else full.new_empty(0)
        assert torch.equal(got.reshape(-1), want.reshape(-1)), (coordinate, index)
        assert tuple(len(i) for i in index) == tuple(want.shape)


def test_pending_reduction_placement_refused() -> None:
    from torch.distributed.tensor import Partial

    with pytest.raises(ValueError, match=r"Partial.*redistribute it to Shard or Replicate"):
        check_placements([Shard(0), Partial()], "parameter 'w'")


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_partial_dtensor_refused_at_construction(single_rank_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    weight = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 4), mesh, [Shard(0), Partial()]))
    with pytest.raises(ValueError, match=r"parameter .* is a DTensor with placements"):
        Muon([{"params": [weight], "use_muon": True}])


class _MeshShape:
    """Only the attributes of a DeviceMesh that the checks read (a real mesh needs that many processes)."""

    def __init__(self, shape, names, root=None):
        self.mesh, self.mesh_dim_names, self.ndim, self._root = torch.zeros(shape), names, len(shape), root

    def _get_root_mesh(self):
        return self._root or self

    def size(self):
        return int(self.mesh.numel())


def test_multi_dim_mesh_over_some_processes_refused(single_rank_group) -> None:
    from lightning_muon.parallel.groups import mesh_domain

    root = _MeshShape((1, 1, 1), ("pp", "dp", "tp"))
    flattened = _MeshShape((1, 1), ("pp_dp", "tp"), root=root)  # not a slice of the root by names
    with pytest.raises(ValueError, match="needs a multi-dim mesh to span every process"):
        mesh_domain(flattened)


def test_gpt_example_tensor_parallel_needs_whole_heads() -> None:
    from examples.gpt import GPT, GPTConfig, tensor_parallelize

    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=4, n_embd=16))
    before = model.h[0].attn.c_attn.weight
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 must divide n_head \(4\)"):
        tensor_parallelize(model, _MeshShape((3,), ("tensor_parallel",)))
    assert model.h[0].attn.c_attn.weight is before  # nothing was split


def test_one_process_two_d_mesh_steps_like_plain_tensors(single_rank_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    g = torch.Generator().manual_seed(0)
    w, grad = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    plain = torch.nn.Parameter(w.clone())
    placed = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0), Shard(1)]))
    plain.grad, placed.grad = grad, distribute_tensor(grad, mesh, [Shard(0), Shard(1)])
    for p in (plain, placed):
        Muon([{"params": [p], "use_muon": True}], lr=0.1, ns_dtype="float32").step()
    torch.testing.assert_close(placed.full_tensor(), plain.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------- subprocess runs


RAW = {"raw22": ("2", "2"), "raw12": ("1", "2")}
RAW_RESUMED = {"raw22_to_12": ("1", "2"), "raw22_to_1": ("1", "1")}  # from raw22's DCP checkpoint
# 98 hidden units: 49 per tensor-parallel rank, then uneven FSDP2 shards (25 + 24) of those
GPT = {
    "single": ("single", "3", "--hidden", "98"),
    "tp22": ("tp", "2", "--dp", "2", "--tp", "2", "--hidden", "98"),
    "tp12": ("tp", "2", "--dp", "1", "--tp", "2", "--hidden", "98"),
}


@pytest.fixture(scope="module")
def raw_runs(tmp_path_factory):
    """The raw torch.distributed runs: 2 x 2 and 1 x 2, then resumed from 2 x 2's DCP checkpoint."""
    dirs = {n: tmp_path_factory.mktemp(n) for n in [*RAW, *RAW_RESUMED]}
    _wait([_launch("tp_step.py", str(dirs[n]), dp, tp, "run") for n, (dp, tp) in RAW.items()])
    _wait(
        [
            _launch("tp_step.py", str(dirs[n]), dp, tp, "resume", str(dirs["raw22"] / "dcp"))
            for n, (dp, tp) in RAW_RESUMED.items()
        ]
    )
    return dirs


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """The Lightning runs: one process, 2 x 2 and 1 x 2; then HSDP and 2 x 2 resumed on 1 x 2 and 1 x 1."""
    dirs = {n: tmp_path_factory.mktemp(n) for n in [*GPT, "tp22_to_12", "tp22_to_1", "hsdp"]}
    _wait([_launch("lightning_gpt.py", str(dirs[n]), *args) for n, args in GPT.items()])
    resume = ["--hidden", "98", "--resume", str(dirs["tp22"] / "e1.ckpt")]
    _wait(
        [
            _launch("lightning_gpt.py", str(dirs["hsdp"]), "hsdp", "2", "--hidden", "98"),
            _launch("lightning_gpt.py", str(dirs["tp22_to_12"]), "tp", "3", "--dp", "1", "--tp", "2", *resume),
            _launch("lightning_gpt.py", str(dirs["tp22_to_1"]), "tp", "3", "--dp", "1", "--tp", "1", *resume),
        ]
    )
    return dirs


def _raw_reference(steps: int):
    init, grads = tp_step.make(0)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Muon(tp_step.groups(params), **tp_step.settings())
    for step in grads[:steps]:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params if p.ndim >= 2]


def _ranks(folder: Path) -> list[dict]:
    return [torch.load(f, weights_only=False) for f in sorted(folder.glob("rank*.pt"))]


def _assert_same(ranks: list[dict], steps: int) -> None:
    params, momentum = _raw_reference(steps)
    for rank in ranks:
        # the same float32 Newton-Schulz on the same matrix, only on another rank: measured equal
        # bit for bit; allow float32 round-off from a different batch composition
        for a, b in zip(params + momentum, rank["params"] + rank["momentum"]):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RAW))
def test_raw_tp_steps_match_one_process(raw_runs, run: str) -> None:
    ranks = _ranks(raw_runs[run])
    assert len(ranks) == int(RAW[run][0]) * int(RAW[run][1])
    _assert_same(ranks, tp_step.STEPS)
    assert all(r["momentum_is_local_shard"] for r in ranks)  # state stays a DTensor of the param's layout


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RAW_RESUMED))
def test_raw_dcp_checkpoint_from_2x2_resumes_on_other_layouts(raw_runs, run: str) -> None:
    ranks = _ranks(raw_runs[run])
    assert len(ranks) == int(RAW_RESUMED[run][0]) * int(RAW_RESUMED[run][1])
    _assert_same(ranks, tp_step.STEPS + 1)


def _raw_buckets() -> int:
    return len({(s[0], math.prod(s[1:]), mesh, names) for s, mesh, names in tp_step.CASES if len(s) >= 2})


def _raw_matrices() -> list[tuple[int, int]]:
    return [(s[0], math.prod(s[1:])) for s, _, _ in tp_step.CASES if len(s) >= 2]


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RAW))
def test_raw_tp_collectives_per_bucket_and_work_split(raw_runs, run: str) -> None:
    ranks = _ranks(raw_runs[run])
    # per shape bucket: pieces to owners, results back; the finite-check all_reduce, and DTensor's own
    # all_reduce that sums the one gradient that arrives Partial() (tp_step.py)
    expected = {"c10d.alltoall_base_": 2 * _raw_buckets(), "c10d.allreduce_": 1, "c10d_functional.all_reduce": 1}
    for rank in ranks:
        assert rank["comms"] == [expected] * tp_step.STEPS
    everything = Counter({m: c * tp_step.STEPS for m, c in Counter(_raw_matrices()).items()})
    done = [Counter(tuple(m) for m in r["orthogonalized"]) for r in ranks]
    assert sum(done, Counter()) == everything  # each matrix once per step, on one rank of the whole mesh
    loads = [sum(ns_flops(m, n, 5) * c for (m, n), c in d.items()) / tp_step.STEPS for d in done]
    assert all(load > 0 for load in loads)
    assert max(loads) - min(loads) <= max(ns_flops(m, n, 5) for m, n in _raw_matrices())
    if len(ranks) == 4:
        assert all(r["nan_step_skipped"] for r in ranks)  # a NaN in one rank's piece: every rank skips


# ---------------------------------------------------------------- Lightning ModelParallelStrategy


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tp22", "tp12"])
def test_gpt_tensor_parallel_matches_one_process(gpt_runs, run: str) -> None:
    _assert_same_training(gpt_runs[run], gpt_runs["single"], epoch=2)


@pytest.mark.slow
def test_gpt_hsdp_mesh_built_in_configure_model_matches_one_process(gpt_runs) -> None:
    _assert_same_training(gpt_runs["hsdp"], gpt_runs["single"], epoch=2)  # fully_shard over (replicate 2, shard 2)
    for r in range(4):
        comms = json.loads((gpt_runs["hsdp"] / f"rank{r}.json").read_text())["comms"]
        assert comms == [{"c10d.alltoall_base_": 8, "c10d.allreduce_": 1}] * len(comms)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tp22_to_12", "tp22_to_1"])
def test_gpt_dcp_checkpoint_from_2x2_resumes_on_1x2_and_one_process(gpt_runs, run: str) -> None:
    _assert_same_training(gpt_runs[run], gpt_runs["single"], epoch=3)  # ModelParallelStrategy(1, 2) and (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("run,world", [("tp22", 4), ("tp12", 2)])
def test_gpt_tensor_parallel_work_split_and_collectives(gpt_runs, run: str, world: int) -> None:
    single = json.loads((gpt_runs["single"] / "rank0.json").read_text())
    per_step = Counter(map(tuple, single["orthogonalized"]))
    steps = len(single["comms"])
    ranks = [json.loads((gpt_runs[run] / f"rank{r}.json").read_text()) for r in range(world)]
    done = [Counter(map(tuple, r["orthogonalized"])) for r in ranks]
    run_steps = len(ranks[0]["comms"])
    assert sum(done, Counter()) == Counter({m: c * run_steps // steps for m, c in per_step.items()})
    # 4 buckets (qkv, proj, fc, out: distinct shapes or layouts): 2 all_to_all each, one all_reduce
    assert all(r["comms"] == [{"c10d.alltoall_base_": 8, "c10d.allreduce_": 1}] * run_steps for r in ranks)
