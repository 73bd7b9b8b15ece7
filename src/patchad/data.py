"""Finding training images: an MVTec-style category folder (``train/good``) or a plain folder."""

from __future__ import annotations

import os
from pathlib import Path

from patchad.errors import PatchadError
from patchad.images import list_images


def training_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Good training images of ``folder``: ``folder/train/good`` if it exists, else every image
    in ``folder`` (recursively).

    Raises:
        PatchadError: the folder is missing or holds no images.
    """
    root = Path(folder)
    if not root.exists():
        raise PatchadError(f"{root}: no such folder")
    if not root.is_dir():
        raise PatchadError(f"{root}: not a folder")
    if (root / "train").is_dir():
        good = root / "train" / "good"
        if not good.is_dir():
            raise PatchadError(f"{root}: has train/ but no train/good folder of good images")
        return list_images(good)
    return list_images(root)
