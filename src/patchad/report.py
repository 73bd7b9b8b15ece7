"""The comparison report: one self-contained HTML page rendered from a benchmark folder.

``write_report(DIR)`` reads the files ``patchad benchmark --out DIR`` writes (``results.json``,
``runs/_images/<category>.npz``, ``runs/<method>/<category>/predictions.npz`` and ``curves.json``)
and writes ``DIR/report.html``. Nothing is recomputed from images or models: every number and every
"pros and cons" sentence is derived from those files. Images are embedded as base64 PNG data URIs;
the page loads nothing from the network (a Content-Security-Policy forbids it) and needs no script.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
SMALL_DEFECT = 0.01  # "small" defect: mask covers under 1% of the original image
GALLERY_PER_TYPE = 1  # fixed sample: the first image of each defect type (and of "good")
SHIFT_PICTURES = 3  # transformed images shown per category and variant

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
color:#1d232a;background:#fff;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:1.2rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.4rem 0}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:2px solid
#dde3ea;padding-bottom:.2rem}h3{font-size:1.05rem;margin:1.2rem 0 .4rem}
p.meta,p.note{color:#55606c;font-size:.9rem}
table{border-collapse:collapse;font-size:.86rem;margin:.5rem 0}
th,td{padding:.28rem .55rem;border-bottom:1px solid #e5e9ee;text-align:right;white-space:nowrap}
th{background:#f3f6f9;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.group td{background:#fafbfc;font-weight:600;text-align:left;border-top:2px solid #d3dae2}
tr.mean td{background:#f6f8fb}
td.best{font-weight:700;color:#0b6b2f}
.wrap{overflow-x:auto}
img.plot{max-width:100%;height:auto;display:block;margin:.3rem 0}
table.gallery td{text-align:center;vertical-align:top;border:none;padding:.15rem}
table.gallery th{font-weight:600;font-size:.8rem;white-space:normal;background:none;
vertical-align:bottom;position:static;text-align:center;width:118px;max-width:118px}
table.gallery .cap{display:block;margin:0 auto;text-align:center}
table.gallery th.rowhead{vertical-align:middle;text-align:right;width:auto;max-width:120px}
table.gallery img{width:112px;height:112px;image-rendering:auto;display:block;margin:0 auto}
.cap{font-size:.72rem;color:#55606c;max-width:120px;white-space:normal}
ul.facts li{margin:.35rem 0}
.missing{color:#8a4b00}
"""


@dataclass
class _Run:
    """What one method left for one category (arrays may be absent)."""

    scores: np.ndarray | None = None
    thumbs: np.ndarray | None = None
    map_min: float = math.nan
    map_max: float = math.nan
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    roc: tuple[list[float], list[float]] = ([], [])
    pro: tuple[list[float], list[float]] = ([], [])
    problems: list[str] = field(default_factory=list)


def write_report(
    results_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    force: bool = True,
) -> Path:
    """Render ``results_dir/report.html`` (or ``out``) from a benchmark output folder.

    Args:
        results_dir: folder written by ``patchad benchmark --out``; must hold ``results.json``.
        out: file to write instead of ``results_dir/report.html``.
        force: overwrite an existing file (default, since the report is derived data).

    Returns:
        The path of the written HTML file.

    Raises:
        PatchadError: the folder or ``results.json`` is missing or invalid.
    """
    from patchad.modelfile import atomic_write_bytes

    root = Path(results_dir)
    target = Path(out) if out is not None else root / "report.html"
    page = render_report(root)
    atomic_write_bytes(target, page.encode("utf-8"), force=force)
    return target


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


