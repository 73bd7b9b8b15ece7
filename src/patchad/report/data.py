"""Data assembly for the report: the benchmark folder read into the structures the page needs.

``assemble(root)`` reads ``results.json`` (checked by ``load_results``), the per-category image
archives ``runs/_images/<category>.npz`` and each method's ``runs/<method>/<category>/``
``predictions.npz`` and ``curves.json``, and returns them as one ``ReportInputs``. A missing or
unreadable run file is recorded as a problem (shown on the page), never raised. Also here: the small
number and text helpers every other report module shares (``num``, ``metric_value``, ``esc``).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchad.errors import PatchadError

METRICS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AU-PRO"),
    ("f1_max", "F1-max"),
)
COSTS: tuple[tuple[str, str], ...] = (
    ("fit_s", "fit s"),
    ("ms_per_image", "ms / image"),
    ("peak_mem_mb", "peak memory MB"),
    ("model_mb", "model MB"),
)


@dataclass
class Run:
    """What one method left for one category (arrays may be absent)."""

    scores: np.ndarray | None = None
    thumbs: np.ndarray | None = None
    map_min: float = math.nan
    map_max: float = math.nan
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    seed_scores: list[np.ndarray] = field(default_factory=list)  # the further seeds' scores
    roc: tuple[list[float], list[float]] = ([], [])
    pro: tuple[list[float], list[float]] = ([], [])
    problems: list[str] = field(default_factory=list)


@dataclass
class ReportInputs:
    """Everything the page is rendered from, as read from one benchmark folder."""

    rows: list[dict[str, Any]]  # all rows of results.json, each with a "variant"
    meta: dict[str, Any]
    methods: list[str]  # in order of first appearance
    categories: list[str]  # the same, without "mean"
    original: dict[tuple[str, str], dict[str, Any]]  # (method, category) -> "original" row
    images: dict[str, dict[str, np.ndarray] | str]  # category -> arrays, or what is wrong
    runs: dict[tuple[str, str], Run]  # (method, category) -> its saved predictions and curves


def assemble(root: Path) -> ReportInputs:
    """Read the benchmark folder ``root`` into ``ReportInputs`` (``PatchadError`` if unusable)."""
    data = load_results(root)
    rows: list[dict[str, Any]] = data["rows"]
    meta: dict[str, Any] = data["meta"]
    methods = unique(r["method"] for r in rows)
    categories = unique(r["category"] for r in rows if r["category"] != "mean")
    original = {(r["method"], r["category"]): r for r in rows if r["variant"] == "original"}
    images = {c: _load_images(root, c) for c in categories}
    runs = {(m, c): _load_run(root, m, c) for m in methods for c in categories}
    return ReportInputs(rows, meta, methods, categories, original, images, runs)


def load_results(root: Path) -> dict[str, Any]:
    """Read and check ``root/results.json``; one-line ``PatchadError`` on any problem."""
    if not root.exists():
        raise PatchadError(f"{root}: does not exist (expected a `patchad benchmark --out` folder)")
    if not root.is_dir():
        raise PatchadError(f"{root}: not a folder (expected a `patchad benchmark --out` folder)")
    path = root / "results.json"
    if not path.is_file():
        raise PatchadError(f"{path}: missing (not a `patchad benchmark --out` folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatchadError(f"{path}: not valid JSON ({exc})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise PatchadError(f"{path}: has no 'rows' list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("method"), str):
            raise PatchadError(f"{path}: row {i} has no 'method'")
        if not isinstance(row.get("category"), str):
            raise PatchadError(f"{path}: row {i} has no 'category'")
        row.setdefault("variant", "original")
    if not isinstance(data.get("meta"), dict):
        data["meta"] = {}
    return data


def unique(items: Any) -> list[str]:
    """The distinct items in order of first appearance."""
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def _load_images(root: Path, category: str) -> dict[str, np.ndarray] | str:
    path = root / "runs" / "_images" / f"{category}.npz"
    if not path.is_file():
        return f"{path.relative_to(root)} is missing"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        return f"{path.relative_to(root)} is unreadable ({type(exc).__name__})"
    need = ("labels", "images")
    if any(k not in arrays for k in need):
        return f"{path.relative_to(root)} lacks 'labels' or 'images'"
    n = len(arrays["labels"])
    arrays.setdefault("types", np.array(["good" if v == 0 else "defect" for v in arrays["labels"]]))
    arrays.setdefault("masks", np.zeros((n, 1, 1), dtype=bool))
    arrays.setdefault("defect_area", np.zeros(n, dtype=np.float32))
    arrays["labels"] = arrays["labels"].astype(int)
    return arrays


def _load_run(root: Path, method: str, category: str) -> Run:
    run = Run()
    folder = root / "runs" / method / category
    preds = folder / "predictions.npz"
    if preds.is_file():
        try:
            with np.load(preds, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            run.scores = arrays.get("scores")
            if run.scores is not None:
                run.scores = run.scores.astype(np.float64)
            thumbs = arrays.get("thumbs")
            run.thumbs = None if thumbs is None else thumbs.astype(np.float32)
            run.map_min = float(arrays.get("map_min", math.nan))
            run.map_max = float(arrays.get("map_max", math.nan))
            run.extra = {k: v for k, v in arrays.items() if k.endswith(("_shift", "_rotate"))}
        except Exception as exc:
            run.problems.append(f"{preds.relative_to(root)} is unreadable ({type(exc).__name__})")
    else:
        run.problems.append(f"{preds.relative_to(root)} is missing")
    for extra in sorted(folder.glob("seed*/predictions.npz")):
        try:
            with np.load(extra, allow_pickle=False) as npz:
                run.seed_scores.append(npz["scores"].astype(np.float64))
        except Exception as exc:
            run.problems.append(f"{extra.relative_to(root)} is unreadable ({type(exc).__name__})")
    curves = folder / "curves.json"
    if curves.is_file():
        try:
            doc = json.loads(curves.read_text(encoding="utf-8"))
            run.roc = (list(doc["roc"]["fpr"]), list(doc["roc"]["tpr"]))
            run.pro = (list(doc["pro"]["fpr"]), list(doc["pro"]["pro"]))
        except Exception as exc:
            run.problems.append(f"{curves.relative_to(root)} is invalid ({type(exc).__name__})")
    else:
        run.problems.append(f"{curves.relative_to(root)} is missing")
    return run


def variant_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The alignment rows ("shift", "rotate") keyed by (method, category, variant)."""
    return {
        (r["method"], r["category"], r["variant"]): r
        for r in rows
        if r["variant"] in {"shift", "rotate"}
    }


def scores_ok(run: Run, labels: np.ndarray) -> bool:
    """Whether ``run`` has one image score per label."""
    return run.scores is not None and len(run.scores) == len(labels)


def thumbs_ok(run: Run, labels: np.ndarray) -> bool:
    """Whether ``run`` has one map thumbnail per label."""
    return run.thumbs is not None and len(run.thumbs) == len(labels)


def num(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if not math.isfinite(value) else float(value)


def metric_value(row: dict[str, Any] | None, key: str) -> float | None:
    """``row[key]`` as a finite float, or None if the row or the number is missing."""
    return None if row is None else num(row.get(key))


def esc(text: Any) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)
