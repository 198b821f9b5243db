"""Distributed Muon: DDP work sharding, FSDP2 (DTensor) row shards, refused flat-shard strategies.

Multi-process runs use gloo on CPU and are launched as subprocess scripts (tests/dist_scripts/),
because Lightning's "ddp" re-launches sys.argv and ModelParallelStrategy always launches by
subprocess. All launches of this module start together in two module-scoped fixtures.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from helpers import DIST_SCRIPTS

from lightning_muon import Muon, ns_flops
from lightning_muon.parallel.buckets import assign_owners
from lightning_muon.parallel.placement import shard_rows

sys.path.insert(0, str(DIST_SCRIPTS))
import raw_step  # noqa: E402  (the worker's parameters and gradients, for the in-process reference)
from _launch import assert_same_training as _assert_same_training  # noqa: E402
from _launch import launch as _launch  # noqa: E402
from _launch import wait as _wait  # noqa: E402

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- in-process: plans and errors
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 97])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_rows_matches_dtensor_shard0(rows: int, world: int) -> None:
    from torch.distributed.tensor.placement_types import Shard

    # DTensor's own rule where this torch exposes it (names differ between releases), else the rule
    # DTensor documents for Shard: torch.chunk's sizes, trailing ranks empty.
    size_and_offset = getattr(Shard, "local_shard_size_and_offset", None) or getattr(
        Shard, "_local_shard_size_on_dim", None
    )
    if size_and_offset is not None:
        reference = [size_and_offset(rows, world, r)[0] for r in range(world)]
    else:
        chunks = [len(c) for c in torch.arange(rows).chunk(world)]
        reference = chunks + [0] * (world - len(chunks))
    assert shard_rows(rows, world) == reference


def test_assign_owners_is_balanced_against_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        costs = torch.randint(1, 100, (7,), generator=g).tolist()
        owners = assign_owners(costs, 3)
        load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
        best = min(
            max(sum(c for c, o in zip(costs, plan) if o == r) for r in range(3))
            for plan in itertools.product(range(3), repeat=len(costs))
        )
        assert max(load) <= 4 / 3 * best  # Graham's bound for largest-first greedy
        assert assign_owners(costs, 3) == owners  # deterministic: every rank makes the same plan


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_parameters_refused_at_construction(single_rank_group, use_orig_params: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)),
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
    )
    with pytest.raises(ValueError, match="FSDP1") as err:
        Muon(model.named_parameters())
    for supported in ("'ddp'", "'ddp_spawn'", "single device", "ModelParallelStrategy", "DeepSpeed's own Muon"):
        assert supported in str(err.value)


def test_flat_partition_swapped_in_after_construction_refused_at_step() -> None:
    # DeepSpeed ZeRO-1/2 replace each param group's params by one flat 1-D fp32 partition after
    # the optimizer is built (it needs CUDA, so this reproduces the swap itself).
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = Muon(
        [
            {"params": [model[0].weight, model[1].weight], "use_muon": True},
            {"params": [model[0].bias, model[1].bias], "use_muon": False},
        ]
    )
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in opt.param_groups[0]["params"]]))
    opt.param_groups[0]["params"] = [flat]
    for p in [flat, model[0].bias, model[1].bias]:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in [flat, model[0].bias, model[1].bias]]
    with pytest.raises(ValueError, match="Supported strategies: 'ddp'"):
        opt.step()
    after = [flat, model[0].bias, model[1].bias]
    assert all(torch.equal(a.detach(), b) for a, b in zip(after, before)) and not opt.state  # nothing changed


# ---------------------------------------------------------------- raw torch.distributed steps
RAW_RUNS = {"ddp2": ("2", "ddp"), "fsdp4": ("4", "fsdp")}  # 4 ranks: 3-row matrices leave one empty


def _raw_reference():
    """One process, no process group: the same parameters, gradients and Muon settings."""
    params, opt = raw_step.one_process(0, "bfloat16")
    momentum = [opt.state[p]["momentum_buffer"] for p in params if p.ndim >= 2]
    return [p.detach() for p in params], momentum


def _matrices():
    return [(s[0], int(torch.Size(s[1:]).numel())) for s in raw_step.SHAPES if len(s) >= 2]


@pytest.mark.cpu_kinds
@pytest.mark.parametrize("run", list(RAW_RUNS))
def test_raw_steps_match_one_process(raw_runs, run: str) -> None:
    params, momentum = _raw_reference()
    for rank in raw_runs[run]:
        # Each matrix goes through the same bf16 Newton-Schulz, only on another rank (results are
        # sent in bf16, which is exact), so parameters agree to float32 round-off: atol 1e-6.
        for a, b in zip(params + momentum, rank["params"] + rank["momentum"]):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.cpu_kinds
@pytest.mark.parametrize("run", list(RAW_RUNS))
def test_raw_each_rank_orthogonalises_only_its_share(raw_runs, run: str) -> None:
    ranks = raw_runs[run]
    everything = Counter({m: c * raw_step.STEPS for m, c in Counter(_matrices()).items()})
    done = [Counter(tuple(m) for m in r["orthogonalized"]) for r in ranks]
    assert sum(done, Counter()) == everything  # every matrix once, on one rank
    assert all(0 < sum(d.values()) < sum(everything.values()) for d in done)
    loads = [sum(ns_flops(m, n, 5) * c for (m, n), c in d.items()) / raw_step.STEPS for d in done]
    assert max(loads) - min(loads) <= max(ns_flops(m, n, 5) for m, n in _matrices())


@pytest.mark.cpu_kinds
def test_raw_collectives_per_step(raw_runs) -> None:
    buckets = len(set(_matrices()))
    for rank in raw_runs["ddp2"]:  # one all_gather per shape bucket, nothing else
        assert rank["comms"] == [{"c10d._allgather_base_": buckets}] * raw_step.STEPS
    for rank in raw_runs["fsdp4"]:  # per bucket: rows to owners, results back; one finite-check
        assert rank["comms"] == [{"c10d.alltoall_base_": 2 * buckets, "c10d.allreduce_": 1}] * raw_step.STEPS
        assert rank["momentum_is_local_shard"]
        assert rank["nan_step_skipped"]  # a NaN in one rank's shard skips the step on all ranks


# ---------------------------------------------------------------- Lightning: tiny GPT
# First wave (with the raw runs): name -> (strategy, epochs). Second wave: resumed to epoch 3,
# name -> (strategy, run resumed from, its checkpoint after epoch 2).
FIRST = {"single": ("single", 3), "ddp": ("ddp", 2), "fsdp": ("fsdp", 2)}
RESUMED = {
    "ddp_then_single": ("single", "ddp", "e1.ckpt"),
    "single_then_ddp": ("ddp", "single", "e1.ckpt"),
    "fsdp_dcp_resumed": ("fsdp", "fsdp", "e1.ckpt"),  # a DCP directory
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The Lightning GPT subprocesses of this module, started in two concurrent waves; returns the folders."""
    dirs = {n: tmp_path_factory.mktemp(n) for n in [*FIRST, *RESUMED]}
    _wait([_launch("lightning_gpt.py", str(dirs[n]), s, str(e)) for n, (s, e) in FIRST.items()])
    _wait(
        [
            _launch("lightning_gpt.py", str(dirs[n]), s, "3", "--resume", str(dirs[src] / ckpt))
            for n, (s, src, ckpt) in RESUMED.items()
        ]
    )
    return dirs


