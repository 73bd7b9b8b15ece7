"""The benchmark's result files: rows aggregated over seeds, mean rows, and
``results.json``/``.csv``/``.md`` (plus ``results_seeds.csv`` for a run of several seeds).

A row of a run with ``--seeds N`` > 1 carries ``seed`` (its seed, or None for a cell that runs once
because the method draws nothing at random for its settings, ``seeded`` False). ``aggregate``
turns the rows of one (method, category, variant) into one row: each metric and cost is the mean
over the seeds, with ``<metric>_min`` / ``<metric>_max``, ``n_seeds``, ``seeds`` and the per-seed
rows under ``per_seed``; its bootstrap ``intervals`` are the means of the seeds' bounds. Rows of a
single-seed run (no ``seed`` key) pass through unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from patchad.atomic import atomic_write_bytes

__all__ = ["aggregate", "expand", "mean_rows", "write_results"]

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
#: Columns after ``config`` in results.csv: seeds, spread over seeds, bootstrap interval.
EXTRA_COLUMNS = (
    "n_seeds",
    *(f"{m}_{end}" for m in METRICS for end in ("min", "max")),
    *(f"{m}_{end}" for m in METRICS for end in ("lo", "hi")),
)


def _write_json(path: Any, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=False).encode(), force=True)


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _seed_group(group: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in group if not r.get("error")]
    if not ok:
        return {**group[0], "n_seeds": 0, "per_seed": group}
    row = dict(ok[0])
    for key in (*METRICS, *COSTS):
        values = [r[key] for r in ok if r[key] is not None]
        row[key] = _mean(values)
        row[f"{key}_min"] = min(values) if values and key in METRICS else None
        row[f"{key}_max"] = max(values) if values and key in METRICS else None
        if key in COSTS:
            del row[f"{key}_min"], row[f"{key}_max"]
    bounds = [r.get("intervals") or {} for r in ok]
    row["intervals"] = {
        key: (
            [float(np.mean([b[key][i] for b in bounds])) for i in (0, 1)]
            if all(b.get(key) for b in bounds)
            else None
        )
        for key in METRICS
    }
    types = list(ok[0].get("per_type", {}))
    row["per_type"] = {
        t: {
            k: _mean([r["per_type"].get(t, {}).get(k) for r in ok])
            for k in ok[0]["per_type"][t]
            if k != "n"
        }
        | {"n": ok[0]["per_type"][t].get("n")}
        for t in types
    }
    row["seeds"] = [r.get("seed") for r in ok]
    row["seed"] = ok[0].get("seed")
    row["n_seeds"] = len(ok)
    row["seeded"] = ok[0].get("seeded", True)
    row.pop("error", None)
    row["per_seed"] = [{k: v for k, v in r.items() if k != "per_seed"} for r in group]
    return row


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, category, variant): rows with a ``seed`` key are aggregated over
    their seeds (see the module docstring); others are returned as they are."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["category"], r["variant"]), []).append(r)
    out = []
    for group in groups.values():
        if "seed" in group[0]:
            out.append(_seed_group(group))
        else:
            out.extend(group)
    return out


def expand(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-seed rows of ``results.json``'s rows (``--resume``): the inverse of
    ``aggregate``, mean rows left out."""
    out: list[dict[str, Any]] = []
    for r in rows:
        if r["category"] == "mean":
            continue
        out.extend(r["per_seed"] if r.get("per_seed") else [r])
    return out


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


def _extra(r: dict[str, Any]) -> list[str]:
    bounds = r.get("intervals") or {}
    cells = [_fmt(r.get("n_seeds", 1 if r["category"] != "mean" else None))]
    for key in METRICS:
        cells += [_fmt(r.get(f"{key}_min")), _fmt(r.get(f"{key}_max"))]
    for key in METRICS:
        b = bounds.get(key)
        cells += [_fmt(b[0]) if b else "", _fmt(b[1]) if b else ""]
    return cells


def _csv(rows: list[dict[str, Any]], head: list[str], extra: Any) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(head)
    for r in rows:
        config = json.dumps(r["config"], sort_keys=True)
        writer.writerow([_fmt(r[c]) for c in COLUMNS] + [config] + extra(r))
    return text.getvalue().encode()


