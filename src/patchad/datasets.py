"""Evaluation datasets: the MVTec AD layout and a plain folder layout, described as test samples.

MVTec AD layout (one category)::

    CATEGORY/train/good/*.png
    CATEGORY/test/good/*.png, CATEGORY/test/<type>/*.png
    CATEGORY/ground_truth/<type>/<name>_mask.png

A root of categories is any folder whose sub-folders are categories (hold ``train/good``).

Plain folder layout::

    DIR/train/*.png                      good images (no ``good`` sub-folder)
    DIR/test/good/*.png, DIR/test/<type>/*.png
    DIR/masks/<type>/<name>.png          optional (or <name>_mask.png, or ground_truth/)

Masks are binarised with ``> 0``. A defective test image without a mask is an error unless
``allow_missing_masks``; then it still counts for image metrics but is left out of pixel metrics.
When a dataset has no masks at all (plain layout without a mask folder) pixel metrics are not
available (``None``), never computed against empty masks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from patchad.errors import PatchadError
from patchad.images import IMAGE_SUFFIXES, list_images

__all__ = ["Sample", "TestSet", "find_categories", "load_category"]

_MASK_FOLDERS = ("ground_truth", "masks")
_KNOWN_TOP = {"train", "test", *_MASK_FOLDERS}


@dataclass(frozen=True)
class Sample:
    """One test image.

    Attributes:
        path: the image file.
        defect_type: the folder it is in (``"good"`` for anomaly-free images).
        label: 0 good, 1 defective.
        mask_path: its ground-truth mask, or None (good images, or a missing mask).
    """

    path: Path
    defect_type: str
    label: int
    mask_path: Path | None


@dataclass(frozen=True)
class TestSet:
    """A category: training images and test samples.

    Attributes:
        root: the category folder.
        name: the category name (the folder name).
        layout: ``"mvtec"`` or ``"plain"``.
        train: good training images.
        samples: test samples, sorted by defect type (``good`` first) then file name.
        has_masks: whether pixel metrics can be computed (some defective image has a mask).
        n_missing_masks: defective images evaluated without a mask (``allow_missing_masks``).
    """

    root: Path
    name: str
    layout: str
    train: tuple[Path, ...]
    samples: tuple[Sample, ...]
    has_masks: bool
    n_missing_masks: int


def _note(message: str) -> None:
    print(f"patchad: note: {message}", file=sys.stderr)


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir() and (folder / "test").is_dir()


def _is_plain(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def find_categories(root: str | os.PathLike[str]) -> list[Path]:
    """The category folders under ``root``: ``root`` itself if it is one, else its sub-folders
    that are (sorted).

    Raises:
        PatchadError: ``root`` is missing, or neither a category nor a root of categories.
    """
    root = Path(root)
    if not root.is_dir():
        raise PatchadError(f"{root}: no such folder")
    if _is_mvtec_category(root) or _is_plain(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and _is_mvtec_category(p))
    if not found:
        raise PatchadError(
            f"{root}: neither an MVTec AD category (train/good, test/), a root of categories, "
            "nor a plain folder (train/, test/good/)"
        )
    return found


def _mask_for(root: Path, defect_type: str, image: Path) -> Path | None:
    for folder in _MASK_FOLDERS:
        base = root / folder / defect_type
        if not base.is_dir():
            continue
        for stem in (f"{image.stem}_mask", image.stem):
            for suffix in (image.suffix, *sorted(IMAGE_SUFFIXES)):
                candidate = base / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def _size(path: Path, what: str) -> tuple[int, int]:
    try:
        with Image.open(path) as handle:
            return handle.size
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PatchadError(f"{path}: not a readable {what} ({reason})") from None


def load_category(folder: str | os.PathLike[str], *, allow_missing_masks: bool = False) -> TestSet:
    """Describe one category folder (MVTec AD or plain layout).

    Image and mask headers are read to check that every mask has its image's size.

    Raises:
        PatchadError: one line naming the file: not a known layout, no images, an unreadable
            image or mask header, a mask whose size differs from its image, or a defective image
            without a mask (unless ``allow_missing_masks``).
    """
    root = Path(folder)
    if _is_mvtec_category(root):
        layout = "mvtec"
        train_dir = root / "train" / "good"
        for extra in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
            if extra.name != "good":
                _note(f"{extra}: not used (only train/good holds training images)")
    elif _is_plain(root):
        layout = "plain"
        train_dir = root / "train"
    else:
        raise PatchadError(
            f"{root}: neither an MVTec AD category (train/good, test/) "
            "nor a plain folder (train/, test/good/)"
        )
    for extra in sorted(p for p in root.iterdir() if p.is_dir()):
        if extra.name not in _KNOWN_TOP:
            _note(f"{extra}: unknown folder, ignored")
    train = tuple(list_images(train_dir))
    test_root = root / "test"
    types = sorted(p.name for p in test_root.iterdir() if p.is_dir())
    if "good" not in types:
        raise PatchadError(f"{test_root}: has no good/ folder of anomaly-free test images")
    types.remove("good")
    mask_folder_exists = any((root / f).is_dir() for f in _MASK_FOLDERS)
    if layout == "mvtec" and not mask_folder_exists and types:
        # MVTec layout promises masks; a plain layout may have none at all.
        mask_folder_exists = True
    samples: list[Sample] = []
    missing: list[Path] = []
    n_masks = 0
    loose = sorted(p for p in test_root.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES)
    if loose:
        _note(f"{test_root}: {len(loose)} images directly in test/ ignored (not in a type folder)")
    for defect_type in ["good", *types]:
        for image in list_images(test_root / defect_type, recursive=False):
            if defect_type == "good":
                samples.append(Sample(image, "good", 0, None))
                continue
            mask = _mask_for(root, defect_type, image) if mask_folder_exists else None
            if mask is None and mask_folder_exists:
                missing.append(image)
            if mask is not None:
                n_masks += 1
                image_size = _size(image, "image")
                mask_size = _size(mask, "mask")
                if image_size != mask_size:
                    raise PatchadError(
                        f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image {image} "
                        f"is {image_size[0]}x{image_size[1]}"
                    )
            samples.append(Sample(image, defect_type, 1, mask))
    if missing and not allow_missing_masks:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PatchadError(
            f"{missing[0]}: defective test image has no mask{more}; "
            "add it or pass --allow-missing-masks"
        )
    if missing:
        _note(
            f"{root}: {len(missing)} defective images have no mask; "
            "they count for image metrics only"
        )
    if not mask_folder_exists and types:
        _note(f"{root}: no masks; pixel metrics are not available")
    return TestSet(
        root=root,
        name=root.name,
        layout=layout,
        train=train,
        samples=tuple(samples),
        has_masks=n_masks > 0,
        n_missing_masks=len(missing),
    )
