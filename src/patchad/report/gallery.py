"""The picture sections of the report: the gallery and the alignment experiment's heat maps.

Both are tables with one column per chosen test image and rows for the input, its ground-truth mask
and one heat map per method (``_picture_table``). The gallery shows, per method, its hardest
defective and hardest good image plus the first image of every defect type; the alignment section
shows shifted/rotated test images scored by the same models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from patchad.report.charts import colour_scale, img_tag, mask_picture, overlay, png_uri
from patchad.report.data import Run, esc, scores_ok, thumbs_ok, unique, variant_rows

GALLERY_PER_TYPE = 1  # fixed sample: the first image of each defect type (and of "good")
SHIFT_PICTURES = 3  # transformed images shown per category and variant


def gallery_section(
    methods: list[str],
    categories: list[str],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], Run],
) -> str:
    """The gallery section: picked test images with each method's heat map."""
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
        out.append(f"<h3>{esc(category)}</h3>")
        if isinstance(info, str):
            out.append(f'<p class="missing">No gallery: {esc(info)}.</p>')
            continue
        labels = info["labels"]
        cat_runs = {m: runs[(m, category)] for m in methods}
        with_maps = [m for m in methods if thumbs_ok(cat_runs[m], labels)]
        maps = {m: cat_runs[m].thumbs for m in with_maps}
        scales = {m: colour_scale(cat_runs[m]) for m in with_maps}
        scores = {m: cat_runs[m].scores for m in methods if scores_ok(cat_runs[m], labels)}
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


def alignment_section(
    methods: list[str],
    categories: list[str],
    rows: list[dict[str, Any]],
    images: dict[str, dict[str, np.ndarray] | str],
    runs: dict[tuple[str, str], Run],
    meta: dict[str, Any],
) -> str:
    """The alignment section: heat maps of the shifted and rotated test images."""
    out = ['<section id="alignment"><h2>Alignment experiment: heat maps of moved images</h2>']
    if not variant_rows(rows):
        out.append(
            '<p class="missing">No alignment experiment in this run (no "shift"/"rotate" '
            "rows in results.json).</p></section>"
        )
        return "".join(out)
    n = meta.get("shift_test")
    out.append(
        f'<p class="note">The same fitted models on test images shifted by {esc(n)} px '
        f"or rotated by {esc(n)}°; colour scale per method as in the gallery (from the "
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
                scales[m] = (
                    colour_scale(run)
                    if thumbs_ok(run, labels)
                    else colour_scale(Run(thumbs=maps[m]))
                )
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
            out.append(f"<h3>{esc(category)}: {esc(variant)}</h3>")
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
        f'<th><span class="cap">{esc(captions[i])}<br><i>{esc(why)}</i></span></th>'
        for i, why in picks
    ]
    rows = [
        [label.format("input")]
        + [f"<td>{img_tag(png_uri(images[i]), 'input ' + captions[i])}</td>" for i, _ in picks]
    ]
    if masks is not None:
        rows.append(
            [label.format("ground truth")]
            + [
                f"<td>{img_tag(png_uri(mask_picture(images[i], masks[i])), 'mask')}</td>"
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
                f'{esc(method)}<br><span class="cap">colour scale {low:.3g} – {high:.3g}</span>'
            )
        ]
        for i, _ in picks:
            pic = overlay(images[i], maps[method][i], low, high)
            text = "" if score is None else f"score {float(score[i]):.3g}"
            cells.append(
                f"<td>{img_tag(png_uri(pic), f'{method} heat map')}"
                f'<div class="cap">{esc(text)}</div></td>'
            )
        rows.append(cells)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return (
        f'<div class="wrap"><table class="gallery"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _zscores(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    good = scores[labels == 0]
    if good.size == 0:
        return scores - np.median(scores)
    spread = float(good.std()) or 1.0
    return (scores - float(good.mean())) / spread


def _gallery_picks(
    methods: list[str], info: dict[str, np.ndarray], runs: dict[str, Run]
) -> list[tuple[int, str]]:
    labels, types = info["labels"], info["types"]
    picks: dict[int, list[str]] = {}
    for method in methods:
        run = runs[method]
        if not scores_ok(run, labels):
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
    for kind in unique(str(t) for t in types):
        for i in np.flatnonzero(types == kind)[:GALLERY_PER_TYPE]:
            picks.setdefault(int(i), []).append(f"sample of {kind}")
    return [(i, "; ".join(why)) for i, why in sorted(picks.items())]


def _caption(info: dict[str, np.ndarray], i: int) -> str:
    kind = str(info["types"][i])
    name = Path(str(info["paths"][i])).name if "paths" in info else f"#{i}"
    area = float(info["defect_area"][i])
    return f"{kind}/{name}" + (f" ({100 * area:.2g}% area)" if area > 0 else "")