def render_report(root: Path) -> str:
    """Build the report page for ``root`` and return it as an HTML string."""
    import matplotlib

    matplotlib.use("Agg", force=True)

    data = load_results(root)
    rows: list[dict[str, Any]] = data["rows"]
    meta: dict[str, Any] = data["meta"]
    methods = _unique(r["method"] for r in rows)
    categories = _unique(r["category"] for r in rows if r["category"] != "mean")
    original = {(r["method"], r["category"]): r for r in rows if r["variant"] == "original"}
    images = {c: _load_images(root, c) for c in categories}
    runs = {(m, c): _load_run(root, m, c) for m in methods for c in categories}

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>patchad comparison report</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>patchad comparison report</h1>",
        _meta_line(meta, methods, categories),
        '<nav><p class="note">Sections: <a href="#summary">summary</a> · '
        '<a href="#pros-cons">pros and cons</a> · <a href="#curves">ROC / PRO curves</a> · '
        '<a href="#distributions">score distributions</a> · <a href="#gallery">gallery</a> · '
        '<a href="#alignment">alignment</a></p></nav>',
        _summary_table(methods, categories, original),
        _pros_cons(methods, categories, rows, original, images, runs, meta),
        _curves_section(methods, categories, runs),
        _distributions_section(methods, categories, images, runs),
        _gallery_section(methods, categories, images, runs),
        _alignment_section(methods, categories, rows, images, runs, meta),
        _problems_section(images, runs),
        "</main></body></html>",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- loading


def _unique(items: Any) -> list[str]:
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


def _load_run(root: Path, method: str, category: str) -> _Run:
    run = _Run()
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


# ----------------------------------------------------------------------------- formatting


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if not math.isfinite(value) else float(value)


def _fmt(value: Any, key: str) -> str:
    v = _num(value)
    if v is None:
        return "n/a"
    if key in {"image_auroc", "pixel_auroc", "aupro", "f1_max"}:
        return f"{v:.3f}"
    if key == "fit_s":
        return f"{v:.2f}" if v < 10 else f"{v:.1f}"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _png_uri(array_or_image: np.ndarray | Image.Image) -> str:
    image = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(np.ascontiguousarray(array_or_image))
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fig_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} src="{uri}" alt="{_esc(alt)}">'


def _meta_line(meta: dict[str, Any], methods: list[str], categories: list[str]) -> str:
    bits = [f"{len(methods)} methods ({', '.join(methods)})"]
    bits.append(f"{len(categories)} categories ({', '.join(categories)})")
    for key in ("data", "date", "git_sha", "command"):
        if meta.get(key):
            bits.append(f"{key}: {meta[key]}")
    return f'<p class="meta">{_esc(" · ".join(bits))}</p>' + (
        '<p class="note">Timings and memory depend on the machine and its load at the time; '
        "compare them within this page only.</p>"
    )


# ----------------------------------------------------------------------------- summary


def _summary_table(
    methods: list[str], categories: list[str], original: dict[tuple[str, str], dict[str, Any]]
) -> str:
    columns = [*METRICS, *COSTS]
    head = "".join(f"<th>{_esc(label)}</th>" for _, label in columns)
    body = []
    for category in [*categories, "mean"]:
        group = [(m, original.get((m, category))) for m in methods]
        group = [(m, r) for m, r in group if r is not None]
        if not group:
            continue
        best: dict[str, float] = {}
        for key, _ in columns:
            values = [_num(r.get(key)) for _, r in group]
            values = [v for v in values if v is not None]
            if len(values) >= 2 and len(set(values)) > 1:
                best[key] = max(values) if key in dict(METRICS) else min(values)
        title = "mean over categories" if category == "mean" else category
        body.append(
            f'<tr class="group"><td class="l" colspan="{len(columns) + 1}">{_esc(title)}</td></tr>'
        )
        klass = ' class="mean"' if category == "mean" else ""
        for method, row in group:
            cells = [f'<td class="l">{_esc(method)}</td>']
            for key, _ in columns:
                v = _num(row.get(key))
                is_best = v is not None and key in best and v == best[key]
                text = _fmt(v, key)
                cells.append(
                    f'<td class="best"><b>{text}</b></td>' if is_best else f"<td>{text}</td>"
                )
            body.append(
                f'<tr{klass} data-method="{_esc(method)}" data-category="{_esc(category)}">'
                + "".join(cells)
                + "</tr>"
            )
    return (
        '<section id="summary"><h2>Summary</h2>'
        '<p class="note">Best value per column within each category in <b>bold green</b> '
        "(highest for quality metrics, lowest for costs). n/a: not available (e.g. no "
        "ground-truth masks for pixel metrics).</p>"
        '<div class="wrap"><table class="summary"><thead><tr><th class="l">method</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>"
    )


