"""What every front end returns: :class:`Prediction`, the calibrated decision on raw scores, and
one ``results.jsonl`` record per image.

Torch-free, so that the trained detectors, the exported runtime and the server share it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from patchad.outputs import WrittenOutputs


@dataclass(frozen=True)
class Prediction:
    """What ``predict`` returns; higher = more anomalous everywhere.

    Attributes:
        scores: image anomaly scores, shape (B,).
        maps: anomaly maps, one float32 array of shape (H_i, W_i) per image, at the image's
            original size.
        names: the file path of each image (``"<image i>"`` for in-memory images).
        normalized: conformal p-values of the scores against the calibration scores, shape (B,),
            in [1/(n+1), 1], smaller = more anomalous (see :func:`patchad.calibration.p_values`);
            None when the detector is not calibrated.
        decisions: ``scores > image_threshold``, bool, shape (B,); None when not calibrated.
        masks: defect masks ``map > pixel_threshold``, one bool array (H_i, W_i) per image;
            None when not calibrated.
        image_threshold: the calibrated image threshold the decisions used; None when not
            calibrated.
        pixel_threshold: the calibrated pixel threshold the masks used (it also anchors the
            overlays' colour scale); None when not calibrated.
        images: the decoded RGB images (PIL), when ``iter_predict(keep_images=True)`` kept
            them for drawing overlays; else None. Not compared, not saved.
    """

    scores: np.ndarray
    maps: list[np.ndarray]
    names: list[str]
    normalized: np.ndarray | None = None
    decisions: np.ndarray | None = None
    masks: list[np.ndarray] | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    images: list[Any] | None = field(default=None, repr=False, compare=False)

    def records(self) -> list[dict[str, Any]]:
        """One :func:`result_record` per image, in order."""
        return [
            result_record(
                name,
                float(self.scores[i]),
                None if self.normalized is None else float(self.normalized[i]),
                None if self.decisions is None else bool(self.decisions[i]),
                None if self.masks is None else self.masks[i],
            )
            for i, name in enumerate(self.names)
        ]

    def save(
        self,
        out: str | os.PathLike[str],
        *,
        images: Sequence[Any] | None = None,
        force: bool = False,
        outputs: str | Sequence[str] | None = None,
    ) -> WrittenOutputs:
        """Write the files ``patchad predict`` writes (scores.csv, results.jsonl, maps/,
        overlays/, masks/ when calibrated) into the folder ``out``.

        Args:
            out: output folder; it must be new or empty unless ``force``.
            images: the images, for the overlays, when ``names`` are not readable files
                (in-memory images); PIL images or uint8 arrays (H, W[, 3]).
            force: write into a non-empty folder.
            outputs: which of them to write, as ``patchad predict --outputs``: a subset of
                ``scores,jsonl,maps,overlays,masks`` (text or names); None = all.
        """
        from patchad.atomic import ensure_out_dir
        from patchad.outputs import parse_outputs, write_predictions

        chosen = parse_outputs(outputs)
        folder = ensure_out_dir(Path(out), force)
        names = self.names
        if images is not None:
            if len(images) != len(names):
                raise ValueError(f"images: {len(images)} given for {len(names)} predictions")
            names = [f"image_{i:04d}" if n.startswith("<image") else n for i, n in enumerate(names)]
        # images given here are drawn on, not the ones the prediction may carry
        part = replace(self, names=list(names), images=self.images if images is None else None)
        sources = None if images is None else dict(zip(names, images, strict=True))
        return write_predictions(
            [part],
            [Path(n) for n in names],
            folder,
            pixel_threshold=self.pixel_threshold,
            images=sources,
            outputs=chosen,
        )


def decide(
    scores: np.ndarray,
    maps: list[np.ndarray],
    names: list[str],
    calibration_scores: np.ndarray | None,
    image_threshold: float | None,
    pixel_threshold: float | None,
) -> Prediction:
    """A :class:`Prediction` from raw scores, with p-values, decisions and masks when calibrated.

    The decision compares in float64 (``score > threshold``), as a user comparing the scores in
    ``scores.csv`` with the stored threshold does, so both give the same answer.

    Args:
        scores: image scores, shape (B,).
        maps: B maps at the images' original sizes.
        names: B image names.
        calibration_scores: image scores of the calibration images, shape (n,); None when the
            model is not calibrated (then the thresholds are ignored).
        image_threshold: image score above which an image is anomalous.
        pixel_threshold: map value above which a pixel is part of a defect.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if calibration_scores is None or image_threshold is None or pixel_threshold is None:
        return Prediction(scores=scores, maps=maps, names=names)
    from patchad.calibration import p_values

    return Prediction(
        scores=scores,
        maps=maps,
        names=names,
        normalized=p_values(calibration_scores, scores),
        decisions=scores.astype(np.float64) > float(image_threshold),
        masks=[m > pixel_threshold for m in maps],
        image_threshold=float(image_threshold),
        pixel_threshold=float(pixel_threshold),
    )


def result_record(
    path: str, score: float, normalized: float | None, anomalous: bool | None, mask: Any
) -> dict[str, Any]:
    """One line of ``results.jsonl``.

    Keys: ``path``; ``score`` (raw); ``normalized`` (conformal p-value, smaller = more
    anomalous); ``anomalous`` (bool) and ``decision`` (``"anomalous"``/``"normal"``);
    ``defect_area_px`` and ``defect_area_fraction`` of the mask; ``boxes``, one
    ``[x0, y0, x1, y1]`` per 8-connected defect region in original pixels, x1/y1 exclusive.
    Everything but path and score is null when the model is not calibrated.
    """
    from patchad.calibration import region_boxes

    record: dict[str, Any] = {"path": path, "score": score, "normalized": normalized}
    record["anomalous"] = anomalous
    record["decision"] = None if anomalous is None else ("anomalous" if anomalous else "normal")
    if mask is None:
        record.update(defect_area_px=None, defect_area_fraction=None, boxes=None)
    else:
        area = int(np.count_nonzero(mask))
        record.update(
            defect_area_px=area,
            defect_area_fraction=area / mask.size,
            boxes=region_boxes(mask),
        )
    return record