def _cell(r: dict[str, Any], c: str) -> str:
    cell = _fmt(r[c])
    if c in METRICS and r.get("n_seeds", 1) > 1 and r.get(f"{c}_max") is not None:
        cell += f" ± {(r[f'{c}_max'] - r[f'{c}_min']) / 2:.4f}"
    return cell


def _markdown(allrows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    seeds = max((r.get("n_seeds", 1) for r in allrows), default=1)
    spread = (
        f" Metrics of seeded methods: mean ± half the range over {seeds} seeds (per-seed rows"
        " below)."
        if seeds > 1
        else ""
    )
    md = [
        f"# patchad benchmark\n\n`{meta['command']}`\n\ngit {meta['git_sha']}, {meta['date']}, "
        f"data `{meta['data']}`. Best value per category and variant in **bold** (metrics: "
        f"highest; costs: lowest). Timings are wall-clock on a shared machine.{spread}\n",
        "| " + " | ".join(COLUMNS[:-1]) + " |",
        "|" + "---|" * (len(COLUMNS) - 1),
    ]
    for r in allrows:
        peers = [
            p for p in allrows if p["category"] == r["category"] and p["variant"] == r["variant"]
        ]
        cells = []
        for c in COLUMNS[:-1]:
            cell = _cell(r, c)
            if c in METRICS or c in COSTS:
                vals = [p[c] for p in peers if p[c] is not None]
                if len(peers) > 1 and r[c] is not None and vals:
                    best = max(vals) if c in METRICS else min(vals)
                    if r[c] == best:
                        cell = f"**{cell}**"
            cells.append(cell or "n/a")
        md.append("| " + " | ".join(cells) + " |")
    return md


def _interval_table(allrows: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in allrows if r.get("intervals")]
    if not rows:
        return []
    md = [
        "\n## 95 % bootstrap intervals over the test images\n\n"
        "Stratified resamples (good and defective images drawn separately), fixed count and seed "
        "(`patchad.bootstrap`); over several seeds, the mean of the seeds' bounds.\n",
        "| method | category | variant | " + " | ".join(METRICS) + " |",
        "|" + "---|" * (3 + len(METRICS)),
    ]
    for r in rows:
        b = r["intervals"]
        cells = [f"{b[k][0]:.4f}-{b[k][1]:.4f}" if b.get(k) else "n/a" for k in METRICS]
        md.append("| " + " | ".join([r["method"], r["category"], r["variant"], *cells]) + " |")
    return md


def _seed_table(seed_rows: list[dict[str, Any]]) -> list[str]:
    if not seed_rows:
        return []
    md = [
        "\n## Per seed\n",
        "| method | category | variant | seed | " + " | ".join((*METRICS, *COSTS)) + " |",
        "|" + "---|" * (4 + len(METRICS) + len(COSTS)),
    ]
    for r in seed_rows:
        seed = "once (nothing random)" if r.get("seeded") is False else _fmt(r.get("seed"))
        cells = [_fmt(r.get(c)) or "n/a" for c in (*METRICS, *COSTS)]
        md.append(
            "| " + " | ".join([r["method"], r["category"], r["variant"], seed, *cells]) + " |"
        )
    return md


def write_results(out: Any, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Rewrite results.json/.csv/.md from the category rows (seeds aggregated, mean rows
    recomputed), and results_seeds.csv when the rows carry seeds."""
    body = [r for r in rows if r["category"] != "mean"]
    body.sort(
        key=lambda r: (
            r["variant"] != "original",
            r["variant"],
            r["category"],
            r["method"],
            r.get("seed") or 0,
        )
    )
    seed_rows = [r for r in body if "seed" in r]
    body = aggregate(body)
    allrows = body + mean_rows(body)
    _write_json(out / "results.json", {"version": 1, "rows": allrows, "meta": meta})
    atomic_write_bytes(
        out / "results.csv", _csv(allrows, [*COLUMNS, "config", *EXTRA_COLUMNS], _extra), force=True
    )
    if seed_rows:
        data = _csv(seed_rows, [*COLUMNS, "config", "seed"], lambda r: [_fmt(r.get("seed"))])
        atomic_write_bytes(out / "results_seeds.csv", data, force=True)
    md = _markdown(allrows, meta) + _interval_table(allrows) + _seed_table(seed_rows)
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode(), force=True)
