"""A generated corpus of bad (and merely unusual) inputs, shared by the robustness tests.

Every kind is a small function that writes one input into a folder and returns its path, plus
the expected behaviour: ``error=None`` means it must be read fine; otherwise ``error`` is a
fragment of the one-line message (which must also name the file). Tests for a new command
(``evaluate``) can reuse the corpus by parametrising over :data:`IMAGE_KINDS`,
:data:`MODEL_KINDS` and :data:`DATASET_KINDS`.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Kind:
    """One kind of input: how to make it, and the expected message fragment (None = fine)."""

    make: Callable[[Path], Path]
    error: str | None


def _noise(size: tuple[int, int], seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return rng.integers(0, 256, shape, dtype=np.uint8)


def png_bytes(array: np.ndarray, *, width: int | None = None, height: int | None = None) -> bytes:
    """A hand-made PNG (8- or 16-bit gray/RGB/RGBA), optionally with a header that lies about
    its size (for the decompression-bomb test: the payload stays tiny)."""
    array = np.asarray(array)
    depth = 16 if array.dtype == np.uint16 else 8
    channels = 1 if array.ndim == 2 else array.shape[2]
    color = {1: 0, 3: 2, 4: 6}[channels]
    h, w = array.shape[:2]
    rows = array.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width or w, height or h, depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _save(folder: Path, name: str, image: Image.Image, **options: object) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _png(size: tuple[int, int] = (48, 40)) -> bytes:
    return png_bytes(_noise(size))


def _jpeg(size: tuple[int, int] = (48, 40)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(_noise(size)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def truncated_png(folder: Path) -> Path:
    data = _png()
    return _write(folder, "truncated.png", data[: len(data) // 2])


def truncated_jpeg(folder: Path) -> Path:
    data = _jpeg()
    return _write(folder, "truncated.jpg", data[: len(data) // 2])


def zero_byte(folder: Path) -> Path:
    return _write(folder, "empty.png", b"")


def text_as_png(folder: Path) -> Path:
    return _write(folder, "notes.png", b"this is not an image\n")


def bomb_png(folder: Path) -> Path:
    """A PNG header claiming 20,000 x 20,000 pixels, with a few bytes of payload."""
    return _write(folder, "bomb.png", png_bytes(_noise((4, 4)), width=20_000, height=20_000))


def gray16_png(folder: Path) -> Path:
    array = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 30).astype(np.uint16)
    return _write(folder, "gray16.png", png_bytes(array))


def rgb16_png(folder: Path) -> Path:
    array = _noise((48, 40)).astype(np.uint16) * 257
    return _write(folder, "rgb16.png", png_bytes(array))


def gray16_tiff(folder: Path) -> Path:
    array = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 30).astype(np.uint16)
    return _save(folder, "gray16.tif", Image.fromarray(array))


def palette_png(folder: Path) -> Path:
    return _save(folder, "palette.png", Image.fromarray(_noise((48, 40))).convert("P"))


def rgba_png(folder: Path) -> Path:
    return _save(folder, "rgba.png", Image.fromarray(_noise((48, 40), channels=4), "RGBA"))


def cmyk_jpeg(folder: Path) -> Path:
    return _save(folder, "cmyk.jpg", Image.fromarray(_noise((48, 40))).convert("CMYK"))


def exif_rotated_jpeg(folder: Path) -> Path:
    """Stored 48 wide x 40 high with EXIF orientation 6 (rotate 90): shown 40 x 48."""
    image = Image.fromarray(_noise((48, 40)))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(folder, "rotated.jpg", image, exif=exif)


def one_pixel(folder: Path) -> Path:
    return _save(folder, "one.png", Image.new("RGB", (1, 1), (200, 10, 10)))


def unicode_path(folder: Path) -> Path:
    return _write(folder, "défaut ü 漢字/bild 1.png", _png())


def non_images_mixed(folder: Path) -> Path:
    """A README and a CSV next to the images: ignored (the returned path is the good image)."""
    _write(folder, "README.txt", b"notes")
    _write(folder, "labels.csv", b"a,b\n")
    _write(folder, "no_suffix", _png())
    return _write(folder, "mixed_ok.png", _png())


def symlink_loop(folder: Path) -> Path:
    """A sub-folder holding a link back to its parent: walked once, then skipped."""
    sub = folder / "loop"
    sub.mkdir(parents=True, exist_ok=True)
    link = sub / "back"
    if not link.is_symlink():
        os.symlink(folder, link, target_is_directory=True)
    return _write(sub, "in_loop.png", _png())


#: Images that cannot be read: a one-line error naming the file, or a skip with --skip-bad.
BAD_IMAGE_KINDS: dict[str, Kind] = {
    "truncated_png": Kind(truncated_png, "not a readable image"),
    "truncated_jpeg": Kind(truncated_jpeg, "not a readable image"),
    "zero_byte": Kind(zero_byte, "empty file (0 bytes)"),
    "text_as_png": Kind(text_as_png, "not a readable image"),
    "bomb_20000x20000": Kind(bomb_png, "image too large (20000 x 20000"),
}

#: Unusual but valid images and folders: read as 8-bit RGB without complaint.
ODD_IMAGE_KINDS: dict[str, Kind] = {
    "gray16_png": Kind(gray16_png, None),
    "rgb16_png": Kind(rgb16_png, None),
    "gray16_tiff": Kind(gray16_tiff, None),
    "palette_png": Kind(palette_png, None),
    "rgba_png": Kind(rgba_png, None),
    "cmyk_jpeg": Kind(cmyk_jpeg, None),
    "exif_rotated_jpeg": Kind(exif_rotated_jpeg, None),
    "one_pixel": Kind(one_pixel, None),
    "unicode_space_path": Kind(unicode_path, None),
    "non_images_mixed": Kind(non_images_mixed, None),
    "symlink_loop": Kind(symlink_loop, None),
}

IMAGE_KINDS: dict[str, Kind] = {**BAD_IMAGE_KINDS, **ODD_IMAGE_KINDS}


# ---------------------------------------------------------------------------- model files
def _rewrite_model(source: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    from safetensors.torch import load_file, save

    from patchad.modelfile import METADATA_KEY

    tensors = load_file(str(source))
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    edit_result = {"tensors": tensors, "meta": meta}
    edit(edit_result)
    header = {METADATA_KEY: json.dumps(edit_result["meta"], sort_keys=True)}
    target.write_bytes(save(edit_result["tensors"], metadata=header))
    return target


def truncated_model(good: Path, folder: Path) -> Path:
    data = good.read_bytes()
    path = folder / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


def newer_model(good: Path, folder: Path) -> Path:
    def edit(d: dict) -> None:
        d["meta"]["format_version"] = 99

    return _rewrite_model(good, folder / "newer.safetensors", edit)


def wrong_checksum_model(good: Path, folder: Path) -> Path:
    def edit(d: dict) -> None:
        name = sorted(d["tensors"])[0]
        d["tensors"][name] = d["tensors"][name].clone()
        d["tensors"][name].view(-1)[0] += 1

    return _rewrite_model(good, folder / "tampered.safetensors", edit)


def other_weights_model(good: Path, folder: Path) -> Path:
    def edit(d: dict) -> None:
        d["meta"]["fingerprint"] = "0123456789abcdef"

    return _rewrite_model(good, folder / "otherweights.safetensors", edit)


def foreign_safetensors(good: Path, folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = folder / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    return path


class _Exploit:
    """Unpickling this creates the file ``marker``: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def pickle_model(good: Path, folder: Path) -> Path:
    path = folder / "pickled.safetensors"
    path.write_bytes(pickle.dumps({"model": _Exploit(folder / "PWNED")}))
    return path


#: Model files that must be refused: (maker(good_model, folder) -> path, message fragment).
MODEL_KINDS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "truncated": (truncated_model, "not a patchad model file"),
    "newer_format": (newer_model, "newer patchad (model format 99"),
    "wrong_checksum": (wrong_checksum_model, "checksum mismatch"),
    "other_backbone_weights": (other_weights_model, "fitted with other"),
    "foreign_safetensors": (foreign_safetensors, "not a patchad model file"),
    "pickle_renamed": (pickle_model, "not a patchad model file"),
}
