"""MNIST and Fashion-MNIST from their original idx files (gzip), decoded into tensors in memory."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from pdprune.data.dataset import Dataset
from pdprune.data.files import DataError, verified
from pdprune.data.files import download as fetch

__all__ = ["load_mnist", "load_fashion_mnist", "read_idx", "MIRRORS"]

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
STATISTICS = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}


def read_idx(path: Path) -> torch.Tensor:
    """An idx file (ubyte) as a uint8 tensor of the shape in its header."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path} is not a readable gzip file ({error}); delete it and download it again") from error
    magic, = struct.unpack(">I", data[:4])
    dimensions = magic & 0xFF
    if magic >> 8 != 0x08 or not 1 <= dimensions <= 3:
        raise DataError(f"{path} is not an idx ubyte file (magic {magic:#x}); delete it and download it again")
    shape = struct.unpack(f">{dimensions}I", data[4 : 4 + 4 * dimensions])
    body = data[4 + 4 * dimensions :]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path} holds {len(body)} bytes for a shape {shape}; it is truncated: download it again")
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8).reshape(shape).copy())


def _load(name: str, directory: Path, download_missing: bool) -> Dataset:
    paths = []
    for file_name in FILES:
        relative = f"{name}/{file_name}"
        if download_missing and not (directory / relative).is_file():
            fetch([mirror + file_name for mirror in MIRRORS[name]], directory, relative)
        paths.append(verified(directory, relative))
    train_images, train_labels, test_images, test_labels = (read_idx(path) for path in paths)
    mean, std = STATISTICS[name]

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255 - mean) / std).unsqueeze(1)  # (n, 1, 28, 28)

    return Dataset(name, normalize(train_images), train_labels.long(), {"test": (normalize(test_images), test_labels.long())}, num_classes=10)


def load_mnist(directory: Path, download: bool = False) -> Dataset:
    """MNIST: 60,000 training and 10,000 test images, (1, 28, 28), normalized with the training statistics."""
    return _load("mnist", directory, download)


def load_fashion_mnist(directory: Path, download: bool = False) -> Dataset:
    """Fashion-MNIST: 60,000 training and 10,000 test images, (1, 28, 28), normalized."""
    return _load("fashion_mnist", directory, download)
