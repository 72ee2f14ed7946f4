"""Data files: checked against their published checksums, and downloaded atomically when asked.

A file that fails its check is never read: the error names the file and the fix. A download goes to
`<name>.part`, is verified, and only then renamed into place, so an interrupted or corrupted transfer
never leaves a file that looks complete; each mirror is retried with back-off.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from pdprune.data.checksums import MD5, SHA256

__all__ = ["DataError", "digest", "verified", "download"]

CHUNK = 1 << 20


class DataError(ValueError):
    """A data file is missing, truncated or corrupt; the message names the file and the fix."""


def digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _check(path: Path, relative: str) -> None:
    algorithm, table = ("sha256", SHA256) if relative in SHA256 else ("md5", MD5)
    expected = table.get(relative)
    if expected is None:
        raise KeyError(f"no published checksum for {relative!r}")
    actual = digest(path, algorithm)
    if actual != expected:
        raise DataError(
            f"{path} does not match its published {algorithm} ({expected[:12]}..., got {actual[:12]}...): "
            "it is truncated or corrupt. Delete it, then download it again (download=True / --download) "
            "or copy a good copy into place"
        )


def verified(directory: Path, relative: str) -> Path:
    """`directory / relative`, after checking it against its published checksum.

    Raises:
        DataError: the file is missing or does not match.
    """
    path = Path(directory) / relative
    if not path.is_file():
        raise DataError(
            f"{path} is missing; set PDPRUNE_DATA (or --data-dir) to the folder that holds "
            f"'{relative}', or pass download=True (--download) to fetch it"
        )
    _check(path, relative)
    return path


BACKOFF_SECONDS = 1.0
"""The pause before a mirror's second try, doubled before each further one (1 s, 2 s, ...)."""


def download(
    urls: Sequence[str], directory: Path, relative: str, *, check: bool = True, retries: int = 3,
    timeout: float = 60.0, backoff: float | None = None, progress: bool = True, sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch `relative` into `directory` from the first mirror that works, verified and atomically.

    Args:
        urls: mirrors of the same file, tried in order, each up to `retries` times.
        check: verify against the published checksum (False only for archives checked after unpacking).
        backoff: the first pause between tries of a mirror, doubled each time (default `BACKOFF_SECONDS`).
        sleep: how to pause (tests pass a recorder instead of waiting).
    Raises:
        DataError: every mirror failed; the message lists the last error and how to place the file by hand.
    """
    destination = Path(directory) / relative
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    last_error: Exception | None = None
    for url in urls:
        for attempt in range(retries):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as file:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {relative}", disable=not progress) as bar:
                        while chunk := response.read(CHUNK):
                            file.write(chunk)
                            bar.update(len(chunk))
                    if total is not None and file.tell() != total:
                        raise DataError(f"{url} sent {file.tell()} of {total} bytes")
                if check:
                    _check(partial, relative)
                os.replace(partial, destination)
                return destination
            except (OSError, DataError) as error:
                last_error = error
                partial.unlink(missing_ok=True)
                if attempt + 1 < retries:
                    sleep((BACKOFF_SECONDS if backoff is None else backoff) * 2**attempt)
    raise DataError(
        f"could not download {relative} from {list(urls)} ({type(last_error).__name__}: {last_error}); "
        f"check the network, or download it yourself to {destination}"
    )
