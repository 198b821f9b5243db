"""NorMuon and bfloat16 momentum under DDP and FSDP2 (gloo, CPU): the same training as one process.

Raw torch.distributed steps (tests/dist_scripts/raw_step.py: uneven and empty row shards at 4
ranks, a conv kernel) and the tiny Lightning GPT (tests/dist_scripts/lightning_gpt.py), trained,
checkpointed and resumed across world sizes, all launched together in one module fixture.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import DIST_SCRIPTS

from lightning_muon import Muon

sys.path.insert(0, str(DIST_SCRIPTS))
import raw_step  # noqa: E402
from _launch import assert_same_training, launch, wait  # noqa: E402

pytestmark = pytest.mark.slow

EXTRA = {"variant": "normuon", "momentum_dtype": "bfloat16"}
RAW = {"ddp2": ("2", "ddp"), "fsdp4": ("4", "fsdp")}
# Lightning runs: NorMuon with float32 momentum. (With bfloat16 momentum, gradients summed in another
# order flip a few stochastic roundings, ~10 of 3000 elements per matrix, and parameters then differ
# by up to 1e-3 after 3 epochs: real but not "the same training" at 1e-5. Rounding itself is exact
# across world sizes: the raw runs get the same gradients on every rank and compare bit for bit.)
GPT = ["--muon", json.dumps({"variant": "normuon"})]
FIRST = {"single": ("single", 3), "ddp": ("ddp", 2), "fsdp": ("fsdp", 2)}
RESUMED = {"fsdp_dcp_resumed": ("fsdp", "fsdp"), "ddp_then_single": ("single", "ddp")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The Lightning GPT subprocesses, in two concurrent waves; returns the folders."""
    dirs = {n: tmp_path_factory.mktemp(n) for n in [*FIRST, *RESUMED]}
    wait([launch("lightning_gpt.py", str(dirs[n]), s, str(e), *GPT) for n, (s, e) in FIRST.items()])
    wait(
        [
            launch("lightning_gpt.py", str(dirs[n]), s, "3", "--resume", str(dirs[src] / "e1.ckpt"), *GPT)
            for n, (s, src) in RESUMED.items()
        ]
    )
    return dirs


@pytest.fixture(scope="module")
def raw_runs(tmp_path_factory):
    """The raw torch.distributed runs (NorMuon, bf16 momentum and Newton-Schulz); their folders."""
    dirs = {n: tmp_path_factory.mktemp(n) for n in RAW}
    wait([launch("raw_step.py", str(dirs[n]), w, mode, "bfloat16", json.dumps(EXTRA)) for n, (w, mode) in RAW.items()])
    return dirs


def _raw_reference():
    init, grads = raw_step.make(0)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Muon(raw_step.groups(params), lr=0.05, ns_dtype="bfloat16", weight_decay=0.1, **EXTRA)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    matrices = [p for p in params if p.ndim >= 2]
    return (
        [p.detach() for p in params],
        [opt.state[p]["momentum_buffer"] for p in matrices],
        [opt.state[p]["neuron_second_moment"] for p in matrices],
    )


@pytest.mark.cpu_kinds
@pytest.mark.parametrize("run", list(RAW))
def test_raw_normuon_bf16_steps_match_one_process(raw_runs, run):
    params, momentum, second = _raw_reference()
    assert all(m.dtype == torch.bfloat16 for m in momentum)
    for f in sorted(raw_runs[run].glob("rank*.pt")):
        rank = torch.load(f, weights_only=False)
        # the same gradients on every rank: momentum and its stochastic rounding are bit for bit
        # those of one process (the rounding bits hash each element's global index)
        for a, b in zip(momentum, rank["momentum"]):
            assert b.dtype == torch.bfloat16 and torch.equal(a, b)
        # NorMuon's row statistics: summed over the shards (fsdp4) in another order, float32 round-off
        for a, b in zip(second, rank["second_moment"]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
        for a, b in zip(params, rank["params"]):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_gpt_two_ranks_match_one_process(runs, run):
    assert_same_training(runs[run], runs["single"], epoch=2)


@pytest.mark.parametrize("run", list(RESUMED))
def test_gpt_resumes_across_world_sizes(runs, run):
    assert_same_training(runs[run], runs["single"], epoch=3)
    saved = torch.load(runs[run] / "epoch3.pt", weights_only=False)
    assert any(k.startswith("neuron_second_moment.") for k in saved)
