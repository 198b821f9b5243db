"""The paper's small Vision Transformer as a LightningModule, with a Muon/AdamW switch.

torchvision's ``VisionTransformer`` (4 layers, 4 heads, width 128, patch 4, MLP 512 by default);
image size, channels and classes come from the data module. Under Muon the attention and MLP
matrices go to Muon; the patch embedding (``conv_proj``), class token, positional embedding,
classifier (``heads.head``), LayerNorms and biases go to AdamW (see ``lightning_muon.routing``).

Run from the repository root:

    python -m examples.vit fit --config examples/configs/vit_demo.yaml      # CPU, embedded digits
    python -m examples.vit fit --config examples/configs/vit_paper.yaml \\
        --data.init_args.root /data/cifar10                                # paper's CIFAR-10 run
    python -m examples.vit fit --config examples/configs/vit_demo.yaml --config examples/configs/adamw.yaml

Example (in Python):
    >>> from examples.common import muon
    >>> from examples.vit import LitViT
    >>> model = LitViT(image_size=16, num_channels=1, optimizer=muon(lr=0.02))
    >>> [g["name"] for g in model.configure_optimizers().param_groups]
    ['muon', 'adamw', 'adamw_no_decay']
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningArgumentParser, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.models import VisionTransformer

from examples.common import ExampleCLI, configure_optimizer, fully_shard_blocks
from examples.image_data import ImageDataModule
from lightning_muon import Muon

__all__ = ["LitViT", "ViTCLI", "cli_main"]


class LitViT(L.LightningModule):
    """Image classification with torchvision's ``VisionTransformer``.

    Args:
        image_size, num_channels, num_classes: the input; linked from the data module by the CLI.
        patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout: the architecture.
        optimizer: an optimizer factory over param groups (LightningCLI's ``OptimizerCallable``):
            ``Muon`` (default, library defaults; the configs set the paper's) or e.g. ``torch.optim.AdamW``;
            either way ``configure_muon`` routes the parameters into the same named groups.
        warmup_steps, schedule: one LR schedule over every group (see ``lightning_muon.configure_muon``).
    """

    def __init__(
        self,
        image_size: int = 32,
        num_channels: int = 3,
        num_classes: int = 10,
        patch_size: int = 4,
        num_layers: int = 4,
        num_heads: int = 4,
        hidden_dim: int = 128,
        mlp_dim: int = 512,
        dropout: float = 0.0,
        optimizer: OptimizerCallable = Muon,
        warmup_steps: int = 0,
        schedule: str = "constant",
        split_qkv: bool | str = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}); "
                "resize the data (e.g. DigitsDataModule(image_size=16)) or change patch_size"
            )
        self.save_hyperparameters(ignore=["optimizer"])  # LightningCLI records it in config.yaml
        self.optimizer = optimizer
        self.model = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=mlp_dim,
            dropout=dropout,
            num_classes=num_classes,
        )
        if num_channels != 3:  # torchvision's patch embedding is hard-wired to 3 input channels
            proj = nn.Conv2d(num_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
            nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / (num_channels * patch_size**2)))
            nn.init.zeros_(proj.bias)
            self.model.conv_proj = proj
        self.train_acc = MulticlassAccuracy(num_classes=num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)
        self.val_loss = MeanMetric()

    def configure_model(self) -> None:
        """FSDP2 (ModelParallelStrategy): shard each encoder block, then the model."""
        fully_shard_blocks(self, self.model, self.model.encoder.layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss(F.cross_entropy(logits, y), weight=len(y))
        self.val_acc(logits, y)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> dict | torch.optim.Optimizer:
        return configure_optimizer(
            self, self.optimizer, self.hparams.warmup_steps, self.hparams.schedule, split_qkv=self.hparams.split_qkv
        )


class ViTCLI(ExampleCLI):
    """LightningCLI that sizes the model from the data module's images."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("image_size", "num_channels", "num_classes"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")


def cli_main(args: list[str] | None = None, run: bool = True) -> ViTCLI:
    """Entry point; ``args`` as on the command line (``None`` reads ``sys.argv``)."""
    torch.set_float32_matmul_precision("high")
    return ViTCLI(
        LitViT,
        ImageDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
