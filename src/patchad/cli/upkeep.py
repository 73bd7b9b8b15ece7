"""Commands that look after a fitted model on the line: ``patchad update`` (new good images into
the model, without a refit) and ``patchad info`` (what a model file holds, and its lineage).
Thin: the work is :meth:`patchad.detectors.Detector.update` and :mod:`patchad.info`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from patchad.cli.commands import _good_images, _say, _summary
from patchad.cli.parser import EXIT_OK
from patchad.errors import PatchadError


def _thresholds(pair: tuple[float, float] | None) -> str:
    return "none" if pair is None else f"image {pair[0]:.6g}, pixel {pair[1]:.6g}"


def cmd_update(args: argparse.Namespace) -> int:
    from patchad.data import training_images
    from patchad.detectors import load

    out = Path(args.out)
    if out.exists() and not args.force:
        raise PatchadError(f"{out}: already exists (use --force to overwrite)")
    if args.data is None:
        raise PatchadError("update: give --data NEW_GOOD_DIR")
    images = training_images(args.data)
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
            f"memory bank ({added['bank_before']:,} -> {added['bank_after']:,}; covering radius "
            f"{added['radius']:.6g}, {added['radius_from']})"
        )
    elif "gallery_after" in added:
        what = f"gallery {added['gallery_before']:,} -> {added['gallery_after']:,} images"
    else:
        what = f"Gaussians from {added['images_before']:,} -> {added['images_after']:,} images"
    _say(
        args,
        f"updated {args.model} with {report.images} images from {args.data} "
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
    detector.save(out, force=args.force)
    _summary(args, f"saved {out} ({time.perf_counter() - start:.1f} s)")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from patchad.info import describe, model_info

    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        sys.stdout.write("".join(line + "\n" for line in describe(info)))
    return EXIT_OK
