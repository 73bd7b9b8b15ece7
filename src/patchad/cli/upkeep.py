"""Commands that look after a fitted model on the line: ``patchad update`` (new good images into
the model, without a refit) and ``patchad info`` (what a model file holds, and its lineage).
Thin: the work is :meth:`patchad.detectors.Detector.update` and :mod:`patchad.info`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from patchad.cli.commands import _good_images, _say, _summary
from patchad.cli.parser import EXIT_OK
from patchad.errors import PatchadError


def _thresholds(pair: tuple[float, float] | None) -> str:
    return "none" if pair is None else f"image {pair[0]:.6g}, pixel {pair[1]:.6g}"


def cmd_update(args: argparse.Namespace) -> int:
    from patchad.data import training_images
    from patchad.detectors import load
    from patchad.update import feedback_images

    out = Path(args.out)
    if out.exists() and not args.force:
        raise PatchadError(f"{out}: already exists (use --force to overwrite)")
    if args.data is None and args.feedback is None:
        raise PatchadError("update: give --data NEW_GOOD_DIR and/or --feedback FEEDBACK_DIR")
    images = [] if args.data is None else training_images(args.data)
    good: list[Path] = []
    defects: list[Path] = []
    if args.feedback is not None:
        name = args.feedback_model or Path(args.model).stem
        good, defects = feedback_images(args.feedback, name)
        if not good and args.data is None:
            raise PatchadError(
                f"{args.feedback}: no image of model {name!r} is labelled good (a false alarm); "
                "nothing to update with"
            )
        _say(
            args,
            f"feedback for {name}: {len(good)} false alarms to learn from, {len(defects)} "
            "confirmed defects to check",
        )
        images = [*images, *good]
    calibration = None if args.calibration_dir is None else _good_images(args.calibration_dir)
    detector = load(args.model, weights=args.weights)
    if args.calibration_split is not None:
        detector.calibration_split = args.calibration_split
        detector._validate()
    start = time.perf_counter()
    detector.update(
        images,
        calibration=calibration,
        max_added=args.max_added,
        grow=args.grow,
        progress=not args.quiet,
        skip_bad=args.skip_bad,
    )
    report = detector.last_update_
    if args.fpr is not None and detector.is_calibrated:
        detector.calibrate(fpr=args.fpr)
    added = report.added
    if "patches_added" in added:
        what = (
            f"{added['patches_added']:,} of {added['new_patches']:,} new patches added to the "
            f"memory bank ({added['bank_before']:,} -> {added['bank_after']:,}; grow "
            f"{added['rule']}; covering radius {added['radius']:.6g}, {added['radius_from']})"
        )
    elif "gallery_after" in added:
        what = f"gallery {added['gallery_before']:,} -> {added['gallery_after']:,} images"
    else:
        what = f"Gaussians from {added['images_before']:,} -> {added['images_after']:,} images"
    source = " and ".join(x for x in (args.data, args.feedback) if x is not None)
    _say(
        args,
        f"updated {args.model} with {report.images} images from {source} "
        f"(+ {report.calibration_images} held out for calibration): {what}",
    )
    after = None
    if detector.is_calibrated:
        after = (detector.image_threshold_, detector.pixel_threshold_)
    _say(
        args,
        f"thresholds: {_thresholds(report.thresholds_before)} -> {_thresholds(after)} "
        f"({report.calibration})",
    )
    _check_feedback(args, detector, good, defects)
    detector.save(out, force=args.force)
    _summary(args, f"saved {out} ({time.perf_counter() - start:.1f} s)")
    return EXIT_OK


def _check_feedback(
    args: argparse.Namespace, detector: Any, good: list[Path], defects: list[Path]
) -> None:
    """After an update from feedback: warn when a false alarm is still flagged, and warn
    (``--strict``: refuse) when a confirmed defect no longer is."""
    from patchad.update import not_flagged

    if not good and not defects:
        return
    if not detector.is_calibrated:
        print(
            "patchad: warning: the model has no thresholds, so the feedback images could not be "
            "checked against it",
            file=sys.stderr,
        )
        return
    flagged = sorted(set(good) - set(not_flagged(detector, good)))
    if flagged:
        print(
            f"patchad: warning: the updated model still flags {len(flagged)} of {len(good)} "
            f"false alarms: {', '.join(str(p) for p in flagged)}",
            file=sys.stderr,
        )
    missed = not_flagged(detector, defects)
    if not missed:
        if defects:
            _say(args, f"the updated model still flags all {len(defects)} confirmed defects")
        return
    names = ", ".join(str(p) for p in missed)
    message = (
        f"the updated model no longer flags {len(missed)} of {len(defects)} confirmed defects: "
        f"{names}"
    )
    if args.strict:
        raise PatchadError(message + " (--strict: nothing written)")
    print(f"patchad: warning: {message}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    from patchad.info import describe, model_info

    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        sys.stdout.write("".join(line + "\n" for line in describe(info)))
    return EXIT_OK
