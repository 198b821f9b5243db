"""The ViT example (examples/vit.py, examples/image_data.py): CLI, Muon routing, shipped data."""

from pathlib import Path

import pytest
import torch
from helpers import ROOT

from examples.image_data import CIFAR10DataModule, DigitsDataModule, load_digits_arrays
from examples.vit import LitViT, cli_main
from lightning_muon import Muon

DEMO = str(ROOT / "examples" / "configs" / "vit_demo.yaml")


@pytest.mark.parametrize("optimizer, precision", [("muon", "32-true"), ("adamw", "32-true"), ("muon", "bf16-mixed")])
def test_cli_fits_a_few_steps_from_the_demo_config(tmp_path, optimizer, precision):
    # Smoke test of the CLI paths (3 steps): it checks wiring (argument links, optimizer type, log
    # and checkpoint files) and ranges, not training values; those are checked against references
    # in test_optimizer.py, test_reference_updates.py and test_reliability.py (bf16 vs fp32).
    cli = cli_main(
        [
            "fit",
            "--config",
            DEMO,
            *(["--config", str(ROOT / "examples" / "configs" / "adamw.yaml")] if optimizer == "adamw" else []),
            "--trainer.precision",
            precision,
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    trainer = cli.trainer
    assert trainer.global_step == 3
    # model sized from the data module through the CLI's argument links
    assert (cli.model.hparams.image_size, cli.model.hparams.num_channels) == (16, 1)
    expected = Muon if optimizer == "muon" else torch.optim.AdamW
    assert type(trainer.optimizers[0]) is expected
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    log_dir = Path(trainer.logger.log_dir)
    assert log_dir.is_relative_to(tmp_path)
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()


def test_muon_routing_on_the_vit():
    model = LitViT(image_size=16, num_channels=1)
    optimizer = model.configure_optimizers()
    group_of = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(group_of) == len(named)  # every parameter is optimised exactly once
    to_adamw = ["model.conv_proj.weight", "model.class_token", "model.encoder.pos_embedding", "model.heads.head.weight"]
    for name in to_adamw:
        assert group_of[id(named[name])] != "muon", name
    for i in range(4):
        block = f"model.encoder.layers.encoder_layer_{i}"
        for suffix in (
            "self_attention.in_proj_weight",
            "self_attention.out_proj.weight",
            "mlp.0.weight",
            "mlp.3.weight",
        ):
            assert group_of[id(named[f"{block}.{suffix}"])] == "muon", suffix
    muon_names = {n for n, p in named.items() if group_of[id(p)] == "muon"}
    assert len(muon_names) == 16  # exactly the 4 attention/MLP matrices of the 4 blocks
    for name, p in named.items():  # gains and biases: AdamW without weight decay
        if p.ndim == 1:
            assert group_of[id(p)] == "adamw_no_decay", name


def test_digits_arrays_match_scikit_learn():
    from sklearn.datasets import load_digits

    reference = load_digits()
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8)
    assert (images == reference.images).all()
    assert (labels == reference.target).all()


def test_digits_datamodule_yields_real_images_with_a_fixed_split():
    from sklearn.datasets import load_digits

    reference = load_digits()
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 9
    n_train, n_val = len(dm.train_set), len(dm.val_set)
    assert (n_train, n_val) == (1438, 359)
    all_labels = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1]])
    assert torch.equal(torch.bincount(all_labels), torch.bincount(torch.from_numpy(reference.target)))
    again = DigitsDataModule(image_size=16)
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[0], dm.val_set.tensors[0])  # deterministic split
    # Upsampled images still are the digits: 2x2 average pooling brings them back to 8x8, which
    # correlate with scikit-learn's images at > 0.95 (measured ~0.99; a shuffled pairing gives ~0.5).
    full, labels = dm.images()
    pooled = torch.nn.functional.avg_pool2d(full, 2).reshape(len(full), -1)
    ref = torch.from_numpy(reference.images).float().reshape(len(full), -1)
    corr = torch.nn.functional.cosine_similarity(pooled - pooled.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True))
    assert float(corr.min()) > 0.95
    assert torch.equal(labels, torch.from_numpy(reference.target))


def test_cifar10_without_data_says_where_it_looked(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")
    assert dm.train_set is None


def test_vit_rejects_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="image_size .* multiple of patch_size"):
        LitViT(image_size=18, patch_size=4)
