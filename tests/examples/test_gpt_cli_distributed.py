"""The GPT example's CLI under 2-process DDP, FSDP2 and tensor parallelism (ModelParallelStrategy) on CPU/gloo.

Lightning's ddp launcher re-runs the command line in the other rank and ModelParallelStrategy
always launches by subprocess, so these run the CLI in a subprocess and check what it wrote.

These are SMOKE tests (named ``*_smoke``): they check that the CLI configs start, train and log
under 2 processes, not the values. The values under DDP and FSDP2 are compared with one process on
the same global batch in tests/parallel/test_distributed.py (optimizer) and tests/callbacks/test_callbacks.py
(monitors); the single-process CLI's logged values are checked in tests/examples/test_gpt_example.py.
"""

import os
import subprocess
import sys

import pytest
from helpers import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SMALL = [
    "--model.n_layer=1",
    "--model.n_head=2",
    "--model.n_embd=32",
    "--model.block_size=32",
    "--model.warmup_steps=1",
    "--data.batch_size=4",
    "--data.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.precision=32-true",
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
]


def _cli(configs, tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [
        sys.executable,
        "-m",
        "examples.gpt",
        "fit",
        *(arg for config in configs.split() for arg in ("--config", str(ROOT / config))),
        *SMALL,
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        *extra,
    ]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = next(p for p in tmp_path.rglob("events.out.tfevents*")).parent
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc.Tags()["scalars"]


@pytest.mark.slow
def test_gpt_cli_ddp_two_processes_smoke(tmp_path):
    tags = _cli("examples/configs/gpt_demo.yaml", tmp_path, "--trainer.strategy=ddp")
    assert "train/loss" in tags and "val/loss" in tags
    assert "stable_rank/mean" in tags and "critical_batch_size/b_simple" in tags  # logged once, by rank 0


@pytest.mark.slow
def test_gpt_cli_fsdp2_two_processes_smoke(tmp_path):
    tags = _cli(
        "examples/configs/gpt2_124m.yaml examples/configs/gpt2_124m_fsdp2.yaml",
        tmp_path,
        "--trainer.strategy.init_args.data_parallel_size=2",
        "--trainer.max_steps=3",
    )
    assert "train/loss" in tags and "spectral_entropy/mean" in tags and "lr-Muon/muon" in tags


@pytest.mark.slow
def test_gpt_cli_tensor_parallel_two_processes(tmp_path):
    # 1 (FSDP2) x 2 (tensor parallel): one head per rank; the spectral monitors gather full matrices
    tags = _cli(
        "examples/configs/gpt2_124m.yaml examples/configs/gpt2_124m_tp.yaml",
        tmp_path,
        "--trainer.strategy.init_args.data_parallel_size=1",
    )
    assert "train/loss" in tags and "val/loss" in tags and "lr-Muon/muon" in tags
    for tag in ("spectral_entropy/mean", "stable_rank/mean", "polar_misalignment/update_sin_theta/mean"):
        assert tag in tags, tag


@pytest.mark.slow
def test_vit_cli_fsdp2_two_processes_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [
        sys.executable,
        "-m",
        "examples.vit",
        "fit",
        "--config",
        str(ROOT / "examples/configs/vit_ddp.yaml"),
        "--config",
        str(ROOT / "examples/configs/vit_fsdp2.yaml"),
        "--data.class_path=examples.image_data.DigitsDataModule",
        "--data.init_args.batch_size=8",
        "--model.num_layers=1",
        "--model.hidden_dim=32",
        "--model.mlp_dim=64",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.precision=32-true",
        "--trainer.strategy.init_args.data_parallel_size=2",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "val/acc" in tags and "stable_rank/mean" in tags
