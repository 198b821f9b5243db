"""A 2-process DDP run loses a rank to SIGKILL; relaunching with ckpt_path="last" completes it
with nothing lost beyond the last checkpoint: final state equals an uninterrupted run's."""

import subprocess
import sys

import pytest
import torch
from helpers import SCRIPTS

SCRIPT = SCRIPTS / "ddp_train.py"


def _launch(*args, check=True):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600, check=check
    )


@pytest.mark.slow
def test_sigkill_one_rank_then_resume_from_last(tmp_path):
    _launch(tmp_path / "ref", 4)  # uninterrupted: 4 epochs x 4 steps
    killed = _launch(tmp_path / "run", 4, "--kill-rank", 1, "--kill-at-step", 10, check=False)
    assert killed.returncode != 0, "the run should fail when a rank is killed"
    assert not (tmp_path / "run" / "final.pt").exists()
    assert (tmp_path / "run" / "ckpt" / "last.ckpt").exists()
    _launch(tmp_path / "run", 4, "--resume")
    ref = torch.load(tmp_path / "ref" / "final.pt")
    resumed = torch.load(tmp_path / "run" / "final.pt")
    # The kill came at step 10 (inside epoch 3); the last checkpoint is the end of epoch 2.
    assert resumed["start_step"] == 8 and resumed["global_step"] == ref["global_step"] == 16
    # DDP on gloo with a fixed sampler is deterministic: same parameters and state, bitwise.
    for k, v in ref["params"].items():
        assert torch.equal(v, resumed["params"][k]), k
    for k, st in ref["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, resumed["optimizer"]["state"][k][name]), (k, name)