# ----------------------------------------------------------------------------- plots


def _curves_section(
    methods: list[str], categories: list[str], runs: dict[tuple[str, str], _Run]
) -> str:
    import matplotlib.pyplot as plt

    out = [
        '<section id="curves"><h2>ROC and PRO curves</h2>',
        '<p class="note">Left: image-level ROC. Right: pixel-level PRO curve up to FPR 0.3 '
        "(its normalised area is AU-PRO).</p>",
    ]
    for category in categories:
        fig, (ax_roc, ax_pro) = plt.subplots(1, 2, figsize=(10, 3.8))
        any_pro = False
        for method in methods:
            run = runs[(method, category)]
            if run.roc[0]:
                ax_roc.plot(run.roc[0], run.roc[1], label=method, linewidth=1.6)
            if run.pro[0]:
                any_pro = True
                ax_pro.plot(run.pro[0], run.pro[1], label=method, linewidth=1.6)
        ax_roc.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8, linestyle="--")
        ax_roc.set(
            xlim=(0, 1),
            ylim=(0, 1.02),
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"{category}: image ROC",
        )
        ax_pro.set(
            xlim=(0, 0.3),
            ylim=(0, 1.02),
            xlabel="false positive rate (pixels)",
            ylabel="per-region overlap",
            title=f"{category}: PRO (FPR ≤ 0.3)",
        )
        if not any_pro:
            ax_pro.text(
                0.15,
                0.5,
                "not available\n(no ground-truth masks)",
                ha="center",
                va="center",
                color="#8a4b00",
            )
        for ax in (ax_roc, ax_pro):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="lower right", fontsize=8)
        out.append(f"<h3>{_esc(category)}</h3>")
        out.append(_img(_fig_uri(fig), f"ROC and PRO curves for {category}", "plot"))
    out.append("</section>")
    return "".join(out)


def _distributions_section(
    methods: list[str],
    categories: list[str],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], _Run],
) -> str:
    import matplotlib.pyplot as plt

    out = [
        '<section id="distributions"><h2>Score distributions: good against defective</h2>',
        '<p class="note">Image scores of the test set; the less the two histograms overlap, '
        "the better the method separates good from defective parts.</p>",
    ]
    for category in categories:
        info = images[category]
        if isinstance(info, str):
            out.append(f'<p class="missing">{_esc(category)}: {_esc(info)}.</p>')
            continue
        labels = info["labels"]
        usable = [m for m in methods if _scores_ok(runs[(m, category)], labels)]
        if not usable:
            out.append(f'<p class="missing">{_esc(category)}: no method has scores.</p>')
            continue
        fig, axes = plt.subplots(1, len(usable), figsize=(3.4 * len(usable), 2.7), squeeze=False)
        for ax, method in zip(axes[0], usable, strict=True):
            scores = runs[(method, category)].scores
            assert scores is not None
            bins = np.histogram_bin_edges(scores, bins=24)
            ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good", color="#2b7bba")
            ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="defective", color="#d7301f")
            ax.set(title=method, xlabel="image score")
            ax.legend(fontsize=7)
        out.append(f"<h3>{_esc(category)}</h3>")
        out.append(_img(_fig_uri(fig), f"score histograms for {category}", "plot"))
    out.append("</section>")
    return "".join(out)


def _scores_ok(run: _Run, labels: np.ndarray) -> bool:
    return run.scores is not None and len(run.scores) == len(labels)


def _thumbs_ok(run: _Run, labels: np.ndarray) -> bool:
    return run.thumbs is not None and len(run.thumbs) == len(labels)


# ----------------------------------------------------------------------------- gallery


def _scale(run: _Run) -> tuple[float, float]:
    """One colour scale per method and category: robust percentiles of all its thumbnails."""
    assert run.thumbs is not None
    finite = run.thumbs[np.isfinite(run.thumbs)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.8]))
    if high <= low:
        high = low + 1e-6
    return low, high


def _overlay(image: np.ndarray, amap: np.ndarray, low: float, high: float) -> np.ndarray:
    from patchad.visualize import heatmap

    colours = heatmap(np.nan_to_num(amap.astype(np.float32), nan=low), low, high)
    if colours.shape[:2] != image.shape[:2]:
        colours = np.asarray(Image.fromarray(colours).resize(image.shape[1::-1]))
    return (0.55 * image.astype(np.float32) + 0.45 * colours).round().astype(np.uint8)