@pytest.fixture(scope="module")
def raw_runs(tmp_path_factory):
    """The raw torch.distributed runs (bf16 Newton-Schulz), concurrently; what each rank saved."""
    dirs = {n: tmp_path_factory.mktemp(n) for n in RAW_RUNS}
    _wait([_launch("raw_step.py", str(dirs[n]), world, mode, "bfloat16") for n, (world, mode) in RAW_RUNS.items()])
    return {n: [torch.load(f, weights_only=False) for f in sorted(dirs[n].glob("rank*.pt"))] for n in RAW_RUNS}


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_gpt_two_ranks_match_one_process(runs, run: str) -> None:
    _assert_same_training(runs[run], runs["single"], epoch=2)


@pytest.mark.parametrize("run", list(RESUMED))
def test_gpt_checkpoints_resume_across_world_sizes(runs, run: str) -> None:
    _assert_same_training(runs[run], runs["single"], epoch=3)


def test_gpt_work_split_and_collectives(runs) -> None:
    single = json.loads((runs["single"] / "rank0.json").read_text())
    per_step = len(single["orthogonalized"]) // len(single["comms"])
    assert per_step == 8 and all(c == {} for c in single["comms"])  # 2 blocks x 4 matrices
    steps = 8  # 2 epochs of the two-rank runs
    wanted = Counter(
        {tuple(m): c * steps // len(single["comms"]) for m, c in Counter(map(tuple, single["orthogonalized"])).items()}
    )
    for run, expected in [
        ("ddp", {"c10d._allgather_base_": 4}),
        ("fsdp", {"c10d.alltoall_base_": 8, "c10d.allreduce_": 1}),
    ]:
        ranks = [json.loads((runs[run] / f"rank{r}.json").read_text()) for r in range(2)]
        done = [Counter(map(tuple, r["orthogonalized"])) for r in ranks]
        assert sum(done, Counter()) == wanted  # every matrix once per step, on one rank
        assert all(sum(d.values()) == 4 * steps for d in done)  # equal NS FLOPs here: 4 matrices each
        for r in ranks:
            assert r["comms"] == [expected] * steps
