"""The files ``patchad predict`` writes, as a library function every front end calls.

An output folder holds:

- ``scores.csv``: ``path,score``, one row per scored image in input order. Scores are written
  round-trip exact (``repr`` of the float32 score as a float64), so comparing them with the
  model's stored ``image_threshold`` gives exactly the model's own decisions.
- ``results.jsonl``: one :func:`patchad.prediction.result_record` per image.
- ``maps/<name>.npy``: the float32 anomaly map at the image's original size.
- ``overlays/<name>.png``: the heat map over the image, on one fixed colour scale for the run.
- ``masks/<name>.png``: the defect mask (0/255), when the model is calibrated.

Every file is written atomically. Torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchad.atomic import save_npy_atomic, write_png_atomic, write_text_atomic
from patchad.errors import PatchadError
from patchad.prediction import Prediction


@dataclass(frozen=True)
class WrittenOutputs:
    """What :func:`write_predictions` wrote.

    Attributes:
        out: the output folder.
        scored: number of images scored and written.
        flagged: number of images decided anomalous; None when the model is not calibrated.
        files: the files and folders written, for a closing message.
    """

    out: Path
    scored: int
    flagged: int | None
    files: tuple[str, ...]


def output_names(paths: Sequence[Path], sources: Sequence[str] | None = None) -> list[str]:
    """Unique output names: the path relative to the folder it was found in, without suffix
    (``broken_large/000``), or the file's stem; clashes get ``-1``, ``-2``... appended."""
    names, used = [], set()
    for path in paths:
        name = path.stem
        for source in sources or ():
            src = Path(source)
            if src.is_dir():
                try:
                    name = path.relative_to(src).with_suffix("").as_posix()
                    break
                except ValueError:
                    continue
        base, n = name, 0
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        names.append(name)
    return names


def format_score(score: float) -> str:
    """A score as ``scores.csv`` writes it: the shortest text that parses back to the same
    float64 (and so to the same float32) value."""
    return repr(float(score))


def scores_csv(rows: Iterable[tuple[str, float]]) -> str:
    """The text of ``scores.csv`` from ``(path, score)`` rows."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows((path, format_score(score)) for path, score in rows)
    return text.getvalue()


def overlay_scale(pixel_threshold: float | None, low: float, high: float) -> tuple[float, float]:
    """The overlays' colour scale: anchored on the pixel threshold when the model is calibrated
    (it sits mid-scale, so one colour means one score in every run and image; red = 1.5x the
    threshold or more), else the run's map range ``[low, high]``."""
    if pixel_threshold is not None and pixel_threshold > 0:
        return 0.5 * pixel_threshold, 1.5 * pixel_threshold
    return low, high


def write_predictions(
    parts: Iterable[Prediction],
    paths: Sequence[Path],
    out: Path,
    *,
    sources: Sequence[str] | None = None,
    pixel_threshold: float | None = None,
    images: Mapping[str, Any] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> WrittenOutputs:
    """Stream predictions into the output folder ``out`` (which must already exist).

    Maps and masks are written as each batch arrives; ``scores.csv`` and ``results.jsonl``
    only once every batch is in, so a run that stops on a bad image leaves no partial CSV.

    Args:
        parts: predictions, in the order of ``paths`` (images skipped as unreadable may be
            missing); each ``names[i]`` is the path as a string.
        paths: every input path, in order; the output names are derived from them.
        out: output folder.
        sources: the files and folders the user named, to derive the output names
            (``broken_large/000``); see :func:`output_names`.
        pixel_threshold: the model's pixel threshold when it is calibrated, for the overlays'
            colour scale.
        images: the image for each name, when names are not readable files (in-memory images).
        on_progress: called with the number of images in each finished step.

    Raises:
        PatchadError: an image could not be scored; the message says how far the run got.
    """
    todo: dict[str, list[str]] = {}
    for path, name in zip(paths, output_names(paths, sources), strict=True):
        todo.setdefault(str(path), []).append(name)
    rows: list[tuple[str, str, float]] = []  # (path, output name, score)
    records: list[dict[str, Any]] = []
    low, high = np.inf, -np.inf
    try:
        for part in parts:
            for i, record in enumerate(part.records()):
                path_str = part.names[i]
                name = todo[path_str].pop(0)
                amap = part.maps[i]
                save_npy_atomic(out / "maps" / f"{name}.npy", amap.astype(np.float32))
                rows.append((path_str, name, float(part.scores[i])))
                low, high = min(low, float(amap.min())), max(high, float(amap.max()))
                if part.masks is not None:
                    write_png_atomic(
                        out / "masks" / f"{name}.png", part.masks[i].astype(np.uint8) * 255
                    )
                records.append(record)
            if on_progress is not None:
                on_progress(len(part.names))
    except PatchadError as exc:
        raise PatchadError(
            f"{exc}; stopped: {len(rows)} of {len(paths)} images scored (maps in {out / 'maps'}), "
            f"{len(paths) - len(rows)} not scored, no scores.csv written "
            "(use --skip-bad to skip unreadable images)"
        ) from None
    write_text_atomic(out / "scores.csv", scores_csv((p, s) for p, _, s in rows))
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_overlays(rows, out, overlay_scale(pixel_threshold, low, high), images)
    files = ["scores.csv", "results.jsonl", "maps/", "overlays/"]
    flagged = None
    if records and records[0]["anomalous"] is not None:
        files.append("masks/")
        flagged = sum(bool(r["anomalous"]) for r in records)
    return WrittenOutputs(out=out, scored=len(rows), flagged=flagged, files=tuple(files))


def write_overlays(
    rows: Sequence[tuple[str, str, float]],
    out: Path,
    scale: tuple[float, float],
    images: Mapping[str, Any] | None = None,
) -> None:
    """``overlays/<name>.png`` for each ``(path, name, score)`` row, from ``maps/<name>.npy``
    and the image (read again from ``path``, or taken from ``images``)."""
    from PIL import Image

    from patchad.images import read_image
    from patchad.visualize import overlay

    for path, name, _ in rows:
        amap = np.load(out / "maps" / f"{name}.npy")
        if images is not None and path in images:
            source = images[path]
            picture = source if isinstance(source, Image.Image) else Image.fromarray(source)
        else:
            picture = read_image(path)
        write_png_atomic(out / "overlays" / f"{name}.png", overlay(picture, amap, *scale))


def read_scores_csv(path: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """``(path, score)`` rows of a ``scores.csv``, scores as float64 (exactly as written)."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return [(row[0], float(row[1])) for row in reader]
