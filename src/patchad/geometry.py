"""Input geometry as pure functions (no torch): the size the backbone sees for an image, the
tiles it is cut into, and the smooth window that stitches tile maps back together.

Sizes are ``(height, width)`` in pixels; tile boxes are ``(top, left, height, width)``.
The same functions serve fit and predict, so both see an image the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from patchad.errors import ConfigError

Size = tuple[int, int]
Box = tuple[int, int, int, int]

RESIZE_MODES = ("squash", "keep_aspect")
#: ``resize`` values a detector accepts: ``auto`` picks one of :data:`RESIZE_MODES` at fit.
RESIZE_CHOICES = ("auto", *RESIZE_MODES)
#: ``resize="auto"`` keeps the proportions when a squash would stretch the median training image
#: by more than this factor (long side over short side). The backbone was pretrained with
#: random crops of aspect ratio 3/4 to 4/3 resized to a square, so it has seen stretches up to
#: 4/3 and not beyond; on 4:3 images keep_aspect bought little for 1.8x the fit time, and on
#: strips of 2.5:1 and 3:1 a large gain (docs/geometry.md). 3:2 is the next common ratio.
AUTO_MAX_STRETCH = 1.5
#: ``image_size`` words: ``auto`` picks H x W at fit time, ``native`` keeps each image's size.
SIZE_WORDS = ("auto", "native")
#: Pixel count ``image_size="auto"`` keeps, unless written ``auto:N`` (N x N pixels).
AUTO_SIDE = 256
#: Largest aspect ratio ``keep_aspect`` accepts (its input would be this many squares long).
MAX_ASPECT = 64
#: Smallest side, tile, or input the backbone is given.
MIN_SIDE = 16


def parse_image_size(value: int | str) -> Size | str:
    """Read an ``image_size`` parameter.

    Args:
        value: an int ``S`` (a square), ``"S"``, ``"HxW"``, ``"auto"``, ``"auto:S"`` or
            ``"native"``.

    Returns:
        ``(H, W)``, or the word (``"auto"``, ``"auto:S"``, ``"native"``) unchanged.

    Raises:
        ConfigError: anything else, or a side below 16.
    """
    if isinstance(value, bool):
        raise ConfigError(f"image_size must be an int, 'HxW', 'auto' or 'native', got {value!r}")
    if isinstance(value, int):
        sides = (value, value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "native":
            return "native"
        if text == "auto" or text.startswith("auto:"):
            auto_side(text)  # validates
            return text
        parts = text.replace("*", "x").split("x")
        try:
            sides = tuple(int(p) for p in parts)
        except ValueError:
            sides = ()
        if len(sides) == 1:
            sides = (sides[0], sides[0])
        if len(sides) != 2:
            raise ConfigError(
                f"image_size must be an int, 'HxW', 'auto' or 'native', got {value!r}"
            )
    else:
        raise ConfigError(f"image_size must be an int, 'HxW', 'auto' or 'native', got {value!r}")
    if min(sides) < MIN_SIDE:
        raise ConfigError(f"image_size sides must be >= {MIN_SIDE}, got {value!r}")
    return int(sides[0]), int(sides[1])


def parse_fixed_size(value: int | str) -> Size | str:
    """:func:`parse_image_size` for a size known without training images: ``(H, W)`` or
    ``"native"``.

    Raises:
        ConfigError: as :func:`parse_image_size`, or ``auto`` (only a fit resolves it).
    """
    size = parse_image_size(value)
    if isinstance(size, str) and size != "native":
        raise ConfigError(
            f"image_size={value!r}: auto is resolved from training images at fit; give a size"
        )
    return size


def auto_side(text: str) -> int:
    """The square side whose pixel count ``"auto"`` / ``"auto:S"`` keeps."""
    if text == "auto":
        return AUTO_SIDE
    try:
        side = int(text.removeprefix("auto:"))
    except ValueError:
        raise ConfigError(f"image_size {text!r}: expected 'auto' or 'auto:S'") from None
    if side < MIN_SIDE:
        raise ConfigError(f"image_size {text!r}: S must be >= {MIN_SIDE}")
    return side


def round_to(x: float, multiple: int) -> int:
    """``x`` rounded to the nearest multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, multiple * round(x / multiple))


def auto_size(sizes: Sequence[Size], side: int, stride: int) -> Size:
    """``image_size="auto"``: H x W with the training images' median aspect ratio (W / H) and
    about ``side * side`` pixels, each side rounded to a multiple of ``stride``.

    Args:
        sizes: (height, width) of the training images.
        side: square side whose pixel count to keep.
        stride: the backbone's largest feature stride among the used layers.
    """
    if not sizes:
        return round_to(side, stride), round_to(side, stride)
    ratio = float(np.median([w / h for h, w in sizes]))
    height = side / math.sqrt(ratio)
    return round_to(height, stride), round_to(height * ratio, stride)


def stretch(size: Size) -> float:
    """How much a squash to a square distorts an image of ``(height, width)``: long over short."""
    height, width = size
    return max(height, width) / min(height, width)