def _mask_picture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if mask.shape != image.shape[:2]:
        return np.zeros_like(image)
    picture = (image.astype(np.float32) * 0.35).astype(np.uint8)
    picture[mask] = (255, 255, 255)
    return picture


def _zscores(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    good = scores[labels == 0]
    if good.size == 0:
        return scores - np.median(scores)
    spread = float(good.std()) or 1.0
    return (scores - float(good.mean())) / spread


def _gallery_picks(
    methods: list[str], info: dict[str, np.ndarray], runs: dict[str, _Run]
) -> list[tuple[int, str]]:
    labels, types = info["labels"], info["types"]
    picks: dict[int, list[str]] = {}
    for method in methods:
        run = runs[method]
        if not _scores_ok(run, labels):
            continue
        assert run.scores is not None
        z = _zscores(run.scores, labels)
        defective = np.flatnonzero(labels == 1)
        good = np.flatnonzero(labels == 0)
        if defective.size:
            i = int(defective[np.argmin(z[defective])])
            picks.setdefault(i, []).append(f"hardest defective for {method}")
        if good.size:
            i = int(good[np.argmax(z[good])])
            picks.setdefault(i, []).append(f"hardest good for {method}")
    for kind in _unique(str(t) for t in types):
        for i in np.flatnonzero(types == kind)[:GALLERY_PER_TYPE]:
            picks.setdefault(int(i), []).append(f"sample of {kind}")
    return [(i, "; ".join(why)) for i, why in sorted(picks.items())]


def _picture_table(
    methods: list[str],
    scores: dict[str, np.ndarray | None],
    images: np.ndarray,
    masks: np.ndarray | None,
    maps: dict[str, np.ndarray],
    scales: dict[str, tuple[float, float]],
    picks: list[tuple[int, str]],
    captions: dict[int, str],
) -> str:
    """One column per picked image; rows: input, ground truth, then one heat map per method."""
    label = '<th class="l rowhead">{}</th>'
    head = [label.format("")] + [
        f'<th><span class="cap">{_esc(captions[i])}<br><i>{_esc(why)}</i></span></th>'
        for i, why in picks
    ]
    rows = [
        [label.format("input")]
        + [f"<td>{_img(_png_uri(images[i]), 'input ' + captions[i])}</td>" for i, _ in picks]
    ]
    if masks is not None:
        rows.append(
            [label.format("ground truth")]
            + [
                f"<td>{_img(_png_uri(_mask_picture(images[i], masks[i])), 'mask')}</td>"
                for i, _ in picks
            ]
        )
    for method in methods:
        if method not in maps:
            continue
        low, high = scales[method]
        score = scores.get(method)
        cells = [
            label.format(
                f'{_esc(method)}<br><span class="cap">colour scale {low:.3g} – {high:.3g}</span>'
            )
        ]
        for i, _ in picks:
            pic = _overlay(images[i], maps[method][i], low, high)
            text = "" if score is None else f"score {float(score[i]):.3g}"
            cells.append(
                f"<td>{_img(_png_uri(pic), f'{method} heat map')}"
                f'<div class="cap">{_esc(text)}</div></td>'
            )
        rows.append(cells)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return (
        f'<div class="wrap"><table class="gallery"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _gallery_section(
    methods: list[str],
    categories: list[str],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], _Run],
) -> str:
    out = [
        '<section id="gallery"><h2>Gallery: the same test images under each method</h2>',
        '<p class="note">For each method, its hardest defective image (lowest score relative '
        "to its own good-image scores) and its hardest good image (highest), plus the first "
        "image of every defect type. Heat maps use one colour scale per method and category "
        "(1st to 99.8th percentile of all its map values; blue low, red high), so colours "
        "compare across images within a row.</p>",
    ]
    for category in categories:
        info = images[category]
        out.append(f"<h3>{_esc(category)}</h3>")
        if isinstance(info, str):
            out.append(f'<p class="missing">No gallery: {_esc(info)}.</p>')
            continue
        labels = info["labels"]
        cat_runs = {m: runs[(m, category)] for m in methods}
        with_maps = [m for m in methods if _thumbs_ok(cat_runs[m], labels)]
        maps = {m: cat_runs[m].thumbs for m in with_maps}
        scales = {m: _scale(cat_runs[m]) for m in with_maps}
        scores = {m: cat_runs[m].scores for m in methods if _scores_ok(cat_runs[m], labels)}
        picks = _gallery_picks(methods, info, cat_runs)
        captions = {i: _caption(info, i) for i, _ in picks}
        has_masks = (
            bool(np.any(info["masks"])) and info["masks"].shape[1:] == info["images"].shape[1:3]
        )
        out.append(
            _picture_table(
                methods,
                scores,
                info["images"],
                info["masks"] if has_masks else None,
                maps,
                scales,
                picks,
                captions,
            )
        )
        if not has_masks:
            out.append('<p class="missing">No ground-truth masks for this category.</p>')
    out.append("</section>")
    return "".join(out)


