"""Checkpoint files: written atomically, read with `weights_only=True`, errors that name the file."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from pdprune._version import __version__

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_file"]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` (tensors, numbers, strings, containers) to `path`, replacing it only when complete.

    A crash mid-write leaves the previous file intact; `pdprune_version` is added to the state.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as file:
        torch.save({**state, "pdprune_version": __version__}, file)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to `path` that replaces `path` when the block ends without an error.

    A crash or Ctrl-C inside the block leaves `path` as it was and no temporary behind. The file gets
    the permissions of any new file (the umask applies), not mkstemp's owner-only ones.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, mode.replace("w", "x")) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
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
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes): a write was cut short; restore it or delete it to start over")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        reason = _reason(error)
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} ({type(error).__name__}: {reason[:200]}); "
            "the file is truncated, corrupt or not a weights-only torch checkpoint (pickled objects are refused: "
            "loading them could run code): restore it or delete it to start over"
        ) from error


def _reason(error: Exception) -> str:
    """The specific line of a load error; torch's advice for a refused pickle (weights_only=False, which
    could run the file's code) is left out."""
    generic = ("weights only load failed", "weights_only", "check the documentation", "please file an issue")
    for line in str(error).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not any(phrase in line.lower() for phrase in generic):
            return line.split(". Please")[0].rstrip(".")
    return type(error).__name__
