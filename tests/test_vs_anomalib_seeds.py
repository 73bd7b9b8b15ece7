"""benchmarks/bench_vs_anomalib.py --seeds N: the part that runs without anomalib (which tools
get seeds, how draws collapse, and the "agree within" statements)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(
        "bench_vs_anomalib", BENCH / "bench_vs_anomalib.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(tool, method, auroc, seed=None, category="bottle"):
    row = {
        "tool": tool, "method": method, "category": category, "fit_s": 10.0,
        "predict_ms_img": 50.0, "peak_rss_mb": 900.0, "load_before": 1.0, "load_after": 1.0,
        "image_auroc": auroc, "pixel_auroc": 0.98, "aupro": 0.9,
    }  # fmt: skip
    if seed is not None:
        row["seed"] = seed
    return row


def _floor():
    return {
        "tool": "floor", "method": "decode + backbone", "category": "bottle", "fit_s": 5.0,
        "predict_ms_img": 20.0, "peak_rss_mb": 500.0, "load_before": 1.0, "load_after": 1.0,
    }  # fmt: skip


def test_tool_seeds_seed_only_the_random_rows():
    bench = _module()
    assert bench.tool_seeds("patchcore", 1) == [(t, None) for t in bench.TOOLS]
    pc = bench.tool_seeds("patchcore", 3)
    assert [s for t, s in pc if t == "anomalib"] == [0, 1, 2]  # anomalib's greedy too
    assert [s for t, s in pc if t == "patchad imagenet"] == [0, 1, 2]
    padim = bench.tool_seeds("padim", 3)
    assert [s for t, s in padim if t == "patchad imagenet"] == [None]  # every channel
    assert [s for t, s in padim if t == "anomalib"] == [None]
    assert [s for t, s in padim if t == "patchad defaults"] == [0, 1, 2]  # random subset


def test_single_draw_report_reads_as_before():
    bench = _module()
    rows = [_floor(), _row("patchad imagenet", "padim", 0.99), _row("anomalib", "padim", 0.98)]
    text = bench.report([*rows, _floor()])
    assert "| bottle | patchad imagenet | padim | 10.0 | 50.0 | 900 | 0.9900 | 0.9800 |" in text
    assert "image_auroc patchad - anomalib +0.0100;" in text
    assert "floor 5.0 / 5.0 s" in text  # both floor rows kept
    assert "seed" not in text


def test_draws_collapse_and_agreement_uses_the_spread():
    bench = _module()
    rows = [_floor()]
    rows += [_row("patchad imagenet", "patchcore 1%", v, k) for k, v in enumerate([0.70, 0.79])]
    rows += [_row("anomalib", "patchcore 1%", v, k) for k, v in enumerate([0.73, 0.74])]
    text = bench.report([*rows, _floor()])
    assert "| 0.7450 (0.7000-0.7900) |" in text
    assert "| 0.7350 (0.7300-0.7400) |" in text
    assert "image_auroc patchad - anomalib +0.0100 (agree within the seed spread" in text
    apart = bench.agreement("image_auroc", [0.90, 0.92], [0.70, 0.74])
    assert "patchad higher by at least 0.1600, outside the seed spread" in apart
