"""The demo's drift scene: after deployment the good appearance moves, and an update with a
handful of new good parts brings the false alarms back down.

The demo's ``part`` category (a flange in a fixture) is photographed, after deployment, under a
new lamp on a new surface finish (:func:`drifted`: a warmer, brighter light falling off across
the field, and a finer turning pattern on the steel). Good parts that look new are flagged; the
operator collects a handful of them and runs ``update``. :func:`drift_experiment` measures, for
each fitted model, before and after that update:

- the false-alarm rate on new good parts (the ones not used for the update),
- the recall of defects on parts of the new appearance,
- the false-alarm rate on good parts of the old appearance,

at each model's calibrated threshold, and :func:`drift_markdown` states them for ``results.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchad.atomic import write_text_atomic
from patchad.demo import CATEGORY_DEFECTS, render

#: Share of the old and of the new good parts held out for the thresholds.
CALIBRATION_SPLIT = 0.25
#: Images rendered for the scene: new good parts for the update, new good and defective parts to
#: test on. Index offsets keep them apart from the demo's own images of the category.
N_UPDATE, N_TEST_GOOD, N_TEST_DEFECT = 15, 20, 15
_UPDATE_AT, _TEST_AT, _DEFECT_AT = 5000, 6000, 7000


def drifted(image: Image.Image, index: int) -> Image.Image:
    """The same part under the new lamp and finish: warmer and brighter light that falls off
    from left to right (0.85-1.15), and a fine turning pattern on the surface."""
    pixels = np.asarray(image, dtype=np.float64) / 255
    h, w = pixels.shape[:2]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    falloff = 1.15 - 0.3 * x
    lamp = np.array([1.18, 1.06, 0.86])  # warmer
    rings = 0.04 * np.sin(2 * np.pi * np.hypot(y - 0.5, x - 0.5) * 40 + index)
    out = pixels * falloff[..., None] * lamp + rings[..., None]
    return Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))


def write_scene(root: str | os.PathLike[str], *, size: int, seed: int = 0) -> Path:
    """Render the new-appearance images under ``root``: ``update/`` (good, for the update),
    ``test/good/`` and ``test/<defect>/`` (with ``ground_truth``, MVTec layout). Returns root."""
    root = Path(root)
    kinds = CATEGORY_DEFECTS["part"]
    jobs: list[tuple[Path, int, str | None]] = []
    jobs += [(root / "update" / f"{i:03d}.png", _UPDATE_AT + i, None) for i in range(N_UPDATE)]
    good = root / "test" / "good"
    jobs += [(good / f"{i:03d}.png", _TEST_AT + i, None) for i in range(N_TEST_GOOD)]
    for i in range(N_TEST_DEFECT):
        kind = kinds[i % len(kinds)]
        jobs.append((root / "test" / kind / f"{i:03d}.png", _DEFECT_AT + i, kind))
    for path, index, defect in jobs:
        image, mask = render("part", index, defect, size=size, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        drifted(image, index).save(path)
        if defect is not None:
            gt = root / "ground_truth" / defect / f"{path.stem}_mask.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt)
    return root


@dataclass(frozen=True)
class DriftRow:
    """One model's figures before and after the update (rates in [0, 1])."""

    method: str
    new_good_false_alarms_before: float
    new_good_false_alarms_after: float
    new_defect_recall_before: float
    new_defect_recall_after: float
    old_good_false_alarms_before: float
    old_good_false_alarms_after: float
    update: dict[str, Any]


def _anomalous(model: Any, images: list[Path]) -> float:
    return float(np.mean(model.predict(images).decisions))


