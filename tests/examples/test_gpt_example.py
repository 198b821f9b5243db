"""The GPT example: real data, the CLI end to end, and TensorBoard logs on disk."""

import numpy as np
import pytest
import torch

from examples.common import adamw
from examples.gpt import GPTDataModule, LitGPT, TokenBlocks, cli_main, kjv_text, load_tokens
from lightning_muon import lr_lambda


def test_kjv_corpus_is_real_and_split():
    text = kjv_text()
    assert text.startswith("In the beginning God created the heaven and the earth.")
    assert len(text) > 4_000_000
    dm = GPTDataModule(block_size=64, batch_size=4)
    assert 60 <= dm.vocab_size <= 90
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # next-token targets
    assert dm.decode(dm._split(True)[0][0][:16].tolist()) == text[:16]
    assert len(dm._split(False)) == (len(text) - int(len(text) * 0.9) - 1) // 64


def test_bin_token_file(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "toks.bin"
    tokens.tofile(path)
    loaded, vocab = load_tokens(path)
    assert vocab == 50304 and np.array_equal(loaded, tokens)
    x, y = TokenBlocks(loaded, 10)[3]
    assert x.tolist() == list(range(30, 40)) and y.tolist() == list(range(31, 41))
    (tmp_path / "a.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match=r"must end in \.bin"):
        load_tokens(tmp_path / "a.csv")
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "missing.bin")


def test_cli_demo_config_runs_and_writes_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = cli_main(
        [
            "fit",
            "--config",
            "examples/configs/gpt_demo.yaml",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=0.001",  # a fraction: the CLI reads "1" as 1.0, the whole val set
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.n_layer=1",
            "--model.n_embd=32",
            "--model.block_size=32",
            "--model.warmup_steps=1",
            "--data.batch_size=4",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 4
    assert cli.model.model.cfg.vocab_size == cli.datamodule.vocab_size  # linked at instantiation
    run_dir = next(tmp_path.glob("gpt_demo/version_*"))
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "val/loss" in tags and "lr-Muon/muon" in tags
    assert all(np.isfinite(e.value) for e in acc.Scalars("train/loss"))
    # Values, not only tags. The first loss is about ln(vocab) (near-uniform predictions at init).
    assert acc.Scalars("train/loss")[0].value == pytest.approx(np.log(cli.datamodule.vocab_size), rel=0.1)
    # One cosine schedule (warmup 1, 4 steps) drives both kinds of group from the config's lrs.
    f = lr_lambda("cosine", 1, 4)
    for tag, base in (("lr-Muon/muon", 0.02), ("lr-Muon/adamw", 0.001)):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # logged per micro-batch: 2 per step
        assert sorted(by_step) == [0, 1, 2, 3]
        assert [by_step[s] for s in range(4)] == pytest.approx([base * f(s) for s in range(4)], rel=1e-6)
    # The four diagnostics callbacks of the demo config logged at step 0, with consistent values:
    # each */mean is the mean of the per-layer tags, and each value lies in its range.
    k = 32  # the smaller side of every hidden matrix of this 1-layer, n_embd=32 model
    ranges = {"spectral_entropy": (0, 1), "stable_rank": (1, k), "polar_misalignment/grad_delta_p": (0, 1)}
    for prefix, (lo, hi) in ranges.items():
        layers = [t for t in tags if t.startswith(f"per_layer/{prefix}/model.h.")]
        assert len(layers) == 4, (prefix, tags)  # c_attn, attn.c_proj, c_fc, mlp.c_proj
        values = [acc.Scalars(t)[0].value for t in layers]
        assert all(lo <= v <= hi for v in values), (prefix, values)
        assert acc.Scalars(prefix + "/mean")[0].value == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert any(t.startswith("per_layer/critical_batch_size/b_simple/model.h.") for t in tags)


def test_adamw_switch_uses_same_groups():
    model = LitGPT(vocab_size=50, block_size=16, n_layer=1, n_embd=32, n_head=2, optimizer=adamw(weight_decay=0.1))
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw", "adamw_no_decay"]
    assert opt.param_groups[2]["weight_decay"] == 0.0
    assert opt.param_groups[0]["weight_decay"] == opt.param_groups[1]["weight_decay"] == 0.1
    with pytest.raises(TypeError, match="optimizer must be a callable"):
        LitGPT(vocab_size=50, optimizer="sgd").configure_optimizers()


def test_adamw_config_overlay_swaps_the_optimizer_and_keeps_the_schedule(tmp_path):
    cli = cli_main(
        [
            "fit",
            "--config",
            "examples/configs/gpt_demo.yaml",
            "--config",
            "examples/configs/adamw.yaml",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--model.n_layer=1",
            "--model.n_embd=32",
            "--model.block_size=32",
            "--data.batch_size=4",
            "--model.schedule=constant",
            "--model.warmup_steps=5",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    opt = cli.trainer.optimizers[0]
    assert type(opt) is torch.optim.AdamW
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw", "adamw_no_decay"]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"] is True
    # the module's schedule (warmup 5) over AdamW's lr 1e-3 in every group, after 2 steps: 3/6 of it
    f = lr_lambda("constant", 5, None)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * f(2)] * 3, rel=1e-6)
