"""The one PNG encoder of every file and answer patchad writes (overlays, masks, ``?overlay=png``).

PNG stays the format (the output file names and what readers decode are a contract); only the
encoder settings change. Pillow's default (zlib level 6, its adaptive per-row filter) took about
190 ms for an 800 x 600 overlay and Pillow's fastest level still about 40 ms, most of it in the
adaptive filter. :func:`encode_png` writes 8-bit images with numpy's ``Sub`` filter on every row
(each byte minus the one a pixel to its left), then deflates them with Intel's ISA-L (the
``isal`` package, level 1) where it is installed, else with zlib level 1 and the ``Z_RLE``
strategy. zlib took about 12 ms of the encoding of such an overlay and ISA-L about 4 ms, for a
file 7 % larger (577 against 539 KiB); both decode to the same pixels. numpy, zlib and ISA-L
release the GIL, so encoders in several threads run in parallel. Measurements:
docs/benchmarks.md ("Where the time goes in predict").

The rows are compressed in strips of about :data:`STRIP_BYTES`, each an independent deflate
stream ending on a byte boundary (as pigz does), joined into the one zlib stream PNG holds: so
the strips of one image can be compressed in parallel (``threads``, what the server does for one
``?overlay=png`` answer), and the bytes are the same whatever the number of threads.

Torch-free.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: zlib level and strategy of :func:`encode_png` without ISA-L (measured in docs/benchmarks.md).
ZLIB_LEVEL = 1
ZLIB_STRATEGY = zlib.Z_RLE
#: ISA-L level of :func:`encode_png` (0-3; measured in docs/benchmarks.md).
ISAL_LEVEL = 1

try:  # the faster deflate, where its wheel is installed (a core dependency on common platforms)
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - depends on the platform
    _isal = None

#: Cores this process may use, at most 4: the threads of one server answer's encoding, and the
#: writer threads of ``patchad predict`` (:data:`patchad.outputs.DEFAULT_WRITERS`).
CORES = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)

#: Filtered bytes per independently compressed strip of rows.
STRIP_BYTES = 256 * 1024

#: PNG colour type by number of channels of an 8-bit image: grey, grey+alpha, RGB, RGBA.
_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUB = 1  # PNG filter type "Sub"


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(tag))
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def encode_png(image: Any, *, threads: int = 1) -> bytes:
    """A PNG file's bytes from a PIL image or an array.

    8-bit grey, grey+alpha, RGB and RGBA (uint8 arrays (H, W) or (H, W, C), or PIL images of
    modes ``L``, ``LA``, ``RGB``, ``RGBA``) go through the fast encoder described above; anything
    else (other modes, other dtypes) through Pillow at zlib level 1. Decoding gives back exactly
    the pixels given.

    Args:
        image: the picture.
        threads: compress this many strips of rows at once (the same bytes; faster for one
            large image when cores are idle).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode not in ("L", "LA", "RGB", "RGBA"):
            return _pillow_png(image)
        array = np.asarray(image)
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            return _pillow_png(Image.fromarray(array))
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels not in _COLOUR_TYPES or array.size == 0:
        return _pillow_png(Image.fromarray(array))
    height, width = array.shape[:2]
    rows = np.ascontiguousarray(array).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), np.uint8)
    filtered[:, 0] = _SUB
    filtered[:, 1 : 1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, 1 + channels :])
    rows_per_strip = max(1, STRIP_BYTES // filtered.shape[1])
    strips = [filtered[i : i + rows_per_strip] for i in range(0, height, rows_per_strip)]
    if threads > 1 and len(strips) > 1:
        pieces = list(_pool(threads).map(_deflate, strips, [s is strips[-1] for s in strips]))
    else:
        pieces = [_deflate(strip, strip is strips[-1]) for strip in strips]
    adler = zlib.adler32(filtered.data)
    data = _ZLIB_HEADER + b"".join(pieces) + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


#: zlib stream header: deflate, 32 KiB window, "fastest" level, no dictionary (check bits).
_ZLIB_HEADER = b"\x78\x01"
_POOL: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _deflate(rows: np.ndarray, last: bool) -> bytes:
    """Raw deflate of a strip: ends on a byte boundary (a sync flush), or the final block."""
    if _isal is not None:
        isal = _isal.compressobj(ISAL_LEVEL, _isal.DEFLATED, -15)
        return isal.compress(rows.data) + isal.flush(_isal.Z_FINISH if last else _isal.Z_SYNC_FLUSH)
    compressor = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, -15, 9, ZLIB_STRATEGY)
    return compressor.compress(rows.data) + compressor.flush(
        zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
    )


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if threads not in _POOL:
            _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="patchad-png")
        return _POOL[threads]


def _pillow_png(picture: Any) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=ZLIB_LEVEL)
    return buffer.getvalue()
