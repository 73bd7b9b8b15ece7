"""The ``.safetensors`` model file: tensors, plus JSON metadata; no pickle anywhere.

The safetensors metadata holds one key, ``patchad``, whose value is a JSON object (sorted keys,
so equal models give identical bytes) with: ``format`` (``"patchad"``), ``format_version``,
``patchad_version``, ``method``, ``config`` (the constructor parameters), ``state`` (learned
non-tensor values, with the lineage: :mod:`patchad.lineage`), ``fingerprint`` (of the backbone
weights), ``checksum`` (SHA-256 of every tensor's name, dtype, shape and bytes) and ``model_id``
(:func:`model_id`). Writes are atomic: a temporary file in the same folder,
fsync, then rename. A write killed mid-way leaves the old file intact and, at worst, a hidden
``.<name>.*.tmp`` file, removed by the next successful write once it is an hour old.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from patchad.atomic import STALE_TMP_AGE, atomic_write_bytes  # noqa: F401 (re-exported)
from patchad.errors import PatchadError

FORMAT = "patchad"
FORMAT_VERSION = 1
METADATA_KEY = "patchad"


def checksum(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def model_id(
    checksum_hex: str, method: str, config: dict[str, Any], state: dict[str, Any], fingerprint: str
) -> str:
    """A model's id: SHA-256 of its tensors' :func:`checksum` and its metadata (method,
    config, state with thresholds and lineage, backbone fingerprint), not of the patchad version
    or the file's bytes. Equal models have equal ids; any update or recalibration changes it."""
    content = json.dumps(
        {
            "checksum": checksum_hex,
            "method": method,
            "config": config,
            "state": state,
            "fingerprint": fingerprint,
        },
        sort_keys=True,
    )
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def write_model(
    path: str | os.PathLike[str],
    tensors: dict[str, Tensor],
    *,
    method: str,
    config: dict[str, Any],
    state: dict[str, Any],
    fingerprint: str,
    force: bool = False,
) -> None:
    """Serialise a fitted detector (deterministic bytes for equal inputs)."""
    from patchad import __version__

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest = checksum(contiguous)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "patchad_version": __version__,
        "method": method,
        "config": config,
        "state": state,
        "fingerprint": fingerprint,
        "checksum": digest,
        "model_id": model_id(digest, method, config, state, fingerprint),
    }
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write_bytes(path, save(contiguous, metadata=header), force=force)


def read_model(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a model file.

    Returns:
        The tensors, and the metadata with ``config`` and ``state`` decoded from JSON.

    Raises:
        PatchadError: missing, truncated or foreign file, newer format, or a checksum mismatch.
    """
    p = Path(path)
    if not p.is_file():
        raise PatchadError(f"{p}: model file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as handle:
            header = dict(handle.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise PatchadError(f"{p}: not a patchad model file ({reason})") from None
    try:
        metadata = json.loads(header[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise PatchadError(f"{p}: not a patchad model file (no patchad metadata)") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise PatchadError(f"{p}: not a patchad model file (no patchad metadata)")
    version = metadata.get("format_version")
    if not isinstance(version, int):
        raise PatchadError(f"{p}: not a patchad model file (bad format version)")
    if version > FORMAT_VERSION:
        raise PatchadError(
            f"{p}: made by a newer patchad (model format {version}, this version reads "
            f"up to {FORMAT_VERSION}); upgrade patchad"
        )
    if checksum(tensors) != metadata.get("checksum"):
        raise PatchadError(f"{p}: checksum mismatch, the file is corrupt or was modified")
    if not isinstance(metadata.get("config"), dict) or not isinstance(metadata.get("state"), dict):
        raise PatchadError(f"{p}: not a patchad model file (bad config)")
    return tensors, metadata
