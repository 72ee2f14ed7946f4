"""Datasets by name, read from a data directory (`--data-dir` or `PDPRUNE_DATA`); no torchvision."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pdprune.data.cifar10 import load_cifar10
from pdprune.data.dataset import Dataset, batches
from pdprune.data.digits import load_digits
from pdprune.data.files import DataError
from pdprune.data.idx import load_fashion_mnist, load_mnist
from pdprune.data.sst2 import load_sst2

__all__ = ["Dataset", "DataError", "batches", "load_dataset", "DATASETS", "data_dir"]

DATASETS: dict[str, Callable[[Path, bool], Dataset]] = {
    "digits": lambda directory, download: load_digits(),
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "sst2": load_sst2,
}
EMBEDDED = {"digits"}


def data_dir(directory: str | os.PathLike | None = None) -> Path | None:
    """The data directory: the argument, else `PDPRUNE_DATA`, else None (only embedded data)."""
    chosen = directory if directory is not None else os.environ.get("PDPRUNE_DATA")
    return None if chosen in (None, "") else Path(chosen)


def load_dataset(name: str, directory: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load dataset `name` from `directory` (or `PDPRUNE_DATA`); `download` fetches missing files.

    Raises:
        ValueError: unknown name, or no data directory for a dataset that needs one.
        DataError: a file is missing, truncated or corrupt (the message names it and the fix).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    folder = data_dir(directory)
    if folder is None and name not in EMBEDDED:
        raise ValueError(f"dataset {name!r} needs a data directory: pass --data-dir / directory=..., or set PDPRUNE_DATA")
    return DATASETS[name](folder, download)
