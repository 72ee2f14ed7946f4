"""Datasets by name, read from a data directory (`--data-dir` or `PDPRUNE_DATA`); no torchvision."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pdprune.data.dataset import Dataset, batches
from pdprune.data.digits import load_digits

__all__ = ["Dataset", "batches", "load_dataset", "DATASETS", "data_dir"]

DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "digits": lambda directory: load_digits(),
}


def data_dir(directory: str | os.PathLike | None = None) -> Path | None:
    """The data directory: the argument, else `PDPRUNE_DATA`, else None (only embedded data)."""
    chosen = directory if directory is not None else os.environ.get("PDPRUNE_DATA")
    return None if chosen in (None, "") else Path(chosen)


def load_dataset(name: str, directory: str | os.PathLike | None = None) -> Dataset:
    """Load dataset `name` from `directory` (or `PDPRUNE_DATA`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](data_dir(directory))