def _caption(info: dict[str, np.ndarray], i: int) -> str:
    kind = str(info["types"][i])
    name = Path(str(info["paths"][i])).name if "paths" in info else f"#{i}"
    area = float(info["defect_area"][i])
    return f"{kind}/{name}" + (f" ({100 * area:.2g}% area)" if area > 0 else "")


# ----------------------------------------------------------------------------- pros and cons


def _metric_value(row: dict[str, Any] | None, key: str) -> float | None:
    return None if row is None else _num(row.get(key))


def _winner_sentences(
    methods: list[str], categories: list[str], original: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    sentences = []
    for key, label in METRICS:
        wins: dict[str, list[str]] = {}
        unavailable = []
        for category in categories:
            scored = [(m, _metric_value(original.get((m, category)), key)) for m in methods]
            scored = [(m, v) for m, v in scored if v is not None]
            if len(scored) < 2:
                if not scored:
                    unavailable.append(category)
                continue
            scored.sort(key=lambda mv: -mv[1])
            (best, v1), (second, v2) = scored[0], scored[1]
            if v1 == v2:
                wins.setdefault("tie", []).append(f"{category} ({best} = {second} = {v1:.3f})")
            else:
                wins.setdefault(best, []).append(
                    f"{category} ({v1:.3f} vs {v2:.3f} for {second}, +{v1 - v2:.3f})"
                )
        parts = []
        for method, where in sorted(wins.items(), key=lambda kv: -len(kv[1])):
            if method == "tie":
                parts.append("tie on " + ", ".join(where))
            else:
                n = len(where)
                parts.append(
                    f"<b>{_esc(method)}</b> wins on {n} categor{'y' if n == 1 else 'ies'}"
                    f": {_esc(', '.join(where))}"
                )
        if parts:
            text = f"{label}: " + "; ".join(parts) + "."
            if unavailable:
                text += f" Not available for {_esc(', '.join(unavailable))}."
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
    runs: dict[tuple[str, str], _Run],
) -> list[str]:
    from patchad.metrics import image_auroc

    sentences = []
    pooled: dict[str, list[float]] = {}
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
                f"{_esc(category)}: no defect areas (no masks), so small defects "
                "cannot be singled out."
            )
            continue
        if not small.any():
            sentences.append(f"{_esc(category)}: no defect covers under 1% of the image.")
            continue
        large = (labels == 1) & ~small
        parts = []
        for method in methods:
            run = runs[(method, category)]
            if not _scores_ok(run, labels) or not good.any():
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
            if auc_large is not None and math.isfinite(auc_large):
                text += f" (larger defects {auc_large:.3f}, {auc_small - auc_large:+.3f})"
            text += f", a small defect outscores {100 * above:.0f}% of good images on average"
            parts.append(text)
        if parts:
            n = int(small.sum())
            sentences.append(
                f"{_esc(category)}: {n} defective image{'s' if n != 1 else ''} with a defect under"
                f" 1% of the image; image AUROC of these against all good images: "
                + _esc("; ".join(parts))
                + "."
            )
    if len(pooled) >= 2:
        mean = {m: float(np.nanmean(v)) for m, v in pooled.items()}
        order = sorted(mean, key=lambda m: -mean[m])
        sentences.append(
            f"On small defects overall, <b>{_esc(order[0])}</b> holds up best (mean small-defect "
            f"image AUROC {mean[order[0]]:.3f}) and {_esc(order[-1])} worst "
            f"({mean[order[-1]]:.3f})."
        )
    return sentences


