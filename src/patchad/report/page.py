"""The report page: its template and style, the text sections, and writing the file.

``render_report(root)`` assembles the inputs (``data``), then joins the sections in page order:
metadata line, summary table, pros and cons (``sentences``), ROC/PRO curves and score histograms
(``charts``), gallery and alignment pictures (``gallery``), and the list of missing files.
``write_report`` writes the page atomically. The page is self-contained: images are PNG data URIs,
a Content-Security-Policy forbids loading anything, and there is no script.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from patchad.report.charts import curves_png, histograms_png, img_tag, use_agg
from patchad.report.data import COSTS, METRICS, Run, assemble, esc, metric_value, num, scores_ok
from patchad.report.gallery import alignment_section, gallery_section
from patchad.report.noise import RULE, summary_cell
from patchad.report.sentences import pros_and_cons

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
span.ci{color:#55606c;font-size:.75rem;font-weight:400;white-space:nowrap}
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


def render_report(root: Path) -> str:
    """Build the report page for ``root`` and return it as an HTML string."""
    use_agg()

    inputs = assemble(root)
    methods, categories, original = inputs.methods, inputs.categories, inputs.original
    rows, meta, images, runs = inputs.rows, inputs.meta, inputs.images, inputs.runs

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
        _pros_cons_section(methods, categories, rows, original, images, runs, meta),
        _curves_section(methods, categories, runs),
        _distributions_section(methods, categories, images, runs),
        gallery_section(methods, categories, images, runs),
        alignment_section(methods, categories, rows, images, runs, meta),
        _problems_section(images, runs),
        "</main></body></html>",
    ]
    return "\n".join(parts)


def _meta_line(meta: dict[str, Any], methods: list[str], categories: list[str]) -> str:
    bits = [f"{len(methods)} methods ({', '.join(methods)})"]
    bits.append(f"{len(categories)} categories ({', '.join(categories)})")
    for key in ("data", "date", "git_sha", "command"):
        if meta.get(key):
            bits.append(f"{key}: {meta[key]}")
    return f'<p class="meta">{esc(" · ".join(bits))}</p>' + (
        '<p class="note">Timings and memory depend on the machine and its load at the time; '
        "compare them within this page only.</p>"
    )


def _fmt(value: Any, key: str) -> str:
    v = num(value)
    if v is None:
        return "n/a"
    if key in {"image_auroc", "pixel_auroc", "aupro", "f1_max"}:
        return f"{v:.3f}"
    if key == "fit_s":
        return f"{v:.2f}" if v < 10 else f"{v:.1f}"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _summary_table(
    methods: list[str], categories: list[str], original: dict[tuple[str, str], dict[str, Any]]
) -> str:
    columns = [*METRICS, *COSTS]
    head = "".join(f"<th>{esc(label)}</th>" for _, label in columns)
    body = []
    for category in [*categories, "mean"]:
        group = [(m, original.get((m, category))) for m in methods]
        group = [(m, r) for m, r in group if r is not None]
        if not group:
            continue
        best: dict[str, float] = {}
        for key, _ in columns:
            values = [num(r.get(key)) for _, r in group]
            values = [v for v in values if v is not None]
            if len(values) >= 2 and len(set(values)) > 1:
                best[key] = max(values) if key in dict(METRICS) else min(values)
        title = "mean over categories" if category == "mean" else category
        body.append(
            f'<tr class="group"><td class="l" colspan="{len(columns) + 1}">{esc(title)}</td></tr>'
        )
        klass = ' class="mean"' if category == "mean" else ""
        for method, row in group:
            cells = [f'<td class="l">{esc(method)}</td>']
            for key, _ in columns:
                v = num(row.get(key))
                is_best = v is not None and key in best and v == best[key]
                text = _fmt(v, key)
                if key in dict(METRICS) and v is not None:
                    text = summary_cell(row, key, text)
                cells.append(
                    f'<td class="best"><b>{text}</b></td>' if is_best else f"<td>{text}</td>"
                )
            body.append(
                f'<tr{klass} data-method="{esc(method)}" data-category="{esc(category)}">'
                + "".join(cells)
                + "</tr>"
            )
    return (
        '<section id="summary"><h2>Summary</h2>'
        '<p class="note">Best value per column within each category in <b>bold green</b> '
        "(highest for quality metrics, lowest for costs). n/a: not available (e.g. no "
        "ground-truth masks for pixel metrics).</p>"
        f"{_uncertainty_note(original)}"
        '<div class="wrap"><table class="summary"><thead><tr><th class="l">method</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>"
    )


def _uncertainty_note(original: dict[tuple[str, str], dict[str, Any]]) -> str:
    """What the ± and the bracketed intervals of the summary mean, where there are any."""
    rows = list(original.values())
    counts = sorted({int(r.get("n_seeds") or 1) for r in rows} - {1})
    bits = []
    if counts:
        seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        bits.append(
            f"Metrics of seeded methods: mean of {seeds} seeds ± half their min-max range "
            "(methods that draw nothing at random ran once)."
        )
    if any(r.get("intervals") for r in rows):
        bits.append(
            "[lo, hi]: 95 % bootstrap interval over the test images (good and defective "
            "resampled separately)."
        )
    return f'<p class="note">{esc(" ".join(bits))}</p>' if bits else ""


def _pros_cons_section(
    methods: list[str],
    categories: list[str],
    rows: list[dict[str, Any]],
    original: dict[tuple[str, str], dict[str, Any]],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], Run],
    meta: dict[str, Any],
) -> str:
    groups = pros_and_cons(methods, categories, rows, original, images, runs, meta)
    missing_pixel = [
        c
        for c in categories
        if all(metric_value(original.get((m, c)), "pixel_auroc") is None for m in methods)
    ]
    out = [
        '<section id="pros-cons"><h2>Pros and cons, from the data</h2>',
        '<p class="note">Every sentence below is computed from this run\'s results.</p>',
    ]
    if any(r.get("intervals") or int(r.get("n_seeds") or 1) > 1 for r in original.values()):
        out.append(f'<p class="note">{esc(RULE)}</p>')
    if missing_pixel:
        out.append(
            f'<p class="missing">Pixel metrics (pixel AUROC, AU-PRO) are not available '
            f"for {esc(', '.join(missing_pixel))}: no ground-truth masks.</p>"
        )
    for title, sentences in groups:
        out.append(f"<h3>{esc(title)}</h3>")
        if not sentences:
            out.append('<p class="missing">Not enough data for this.</p>')
            continue
        out.append('<ul class="facts">' + "".join(f"<li>{s}</li>" for s in sentences) + "</ul>")
    out.append("</section>")
    return "".join(out)


def _curves_section(
    methods: list[str], categories: list[str], runs: dict[tuple[str, str], Run]
) -> str:
    out = [
        '<section id="curves"><h2>ROC and PRO curves</h2>',
        '<p class="note">Left: image-level ROC. Right: pixel-level PRO curve up to FPR 0.3 '
        "(its normalised area is AU-PRO).</p>",
    ]
    for category in categories:
        uri = curves_png(category, methods, runs)
        out.append(f"<h3>{esc(category)}</h3>")
        out.append(img_tag(uri, f"ROC and PRO curves for {category}", "plot"))
    out.append("</section>")
    return "".join(out)


def _distributions_section(
    methods: list[str],
    categories: list[str],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], Run],
) -> str:
    out = [
        '<section id="distributions"><h2>Score distributions: good against defective</h2>',
        '<p class="note">Image scores of the test set; the less the two histograms overlap, '
        "the better the method separates good from defective parts.</p>",
    ]
    for category in categories:
        info = images[category]
        if isinstance(info, str):
            out.append(f'<p class="missing">{esc(category)}: {esc(info)}.</p>')
            continue
        labels = info["labels"]
        usable = [m for m in methods if scores_ok(runs[(m, category)], labels)]
        if not usable:
            out.append(f'<p class="missing">{esc(category)}: no method has scores.</p>')
            continue
        uri = histograms_png(category, usable, labels, runs)
        out.append(f"<h3>{esc(category)}</h3>")
        out.append(img_tag(uri, f"score histograms for {category}", "plot"))
    out.append("</section>")
    return "".join(out)


def _problems_section(
    images: dict[str, dict[str, np.ndarray] | str], runs: dict[tuple[str, str], Run]
) -> str:
    problems = [v for v in images.values() if isinstance(v, str)]
    for run in runs.values():
        problems.extend(run.problems)
    if not problems:
        return ""
    items = "".join(f"<li>{esc(p)}</li>" for p in problems)
    return (
        f'<section id="problems"><h2>Missing files</h2><p class="missing">Parts of the page '
        f"are empty because of these:</p><ul>{items}</ul></section>"
    )
