"""Updating a fitted model with new good images, without a refit (``Detector.update``).

Only the new images go through the backbone. What each method does with them:

- **PaDiM**: a Gaussian per position is a sufficient statistic. The model keeps each position's
  covariance and the image count (``cov_``, ``count_``; ``updatable=True``, the default), which
  stand for the sums of the old embeddings (:func:`patchad.ops.gaussian.moments_from_gaussians`);
  the new images' sums are merged in and the Gaussians refitted: the result is a fit on the old
  and new images together, up to float32 rounding.
- **SPADE**: the gallery is the training set; the new images are appended, as a fit on the old
  images followed by the new ones would hold them.
- **PatchCore**: the greedy k-center coreset continues over the new patches from the existing
  bank (:func:`patchad.ops.coreset.extend_cover`): the farthest new patch joins the bank while it
  lies beyond the covering radius the fit reached (``coreset_radius_``, recorded at fit; a model
  without it estimates it from its bank, :func:`patchad.ops.coreset.bank_radius`, and says so).
  New patches already covered add nothing, so the bank grows only by what is new, and every
  training patch, old or new, stays within the radius. That is ``grow="radius"``, the default.
  ``grow="ratio"`` continues the same farthest-first selection until the bank holds
  ``coreset_ratio`` of every patch seen, old and new (``coreset_patches_``, recorded at fit;
  estimated as bank size / ratio for older files): the bank size a refit on old and new images
  would pick, so a stream of updates keeps the fit's density where the radius rule keeps its
  radius. ``max_added`` caps either. The search index and the Eq. 7 neighbours are rebuilt for
  the new bank.

The geometry, backbone, layers and preprocessing are the model's own. PaDiM needs its training
input shape and SPADE its gallery's shape: an image of another shape is refused before any work.

Thresholds (the rule, per method):

1. With ``calibration`` images given, the thresholds are recalibrated on them alone: sound for
   every method.
2. Otherwise a share ``calibration_split`` of the new images is held out (as at fit), scored by
   the updated model, and joins the stored calibration scores; the thresholds are recomputed on
   the union. With ``calibration_split=0`` the stored scores are kept as they are.

   - PatchCore: the bank only grows, so every stored image's patch scores and map maximum can
     only fall (a nearest distance over a superset): the stored scores are upper bounds, and the
     thresholds stay conservative for the old appearance. (The Eq. 7 image score is a weight in
     [0, 1] times that maximum; the weight can move either way, by little.)
   - SPADE: the image score (mean distance to the K nearest training images) can only fall too;
     the pixel maps need not.
   - PaDiM: the Gaussians move both ways, so the stored scores are approximations; the report
     says so, and ``calibration`` images make it exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from patchad import lineage
from patchad.errors import ConfigError, PatchadError
from patchad.loading import Images, as_items

if TYPE_CHECKING:
    from patchad.detectors.base import Detector

#: Methods whose stored calibration scores bound the updated model's scores of the same images
#: from above (image threshold and pixel threshold), see the module docstring.
SCORES_ONLY_FALL = {"patchcore": "image and pixel", "spade": "image"}

#: PatchCore's rules for how much the memory bank grows in an update (the module docstring).
GROW_RULES = ("radius", "ratio")


@dataclass(frozen=True)
class Growth:
    """How much PatchCore's memory bank may grow in one update.

    Attributes:
        rule: one of :data:`GROW_RULES`.
        max_added: most patches added (None: no cap).
    """

    rule: str = "radius"
    max_added: int | None = None


@dataclass(frozen=True)
class UpdateReport:
    """What an update changed.

    Attributes:
        images: new images that went into the model.
        calibration_images: new images held out (or given) for calibration.
        added: the method's own facts: PatchCore ``new_patches``, ``patches_added``,
            ``bank_before``, ``bank_after``, ``radius``, ``radius_from``; SPADE
            ``gallery_before`` / ``gallery_after``; PaDiM ``images_before`` / ``images_after``.
        seconds: wall time of the update.
        thresholds_before: (image, pixel) thresholds before, or None when not calibrated.
        thresholds_after: the same after.
        calibration: one line saying how the thresholds were set.
    """

    images: int
    calibration_images: int
    added: dict[str, Any]
    seconds: float
    thresholds_before: tuple[float, float] | None
    thresholds_after: tuple[float, float] | None
    calibration: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return asdict(self)


def _thresholds(det: Detector) -> tuple[float, float] | None:
    if not det.is_calibrated:
        return None
    return float(det.image_threshold_), float(det.pixel_threshold_)


def _check_shapes(det: Detector, items: list[Any]) -> None:
    """Refuse, before any work, a new image of a shape the model cannot take."""
    sizes = det.image_sizes(items)
    for item, size in zip(items, sizes, strict=True):
        if size is None:
            continue  # unreadable: reported when it is read (or skipped)
        (resized,) = det.plan_inputs([size])
        problem = det._update_shape_problem(resized)
        if problem:
            raise PatchadError(f"{item}: {problem}")


def update_detector(
    det: Detector,
    images: Images,
    *,
    calibration: Images | None = None,
    max_added: int | None = None,
    grow: str = "radius",
    progress: bool = False,
    skip_bad: bool = False,
) -> UpdateReport:
    """The work of :meth:`patchad.detectors.Detector.update` (see the module docstring).

    ``det`` is changed only when the update succeeds: any error leaves it as it was.

    Raises:
        NotFittedError: ``det`` is not fitted.
        ConfigError: ``max_added`` or ``grow="ratio"`` on a method other than PatchCore, or an
            invalid value.
        PatchadError: no images, an image the model cannot take, or a model that cannot be
            updated (a PaDiM without covariances).
    """
    import copy

    det._check_fitted("update")
    if max_added is not None:
        if det.method != "patchcore":
            raise ConfigError(f"max_added caps PatchCore's memory bank; {det.method} has none")
        if not isinstance(max_added, int) or max_added < 0:
            raise ConfigError(f"max_added must be an integer >= 0 or None, got {max_added!r}")
    if grow not in GROW_RULES:
        raise ConfigError(f"grow must be one of {', '.join(GROW_RULES)}, got {grow!r}")
    if grow != "radius" and det.method != "patchcore":
        raise ConfigError(
            f"grow={grow!r} sets how PatchCore's memory bank grows; {det.method} has none"
        )
    det._check_updatable()
    items = as_items(images)
    if not items:
        raise PatchadError("no images to update with")
    if calibration is not None:
        train, calib = items, as_items(calibration)
    else:
        train, calib = det.split_calibration(items)
    _check_shapes(det, train)
    start = time.perf_counter()
    before = _thresholds(det)
    parent = {
        "model_id": det.model_id(),
        "sha256": (getattr(det, "source_", None) or {}).get("sha256"),
    }
    # work on a copy of the learned state, so that a failure leaves the model as it was
    work = copy.copy(det)
    batches = work._feature_batches(train, progress, f"{det.method} update", skip_bad)
    seen = [0]

    def counted() -> Iterator[list[Tensor]]:
        for features in batches:
            seen[0] += features[0].shape[0]
            yield features

    with torch.inference_mode():
        added = work._update(counted(), len(train), Growth(grow, max_added))
    work.n_train_ = getattr(det, "n_train_", 0) + seen[0]
    how = _recalibrate(work, det, calib, explicit=calibration is not None, progress=progress)
    history = dict(getattr(det, "lineage_", None) or {})
    history["updates"] = [
        *history.get("updates", []),
        {**lineage.record(train, seen[0], len(calib)), "parent": parent, "added": added},
    ]
    work.lineage_ = history
    det.__dict__.clear()
    det.__dict__.update(work.__dict__)
    return UpdateReport(
        images=seen[0],
        calibration_images=len(calib),
        added=added,
        seconds=time.perf_counter() - start,
        thresholds_before=before,
        thresholds_after=_thresholds(det),
        calibration=how,
    )


def _recalibrate(
    work: Detector, old: Detector, calib: list[Any], *, explicit: bool, progress: bool
) -> str:
    """Set ``work``'s thresholds by the rule of the module docstring; return it in one line."""
    if explicit:
        work.calibrate(calib, progress=progress)
        return f"recalibrated on the {len(calib)} calibration images given"
    if not old.is_calibrated:
        if calib:
            work.calibrate(calib, progress=progress)
            return f"calibrated on {len(calib)} held-out new images (the model had none)"
        return "not calibrated (the model had no thresholds and no image was held out)"
    stored = len(old.calibration_scores_)
    bound = SCORES_ONLY_FALL.get(work.method)
    why = (
        f"{work.method}'s {bound} scores can only fall with the update, so the stored ones are "
        "upper bounds"
        if bound
        else f"{work.method}'s stored scores are approximations after the update; pass "
        "calibration images to recalibrate exactly"
    )
    if not calib:
        work.calibrate(None)  # the stored scores, at the stored fpr
        return f"kept the {stored} stored calibration scores ({why})"
    pred = work.predict(calib, progress=progress)
    scores = np.concatenate([old.calibration_scores_.numpy(), pred.scores]).astype(np.float32)
    map_max = np.array([float(m.max()) for m in pred.maps], dtype=np.float32)
    maxima = np.concatenate([old.calibration_map_max_.numpy(), map_max])
    work.calibration_scores_ = torch.from_numpy(np.sort(scores))
    work.calibration_map_max_ = torch.from_numpy(np.sort(maxima).astype(np.float32))
    work.calibrate(None)
    return (
        f"recalibrated on the {stored} stored calibration scores and {len(calib)} held-out new "
        f"images ({why})"
    )


def feedback_images(directory: str | Any, model: str) -> tuple[list[Any], list[Any]]:
    """The images operators labelled for ``model`` in a ``patchad serve --feedback-dir``
    folder: (good ones, i.e. false alarms; confirmed defects), oldest first.

    Raises:
        PatchadError: the folder or a record is unreadable, or it holds no feedback for
            ``model`` (the message lists the models it has feedback for).
    """
    from patchad.serve.feedback import read_feedback

    records = read_feedback(directory, model=model)
    if not records:
        names = sorted({r.model for r in read_feedback(directory)})
        raise PatchadError(
            f"{directory}: no feedback for model {model!r} (feedback there is for "
            f"{names or 'no model'}; --feedback-model NAME chooses)"
        )
    good = [r.image for r in records if r.label == "good"]
    defect = [r.image for r in records if r.label == "defect"]
    return good, defect


def not_flagged(det: Detector, images: list[Any]) -> list[Any]:
    """Of ``images`` (confirmed defects), those the calibrated model now judges normal."""
    if not images:
        return []
    pred = det.predict(images)
    return [image for image, bad in zip(images, pred.decisions, strict=True) if not bad]
