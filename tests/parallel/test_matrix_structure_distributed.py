"""Matrix views under DDP, FSDP2 and tensor parallelism: a stack of expert matrices and a per-head split
fused q/k/v train as in one process (gloo on CPU, Lightning, launched as subprocess scripts)."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
from helpers import DIST_SCRIPTS

sys.path.insert(0, str(DIST_SCRIPTS))
from _launch import assert_same_training, launch, wait  # noqa: E402

pytestmark = pytest.mark.slow

RUNS = ("single", "ddp", "fsdp", "tp")  # fsdp: 2 ranks, the 3-expert stack sharded 2 + 1; tp: 1 x 2
STEPS = 8  # 2 epochs of 4 optimizer steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dirs = {r: tmp_path_factory.mktemp(f"structure_{r}") for r in RUNS}
    wait([launch("structure_gpt.py", str(dirs[r]), r, "2", "--split-qkv", "per_head") for r in RUNS])
    return dirs


@pytest.mark.parametrize("run", ["ddp", "fsdp", "tp"])
def test_stack_and_per_head_split_train_as_in_one_process(runs, run: str) -> None:
    assert_same_training(runs[run], runs["single"], epoch=2)


@pytest.mark.parametrize("run", RUNS)
def test_each_block_and_slice_is_orthogonalised_once_per_step(runs, run: str) -> None:
    ranks = [json.loads(f.read_text()) for f in sorted(runs[run].glob("rank*.json"))]
    assert all(r["views"] == ranks[0]["views"] for r in ranks)
    assert set(ranks[0]["views"].values()) == {"stack", "split=3,heads=4,order=heads,per_head"}
    done = sum((Counter(map(tuple, r["orthogonalized"])) for r in ranks), Counter())
    # per step: 2 blocks x 12 head blocks (8 x 32) of q/k/v; 2 x (3 experts + proj) (32 x 32)
    assert done == Counter({(8, 32): 24 * STEPS, (32, 32): 8 * STEPS})
    if run != "single":
        assert all(r["orthogonalized"] for r in ranks)  # the work is shared
