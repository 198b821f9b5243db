"""Natural-image data without a download: 32x32 crops of ten colour photographs that ship inside
installed packages (scikit-image's sample data, scikit-learn's two sample images and matplotlib's
Grace Hopper portrait), ten classes = the ten photographs.

How it differs from CIFAR-10 (the paper's data, which needs a download): CIFAR-10 has 6,000
different 32x32 photographs per class of ten object categories; here each class is one photograph
(a scene: an astronaut, a cat, a cup of coffee, a rocket, a motorcycle, a deep-field sky, a Chinese
temple, a flower, a portrait, a retina), seen through random 32x32 crops of a downscaled copy
(shorter side 112 px). Crops of one photograph share its colours and textures, so the task is
closer to texture/scene recognition than to object categories; validation crops come from the
right 30% of each photograph, which training never sees (a shift in content, not in class).

Example:
    >>> x, y = photo_patches(per_class=4, split="val", seed=0)
    >>> tuple(x.shape), sorted(set(y.tolist())) == list(range(10))
    ((40, 3, 32, 32), True)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from examples.image_data import ImageDataModule

__all__ = ["PHOTOS", "PhotoPatchesDataModule", "load_photos", "photo_patches"]

#: (package, path inside it) of the ten photographs, one class each
PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("skimage", "data/retina.jpg"),
)
SHORT_SIDE = 112
TRAIN_FRACTION = 0.7


def _path(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the photo data needs the {package!r} package, which ships {rel}: pip install -e '.[examples]'"
        )
    return Path(spec.origin).parent / rel


def load_photos() -> list[np.ndarray]:
    """The ten photographs as float32 ``(H, W, 3)`` arrays in [0, 1], shorter side ``SHORT_SIDE``."""
    from PIL import Image

    out = []
    for package, rel in PHOTOS:
        img = Image.open(_path(package, rel)).convert("RGB")
        scale = SHORT_SIDE / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.float32) / 255.0)
    return out


_PHOTOS_CACHE: list[np.ndarray] = []


def photo_patches(per_class: int, split: str, seed: int = 0, size: int = 32) -> tuple[Tensor, Tensor]:
    """``per_class`` random ``size x size`` crops of each photograph: from its left 70% (``split=
    "train"``, with random horizontal flips) or its right 30% (``"val"``). Returns images ``(N, 3,
    size, size)``, each crop standardised per channel (so that the class is not given away by a
    photograph's colour cast), and labels."""
    if split not in ("train", "val"):
        raise ValueError(f"photo_patches: split must be 'train' or 'val', got {split!r}")
    if not _PHOTOS_CACHE:
        _PHOTOS_CACHE.extend(load_photos())
    g = np.random.default_rng(seed + (0 if split == "train" else 1_000_003))
    xs, ys = [], []
    for label, img in enumerate(_PHOTOS_CACHE):
        h, w, _ = img.shape
        cut = int(w * TRAIN_FRACTION)
        x0, x1 = (0, cut - size) if split == "train" else (cut, w - size)
        for _ in range(per_class):
            r, c = g.integers(0, h - size + 1), g.integers(x0, x1 + 1)
            crop = img[r : r + size, c : c + size]
            if split == "train" and g.random() < 0.5:
                crop = crop[:, ::-1]
            xs.append(crop.transpose(2, 0, 1))
            ys.append(label)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(xs)))
    # each crop standardised per channel: a photograph's overall colour cast would otherwise name its class
    x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 0.05)
    return x, torch.tensor(ys)


class PhotoPatchesDataModule(ImageDataModule):
    """:func:`photo_patches` as a data module for the ViT example (3 channels, 32x32, 10 classes).

    Args:
        train_per_class, val_per_class: crops per photograph.
        seed: seed of the crops.
    """

    image_size = 32
    num_channels = 3
    num_classes = 10

    def __init__(
        self,
        train_per_class: int = 500,
        val_per_class: int = 100,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.train_per_class, self.val_per_class, self.seed = train_per_class, val_per_class, seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = TensorDataset(*photo_patches(self.train_per_class, "train", self.seed))
            self.val_set = TensorDataset(*photo_patches(self.val_per_class, "val", self.seed))
