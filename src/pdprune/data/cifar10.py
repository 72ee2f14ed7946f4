"""CIFAR-10 (Krizhevsky, 2009), from the official python tarball or from lossless WebP batches.

With the official tarball (what `download=True` fetches) the split is the standard 50,000 / 10,000.
The shared WebP batches hold the 50,000 training images and only the first 1,000 test images exactly;
there, models are trained on training images 0-44,999 and evaluated on the held-out training images
45,000-49,999 and on the exact test images 0-999 (both reported, named as such).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from pdprune.data.augment import random_crop_flip
from pdprune.data.dataset import Dataset
from pdprune.data.files import DataError, verified
from pdprune.data.files import download as fetch

__all__ = ["load_cifar10", "URL", "MEAN", "STD", "CLASSES"]

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TARBALL = "cifar10/cifar-10-python.tar.gz"
TRAIN_FILES = 50
HELD_OUT_START = 45_000
# The pretrained ResNets of akamaster/pytorch_resnet_cifar10 expect ImageNet statistics; using them
# everywhere lets from-scratch and pretrained runs share one input pipeline.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _normalize(images: np.ndarray) -> torch.Tensor:
    """(n, 32, 32, 3) uint8 -> (n, 3, 32, 32) float32, normalized."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (tensor - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def _read_webp_grid(path: Path) -> np.ndarray:
    """A 320x3200 WebP grid of 10 x 100 images -> (1000, 32, 32, 3) uint8, image i at row i // 100."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise DataError(f"{path} cannot be decoded ({error}); it is corrupt: copy a good one into place") from error
    if pixels.shape != (320, 3200, 3):
        raise DataError(f"{path} is {pixels.shape}, not a 320x3200 grid of 32x32 images")
    return pixels.reshape(10, 32, 100, 32, 3).transpose(0, 2, 1, 3, 4).reshape(1000, 32, 32, 3)


def _labels(path: Path, count: int) -> torch.Tensor:
    digits = path.read_text().strip()
    if len(digits) != count or not digits.isdigit():
        raise DataError(f"{path} should hold {count} digits, one per image; it holds {len(digits)} characters")
    return torch.tensor([int(d) for d in digits], dtype=torch.long)


def _from_webp(directory: Path) -> Dataset:
    train = np.concatenate([_read_webp_grid(verified(directory, f"cifar10/train_{i:02d}.webp")) for i in range(TRAIN_FILES)])
    train_labels = _labels(verified(directory, "cifar10/train_labels.txt"), 50_000)
    test = _read_webp_grid(verified(directory, "cifar10/test_exact_00.webp"))
    test_labels = _labels(verified(directory, "cifar10/test_exact_labels.txt"), 1_000)
    images = _normalize(train)
    return Dataset(
        "cifar10",
        images[:HELD_OUT_START],
        train_labels[:HELD_OUT_START],
        {"held_out_train_45000_49999": (images[HELD_OUT_START:], train_labels[HELD_OUT_START:]), "test_exact_0_999": (_normalize(test), test_labels)},
        num_classes=10,
        augment=random_crop_flip,
    )


def _from_tarball(path: Path) -> Dataset:
    """The official archive, read in place; its pickles are only opened after the MD5 check passed."""
    batches: dict[str, dict] = {}
    with tarfile.open(path, "r:gz") as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if name.startswith(("data_batch_", "test_batch")):
                batches[name] = pickle.load(io.BytesIO(archive.extractfile(member).read()), encoding="bytes")

    def images(batch: dict) -> np.ndarray:
        return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (n, 32, 32, 3)

    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    return Dataset(
        "cifar10",
        _normalize(np.concatenate([images(b) for b in train])),
        torch.tensor(np.concatenate([b[b"labels"] for b in train]), dtype=torch.long),
        {"test": (_normalize(images(batches["test_batch"])), torch.tensor(batches["test_batch"][b"labels"], dtype=torch.long))},
        num_classes=10,
        augment=random_crop_flip,
    )


def load_cifar10(directory: Path, download: bool = False) -> Dataset:
    """CIFAR-10 from `directory/cifar10/`: the WebP batches if present, else the official tarball.

    Raises:
        DataError: neither is there (and `download` is False), or a file fails its checksum.
    """
    directory = Path(directory)
    if (directory / "cifar10" / "train_00.webp").is_file():
        return _from_webp(directory)
    if download and not (directory / TARBALL).is_file():
        fetch([URL], directory, TARBALL)
    return _from_tarball(verified(directory, TARBALL))
