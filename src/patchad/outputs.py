"""The files ``patchad predict`` writes, as a library function every front end calls.

An output folder holds:

- ``scores.csv``: ``path,score``, one row per scored image in input order. Scores are written
  round-trip exact (``repr`` of the float32 score as a float64), so comparing them with the
  model's stored ``image_threshold`` gives exactly the model's own decisions.
- ``results.jsonl``: one :func:`patchad.prediction.result_record` per image.
- ``maps/<name>.npy``: the float32 anomaly map at the image's original size.
- ``overlays/<name>.png``: the heat map over the image, on one fixed colour scale for the run.
- ``masks/<name>.png``: the defect mask (0/255), when the model is calibrated.

``outputs`` (``--outputs``) chooses which of these are written (:data:`OUTPUTS`; default all).
Every file is written atomically, by a small pool of writer threads that runs while the next
batch is scored (:class:`WriterPool`): numpy, zlib and the file writes release the GIL, so the
files cost little next to scoring. Torch-free.
"""

from __future__ import annotations

import collections
import csv
import functools
import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from patchad.atomic import save_npy_atomic, write_png_atomic, write_text_atomic
from patchad.errors import PatchadError
from patchad.png import CORES
from patchad.prediction import Prediction

#: What ``outputs`` (``patchad predict --outputs``) chooses from: ``scores.csv``,
#: ``results.jsonl``, ``maps/``, ``overlays/``, ``masks/`` (masks only when calibrated).
OUTPUTS = ("scores", "jsonl", "maps", "overlays", "masks")

#: Writer threads by default: one per core this process may use, at most 4 (the encoders are
#: CPU-bound; more threads only contend with scoring).
DEFAULT_WRITERS = CORES


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


def parse_outputs(value: str | Iterable[str] | None) -> frozenset[str]:
    """The outputs chosen by ``value``: a comma-separated text (``"scores,maps"``) or names;
    None means every one of :data:`OUTPUTS`.

    Raises:
        PatchadError: an unknown name, or none at all (the message lists the valid ones).
    """
    if value is None:
        return frozenset(OUTPUTS)
    names = value.split(",") if isinstance(value, str) else list(value)
    chosen = [n.strip() for n in names if n.strip()]
    unknown = [n for n in chosen if n not in OUTPUTS]
    if unknown or not chosen:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "nothing chosen"
        raise PatchadError(f"--outputs: {what}; choose from {','.join(OUTPUTS)}")
    return frozenset(chosen)


