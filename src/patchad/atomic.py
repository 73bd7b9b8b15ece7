"""Atomic file writes: every file patchad writes goes through a temporary file and a rename, so
a killed run never leaves a half-written output, and nothing is overwritten without ``force``.

Torch-free: the CLI, the server and the exported runtime all write through these.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from patchad.errors import PatchadError

#: Temporary files of :func:`atomic_write_bytes` older than this (seconds) were left by a killed
#: write, not by one in progress, and are removed by the next successful write of the same file.
STALE_TMP_AGE = 3600.0


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, force: bool) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Raises:
        PatchadError: ``path`` exists and ``force`` is false, its folder is not writable, or
            the write failed (a full disk); no partial file is left.
    """
    target = Path(path)
    if target.exists() and not force:
        raise PatchadError(f"{target}: already exists (use --force to overwrite)")
    if target.is_dir():
        raise PatchadError(f"{target}: is a folder")
    folder = target.parent if str(target.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise PatchadError(f"{target}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise PatchadError(f"{target}: cannot write ({exc.strerror or exc})") from None
        raise
    _remove_stale_temporaries(target)


def _remove_stale_temporaries(target: Path) -> None:
    now = time.time()
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > STALE_TMP_AGE:
                stale.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str, *, force: bool = True) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), force=force)


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray, *, force: bool = True) -> None:
    """Write a ``.npy`` file atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue(), force=force)


def save_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed ``.npz`` file of ``arrays`` atomically (overwriting)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue(), force=True)


def write_png_atomic(path: str | os.PathLike[str], image: object, *, force: bool = True) -> None:
    """Write a PNG atomically, from a PIL image or a uint8 array (H, W) or (H, W, 3), with
    :func:`patchad.png.encode_png`."""
    from patchad.png import encode_png

    atomic_write_bytes(path, encode_png(image), force=force)


def ensure_out_dir(path: str | os.PathLike[str], force: bool) -> Path:
    """Create an output folder; refuse a non-empty existing one unless ``force``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise PatchadError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise PatchadError(
            f"{folder}: folder exists and is not empty (use --force to write into it)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PatchadError(f"{folder}: cannot create folder ({exc.strerror})") from None
    return folder
