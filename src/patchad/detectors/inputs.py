"""The input geometry every detector shares: the resolved input size (square, HxW, auto,
native), keep_aspect and tiling plans, the views (images or tiles) the backbone sees, the
calibration hold-out, and the lines ``fit`` prints about them. A mixin of
:class:`patchad.detectors.base.Detector`; the pure size arithmetic is in :mod:`patchad.geometry`."""

from __future__ import annotations

import copy
import math
import typing
from typing import ClassVar

import torch

from patchad.errors import ConfigError
from patchad.features import (
    Preprocess,
    backbone_info,
    layer_indices,
)
from patchad.geometry import (
    RESIZE_CHOICES,
    Box,
    Size,
    auto_resize,
    auto_side,
    auto_size,
    median_ratio,
    parse_fixed_size,
    parse_image_size,
    short_side_size,
    tile_boxes,
)
from patchad.loading import ImageLike, Images, as_items, image_dims

if typing.TYPE_CHECKING:
    from typing_extensions import Self


class InputGeometry:
    """Geometry methods of :class:`~patchad.detectors.base.Detector` (which holds the
    parameters ``image_size``, ``resize``, ``tile_size``, ``tile_overlap``, ``crop_size``,
    ``calibration_split`` and ``seed``)."""

    #: Whether a fitted model scores inputs of another size than its training inputs: PatchCore's
    #: bank and SPADE's gallery are sets of patches (paper, Sec. 3), PaDiM's Gaussians belong
    #: to the positions of one training grid.
    any_input_size: ClassVar[bool] = True
    #: Whether the training inputs must share one shape (PaDiM, SPADE): ``resize="auto"`` then
    #: chooses between the square and one H x W at the median aspect ratio.
    one_training_shape: ClassVar[bool] = False
    #: Attributes a fit resolves from the training images (recorded in the model file).
    resolved_geometry: ClassVar[tuple[str, ...]] = ("input_size_", "resize_", "geometry_")

    def _validate_geometry(self) -> None:
        """Check ``image_size``, ``resize``, ``crop_size`` and the tiles; raise
        :class:`ConfigError`."""
        size = parse_image_size(self.image_size)
        if self.resize not in RESIZE_CHOICES:
            raise ConfigError(f"resize must be one of {list(RESIZE_CHOICES)}, got {self.resize!r}")
        if self.resize == "keep_aspect" and isinstance(size, tuple) and size[0] != size[1]:
            raise ConfigError(
                f"resize=keep_aspect scales the shorter side to image_size, which must be one "
                f"side (e.g. 256), got {self.image_size!r}"
            )
        if self.crop_size is not None:
            if not isinstance(self.image_size, int):
                raise ConfigError(f"crop_size needs an integer image_size, got {self.image_size!r}")
            if not 16 <= self.crop_size <= self.image_size:
                raise ConfigError(
                    f"crop_size must be in [16, image_size={self.image_size}], "
                    f"got {self.crop_size!r}"
                )
            if self.resize == "keep_aspect" or self.tile_size is not None:
                raise ConfigError("crop_size works with resize=squash and no tiling only")
        if self.tile_size is not None and (
            not isinstance(self.tile_size, int) or self.tile_size < 32
        ):
            raise ConfigError(f"tile_size must be an integer >= 32 or None, got {self.tile_size!r}")
        if not isinstance(self.tile_overlap, (int, float)) or not 0 <= self.tile_overlap < 1:
            raise ConfigError(f"tile_overlap must be in [0, 1), got {self.tile_overlap!r}")

    def max_stride(self) -> int:
        """The largest feature stride of the resolved layers (keep_aspect and auto round to it)."""
        info = backbone_info(self.backbone)
        return max(info.strides[i] for i in layer_indices(self.backbone, self.resolved_layers))

    def input_size(self) -> Size | str:
        """``image_size`` resolved: (H, W), or ``"native"``; ``"auto"`` is resolved by ``fit``
        (``input_size_``, recorded in the model file) and is a square before it."""
        if hasattr(self, "input_size_"):
            return self.input_size_
        size = parse_image_size(self.image_size)
        if isinstance(size, str) and size != "native":
            side = auto_side(size)
            return side, side
        return size

    def resize_mode(self) -> str:
        """The resize mode in effect: the one a fit chose (``resize_``, recorded in the model
        file), else ``resize``; ``"auto"`` before a fit is ``"squash"``."""
        resolved = getattr(self, "resize_", None)
        if resolved is not None:
            return resolved
        return "squash" if self.resize == "auto" else self.resize

    @property
    def needs_sizes(self) -> bool:
        """Whether the input geometry depends on each image's own size (``resize="auto"``
        before a fit does: the training images decide)."""
        unresolved = self.resize == "auto" and not hasattr(self, "resize_")
        return (
            unresolved
            or self.resize_mode() == "keep_aspect"
            or str(self.image_size).startswith(("auto", "native"))
        )

    def _auto_applies(self) -> str | None:
        """Why ``resize="auto"`` is settled without the images (an explicit ``HxW``, ``auto``
        or ``native`` image_size, or a centre crop: squash), or None when the rule decides."""
        size = parse_image_size(self.image_size)
        if self.crop_size is not None:
            return f"crop_size={self.crop_size} given"
        if isinstance(size, str) or size[0] != size[1]:
            return f"image_size={self.image_size} given"
        return None

    def _resolve_geometry(self, sizes: list[Size | None]) -> None:
        """Set ``resize_``, ``input_size_`` and ``geometry_`` (the choice, why, and the one
        training input shape or None) for training images of ``sizes`` (height, width):
        ``resize="auto"`` is decided here, once (:func:`patchad.geometry.auto_resize`)."""
        for name in self.resolved_geometry:
            self.__dict__.pop(name, None)
        known = [s for s in sizes if s is not None]
        size = parse_image_size(self.image_size)
        resize, why = self.resize, None
        if resize == "auto":
            why = self._auto_applies()
            resize = "squash"
            if why is None:
                resize, why = auto_resize(known, self.one_training_shape)
        if resize == "keep_aspect" and self.one_training_shape and self.resize == "auto":
            # one H x W at the median ratio, short side image_size (keep_aspect's resolution)
            resize, size = (
                "squash",
                short_side_size(median_ratio(known), size[0], self.max_stride()),
            )
            why += ": one HxW at that ratio"
        if isinstance(size, str) and size != "native":
            size = auto_size(known, auto_side(size), self.max_stride())
        self.resize_, self.input_size_ = resize, size
        shapes = set(self.plan_inputs(sizes))
        shape = list(shapes.pop()) if len(shapes) == 1 else None
        self.geometry_ = {"resize": resize, "why": why, "shape": shape}

    def resolved_params(self) -> dict[str, typing.Any]:
        """The constructor parameters with the resolved geometry written out (the resize in
        effect; a squash's input size as ``HxW``), for workers that build their own detector
        from them (the sharded fits): they see the images as this one does and never re-decide
        ``resize="auto"``."""
        params = self.get_params()
        params["resize"] = self.resize_mode()
        size = self.input_size()
        if params["resize"] == "squash" and size != "native" and self.crop_size is None:
            params["image_size"] = f"{size[0]}x{size[1]}"
        return params

    def fixed_input_shape(self) -> Size | None:
        """The one (height, width) every image is resized to when the model can take one
        fixed input shape (an export): the squash size, or with keep_aspect the training
        inputs' shape when they all had one; None otherwise (``native``, mixed shapes)."""
        if self.input_size() == "native":
            return None
        if self.resize_mode() == "squash":
            return tuple(self.input_size())
        shape = getattr(self, "geometry_", {}).get("shape")
        return tuple(shape) if shape else None

    def plan_inputs(self, sizes: list[Size | None]) -> list[Size]:
        """(height, width) of each image's resized input (before tiling) for images of
        ``sizes`` (height, width; None for an unreadable one, which gives none), in order."""
        pre = Preprocess(
            self.input_size(),
            self.crop_size,
            (0, 0, 0),
            (1, 1, 1),
            self.resize_mode(),
            self.max_stride(),
        )
        return [pre.target(size[1], size[0]) for size in sizes if size is not None]

    def plan_views(self, sizes: list[Size | None]) -> list[Size]:
        """(height, width) of every backbone input (an image, or its tiles) for images of
        ``sizes`` (height, width; None for an unreadable one, which gives none), in order."""
        return [(b[2], b[3]) for h, w in self.plan_inputs(sizes) for b in self.boxes(h, w)]

    def view_patches(self, views: list[Size]) -> int:
        """Patches (positions of the finest feature grid) of backbone inputs of (height, width)
        ``views``: what PatchCore's bank and PaDiM's Gaussians count."""
        info = backbone_info(self.backbone)
        stride = min(info.strides[i] for i in layer_indices(self.backbone, self.resolved_layers))
        return sum(math.ceil(h / stride) * math.ceil(w / stride) for h, w in views)

    def boxes(self, height: int, width: int) -> list[Box]:
        """Tiles of a ``height`` x ``width`` input (one box without ``tile_size``)."""
        return tile_boxes(height, width, self.tile_size, self.tile_overlap)

    def rescaled(self, image_size: int | str) -> Self:
        """A copy of this fitted model that predicts at another input size, against the same
        bank or gallery: trained at one scale, tested at another.

        ``image_size`` means what it means at fit (with ``resize=keep_aspect``, an int is the
        shorter side); tiles keep their ``tile_size``. The copy has no thresholds: they were
        calibrated on scores at the training size, so call ``calibrate(good_images)`` on it
        before deciding. This model is unchanged.

        Raises:
            ConfigError: a method that needs its training grid (PaDiM), a centre crop, or an
                ``image_size`` of ``auto`` (which only training images resolve).
        """
        self._check_fitted("rescaled")
        if not self.any_input_size:
            raise ConfigError(
                f"{self.method} scores each position of its training grid and cannot predict at "
                f"another input size (a test image of another shape is resized to the training "
                f"geometry {self.input_size()})"
            )
        if self.crop_size is not None:
            raise ConfigError(f"crop_size={self.crop_size}: a cropped model cannot be rescaled")
        size = parse_fixed_size(image_size)
        other = copy.copy(self)
        for name in (*self.calibration_tensors, "image_threshold_", "pixel_threshold_"):
            other.__dict__.pop(name, None)
        other.image_size = image_size
        other.input_size_ = size
        if hasattr(self, "geometry_"):  # the training input shape is not this copy's
            other.geometry_ = {**self.geometry_, "shape": None}
        pre = self.preprocess_
        other.preprocess_ = Preprocess(
            size, None, pre.mean, pre.std, self.resize_mode(), self.max_stride()
        )
        return other

    def split_calibration(self, images: Images) -> tuple[list[ImageLike], list[ImageLike]]:
        """Split good images into (training, calibration) by ``calibration_split`` and ``seed``.

        ``round(calibration_split * N)`` images, at least 1 when the split is > 0, are drawn
        without replacement by a ``torch.Generator`` seeded with ``seed``; both parts keep the
        input order.

        Raises:
            ConfigError: the split would leave no image for training.
        """
        items = as_items(images)
        if not self.calibration_split:
            return items, []
        n_cal = max(1, round(self.calibration_split * len(items)))
        if n_cal >= len(items):
            raise ConfigError(
                f"calibration_split={self.calibration_split} holds out {n_cal} of "
                f"{len(items)} images, leaving none for training; give more images or "
                "set calibration_split=0"
            )
        generator = torch.Generator().manual_seed(self.seed)
        held = set(torch.randperm(len(items), generator=generator)[:n_cal].tolist())
        train = [x for i, x in enumerate(items) if i not in held]
        calib = [x for i, x in enumerate(items) if i in held]
        return train, calib

    def image_sizes(self, items: list[ImageLike]) -> list[Size | None]:
        """(height, width) of each image from its header, or (1, 1) each when the geometry
        does not depend on it; None for a file whose header cannot be read."""
        if not self.needs_sizes:
            return [(1, 1)] * len(items)
        return [image_dims(item) for item in items]

    def describe_geometry(self, sizes: list[Size | None]) -> str:
        """One line: the input size, resize mode and tiles a fit on images of ``sizes`` uses."""
        size = self.input_size()
        views = self.plan_views(sizes)
        shapes = sorted(set(views))
        text = "native size" if size == "native" else f"{size[0]}x{size[1]}"
        choice = getattr(self, "geometry_", {})
        if self.resize == "auto" and choice.get("why") and self._auto_applies() is None:
            if choice["resize"] == "keep_aspect":
                text = f"short side {size[0]}"
            line = f"geometry: {choice['resize']} ({choice['why']}), {text}"
            line += self._auto_cost(sizes, views)
        else:
            if str(self.image_size).startswith("auto"):
                text = f"{text} (image_size={self.image_size}: median aspect ratio of the images)"
            line = f"geometry: {text}, resize={self.resize_mode()}"
        if self.crop_size is not None:
            line += f", centre crop {self.crop_size}"
        if self.tile_size is not None:
            line += f", tiles of {self.tile_size} px overlapping {self.tile_overlap:g}"
        shown = ", ".join(f"{h}x{w}" for h, w in shapes[:4]) + (" ..." if len(shapes) > 4 else "")
        return (
            f"{line}; {len(views):,} backbone inputs for {len(sizes):,} images "
            f"({len(shapes)} shape{'s' if len(shapes) != 1 else ''}: {shown})"
        )

    def describe_fit(self, images: Images) -> list[str]:
        """What fitting ``images`` will do, before any work: the geometry line (input size,
        resize, tile count) and, for PatchCore, the memory estimate and coreset choice."""
        self._validate()
        saved = {n: self.__dict__.pop(n) for n in self.resolved_geometry if n in self.__dict__}
        try:
            sizes = self.image_sizes(as_items(images))
            self._resolve_geometry(sizes)
            views = self.plan_views(sizes)
            return [self.describe_geometry(sizes), *self._describe_views(len(sizes), views)]
        finally:
            for name in self.resolved_geometry:
                self.__dict__.pop(name, None)
            self.__dict__.update(saved)

    def _auto_cost(self, sizes: list[Size | None], views: list[Size]) -> str:
        """``; N.NNx the patches of the square squash`` when ``resize="auto"`` chose another
        geometry than the square (the exact coreset's time grows with patches x bank size, so
        up to the square of that factor); empty otherwise."""
        square = self.view_patches([(h, w) for h, w in self.plan_inputs_square(sizes)])
        factor = self.view_patches(views) / max(1, square)
        if abs(factor - 1) < 0.005:
            return ""
        text = f"; {factor:.2f}x the patches of the squash"
        if not self.one_training_shape:  # PatchCore: the exact greedy grows with patches x bank
            text += f" (exact coreset up to {factor**2:.1f}x the time)"
        return text

    def plan_inputs_square(self, sizes: list[Size | None]) -> list[Size]:
        """Backbone inputs of ``sizes`` under the square squash (the old default), tiled."""
        side = parse_image_size(self.image_size)
        side = (side[0], side[0]) if isinstance(side, tuple) else (auto_side(side),) * 2
        return [(b[2], b[3]) for s in sizes if s is not None for b in self.boxes(*side)]

    def _describe_views(self, num_images: int, views: list[Size]) -> list[str]:
        """Lines :meth:`describe_fit` adds for ``views`` (backbone input shapes)."""
        return []