def _cost_sentences(
    methods: list[str], categories: list[str], original: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    def mean_of(method: str, key: str) -> float | None:
        row = original.get((method, "mean"))
        v = _metric_value(row, key)
        if v is not None:
            return v
        values = [_metric_value(original.get((method, c)), key) for c in categories]
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
        f"Cost per point of {label}{note}, mean over categories: " + _esc("; ".join(parts)) + "."
    ]
    if len(per_point) >= 2:
        by_quality = sorted(per_point, key=lambda m: -per_point[m][2])
        best, other = by_quality[0], by_quality[-1]
        bq, oq = per_point[best][2], per_point[other][2]
        bms, oms = per_point[best][0], per_point[other][0]
        if bms is not None and oms is not None and oms > 0 and bq != oq:
            ratio = bms / oms
            sentences.append(
                f"<b>{_esc(best)}</b> scores {bq - oq:+.1f} {label} points over {_esc(other)} at "
                f"{ratio:.2g}× its inference time per image ({bms:.3g} vs {oms:.3g} ms)."
            )
    return sentences


def _variant_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {
        (r["method"], r["category"], r["variant"]): r
        for r in rows
        if r["variant"] in {"shift", "rotate"}
    }


def _alignment_sentences(
    methods: list[str],
    categories: list[str],
    rows: list[dict[str, Any]],
    original: dict[tuple[str, str], dict[str, Any]],
    meta: dict[str, Any],
) -> list[str]:
    variants = _variant_rows(rows)
    if not variants:
        return [
            'No alignment experiment in this run (no "shift"/"rotate" rows; run '
            "<code>patchad benchmark --shift-test N</code> to add one)."
        ]
    n = meta.get("shift_test")
    sentences = []
    drops: dict[tuple[str, str], list[float]] = {}
    for variant, how in (("shift", "shifted by {n} px"), ("rotate", "rotated by {n}°")):
        for category in [*categories, "mean"]:
            parts = []
            for method in methods:
                row = variants.get((method, category, variant))
                base = original.get((method, category))
                before, after = (
                    _metric_value(base, "image_auroc"),
                    _metric_value(row, "image_auroc"),
                )
                if before is None or after is None:
                    continue
                drop = before - after
                if category != "mean":
                    drops.setdefault((variant, method), []).append(drop)
                text = f"{method} {before:.3f} → {after:.3f} ({-drop:+.3f})"
                pb, pa = _metric_value(base, "pixel_auroc"), _metric_value(row, "pixel_auroc")
                if pb is not None and pa is not None:
                    text += f", pixel AUROC {pb:.3f} → {pa:.3f}"
                parts.append(text)
            if parts and category != "mean":
                amount = how.format(n=n if n is not None else "N")
                sentences.append(
                    f"{_esc(category)}, test images {_esc(amount)}: image AUROC "
                    + _esc("; ".join(parts))
                    + "."
                )
    for variant in ("shift", "rotate"):
        mean_drop = {m: float(np.mean(d)) for (v, m), d in drops.items() if v == variant}
        if len(mean_drop) >= 2:
            order = sorted(mean_drop, key=lambda m: -mean_drop[m])
            worst, best = order[0], order[-1]
            verb = "shifting" if variant == "shift" else "rotating"
            sentences.append(
                f"Under {verb}, <b>{_esc(worst)}</b> depends most on alignment (mean image AUROC "
                f"drop {mean_drop[worst]:.3f}) and {_esc(best)} least ({mean_drop[best]:.3f})."
            )
    return sentences