class WriterPool:
    """Writes files in a few threads while the caller goes on (with scoring, in ``predict``).

    The caller submits one *entry* at a time: a list of jobs (functions of no argument) and a
    function to call once they are all done. Those functions are called in the caller's thread,
    in submission order, so progress bars and journals see the entries finish in order. At most
    ``max_pending`` jobs of earlier entries wait or run at any time (the caller blocks on the
    oldest entry beyond that), so memory stays bounded however fast the caller produces.

    The first job that raises stops the pool: the jobs not started are cancelled, those running
    finish (every write is atomic, so no partial file is left), and the error is raised in the
    caller's thread at its next :meth:`submit` or :meth:`finish`. Use it as a context manager.
    """

    def __init__(self, workers: int = DEFAULT_WRITERS, max_pending: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="patchad-writer")
        self._max_pending = max_pending if max_pending is not None else 8 * max(1, workers)
        self._entries: collections.deque[tuple[list[Future[Any]], Callable[[], None] | None]]
        self._entries = collections.deque()
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def submit(
        self, jobs: Sequence[Callable[[], Any]], done: Callable[[], None] | None = None
    ) -> list[Future[Any]]:
        """Queue ``jobs``; ``done`` is called (in this thread) once they and every earlier entry
        are done. Returns their futures; waits while earlier entries hold too many jobs."""
        self._raise_if_failed()
        futures = [self._pool.submit(job) for job in jobs]
        for future in futures:
            future.add_done_callback(self._note)
        self._entries.append((futures, done))
        self._retire_finished()
        while len(self._entries) > 1 and self._pending(len(self._entries) - 1) > self._max_pending:
            self._retire_oldest()
        return futures

    def finish(self) -> None:
        """Wait for every job; call the remaining ``done`` functions; raise the first error."""
        while self._entries:
            self._retire_oldest()
        self._raise_if_failed()

    def __enter__(self) -> WriterPool:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _note(self, future: Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            with self._lock:
                if self._error is None:
                    self._error = future.exception()

    def _raise_if_failed(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            for futures, _ in self._entries:
                for future in futures:
                    future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._entries.clear()
            raise error

    def _pending(self, entries: int) -> int:
        return sum(
            1 for futures, _ in list(self._entries)[:entries] for f in futures if not f.done()
        )

    def _retire_finished(self) -> None:
        while self._entries and all(f.done() for f in self._entries[0][0]):
            self._retire_oldest()

    def _retire_oldest(self) -> None:
        futures, done = self._entries[0]
        for future in futures:
            try:
                future.result()
            except BaseException as exc:  # raised below: the first error of any job
                with self._lock:
                    self._error = self._error or exc
                break
        self._raise_if_failed()
        self._entries.popleft()
        if done is not None:
            done()


def wants_images(outputs: str | Iterable[str] | None, pixel_threshold: float | None) -> bool:
    """Whether :func:`write_predictions` draws overlays with each batch, so that the parts
    should carry their decoded images (``iter_predict(..., keep_images=True)``)."""
    fixed_scale = pixel_threshold is not None and pixel_threshold > 0
    return "overlays" in parse_outputs(outputs) and fixed_scale


def write_predictions(
    parts: Iterable[Prediction],
    paths: Sequence[Path],
    out: Path,
    *,
    sources: Sequence[str] | None = None,
    pixel_threshold: float | None = None,
    images: Mapping[str, Any] | None = None,
    on_progress: Callable[[int], None] | None = None,
    outputs: str | Iterable[str] | None = None,
    writers: int = DEFAULT_WRITERS,
    on_written: Callable[[Prediction], None] | None = None,
) -> WrittenOutputs:
    """Stream predictions into the output folder ``out`` (which must already exist).

    The files of each batch are written by a :class:`WriterPool` while the next batch is scored;
    ``scores.csv`` and ``results.jsonl`` only once every batch is in, so a run that stops on a
    bad image leaves no partial CSV. The overlays of a calibrated model are written with the
    rest of their batch, over the decoded images the parts carry (``iter_predict(...,
    keep_images=True)``, see :func:`wants_images`) or else over the files read again; without
    calibration their colour scale is the run's map range, so they are written once every map
    is in, over the files read again (holding every image until then could take any amount
    of memory).

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
        on_progress: called with the number of images in each step whose files are written.
        outputs: which files to write (:func:`parse_outputs`); None = all of :data:`OUTPUTS`.
        writers: writer threads.
        on_written: called with each part once its files are written, in order.

    Raises:
        PatchadError: an image could not be scored (the message says how far the run got), or
            a file could not be written (the message names it); the run stops either way.
    """
    chosen = parse_outputs(outputs)
    todo: dict[str, list[str]] = {}
    for path, name in zip(paths, output_names(paths, sources), strict=True):
        todo.setdefault(str(path), []).append(name)
    rows: list[tuple[str, str, float]] = []  # (path, output name, score)
    records: list[Future[list[dict[str, Any]]]] = []
    flagged: int | None = None
    low, high = np.inf, -np.inf
    fixed_scale = pixel_threshold is not None and pixel_threshold > 0
    scale = overlay_scale(pixel_threshold, 0.0, 1.0)
    late_overlays = "overlays" in chosen and not fixed_scale  # the scale needs every map
    maps_dir = out / "maps"
    scratch = None
    if late_overlays and "maps" not in chosen:  # maps kept only until the overlays are drawn
        scratch = Path(tempfile.mkdtemp(prefix=".patchad-maps-", dir=out))
        maps_dir = scratch
    try:
        with WriterPool(writers) as pool:
            stream = iter(parts)
            while True:
                try:
                    part = next(stream)
                except StopIteration:
                    break
                except PatchadError as exc:
                    pool.finish()  # the batches scored before it are written
                    where = f" (maps in {out / 'maps'})" if "maps" in chosen else ""
                    raise PatchadError(
                        f"{exc}; stopped: {len(rows)} of {len(paths)} images scored{where}, "
                        f"{len(paths) - len(rows)} not scored, no scores.csv written "
                        "(use --skip-bad to skip unreadable images)"
                    ) from None
                jobs: list[Callable[[], Any]] = []
                for i, path_str in enumerate(part.names):
                    name = todo[path_str].pop(0)
                    amap = part.maps[i]
                    rows.append((path_str, name, float(part.scores[i])))
                    if late_overlays:
                        low, high = min(low, float(amap.min())), max(high, float(amap.max()))
                    if "maps" in chosen or scratch is not None:
                        save = _write_map if scratch is None else _save_scratch
                        jobs.append(functools.partial(save, maps_dir / f"{name}.npy", amap))
                    if "masks" in chosen and part.masks is not None:
                        mask = part.masks[i]
                        jobs.append(functools.partial(_write_mask, out, name, mask))
                    if "overlays" in chosen and fixed_scale:
                        kept = part.images[i] if part.images is not None else None
                        source = kept if kept is not None else _source(path_str, images)
                        jobs.append(
                            functools.partial(_write_overlay, out, name, source, amap, scale)
                        )
                if part.decisions is not None:
                    flagged = (flagged or 0) + int(np.count_nonzero(part.decisions))
                if "jsonl" in chosen:
                    jobs.append(part.records)
                futures = pool.submit(
                    jobs, functools.partial(_written, part, on_progress, on_written)
                )
                if "jsonl" in chosen:
                    records.append(futures[-1])
            if late_overlays:
                pool.finish()  # every map is on disk before an overlay reads it
                scale = overlay_scale(pixel_threshold, low, high)
                for path_str, name, _ in rows:
                    amap_file = maps_dir / f"{name}.npy"
                    source = _source(path_str, images)
                    pool.submit(
                        [functools.partial(_write_overlay, out, name, source, amap_file, scale)]
                    )
            pool.finish()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if "scores" in chosen:
        write_text_atomic(out / "scores.csv", scores_csv((p, s) for p, _, s in rows))
    if "jsonl" in chosen:
        lines = [json.dumps(r) + "\n" for future in records for r in future.result()]
        write_text_atomic(out / "results.jsonl", "".join(lines))
    names = {"scores": "scores.csv", "jsonl": "results.jsonl", "maps": "maps/"}
    names.update(overlays="overlays/", masks="masks/")
    files = [names[o] for o in OUTPUTS if o in chosen and (o != "masks" or flagged is not None)]
    return WrittenOutputs(out=out, scored=len(rows), flagged=flagged, files=tuple(files))


def _written(
    part: Prediction,
    on_progress: Callable[[int], None] | None,
    on_written: Callable[[Prediction], None] | None,
) -> None:
    if on_written is not None:
        on_written(part)
    if on_progress is not None:
        on_progress(len(part.names))


def _source(path: str, images: Mapping[str, Any] | None) -> Any:
    """The image of an overlay: the in-memory one given for ``path``, else the file."""
    return images[path] if images is not None and path in images else path


def _write_map(path: Path, amap: np.ndarray) -> None:
    save_npy_atomic(path, amap.astype(np.float32))


def _save_scratch(path: Path, amap: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, amap.astype(np.float32))


def _write_mask(out: Path, name: str, mask: np.ndarray) -> None:
    write_png_atomic(out / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)


def _write_overlay(
    out: Path, name: str, source: Any, amap: np.ndarray | Path, scale: tuple[float, float]
) -> None:
    """``overlays/<name>.png``: the heat map of ``amap`` (or of the ``.npy`` file it names) over
    the image ``source`` (a path to read, a PIL image or a uint8 array)."""
    from PIL import Image

    from patchad.images import read_image
    from patchad.visualize import overlay

    if isinstance(amap, Path):
        amap = np.load(amap)
    if isinstance(source, Image.Image):
        picture = source
    elif isinstance(source, (str, os.PathLike)):
        picture = read_image(source)
    else:
        picture = Image.fromarray(np.asarray(source))
    write_png_atomic(out / "overlays" / f"{name}.png", overlay(picture, amap, *scale))


def write_overlays(
    rows: Sequence[tuple[str, str, float]],
    out: Path,
    scale: tuple[float, float],
    images: Mapping[str, Any] | None = None,
    *,
    writers: int = DEFAULT_WRITERS,
) -> None:
    """``overlays/<name>.png`` for each ``(path, name, score)`` row, from ``maps/<name>.npy``
    and the image (read again from ``path``, or taken from ``images``)."""
    with WriterPool(writers) as pool:
        for path, name, _ in rows:
            job = functools.partial(
                _write_overlay,
                out,
                name,
                _source(path, images),
                out / "maps" / f"{name}.npy",
                scale,
            )
            pool.submit([job])
        pool.finish()


def read_scores_csv(path: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """``(path, score)`` rows of a ``scores.csv``, scores as float64 (exactly as written)."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return [(row[0], float(row[1])) for row in reader]
