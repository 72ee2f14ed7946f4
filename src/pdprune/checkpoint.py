"""Checkpoint files: written atomically, read with `weights_only=True`, errors that name the file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pdprune._version import __version__

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` (tensors, numbers, strings, containers) to `path`, replacing it only when complete.

    A crash mid-write leaves the previous file intact; `pdprune_version` is added to the state.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({**state, "pdprune_version": __version__}, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (or any weights-only torch file).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is truncated, corrupt or not a weights-only torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "the file is truncated, corrupt or not a torch checkpoint: restore it or delete it to start over"
        ) from error
