"""Image data for the ViT example: embedded 8x8 digits (ships with scikit-learn) and CIFAR-10.

Both data modules expose ``image_size``, ``num_channels`` and ``num_classes`` so the LightningCLI
in ``examples/vit.py`` can size the model from the data.

Example:
    >>> dm = DigitsDataModule(image_size=16, batch_size=32)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> x.shape, y.shape
    (torch.Size([32, 1, 16, 16]), torch.Size([32]))
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["ImageDataModule", "DigitsDataModule", "CIFAR10DataModule", "load_digits_arrays"]

# Per-channel statistics of the CIFAR-10 training set (the commonly used values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 handwritten 8x8 digits that scikit-learn ships: images ``(N, 8, 8)`` float32 with
    values 0..16, labels ``(N,)`` int64. Reads the CSV directly (scikit-learn is not imported)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "DigitsDataModule needs scikit-learn, which ships the digits data: pip install scikit-learn"
        )
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


class ImageDataModule(L.LightningDataModule):
    """Base of the example image data modules: the model reads its input shape from these."""

    image_size: int
    num_channels: int
    num_classes: int

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _loader(self, ds: Dataset | None, train: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: call setup('fit') before asking for loaders")
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 digits, resized (bilinear) to ``image_size`` and standardised.

    A fixed seeded permutation splits off ``val_fraction`` of the 1,797 images, so every run and
    every DDP rank sees the same split. One channel, ten classes. No augmentation (flips would
    change a digit's meaning).

    Args:
        image_size: side of the resized images; a multiple of the ViT's patch size (16 or 32).
        val_fraction: share of the images held out for validation, in (0, 1).
        seed: seed of the split permutation.
    """

    num_channels = 1
    num_classes = 10

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        super().__init__(batch_size, num_workers)
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.seed = seed

    def images(self) -> tuple[Tensor, Tensor]:
        """All images as ``(N, 1, image_size, image_size)`` standardised floats, and the labels."""
        raw, labels = load_digits_arrays()
        x = torch.from_numpy(raw).unsqueeze(1) / 16.0
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        x = (x - x.mean()) / x.std()
        return x, torch.from_numpy(labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.images()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(y))
        val, train = perm[:n_val], perm[n_val:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 through torchvision: random crop (padding 4) + horizontal flip for training, the
    official 10,000 test images for validation.

    Args:
        root: folder holding ``cifar-10-batches-py`` (or where to put it with ``download=True``).
        download: fetch the data set if it is missing (needs internet; off by default). Without
            it, ``setup`` raises ``FileNotFoundError`` naming the folder when the data is absent.
    """

    image_size = 32
    num_channels = 3
    num_classes = 10

    def __init__(self, root: str, download: bool = False, batch_size: int = 64, num_workers: int = 4) -> None:
        super().__init__(batch_size, num_workers)
        self.root = str(root)
        self.download = download

    def _check_present(self) -> None:
        if not (Path(self.root) / "cifar-10-batches-py").is_dir():
            raise FileNotFoundError(
                f"CIFAR10DataModule: no CIFAR-10 data under root={self.root!r} (expected "
                f"{Path(self.root) / 'cifar-10-batches-py'}). Point root at a folder that has it, "
                "or pass download=True on a machine with internet."
            )

    def prepare_data(self) -> None:
        from torchvision.datasets import CIFAR10

        if self.download:
            CIFAR10(self.root, train=True, download=True)
            CIFAR10(self.root, train=False, download=True)
        self._check_present()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms as T
        from torchvision.datasets import CIFAR10

        self._check_present()
        normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
        self.train_set = CIFAR10(self.root, train=True, transform=train_tf)
        self.val_set = CIFAR10(self.root, train=False, transform=T.Compose(normalize))
