"""Benchmark: fit and evaluate each method on each category; write the files of the results
schema (``results.json``/``.csv``/``.md``, ``runs/``) after every finished row, atomically, so an
interrupted run never loses finished rows.

Peak memory (``peak_mem_mb``) is the largest resident set size of the process sampled every
20 ms from ``/proc/self/statm`` by a background thread while the row runs (fit + predict);
``ru_maxrss`` cannot be reset between rows and tracemalloc misses torch's allocations. Where
``/proc`` is absent it falls back to ``ru_maxrss`` (a process-wide peak).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchad.atomic import atomic_write_bytes, save_npz_atomic
from patchad.benchresults import COLUMNS, COSTS, METRICS, _fmt, expand, mean_rows, write_results
from patchad.datasets import TestSet, find_categories, load_category
from patchad.errors import PatchadError
from patchad.evaluate import Report, evaluate, rotate_pair, shift_pair
from patchad.testhold import hold
from patchad.thumbnails import THUMB, thumb_map, write_images_file

__all__ = [
    "COLUMNS",
    "CellResult",
    "RSSSampler",
    "git_sha",
    "mean_rows",
    "run_benchmark",
    "run_cell",
    "seed_plan",
    "write_results",
]


class RSSSampler:
    """Peak resident memory (MB) of this process between ``start`` and ``stop``."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def git_sha() -> str:
    """Short commit of the patchad source tree (``+dirty`` if modified), or ``"unknown"``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------- files


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=False).encode(), force=True)


# ---------------------------------------------------------------------- main loop


def _row(
    method: str,
    test_set: TestSet,
    variant: str,
    report: Report,
    *,
    fit_s: float,
    peak_mb: float,
    model_mb: float,
    config: dict[str, Any],
    sha: str,
) -> dict[str, Any]:
    return {
        "method": method,
        "category": test_set.name,
        "variant": variant,
        "image_auroc": report.image_auroc,
        "pixel_auroc": report.pixel_auroc,
        "aupro": report.aupro,
        "f1_max": report.f1_max,
        "fit_s": fit_s,
        "ms_per_image": report.ms_per_image,
        "peak_mem_mb": peak_mb,
        "model_mb": model_mb,
        "n_train": len(test_set.train),
        "n_test": report.n_test,
        "config": config,
        "per_type": report.per_type,
        "git_sha": sha,
        **({} if report.intervals is None else {"intervals": report.intervals}),
        **({} if report.intervals is None else {"intervals_s": report.intervals_s}),
    }


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


@dataclass
class CellResult:
    """What one (category, method) cell computed: its rows (``original`` first, then the
    ``--shift-test`` variants, which reuse the same fit) and its files' contents, which only the
    driver writes (``models/<method>__<category>.safetensors``, ``runs/<method>/<category>/``)."""

    rows: list[dict[str, Any]]
    arrays: dict[str, np.ndarray]
    curves: dict[str, Any]
    model: bytes


def run_cell(
    test_set: TestSet,
    method: str,
    settings: dict[str, Any],
    *,
    shift_test: int | None = None,
    test_scales: Sequence[int | str] = (),
    save_maps: str | os.PathLike[str] | None = None,
    sha: str = "unknown",
    progress: bool = False,
    seed: int | None = None,
    intervals: bool = True,
) -> CellResult:
    """Fit ``method`` on ``test_set``'s training images and evaluate it: one benchmark cell.

    Writes nothing under the benchmark's ``--out`` (only ``save_maps``, when given), so that the
    same function runs in the local loop and in a Ray task (:mod:`patchad.cluster`).

    Args:
        test_set: from :func:`patchad.datasets.load_category`.
        method: a name in :data:`patchad.detectors.DETECTORS`.
        settings: its constructor arguments.
        shift_test: also evaluate on test images shifted by N px and rotated by N degrees.
        test_scales: also evaluate the fitted model at each of these ``image_size`` values
            (:meth:`~patchad.detectors.Detector.rescaled`: trained at one scale, tested at
            another; variant ``scale<size>``), for the methods that allow it (not PaDiM).
        save_maps: write ``<save_maps>/<method>/<category>/...`` (see :func:`evaluate`).
        sha: recorded in every row.
        seed: overrides ``settings["seed"]`` and is recorded in every row as ``seed`` (one
            draw of a ``--seeds N`` run); None: the settings' seed, no ``seed`` key.
        intervals: add the 95 % bootstrap ``intervals`` over the test images to each row
            (:mod:`patchad.bootstrap`) and their cost, ``intervals_s``.
    """
    import tempfile

    from patchad.detectors import DETECTORS

    if seed is not None:
        settings = {**settings, "seed": seed}
    detector = DETECTORS[method](**settings)
    n = len(test_set.samples)
    hold("benchmark-cell")  # tests only: a (Ray) worker holds a cell it started
    with RSSSampler() as sampler:
        t0 = time.perf_counter()
        detector.fit(list(test_set.train), progress=progress)
        fit_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="patchad-cell-") as tmp:
            model_file = Path(tmp) / "model.safetensors"
            detector.save(model_file, force=True)
            model = model_file.read_bytes()
        model_mb = len(model) / 2**20
        thumbs = np.zeros((n, THUMB, THUMB), dtype=np.float16)

        def keep(i, s, score, amap, mask, image, thumbs=thumbs):
            thumbs[i] = thumb_map(amap)

        maps_dir = None
        if save_maps is not None:
            maps_dir = Path(save_maps) / method / test_set.name
        report = evaluate(
            detector,
            test_set,
            save_maps=maps_dir,
            on_map=keep,
            progress=progress,
            intervals=intervals,
        )
    config = _jsonable(detector.get_params())
    costs = {"fit_s": fit_s, "model_mb": model_mb, "config": config, "sha": sha}
    rows = [_row(method, test_set, "original", report, peak_mb=sampler.peak_mb, **costs)]
    arrays: dict[str, np.ndarray] = {
        "scores": report.scores,
        "thumbs": thumbs,
        "map_min": np.float32(report.map_min),
        "map_max": np.float32(report.map_max),
    }
    curves = {
        "roc": {"fpr": report.roc[0], "tpr": report.roc[1]},
        "pro": {"fpr": report.pro[0], "pro": report.pro[1]},
    }
    extra: list[tuple[str, Any, Any]] = []  # (variant, detector, transform)
    if shift_test is not None:
        extra += [("shift", detector, shift_pair(shift_test))]
        extra += [("rotate", detector, rotate_pair(shift_test))]
    if detector.any_input_size:
        extra += [(f"scale{size}", detector.rescaled(size), None) for size in test_scales]
    for variant, scorer, fn in extra:
        vthumbs = np.zeros((n, THUMB, THUMB), dtype=np.float16)

        def keep_v(i, s, score, amap, mask, image, vthumbs=vthumbs):
            vthumbs[i] = thumb_map(amap)

        with RSSSampler() as vs:
            vreport = evaluate(
                scorer,
                test_set,
                transform=fn,
                on_map=keep_v,
                progress=progress,
                intervals=intervals,
            )
        peak = max(vs.peak_mb, sampler.peak_mb)
        rows.append(_row(method, test_set, variant, vreport, peak_mb=peak, **costs))
        arrays[f"scores_{variant}"] = vreport.scores
        arrays[f"thumbs_{variant}"] = vthumbs
    if seed is not None:
        for row in rows:
            row["seed"] = seed
    return CellResult(rows=rows, arrays=arrays, curves=curves, model=model)


def variants(
    shift_test: int | None, test_scales: Sequence[int | str] = (), method: str = ""
) -> tuple[str, ...]:
    """The variants a cell of ``method`` evaluates."""
    from patchad.detectors import DETECTORS

    shifted = () if shift_test is None else ("shift", "rotate")
    scalable = method not in DETECTORS or DETECTORS[method].any_input_size
    return ("original", *shifted, *(f"scale{s}" for s in test_scales if scalable))


def failed_rows(
    test_set: TestSet,
    method: str,
    settings: dict[str, Any],
    *,
    shift_test: int | None,
    sha: str,
    error: str,
    test_scales: Sequence[int | str] = (),
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """The rows of a cell that failed: every metric and cost None, ``error`` the reason. Mean
    rows leave them out, and ``--resume`` runs the cell again."""
    rows = [
        {
            "method": method,
            "category": test_set.name,
            "variant": variant,
            **dict.fromkeys((*METRICS, *COSTS)),
            "n_train": len(test_set.train),
            "n_test": 0,
            "config": _jsonable(settings),
            "per_type": {},
            "git_sha": sha,
            "error": error,
        }
        for variant in variants(shift_test, test_scales, method)
    ]
    if seed is not None:
        for row in rows:
            row["seed"] = seed
    return rows


def write_cell(
    out: Path, method: str, category: str, result: CellResult, seed_dir: str | None = None
) -> None:
    """Write a cell's model and ``runs/<method>/<category>/`` files (the driver's job); the
    further seeds of a ``--seeds N`` run write only ``runs/<method>/<category>/<seed_dir>/``
    (predictions and curves, no model)."""
    run_dir = out / "runs" / method / category
    if seed_dir is None:
        model = out / "models" / f"{method}__{category}.safetensors"
        atomic_write_bytes(model, result.model, force=True)
    else:
        run_dir = run_dir / seed_dir
    save_npz_atomic(run_dir / "predictions.npz", result.arrays)
    _write_json(run_dir / "curves.json", result.curves)


#: A cell: the category's test set, the method and the seed (None: the settings' own, in a
#: single-seed run or for a method that draws nothing at random).
Cell = tuple[TestSet, str, int | None]
#: Runs cells and yields each with its result, or with the failure's message (a string); the
#: local one runs them in order here and lets errors propagate.
CellRunner = Callable[[list[Cell]], Iterator[tuple[Cell, "CellResult | str"]]]


def local_runner(
    settings: dict[str, dict[str, Any]],
    *,
    shift_test: int | None,
    save_maps: str | os.PathLike[str] | None,
    sha: str,
    progress: bool,
    say: Callable[[str], None],
    test_scales: Sequence[int | str] = (),
    intervals: bool = True,
) -> CellRunner:
    """The default :data:`CellRunner`: :func:`run_cell` for each cell, in this process."""

    def run(cells: list[Cell]) -> Iterator[tuple[Cell, CellResult | str]]:
        for test_set, method, seed in cells:
            at = "" if seed is None else f" (seed {seed})"
            say(f"{method} on {test_set.name}{at}: fit on {len(test_set.train)} images")
            result = run_cell(
                test_set,
                method,
                settings.get(method, {}),
                shift_test=shift_test,
                test_scales=test_scales,
                save_maps=save_maps,
                sha=sha,
                progress=progress,
                seed=seed,
                intervals=intervals,
            )
            yield (test_set, method, seed), result

    return run


def seed_plan(method: str, settings: dict[str, Any], seeds: int) -> list[int | None]:
    """The seeds a cell of ``method`` runs with, for ``--seeds`` = ``seeds``: ``[None]`` (the
    settings' own seed, rows as in a single-seed run) when ``seeds`` is 1; ``[None]`` too when
    the method draws nothing at random for these settings (:attr:`Detector.uses_seed`, e.g.
    SPADE, or PaDiM keeping every channel): it runs once and its rows say ``seeded`` False;
    else ``seed, seed + 1, ..., seed + seeds - 1`` from the settings' ``seed`` (default 0)."""
    from patchad.detectors import DETECTORS

    if seeds <= 1 or not DETECTORS[method](**settings).uses_seed:
        return [None]
    base = int(settings.get("seed", 0))
    return [base + k for k in range(seeds)]


def _mark(rows: list[dict[str, Any]], seed: int | None, seeds: int) -> list[dict[str, Any]]:
    """Give rows of a ``--seeds N`` > 1 run their ``seed`` key (None and ``seeded`` False for a
    cell that runs once)."""
    if seeds > 1 and seed is None:
        for row in rows:
            row["seed"] = None
            row["seeded"] = False
    return rows


def run_benchmark(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    methods: Sequence[str],
    settings: dict[str, dict[str, Any]],
    categories: Sequence[str] | None = None,
    save_maps: str | os.PathLike[str] | None = None,
    resume: bool = False,
    shift_test: int | None = None,
    test_scales: Sequence[int | str] = (),
    allow_missing_masks: bool = False,
    command: str = "",
    progress: bool = False,
    say: Callable[[str], None] = print,
    runner: Callable[..., CellRunner] | None = None,
    seeds: int = 1,
    intervals: bool = True,
) -> list[dict[str, Any]]:
    """Fit and evaluate each method on each category; return all rows (means included).

    Args:
        data: a category folder or a root of categories.
        out: output folder (must exist).
        methods: names in :data:`patchad.detectors.DETECTORS`.
        settings: constructor arguments per method.
        categories: subset of category names (default: all found).
        save_maps: write ``<save_maps>/<method>/<category>/<type>/<name>.npy`` and ``scores.csv``.
        resume: keep the rows of an existing ``results.json`` and skip finished (method,
            category) pairs (failed ones run again).
        shift_test: also evaluate on test images shifted by N px and rotated by N degrees.
        test_scales: also evaluate each fitted model at these ``image_size`` values (see
            :func:`run_cell`).
        allow_missing_masks: see :func:`patchad.datasets.load_category`.
        command: the command line, recorded in ``meta``.
        runner: makes the :data:`CellRunner`, called with the keyword arguments of
            :func:`local_runner` (default: :func:`local_runner`; :func:`patchad.cluster.
            ray_runner` runs the cells as Ray tasks). Whatever runs the cells, this process
            alone writes ``out``, after each finished cell.
        seeds: fit each (method, category) this many times with different seeds
            (:func:`seed_plan`; each is a cell of its own); the results' rows hold the mean,
            min and max over the seeds and the per-seed rows (:mod:`patchad.benchresults`).
        intervals: add bootstrap intervals to each row (see :func:`run_cell`).
    """
    if seeds < 1:
        raise PatchadError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    folders = find_categories(data)
    if categories:
        by_name = {f.name: f for f in folders}
        unknown = [c for c in categories if c not in by_name]
        if unknown:
            raise PatchadError(
                f"{data}: no category {', '.join(unknown)} (found: {', '.join(by_name)})"
            )
        folders = [by_name[c] for c in categories]
    sha = git_sha()
    rows: list[dict[str, Any]] = []
    results = out / "results.json"
    if resume and results.exists():
        try:
            rows = expand(json.loads(results.read_text())["rows"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PatchadError(f"{results}: not a readable results file ({exc})") from None
    meta = {
        "git_sha": sha,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "data": str(data),
        "shift_test": shift_test,
        "test_scales": list(test_scales),
        "seeds": seeds,
    }
    done = {
        (r["method"], r["category"], r.get("seed"))
        for r in rows
        if r["variant"] == "original" and not r.get("error")
    }
    plans = {m: seed_plan(m, settings.get(m, {}), seeds) for m in methods}
    cells: list[Cell] = []
    for folder in folders:
        test_set = load_category(folder, allow_missing_masks=allow_missing_masks)
        todo = [
            (test_set, m, s) for m in methods for s in plans[m] if (m, test_set.name, s) not in done
        ]
        if not todo:
            say(f"{test_set.name}: all methods done, skipped (--resume)")
        cells.extend(todo)
    make = local_runner if runner is None else runner
    run = make(
        settings,
        shift_test=shift_test,
        test_scales=tuple(test_scales),
        save_maps=save_maps,
        sha=sha,
        progress=progress,
        say=say,
        intervals=intervals,
    )
    finished = run(cells)  # a remote runner has submitted every cell by now
    for test_set in {id(t): t for t, _, _ in cells}.values():
        write_images_file(out / "runs" / "_images" / f"{test_set.name}.npz", test_set, shift_test)
    for (test_set, method, seed), result in finished:
        if isinstance(result, str):
            new_rows = failed_rows(
                test_set,
                method,
                settings.get(method, {}),
                shift_test=shift_test,
                sha=sha,
                error=result,
                test_scales=test_scales,
                seed=seed,
            )
            say(f"{method} on {test_set.name}: FAILED ({result})")
        else:
            first = seed is None or seed == plans[method][0]
            write_cell(out, method, test_set.name, result, None if first else f"seed{seed}")
            new_rows = result.rows
        new_rows = _mark(new_rows, seed, seeds)
        key = (method, test_set.name, seed)
        rows = [r for r in rows if (r["method"], r["category"], r.get("seed")) != key]
        rows.extend(new_rows)
        write_results(out, rows, meta)
        if isinstance(result, str):
            continue
        r = new_rows[0]
        at = "" if seed is None else f" (seed {seed})"
        say(
            f"{method} on {test_set.name}{at}: image AUROC {_fmt(r['image_auroc']) or 'n/a'}, "
            f"pixel AUROC {_fmt(r['pixel_auroc']) or 'n/a'}, AU-PRO "
            f"{_fmt(r['aupro']) or 'n/a'} (fit {r['fit_s']:.1f} s, "
            f"{r['ms_per_image']:.0f} ms/img)"
        )
    write_results(out, rows, meta)
    return json.loads(results.read_text())["rows"]
