"""The "pros and cons" sentences of the report, each computed from the numbers of one run.

Four groups: who wins which metric on which category, how each method does on small defects (under
``SMALL_DEFECT`` of the image), cost per quality point, and how much shifting or rotating the test
images costs each method. Sentences are HTML fragments: names and numbers are escaped, a winner is
in ``<b>``. Nothing here is written by hand per run; change the numbers and the text follows.

Where the results measured their uncertainty (seed spread, bootstrap intervals), a winner, a
"holds up best" or a "depends most" is named only when the gap exceeds it
(:data:`patchad.report.noise.RULE`); otherwise the sentence says "no clear difference (±...)".
Without such measurements the sentences read as they always did.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from patchad.report.data import METRICS, Run, esc, metric_value, scores_ok, variant_rows
from patchad.report.noise import clear, margin

SMALL_DEFECT = 0.01  # "small" defect: mask covers under 1% of the original image


def pros_and_cons(
    methods: list[str],
    categories: list[str],
    rows: list[dict[str, Any]],
    original: dict[tuple[str, str], dict[str, Any]],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], Run],
    meta: dict[str, Any],
) -> list[tuple[str, list[str]]]:
    """The sentence groups as (title, sentences); an empty list means not enough data."""
    return [
        ("Who wins where", _winner_sentences(methods, categories, original)),
        (
            "Small defects (under 1% of the image)",
            _small_defect_sentences(methods, categories, images, runs, _measured(original)),
        ),
        ("Cost", _cost_sentences(methods, categories, original)),
        ("Alignment", _alignment_sentences(methods, categories, rows, original, meta)),
    ]


def _measured(original: dict[tuple[str, str], dict[str, Any]]) -> bool:
    """Whether the run measured its uncertainty (intervals, or several seeds)."""
    return any(r.get("intervals") or int(r.get("n_seeds") or 1) > 1 for r in original.values())


def _small_noise(scores: list[np.ndarray], labels: np.ndarray) -> float:
    """The noise of a small-defect image AUROC: the larger of half its range over the seeds'
    scores and half its 95 % bootstrap interval (:mod:`patchad.bootstrap`, first seed)."""
    from patchad.bootstrap import RESAMPLES, SEED, image_auroc_resamples, stratified_weights
    from patchad.metrics import image_auroc

    values = [image_auroc(s, labels) for s in scores]
    seed_half = (max(values) - min(values)) / 2.0 if len(values) > 1 else 0.0
    w = stratified_weights(labels, RESAMPLES, SEED)
    draws = image_auroc_resamples(scores[0], labels, w)
    lo, hi = np.quantile(draws[np.isfinite(draws)], [0.025, 0.975])
    return float(max(seed_half, (hi - lo) / 2.0))


def _winner_sentences(
    methods: list[str], categories: list[str], original: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    sentences = []
    for key, label in METRICS:
        wins: dict[str, list[str]] = {}
        unavailable = []
        for category in categories:
            scored = [(m, metric_value(original.get((m, category)), key)) for m in methods]
            scored = [(m, v) for m, v in scored if v is not None]
            if len(scored) < 2:
                if not scored:
                    unavailable.append(category)
                continue
            scored.sort(key=lambda mv: -mv[1])
            (best, v1), (second, v2) = scored[0], scored[1]
            need = margin([original.get((best, category)), original.get((second, category))], key)
            if v1 == v2:
                wins.setdefault("tie", []).append(f"{category} ({best} = {second} = {v1:.3f})")
            elif not clear(v1 - v2, need):
                wins.setdefault("unclear", []).append(
                    f"{category} ({best} {v1:.3f} vs {second} {v2:.3f}, +{v1 - v2:.3f} "
                    f"within ±{need:.3f})"
                )
            else:
                last = ""
                if len(scored) > 2:
                    worst, v3 = scored[-1]
                    last = f"; last {worst} {v3:.3f}, -{v1 - v3:.3f}"
                beyond = f" beyond ±{need:.3f}" if need > 0 else ""
                wins.setdefault(best, []).append(
                    f"{category} ({v1:.3f} vs {v2:.3f} for {second}, +{v1 - v2:.3f}{beyond}{last})"
                )
        parts = []
        for method, where in sorted(wins.items(), key=lambda kv: -len(kv[1])):
            if method == "tie":
                parts.append("tie on " + ", ".join(where))
            elif method == "unclear":
                parts.append("no clear difference on " + esc(", ".join(where)))
            else:
                n = len(where)
                parts.append(
                    f"<b>{esc(method)}</b> wins on {n} categor{'y' if n == 1 else 'ies'}"
                    f": {esc(', '.join(where))}"
                )
        if parts:
            text = f"{label}: " + "; ".join(parts) + "."
            if unavailable:
                text += f" Not available for {esc(', '.join(unavailable))}."
            sentences.append(text)
        elif unavailable:
            sentences.append(
                f"{label}: not available for any category (no ground-truth masks"
                " or too few classes)."
            )
    return sentences


def _small_defect_sentences(
    methods: list[str],
    categories: list[str],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], Run],
    measured: bool = False,
) -> list[str]:
    from patchad.metrics import image_auroc

    sentences = []
    pooled: dict[str, list[float]] = {}
    noise: dict[str, list[float]] = {}
    for category in categories:
        info = images[category]
        if isinstance(info, str):
            continue
        labels, area = info["labels"], info["defect_area"].astype(np.float64)
        good = labels == 0
        small = (labels == 1) & (area > 0) & (area < SMALL_DEFECT)
        if not np.any(labels == 1):
            continue
        if not np.any(area[labels == 1] > 0):
            sentences.append(
                f"{esc(category)}: no defect areas (no masks), so small defects "
                "cannot be singled out."
            )
            continue
        if not small.any():
            sentences.append(f"{esc(category)}: no defect covers under 1% of the image.")
            continue
        large = (labels == 1) & ~small
        parts = []
        for method in methods:
            run = runs[(method, category)]
            if not scores_ok(run, labels) or not good.any():
                continue
            assert run.scores is not None
            s = run.scores
            keep_small = good | small
            auc_small = image_auroc(s[keep_small], labels[keep_small])
            keep_large = good | large
            auc_large = image_auroc(s[keep_large], labels[keep_large]) if large.any() else None
            # percentile of each small-defect score among the good scores (1.0 = above all good)
            above = float(np.mean([np.mean(s[good] < v) for v in s[small]]))
            pooled.setdefault(method, []).append(auc_small)
            text = f"{method} {auc_small:.3f}"
            if measured:
                others = [x for x in run.seed_scores if len(x) == len(s)]
                n_small = _small_noise([x[keep_small] for x in (s, *others)], labels[keep_small])
                noise.setdefault(method, []).append(n_small)
                text += f" (±{n_small:.3f})"
            if auc_large is not None and math.isfinite(auc_large):
                text += f" (larger defects {auc_large:.3f}, {auc_small - auc_large:+.3f})"
            text += f", a small defect outscores {100 * above:.0f}% of good images on average"
            parts.append(text)
        if parts:
            n = int(small.sum())
            sentences.append(
                f"{esc(category)}: {n} defective image{'s' if n != 1 else ''} with a defect under"
                f" 1% of the image; image AUROC of these against all good images: "
                + esc("; ".join(parts))
                + "."
            )
    if len(pooled) >= 2:
        mean = {m: float(np.nanmean(v)) for m, v in pooled.items()}
        order = sorted(mean, key=lambda m: -mean[m])
        best, worst = order[0], order[-1]
        need = max(float(np.mean(noise.get(m, [0.0]))) for m in (best, worst))
        if clear(mean[best] - mean[worst], need):
            beyond = f", a gap beyond ±{need:.3f}" if need > 0 else ""
            sentences.append(
                f"On small defects overall, <b>{esc(best)}</b> holds up best (mean small-defect "
                f"image AUROC {mean[best]:.3f}) and {esc(worst)} worst "
                f"({mean[worst]:.3f}{beyond})."
            )
        else:
            sentences.append(
                "On small defects overall, no clear difference between the methods (mean "
                f"small-defect image AUROC {esc(best)} {mean[best]:.3f} to {esc(worst)} "
                f"{mean[worst]:.3f}, within ±{need:.3f})."
            )
    return sentences


def _cost_sentences(
    methods: list[str], categories: list[str], original: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    def mean_of(method: str, key: str) -> float | None:
        row = original.get((method, "mean"))
        v = metric_value(row, key)
        if v is not None:
            return v
        values = [metric_value(original.get((method, c)), key) for c in categories]
        values = [x for x in values if x is not None]
        return float(np.mean(values)) if values else None

    choices = [
        (k, lbl)
        for k, lbl in (
            ("aupro", "AU-PRO"),
            ("pixel_auroc", "pixel AUROC"),
            ("image_auroc", "image AUROC"),
        )
        if all(mean_of(m, k) is not None for m in methods)
    ]
    if not choices:
        return [
            "No quality metric is available for every method, so costs per point cannot be"
            " computed."
        ]
    key, label = choices[0]
    note = "" if key == "aupro" else f" (AU-PRO is not available, so per point of {label})"
    parts, per_point = [], {}
    for method in methods:
        quality = mean_of(method, key)
        if quality is None or quality <= 0:
            continue
        points = 100 * quality
        ms, mem, fit = (mean_of(method, k) for k in ("ms_per_image", "peak_mem_mb", "fit_s"))
        bits = []
        if ms is not None:
            bits.append(f"{ms / points:.3g} ms/image")
        if mem is not None:
            bits.append(f"{mem / points:.3g} MB peak memory")
        if fit is not None:
            bits.append(f"{fit / points:.3g} s of fitting")
        if bits:
            per_point[method] = (ms, mem, points)
            parts.append(f"{method} ({label} {points:.1f} points): " + ", ".join(bits))
    if not parts:
        return []
    sentences = [
        f"Cost per point of {label}{note}, mean over categories: " + esc("; ".join(parts)) + "."
    ]
    if len(per_point) >= 2:
        by_quality = sorted(per_point, key=lambda m: -per_point[m][2])
        best, other = by_quality[0], by_quality[-1]
        bq, oq = per_point[best][2], per_point[other][2]
        bms, oms = per_point[best][0], per_point[other][0]
        if bms is not None and oms is not None and oms > 0 and bq != oq:
            ratio = bms / oms
            sentences.append(
                f"<b>{esc(best)}</b> scores {bq - oq:+.1f} {label} points over {esc(other)} at "
                f"{ratio:.2g}× its inference time per image ({bms:.3g} vs {oms:.3g} ms)."
            )
    return sentences


def _alignment_sentences(
    methods: list[str],
    categories: list[str],
    rows: list[dict[str, Any]],
    original: dict[tuple[str, str], dict[str, Any]],
    meta: dict[str, Any],
) -> list[str]:
    variants = variant_rows(rows)
    if not variants:
        return [
            'No alignment experiment in this run (no "shift"/"rotate" rows; run '
            "<code>patchad benchmark --shift-test N</code> to add one)."
        ]
    n = meta.get("shift_test")
    sentences = []
    drops: dict[tuple[str, str], list[float]] = {}
    needs: dict[tuple[str, str], list[float]] = {}
    for variant, how in (("shift", "shifted by {n} px"), ("rotate", "rotated by {n}°")):
        for category in [*categories, "mean"]:
            parts = []
            for method in methods:
                row = variants.get((method, category, variant))
                base = original.get((method, category))
                before, after = (
                    metric_value(base, "image_auroc"),
                    metric_value(row, "image_auroc"),
                )
                if before is None or after is None:
                    continue
                drop = before - after
                need = margin([base, row], "image_auroc")
                if category != "mean":
                    drops.setdefault((variant, method), []).append(drop)
                    needs.setdefault((variant, method), []).append(need)
                text = f"{method} {before:.3f} → {after:.3f} ({-drop:+.3f}"
                if need > 0:
                    text += f", ±{need:.3f}" + (
                        "" if clear(abs(drop), need) else ": no clear change"
                    )
                text += ")"
                pb, pa = metric_value(base, "pixel_auroc"), metric_value(row, "pixel_auroc")
                if pb is not None and pa is not None:
                    text += f", pixel AUROC {pb:.3f} → {pa:.3f}"
                parts.append(text)
            if parts and category != "mean":
                amount = how.format(n=n if n is not None else "N")
                sentences.append(
                    f"{esc(category)}, test images {esc(amount)}: image AUROC "
                    + esc("; ".join(parts))
                    + "."
                )
    for variant in ("shift", "rotate"):
        mean_drop = {m: float(np.mean(d)) for (v, m), d in drops.items() if v == variant}
        if len(mean_drop) >= 2:
            order = sorted(mean_drop, key=lambda m: -mean_drop[m])
            worst, best = order[0], order[-1]
            verb = "shifting" if variant == "shift" else "rotating"
            need = max(float(np.mean(needs[(variant, m)])) for m in (worst, best))
            if not clear(mean_drop[worst] - mean_drop[best], need):
                sentences.append(
                    f"Under {verb}, no clear difference between the methods' dependence on "
                    f"alignment (mean image AUROC drop {esc(worst)} {mean_drop[worst]:.3f}, "
                    f"{esc(best)} {mean_drop[best]:.3f}, within ±{need:.3f})."
                )
                continue
            sentences.append(
                f"Under {verb}, <b>{esc(worst)}</b> depends most on alignment (mean image AUROC "
                f"drop {mean_drop[worst]:.3f}) and {esc(best)} least ({mean_drop[best]:.3f})."
            )
    return sentences
