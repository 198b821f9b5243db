"""What a user of the examples' command line sees: a bar in optimizer steps, no third-party noise,
and at the end where the logs are and the command that opens them (examples/common.py ExampleCLI)."""

from __future__ import annotations

import re
import shlex
import warnings

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from examples.gpt import cli_main
from lightning_muon.callbacks import RichStepProgressBar, StepProgressBar

TINY = [
    "--config",
    "examples/configs/gpt_demo.yaml",
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=0.001",
    "--model.n_layer=1",
    "--model.n_embd=32",
    "--model.block_size=32",
    "--model.warmup_steps=1",
    "--data.batch_size=4",
]


def _run(tmp_path, *extra):
    return cli_main(
        [
            "fit",
            *TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--trainer.default_root_dir={tmp_path}",
            *extra,
        ]
    )


@pytest.mark.slow
def test_demo_run_counts_steps_stays_quiet_and_ends_with_where_the_logs_are(tmp_path, capsys, caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _run(tmp_path)
    assert isinstance(cli.trainer.progress_bar_callback, (StepProgressBar, RichStepProgressBar))
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    out = capsys.readouterr().out
    assert "Tip" not in out and "Tip" not in caplog.text
    log_dir = tmp_path / "runs" / "gpt_demo" / "version_0"
    assert any(log_dir.glob("events.out.tfevents.*"))
    lines = out.splitlines()
    shown = next(line for line in lines if line.startswith("TensorBoard logs: "))
    assert shown.endswith(str(log_dir))
    command = next(line for line in lines if "--logdir" in line).split("open them with: ", 1)[1]
    argv = shlex.split(command)
    assert argv[0].endswith("tensorboard") and argv[1:] == ["--logdir", str(tmp_path / "runs")]
    last = next(line for line in lines if line.startswith("last: ")).split(": ", 1)[1]
    assert (tmp_path / "runs" / "gpt_demo" / "version_0" / "checkpoints").exists() and last.endswith(".ckpt")


@pytest.mark.slow
def test_a_progress_bar_from_the_config_is_kept(tmp_path):
    cli = _run(tmp_path, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar


def test_gpt_size_and_data_errors_advise_values_that_work():
    import numpy as np
    import torch

    from examples.gpt import GPT, GPTConfig, TokenBlocks

    with pytest.raises(ValueError, match=r"e\.g\. --model\.n_embd=(\d+)") as err:
        GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=30))
    n_embd = int(re.search(r"--model\.n_embd=(\d+)", str(err.value)).group(1))
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=n_embd))
    with pytest.raises(ValueError, match=r"idx\[:, -8:\]"):
        model(torch.zeros(1, 9, dtype=torch.long))
    assert model(torch.zeros(1, 9, dtype=torch.long)[:, -8:]).shape == (1, 8, 11)
    tokens = np.arange(6)
    with pytest.raises(ValueError, match=r"--model\.block_size=(\d+) or less") as err:
        TokenBlocks(tokens, block_size=8)
    block = int(re.search(r"block_size=(\d+) or less", str(err.value)).group(1))
    x, y = TokenBlocks(tokens, block_size=block)[0]
    assert x.tolist() == list(range(block)) and y.tolist() == list(range(1, block + 1))