def _pros_cons(
    methods: list[str],
    categories: list[str],
    rows: list[dict[str, Any]],
    original: dict[tuple[str, str], dict[str, Any]],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], _Run],
    meta: dict[str, Any],
) -> str:
    groups = [
        ("Who wins where", _winner_sentences(methods, categories, original)),
        (
            "Small defects (under 1% of the image)",
            _small_defect_sentences(methods, categories, images, runs),
        ),
        ("Cost", _cost_sentences(methods, categories, original)),
        ("Alignment", _alignment_sentences(methods, categories, rows, original, meta)),
    ]
    missing_pixel = [
        c
        for c in categories
        if all(_metric_value(original.get((m, c)), "pixel_auroc") is None for m in methods)
    ]
    out = [
        '<section id="pros-cons"><h2>Pros and cons, from the data</h2>',
        '<p class="note">Every sentence below is computed from this run\'s results.</p>',
    ]
    if missing_pixel:
        out.append(
            f'<p class="missing">Pixel metrics (pixel AUROC, AU-PRO) are not available '
            f"for {_esc(', '.join(missing_pixel))}: no ground-truth masks.</p>"
        )
    for title, sentences in groups:
        out.append(f"<h3>{_esc(title)}</h3>")
        if not sentences:
            out.append('<p class="missing">Not enough data for this.</p>')
            continue
        out.append('<ul class="facts">' + "".join(f"<li>{s}</li>" for s in sentences) + "</ul>")
    out.append("</section>")
    return "".join(out)


# ----------------------------------------------------------------------------- alignment


def _alignment_section(
    methods: list[str],
    categories: list[str],
    rows: list[dict[str, Any]],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], _Run],
    meta: dict[str, Any],
) -> str:
    out = ['<section id="alignment"><h2>Alignment experiment: heat maps of moved images</h2>']
    if not _variant_rows(rows):
        out.append(
            '<p class="missing">No alignment experiment in this run (no "shift"/"rotate" '
            "rows in results.json).</p></section>"
        )
        return "".join(out)
    n = meta.get("shift_test")
    out.append(
        f'<p class="note">The same fitted models on test images shifted by {_esc(n)} px '
        f"or rotated by {_esc(n)}°; colour scale per method as in the gallery (from the "
        "original images' maps), so a hotter map means the move raised the scores.</p>"
    )
    shown = False
    for category in categories:
        info = images[category]
        if isinstance(info, str):
            continue
        labels = info["labels"]
        for variant in ("shift", "rotate"):
            pictures = info.get(f"images_{variant}")
            if pictures is None or len(pictures) != len(labels):
                continue
            cat_runs = {m: runs[(m, category)] for m in methods}
            maps, scales, scores = {}, {}, {}
            for m in methods:
                run = cat_runs[m]
                t = run.extra.get(f"thumbs_{variant}")
                if t is None or len(t) != len(labels):
                    continue
                maps[m] = t.astype(np.float32)
                scales[m] = _scale(run) if _thumbs_ok(run, labels) else _scale(_Run(thumbs=maps[m]))
                s = run.extra.get(f"scores_{variant}")
                scores[m] = s if s is not None and len(s) == len(labels) else None
            if not maps:
                continue
            defective = np.flatnonzero(labels == 1)[: SHIFT_PICTURES - 1]
            good = np.flatnonzero(labels == 0)[:1]
            picks = [(int(i), variant) for i in sorted([*good, *defective])]
            masks = info.get(f"masks_{variant}")
            if masks is not None and (not np.any(masks) or masks.shape[1:] != pictures.shape[1:3]):
                masks = None
            captions = {i: _caption(info, i) for i, _ in picks}
            out.append(f"<h3>{_esc(category)}: {_esc(variant)}</h3>")
            out.append(
                _picture_table(methods, scores, pictures, masks, maps, scales, picks, captions)
            )
            shown = True
    if not shown:
        out.append(
            '<p class="missing">Variant rows exist but no shifted/rotated images or maps '
            "were saved, so there are no pictures.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _problems_section(
    images: dict[str, dict[str, np.ndarray] | str], runs: dict[tuple[str, str], _Run]
) -> str:
    problems = [v for v in images.values() if isinstance(v, str)]
    for run in runs.values():
        problems.extend(run.problems)
    if not problems:
        return ""
    items = "".join(f"<li>{_esc(p)}</li>" for p in problems)
    return (
        f'<section id="problems"><h2>Missing files</h2><p class="missing">Parts of the page '
        f"are empty because of these:</p><ul>{items}</ul></section>"
    )
