"""Reading and verifying the metadata of an exported ``.onnx`` file without ``onnx`` or torch.

An ONNX file is a protobuf ``ModelProto``; patchad reads only its top-level fields: ``graph``
(field 7, the nodes and every initializer) and ``metadata_props`` (field 14, key/value pairs).
The checksum is the SHA-256 of the serialised graph followed by the ``patchad`` metadata JSON,
so any change to a weight, a node or the metadata (thresholds included) is detected; the bytes
of an external data file are covered by the SHA-256 recorded in that JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from patchad.errors import PatchadError

EXPORT_FORMAT = "patchad-onnx"
EXPORT_FORMAT_VERSION = 1
METADATA_KEY = "patchad"
CHECKSUM_KEY = "patchad_checksum"

_GRAPH_FIELD, _METADATA_FIELD = 7, 14
_BLOCK = 1 << 24


def graph_digest(graph_blocks: Iterable[bytes], metadata_json: str) -> str:
    """SHA-256 of the serialised graph bytes followed by the metadata JSON."""
    digest = hashlib.sha256()
    for block in graph_blocks:
        digest.update(block)
    digest.update(metadata_json.encode("utf-8"))
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class _Truncated(Exception):
    pass


def _varint(handle: BinaryIO) -> int | None:
    """A protobuf varint, or None at a clean end of file."""
    value = shift = 0
    while True:
        byte = handle.read(1)
        if not byte:
            if shift:
                raise _Truncated
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise _Truncated


def _read_exact(handle: BinaryIO, length: int) -> bytes:
    data = handle.read(length)
    if len(data) != length:
        raise _Truncated
    return data


def _string_pair(entry: bytes) -> tuple[str, str]:
    """Key and value of a ``StringStringEntryProto`` (fields 1 and 2)."""
    import io

    fields = {1: "", 2: ""}
    handle = io.BytesIO(entry)
    while (tag := _varint(handle)) is not None:
        if tag & 7 != 2:
            raise _Truncated
        length = _varint(handle)
        if length is None:
            raise _Truncated
        fields[tag >> 3] = _read_exact(handle, length).decode("utf-8")
    return fields[1], fields[2]


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify the patchad metadata of an exported model.

    Returns:
        The decoded ``patchad`` JSON object.

    Raises:
        PatchadError: the file is missing, truncated, not an ONNX file made by patchad, from a
            newer export format, or its checksum (or its external data's) does not match.
    """
    p = Path(path)
    if not p.is_file():
        raise PatchadError(f"{p}: model file not found")
    try:
        digest = hashlib.sha256()
        with open(p, "rb") as handle:
            metadata = _scan_into(handle, digest)
    except (_Truncated, UnicodeDecodeError):
        raise PatchadError(f"{p}: not a readable ONNX file (truncated or corrupt)") from None
    if METADATA_KEY not in metadata:
        raise PatchadError(f"{p}: not a patchad ONNX file (no patchad metadata)")
    text = metadata[METADATA_KEY]
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise PatchadError(f"{p}: not a patchad ONNX file (bad patchad metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise PatchadError(f"{p}: not a patchad ONNX file (no patchad metadata)")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise PatchadError(f"{p}: not a patchad ONNX file (bad format version)")
    if version > EXPORT_FORMAT_VERSION:
        raise PatchadError(
            f"{p}: made by a newer patchad (export format {version}, this version reads up to "
            f"{EXPORT_FORMAT_VERSION}); upgrade patchad"
        )
    digest.update(text.encode("utf-8"))
    if digest.hexdigest() != metadata.get(CHECKSUM_KEY):
        raise PatchadError(f"{p}: checksum mismatch, the file is corrupt or was modified")
    external = meta.get("external_data")
    if external:
        data = p.parent / str(external["file"])
        if not data.is_file():
            raise PatchadError(f"{p}: its external data file {data} is missing")
        if file_sha256(data) != external["sha256"]:
            raise PatchadError(f"{data}: checksum mismatch, the file is corrupt or was modified")
    return meta


def _scan_into(handle: BinaryIO, graph: Any) -> dict[str, str]:
    """Walk the top-level fields of a ``ModelProto``: feed the graph field's bytes to ``graph``
    (a hashlib object) and return the metadata pairs."""
    seen_graph = False
    metadata: dict[str, str] = {}
    while (tag := _varint(handle)) is not None:
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            if _varint(handle) is None:
                raise _Truncated
        elif wire == 2:
            length = _varint(handle)
            if length is None:
                raise _Truncated
            if field == _GRAPH_FIELD:
                seen_graph = True
                left = length
                while left:
                    block = _read_exact(handle, min(left, _BLOCK))
                    graph.update(block)
                    left -= len(block)
            elif field == _METADATA_FIELD:
                key, value = _string_pair(_read_exact(handle, length))
                metadata[key] = value
            else:
                _read_exact(handle, length)
        elif wire == 5:
            _read_exact(handle, 4)
        elif wire == 1:
            _read_exact(handle, 8)
        else:
            raise _Truncated
    if not seen_graph:
        raise _Truncated
    return metadata