def drift_experiment(
    train: Path, scene: Path, old_good: list[Path], settings: dict[str, Any]
) -> list[DriftRow]:
    """Fit each method on ``train`` (good parts of the old appearance; a quarter held out for
    the thresholds), score the scene, update the model with ``scene/update``, score again."""
    from patchad.detectors import DETECTORS

    new_good = sorted((scene / "test" / "good").glob("*.png"))
    new_defect = sorted(p for p in (scene / "test").rglob("*.png") if p.parent.name != "good")
    update = sorted((scene / "update").glob("*.png"))
    rows = []
    for method, cls in DETECTORS.items():
        own = {k: v for k, v in settings.items() if k in cls.param_names()}
        det = cls(**{**own, "calibration_split": CALIBRATION_SPLIT}).fit(train)
        before = [_anomalous(det, s) for s in (new_good, new_defect, old_good)]
        det.update(update)
        after = [_anomalous(det, s) for s in (new_good, new_defect, old_good)]
        report = det.last_update_
        rows.append(
            DriftRow(
                method,
                before[0],
                after[0],
                before[1],
                after[1],
                before[2],
                after[2],
                {
                    "images": report.images,
                    "calibration_images": report.calibration_images,
                    "added": report.added,
                    "seconds": round(report.seconds, 2),
                    "calibration": report.calibration,
                },
            )
        )
    return rows


def drift_markdown(rows: list[DriftRow], *, n_update: int) -> str:
    """The scene's section of ``results.md``, every figure from ``rows``."""
    lines = [
        "## After deployment: new lamp, new finish (`patchad update`)",
        "",
        f"The `part` flange photographed under a warmer lamp that falls off across the field, on "
        f"a finer surface finish (`patchad/demo_drift.py`). Each method, fitted on the "
        f"category's good parts of the old look ({CALIBRATION_SPLIT:.0%} held out for its "
        f"thresholds, fpr 0.01), scores {N_TEST_GOOD} new good parts and {N_TEST_DEFECT} new "
        "defective ones, then is updated "
        f"with {n_update} other new good parts ({CALIBRATION_SPLIT:.0%} of them held out for "
        "its thresholds), without a refit, and scores them again. Rates at each model's "
        "calibrated threshold:",
        "",
        "| method | false alarms, new good | defect recall, new look | false alarms, old good "
        "| what the update added |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        added = ", ".join(f"{k} {v}" for k, v in r.update["added"].items())
        lines.append(
            f"| {r.method} | {r.new_good_false_alarms_before:.0%} -> "
            f"{r.new_good_false_alarms_after:.0%} | {r.new_defect_recall_before:.0%} -> "
            f"{r.new_defect_recall_after:.0%} | {r.old_good_false_alarms_before:.0%} -> "
            f"{r.old_good_false_alarms_after:.0%} | {added} |"
        )
    lines.append("")
    for r in rows:
        lines.append(f"- {r.method}: {_sentence(r)}")
    lines.append("")
    return "\n".join(lines)


def _sentence(r: DriftRow) -> str:
    fell = r.new_good_false_alarms_after < r.new_good_false_alarms_before
    held = r.new_defect_recall_after >= r.new_defect_recall_before - 1e-9
    first = (
        f"false alarms on new good parts fell from {r.new_good_false_alarms_before:.0%} to "
        f"{r.new_good_false_alarms_after:.0%}"
        if fell
        else f"false alarms on new good parts did not fall ({r.new_good_false_alarms_before:.0%}"
        f" -> {r.new_good_false_alarms_after:.0%})"
    )
    second = (
        f"defect recall on the new look held ({r.new_defect_recall_before:.0%} -> "
        f"{r.new_defect_recall_after:.0%})"
        if held
        else f"defect recall on the new look dropped ({r.new_defect_recall_before:.0%} -> "
        f"{r.new_defect_recall_after:.0%})"
    )
    return f"{first}; {second}; thresholds: {r.update['calibration']}."


def run_drift_demo(out: Path, settings: dict[str, Any], *, size: int) -> str:
    """Render the scene under ``out/drift``, run the experiment on the demo's ``part`` category
    (``out/data/part``) with ``settings``, write ``out/drift/results.json`` and return the
    Markdown section."""
    scene = write_scene(out / "drift", size=size)
    part = out / "data" / "part"
    old_good = sorted((part / "test" / "good").glob("*.png"))
    rows = drift_experiment(part / "train" / "good", scene, old_good, settings)
    write_text_atomic(
        scene / "results.json",
        json.dumps([asdict(r) for r in rows], indent=2) + "\n",
        force=True,
    )
    return drift_markdown(rows, n_update=N_UPDATE)