def auto_resize(sizes: Sequence[Size], one_shape: bool) -> tuple[str, str]:
    """``resize="auto"``: ``("keep_aspect" or "squash", why)`` for training images of ``sizes``.

    The squash stretches image i by ``s_i`` (:func:`stretch`). For methods that score any input
    shape (PatchCore), keep_aspect when the median ``s_i`` exceeds :data:`AUTO_MAX_STRETCH`:
    each image then keeps its own proportions, whatever their spread. Methods that need one
    training shape (``one_shape``: PaDiM, SPADE) get one H x W at the median aspect ratio W / H
    instead (``"keep_aspect"`` here means that shape; see :func:`short_side_size`), when that ratio
    itself stretches by more than the factor (the median of log W / H, so that an even split of
    orientations gives 1): a set of both orientations, which no single shape improves on, keeps
    the square.
    """
    if not sizes:
        return "squash", "no training image sizes"
    if one_shape:
        ratio = median_ratio(sizes)
        typical = max(ratio, 1 / ratio)
        what = "median aspect"
    else:
        typical = float(np.median([stretch(s) for s in sizes]))
        what = "median stretch"
    if typical > AUTO_MAX_STRETCH:
        return "keep_aspect", f"{what} {typical:.2f}:1 > {AUTO_MAX_STRETCH:g}:1"
    return "squash", f"{what} {typical:.2f}:1 <= {AUTO_MAX_STRETCH:g}:1"


def median_ratio(sizes: Sequence[Size]) -> float:
    """The median aspect ratio W / H of ``sizes``, taken over log W / H (so that an even split
    between both orientations gives 1)."""
    return math.exp(float(np.median([math.log(w / h) for h, w in sizes])))


def short_side_size(ratio: float, side: int, stride: int) -> Size:
    """One fixed H x W at aspect ratio ``ratio`` (W / H) whose shorter side is ``side``: what
    ``keep_aspect`` gives an image of that ratio (:func:`target_size`)."""
    width = 1_000_000
    return target_size(round(width / ratio), width, (side, side), "keep_aspect", stride)


def target_size(height: int, width: int, image_size: Size | str, resize: str, stride: int) -> Size:
    """The (height, width) an image of ``height`` x ``width`` is resized to before the backbone.

    - ``image_size="native"``: the image's own size, whatever ``resize``.
    - ``resize="squash"``: ``image_size`` exactly (today's behaviour), aspect ratio ignored.
    - ``resize="keep_aspect"``: the shorter side becomes ``S`` (``image_size`` must be square)
      and the longer side ``S + stride * round(S * (ratio - 1) / stride)``: in proportion,
      longer than ``S`` by a whole number of strides (so a multiple of ``stride`` when ``S`` is;
      a square image gets exactly ``S x S``, the same as ``squash``).

    Args:
        height, width: the original image size.
        image_size: ``(H, W)`` or ``"native"`` (``"auto"`` must be resolved first).
        resize: one of :data:`RESIZE_MODES`.
        stride: the backbone's largest feature stride among the used layers.
    """
    if image_size == "native":
        return height, width
    if isinstance(image_size, str):
        raise ValueError(f"unresolved image_size {image_size!r}")
    if resize == "squash":
        return image_size
    side = image_size[0]
    if image_size[0] != image_size[1]:
        raise ConfigError(f"resize=keep_aspect needs a square image_size (S), got {image_size}")
    short, long = min(height, width), max(height, width)
    if long > MAX_ASPECT * short:
        raise ConfigError(
            f"aspect ratio {long / short:.0f}:1 ({width}x{height}) is beyond {MAX_ASPECT}:1 for "
            f"resize=keep_aspect; use resize=squash, or image_size=native with tile_size"
        )
    extra = stride * round(side * (long / short - 1) / stride)
    longer = side + extra
    return (side, longer) if height <= width else (longer, side)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` pixels.

    The tiles overlap by at least ``round(overlap * tile)`` pixels; the first starts at 0, the
    last ends at ``length``, and the starts are spread evenly between. A length no longer than
    the tile gives one tile (then of the length itself, see :func:`tile_boxes`).
    """
    if length <= tile:
        return [0]
    step = max(1, tile - round(overlap * tile))
    count = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_boxes(height: int, width: int, tile: int | None, overlap: float) -> list[Box]:
    """Tiles ``(top, left, h, w)`` covering a ``height`` x ``width`` input, row-major.

    ``tile=None`` gives the whole input as one box. Tiles are ``tile`` x ``tile`` except along a
    side shorter than ``tile``, where they take the side's length (nothing is padded).
    """
    if tile is None:
        return [(0, 0, height, width)]
    th, tw = min(tile, height), min(tile, width)
    return [
        (top, left, th, tw)
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


def tile_window(height: int, width: int) -> np.ndarray:
    """The stitching weight of a tile map: a 2-D Hann window raised by a small floor, float32
    (height, width), so a pixel covered by one tile only keeps its value and overlaps blend
    smoothly, without seams."""

    def hann(n: int) -> np.ndarray:
        x = (np.arange(n) + 0.5) / n
        return np.sin(np.pi * x) ** 2 + 1e-3

    return np.outer(hann(height), hann(width)).astype(np.float32)


def stitch(maps: Sequence[np.ndarray], boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """Blend tile maps into one ``height`` x ``width`` map, weighted by :func:`tile_window`.

    Args:
        maps: one float array (h_i, w_i) per tile, matching ``boxes``.
        boxes: ``(top, left, h, w)`` of each tile.

    Returns:
        float32 (height, width): at each pixel the window-weighted mean of the tiles covering it.
    """
    if len(maps) == 1 and boxes[0] == (0, 0, height, width):
        return np.asarray(maps[0], dtype=np.float32)
    total = np.zeros((height, width), dtype=np.float64)
    weight = np.zeros((height, width), dtype=np.float64)
    for m, (top, left, h, w) in zip(maps, boxes, strict=True):
        win = tile_window(h, w)
        total[top : top + h, left : left + w] += win * m
        weight[top : top + h, left : left + w] += win
    return (total / weight).astype(np.float32)
