"""The HTML comparison report, rendered from a tiny fake benchmark folder (RESULTS_SCHEMA)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from holds import HANG_S
from patchad.cli import main
from patchad.report import write_report

METHODS = ("patchcore", "padim")
TYPES = ("good", "good", "good", "crack", "crack", "hole", "hole", "hole")
SHIFT_N = 4


def _row(method, category, variant, image_auroc, pixel_auroc, aupro, f1, *, fit_s=1.0, ms=10.0):
    return {
        "method": method,
        "category": category,
        "variant": variant,
        "image_auroc": image_auroc,
        "pixel_auroc": pixel_auroc,
        "aupro": aupro,
        "f1_max": f1,
        "fit_s": fit_s,
        "ms_per_image": ms,
        "peak_mem_mb": 300.0 if method == "patchcore" else 450.0,
        "model_mb": 5.0 if method == "patchcore" else 40.0,
        "n_train": 10,
        "n_test": len(TYPES),
        "config": {"backbone": "tf_efficientnet_lite0", "image_size": 64},
        "per_type": {
            "crack": {
                "image_auroc": image_auroc,
                "pixel_auroc": None,
                "aupro": None,
                "f1_max": f1,
                "n": 2,
            }
        },
        "git_sha": "abc1234",
    }


def _images_npz(path: Path, *, masks: bool, shift: bool, rng: np.random.Generator) -> None:
    n = len(TYPES)
    labels = np.array([0 if t == "good" else 1 for t in TYPES])
    images = rng.integers(60, 200, size=(n, 128, 128, 3), dtype=np.uint8)
    mask = np.zeros((n, 128, 128), dtype=bool)
    area = np.zeros(n, dtype=np.float32)
    if masks:
        for i in np.flatnonzero(labels):
            side = 8 if i % 2 else 40  # 64/16384 = 0.4% (small) or ~10%
            mask[i, 20 : 20 + side, 30 : 30 + side] = True
            area[i] = side * side / (128 * 128)
    arrays = {
        "paths": np.array([f"/data/test/{t}/{i:03d}.png" for i, t in enumerate(TYPES)]),
        "types": np.array(TYPES),
        "labels": labels,
        "images": images,
        "masks": mask,
        "defect_area": area,
    }
    if shift:
        arrays["images_shift"] = np.roll(images, SHIFT_N, axis=2)
        arrays["images_rotate"] = np.rot90(images, axes=(1, 2)).copy()
        arrays["masks_shift"] = np.roll(mask, SHIFT_N, axis=2)
        arrays["masks_rotate"] = np.rot90(mask, axes=(1, 2)).copy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _predictions(folder: Path, *, masks: bool, shift: bool, rng: np.random.Generator) -> None:
    n = len(TYPES)
    labels = np.array([0 if t == "good" else 1 for t in TYPES])
    scores = (rng.normal(size=n) + 2.0 * labels).astype(np.float32)
    thumbs = rng.random((n, 128, 128)).astype(np.float16)
    thumbs[labels == 1, 20:40, 30:50] += 2
    arrays = {"scores": scores, "thumbs": thumbs, "map_min": 0.0, "map_max": 3.0}
    if shift:
        for v in ("shift", "rotate"):
            arrays[f"scores_{v}"] = scores + 0.5
            arrays[f"thumbs_{v}"] = (thumbs + 0.3).astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "predictions.npz", **arrays)
    fpr = np.linspace(0, 1, 20)
    curves = {
        "roc": {"fpr": fpr.tolist(), "tpr": np.sqrt(fpr).tolist()},
        "pro": (
            {"fpr": np.linspace(0, 0.3, 10).tolist(), "pro": np.linspace(0, 0.9, 10).tolist()}
            if masks
            else {"fpr": [], "pro": []}
        ),
    }
    (folder / "curves.json").write_text(json.dumps(curves))


def make_results(root: Path) -> Path:
    """2 methods x 2 categories; "texture" has masks and shift/rotate rows, "plain" has no masks."""
    rng = np.random.default_rng(0)
    rows = []
    quality = {  # (method, category) -> image_auroc, pixel_auroc, aupro, f1
        ("patchcore", "texture"): (0.98, 0.97, 0.91, 0.95),
        ("padim", "texture"): (0.90, 0.95, 0.85, 0.88),
        ("patchcore", "plain"): (0.93, None, None, 0.90),
        ("padim", "plain"): (0.96, None, None, 0.92),
    }
    for method in METHODS:
        for category in ("texture", "plain"):
            rows.append(
                _row(
                    method,
                    category,
                    "original",
                    *quality[(method, category)],
                    ms=12.0 if method == "patchcore" else 8.0,
                )
            )
        ia = float(np.mean([quality[(method, c)][0] for c in ("texture", "plain")]))
        rows.append(
            _row(
                method,
                "mean",
                "original",
                ia,
                0.97 if method == "patchcore" else 0.95,
                quality[(method, "texture")][2],
                0.9,
            )
        )
        drop = 0.02 if method == "patchcore" else 0.15
        for v in ("shift", "rotate"):
            ia0, pa0, ap0, f0 = quality[(method, "texture")]
            rows.append(_row(method, "texture", v, ia0 - drop, pa0 - drop, ap0 - drop, f0 - drop))
    meta = {
        "git_sha": "abc1234",
        "date": "2024-01-01T00:00:00",
        "command": "patchad benchmark",
        "data": "/data",
        "shift_test": SHIFT_N,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps({"version": 1, "rows": rows, "meta": meta}))
    _images_npz(root / "runs/_images/texture.npz", masks=True, shift=True, rng=rng)
    _images_npz(root / "runs/_images/plain.npz", masks=False, shift=False, rng=rng)
    for method in METHODS:
        _predictions(root / "runs" / method / "texture", masks=True, shift=True, rng=rng)
        _predictions(root / "runs" / method / "plain", masks=False, shift=False, rng=rng)
    return root


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str]] = []
        self.srcs: list[str] = []
        self.links: list[str] = []
        self.section: str | None = None
        self.sections: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-method" in a:
            self.rows.append((a["data-method"], a["data-category"]))
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.links.append(a[key])
        if tag == "section":
            self.section = a.get("id")

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        if self.section:
            self.sections.setdefault(self.section, []).append(data)

    def text(self, section: str) -> str:
        return " ".join("".join(self.sections.get(section, [])).split())


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = make_results(tmp_path_factory.mktemp("bench") / "out")
    return write_report(root)


def test_report_rows_images_and_no_network(rendered):
    assert rendered.name == "report.html"
    page = _parse(rendered)
    expected = {(m, c) for m in METHODS for c in ("texture", "plain", "mean")}
    assert set(page.rows) == expected
    assert len(page.rows) == len(expected)
    assert len(page.srcs) > 10
    for src in page.srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).load()
    assert all(link.startswith("#") for link in page.links)
    raw = rendered.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", raw)
    assert "@import" not in raw
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", raw)
    assert "<script" not in raw


def test_report_sections_say_what_is_missing_and_what_moved(rendered):
    page = _parse(rendered)
    pros = page.text("pros-cons")
    assert "not available for plain" in pros  # null pixel metrics are stated, not a crash
    # alignment drop stated with numbers: padim 0.900 -> 0.750
    assert "padim 0.900 → 0.750 (-0.150)" in pros
    assert "padim depends most on alignment" in pros
    assert "under 1% of the image" in pros
    assert "per point of AU-PRO" in pros
    assert "shift" in page.text("alignment")
    # summary: best per column is bold with class "best"
    raw = rendered.read_text(encoding="utf-8")
    assert '<td class="best"><b>0.980</b></td>' in raw


def test_pros_and_cons_follow_the_numbers(tmp_path):
    root = make_results(tmp_path / "out")
    before = _parse(write_report(root)).text("pros-cons")
    assert "image AUROC: patchcore wins on 1 category: texture (0.980 vs 0.900" in before
    data = json.loads((root / "results.json").read_text())
    for row in data["rows"]:
        if row["category"] == "texture" and row["variant"] == "original":
            row["image_auroc"] = 0.99 if row["method"] == "padim" else 0.70
    (root / "results.json").write_text(json.dumps(data))
    after = _parse(write_report(root)).text("pros-cons")
    assert after != before
    assert "image AUROC: padim wins on 2 categories" in after
    assert "texture (0.990 vs 0.700 for patchcore, +0.290)" in after


def test_report_without_alignment_rows_or_run_files(tmp_path):
    root = make_results(tmp_path / "out")
    data = json.loads((root / "results.json").read_text())
    data["rows"] = [r for r in data["rows"] if r["variant"] == "original"]
    (root / "results.json").write_text(json.dumps(data))
    shutil.rmtree(root / "runs" / "padim" / "plain")
    page = _parse(write_report(root))
    assert "No alignment experiment in this run" in page.text("pros-cons")
    assert "runs/padim/plain/predictions.npz is missing" in page.text("problems")


def test_cli_report(tmp_path, capsys):
    root = make_results(tmp_path / "out")
    assert main(["report", str(root)]) == 0
    assert (root / "report.html").is_file()
    other = tmp_path / "elsewhere.html"
    assert main(["report", str(root), "--out", str(other)]) == 0
    assert other.is_file()
    assert main(["report", str(root), "--out", str(other)]) == 2  # no overwrite without --force
    assert "already exists" in capsys.readouterr().err
    assert main(["-q", "report", str(root), "--out", str(other), "--force"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchad: error:")
    assert "nope: does not exist" in err
    assert "\n" not in err
    (root / "results.json").write_text("{not json")
    assert main(["report", str(root)]) == 2
    assert "results.json: not valid JSON" in capsys.readouterr().err


def test_report_in_headless_chromium(rendered, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,2000",
            f"--screenshot={shot}",
            rendered.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        check=False,
    )
    console = [
        line
        for line in proc.stderr.splitlines()
        if "CONSOLE" in line or "Uncaught" in line or "Refused to" in line
    ]
    assert not console, "\n".join(console)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 5.0


def test_winner_sentence_names_the_last_of_three_methods():
    from patchad.report.sentences import _winner_sentences

    original = {
        ("patchcore", "conveyor"): {"pixel_auroc": 0.977},
        ("padim", "conveyor"): {"pixel_auroc": 0.957},
        ("spade", "conveyor"): {"pixel_auroc": 0.996},
    }
    text = " ".join(_winner_sentences(["patchcore", "padim", "spade"], ["conveyor"], original))
    assert "conveyor (0.996 vs 0.977 for patchcore, +0.019; last padim 0.957, -0.039)" in text
