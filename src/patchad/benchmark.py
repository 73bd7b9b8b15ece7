"""Benchmark: fit and evaluate each method on each category; write the files of the results
schema (``results.json``/``.csv``/``.md``, ``runs/``) after every finished row, atomically, so an
interrupted run never loses finished rows.

Peak memory (``peak_mem_mb``) is the largest resident set size of the process sampled every
20 ms from ``/proc/self/statm`` by a background thread while the row runs (fit + predict);
``ru_maxrss`` cannot be reset between rows and tracemalloc misses torch's allocations. Where
``/proc`` is absent it falls back to ``ru_maxrss`` (a process-wide peak).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
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
from patchad.datasets import TestSet, find_categories, load_category
from patchad.errors import PatchadError
from patchad.evaluate import Report, evaluate, rotate_pair, shift_pair
from patchad.testhold import hold
from patchad.thumbnails import THUMB, thumb_map, write_images_file

__all__ = ["CellResult", "RSSSampler", "git_sha", "run_benchmark", "run_cell"]

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
COSTS = ("fit_s", "ms_per_image", "peak_mem_mb", "model_mb")
COLUMNS = (
    "method",
    "category",
    "variant",
    *METRICS,
    *COSTS,
    "n_train",
    "n_test",
    "git_sha",
)


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


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``category="mean"`` row per (method, variant) over its category rows."""
    out = []
    keys = []
    for r in rows:
        if r.get("error"):
            continue
        if r["category"] != "mean" and (r["method"], r["variant"]) not in keys:
            keys.append((r["method"], r["variant"]))
    for method, variant in keys:
        group = [
            r
            for r in rows
            if r["method"] == method
            and r["variant"] == variant
            and r["category"] != "mean"
            and not r.get("error")
        ]
        row: dict[str, Any] = {"method": method, "category": "mean", "variant": variant}
        for key in (*METRICS, *COSTS):
            row[key] = _mean([r[key] for r in group])
        row["n_train"] = sum(r["n_train"] for r in group)
        row["n_test"] = sum(r["n_test"] for r in group)
        row["config"] = group[0]["config"]
        row["per_type"] = {}
        row["git_sha"] = group[0]["git_sha"]
        out.append(row)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_results(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Rewrite results.json/.csv/.md from the category rows (mean rows recomputed)."""
    body = [r for r in rows if r["category"] != "mean"]
    body.sort(key=lambda r: (r["variant"] != "original", r["variant"], r["category"], r["method"]))
    allrows = body + mean_rows(body)
    _write_json(out / "results.json", {"version": 1, "rows": allrows, "meta": meta})
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*COLUMNS, "config"])
    for r in allrows:
        writer.writerow([_fmt(r[c]) for c in COLUMNS] + [json.dumps(r["config"], sort_keys=True)])
    atomic_write_bytes(out / "results.csv", text.getvalue().encode(), force=True)
    md = [
        f"# patchad benchmark\n\n`{meta['command']}`\n\ngit {meta['git_sha']}, {meta['date']}, "
        f"data `{meta['data']}`. Best value per category and variant in **bold** (metrics: "
        "highest; costs: lowest). Timings are wall-clock on a shared machine.\n",
        "| " + " | ".join(COLUMNS[:-1]) + " |",
        "|" + "---|" * (len(COLUMNS) - 1),
    ]
    for r in allrows:
        peers = [
            p for p in allrows if p["category"] == r["category"] and p["variant"] == r["variant"]
        ]
        cells = []
        for c in COLUMNS[:-1]:
            cell = _fmt(r[c])
            if c in METRICS or c in COSTS:
                vals = [p[c] for p in peers if p[c] is not None]
                if len(peers) > 1 and r[c] is not None and vals:
                    best = max(vals) if c in METRICS else min(vals)
                    if r[c] == best:
                        cell = f"**{cell}**"
            cells.append(cell or "n/a")
        md.append("| " + " | ".join(cells) + " |")
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode(), force=True)


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
    """
    import tempfile

    from patchad.detectors import DETECTORS

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
        report = evaluate(detector, test_set, save_maps=maps_dir, on_map=keep, progress=progress)
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
            vreport = evaluate(scorer, test_set, transform=fn, on_map=keep_v, progress=progress)
        peak = max(vs.peak_mb, sampler.peak_mb)
        rows.append(_row(method, test_set, variant, vreport, peak_mb=peak, **costs))
        arrays[f"scores_{variant}"] = vreport.scores
        arrays[f"thumbs_{variant}"] = vthumbs
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
) -> list[dict[str, Any]]:
    """The rows of a cell that failed: every metric and cost None, ``error`` the reason. Mean
    rows leave them out, and ``--resume`` runs the cell again."""
    return [
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


def write_cell(out: Path, method: str, category: str, result: CellResult) -> None:
    """Write a cell's model and ``runs/<method>/<category>/`` files (the driver's job)."""
    model = out / "models" / f"{method}__{category}.safetensors"
    atomic_write_bytes(model, result.model, force=True)
    run_dir = out / "runs" / method / category
    save_npz_atomic(run_dir / "predictions.npz", result.arrays)
    _write_json(run_dir / "curves.json", result.curves)


#: A cell: the category's test set and the method.
Cell = tuple[TestSet, str]
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
) -> CellRunner:
    """The default :data:`CellRunner`: :func:`run_cell` for each cell, in this process."""

    def run(cells: list[Cell]) -> Iterator[tuple[Cell, CellResult | str]]:
        for test_set, method in cells:
            say(f"{method} on {test_set.name}: fit on {len(test_set.train)} images")
            result = run_cell(
                test_set,
                method,
                settings.get(method, {}),
                shift_test=shift_test,
                test_scales=test_scales,
                save_maps=save_maps,
                sha=sha,
                progress=progress,
            )
            yield (test_set, method), result

    return run


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
    """
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
            rows = [r for r in json.loads(results.read_text())["rows"] if r["category"] != "mean"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PatchadError(f"{results}: not a readable results file ({exc})") from None
    meta = {
        "git_sha": sha,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "data": str(data),
        "shift_test": shift_test,
        "test_scales": list(test_scales),
    }
    done = {
        (r["method"], r["category"])
        for r in rows
        if r["variant"] == "original" and not r.get("error")
    }
    cells: list[Cell] = []
    for folder in folders:
        test_set = load_category(folder, allow_missing_masks=allow_missing_masks)
        todo = [m for m in methods if (m, test_set.name) not in done]
        if not todo:
            say(f"{test_set.name}: all methods done, skipped (--resume)")
        cells.extend((test_set, m) for m in todo)
    make = local_runner if runner is None else runner
    run = make(
        settings,
        shift_test=shift_test,
        test_scales=tuple(test_scales),
        save_maps=save_maps,
        sha=sha,
        progress=progress,
        say=say,
    )
    finished = run(cells)  # a remote runner has submitted every cell by now
    for test_set in {id(t): t for t, _ in cells}.values():
        write_images_file(out / "runs" / "_images" / f"{test_set.name}.npz", test_set, shift_test)
    for (test_set, method), result in finished:
        if isinstance(result, str):
            new_rows = failed_rows(
                test_set,
                method,
                settings.get(method, {}),
                shift_test=shift_test,
                sha=sha,
                error=result,
                test_scales=test_scales,
            )
            say(f"{method} on {test_set.name}: FAILED ({result})")
        else:
            write_cell(out, method, test_set.name, result)
            new_rows = result.rows
        rows = [r for r in rows if (r["method"], r["category"]) != (method, test_set.name)]
        rows.extend(new_rows)
        write_results(out, rows, meta)
        if isinstance(result, str):
            continue
        r = new_rows[0]
        say(
            f"{method} on {test_set.name}: image AUROC {_fmt(r['image_auroc']) or 'n/a'}, "
            f"pixel AUROC {_fmt(r['pixel_auroc']) or 'n/a'}, AU-PRO "
            f"{_fmt(r['aupro']) or 'n/a'} (fit {r['fit_s']:.1f} s, "
            f"{r['ms_per_image']:.0f} ms/img)"
        )
    write_results(out, rows, meta)
    return json.loads(results.read_text())["rows"]
