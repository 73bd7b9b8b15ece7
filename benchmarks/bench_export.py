"""Exported ONNX models against the torch models they came from, on MVTec bottle.

For PatchCore 1 % and 10 %, PaDiM and SPADE (tf_efficientnet_lite0, 256 px, batch 8, calibrated
on a 10 % hold-out): export time, peak RSS of the export and file size; equality of image
scores, maps, decisions and metrics (image AUROC, pixel AUROC, AU-PRO) through the same
``patchad.evaluate.evaluate``; predict ms/image of both (best of ``--repeats`` alternating runs
of the whole test set, decode and map restoration included); peak RSS of ``patchad predict``
over the 83 test images with the torch model and, in a virtual environment without torch
(``--venv``), with the ONNX model; the same through OpenVINO (``--engine openvino``) when it is
installed. Then banks of 20,000 rows and of MTD size (78,000 random rows, ``--mtd-rows``):
export, memory and speed at runtime batch sizes 1 and 8, to show the bound.

    PYTHONPATH=src python3 benchmarks/bench_export.py --venv /tmp/rt --out export_bottle.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE, ROOT, header, write_results

LITE0 = "tf_efficientnet_lite0"
CONFIGS = {
    "patchcore 1%": ("patchcore", {"coreset_ratio": 0.01}),
    "patchcore 10%": ("patchcore", {"coreset_ratio": 0.1}),
    "padim": ("padim", {}),
    "spade": ("spade", {}),
}


def _time_v(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``argv`` under ``/usr/bin/time -v``: (wall s, peak RSS MiB, stderr)."""
    start = time.perf_counter()
    run = subprocess.run(
        ["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{run.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    return wall, rss / 1024, run.stderr


def _fit(name: str, work: Path) -> Path:
    from patchad.detectors import DETECTORS

    method, params = CONFIGS[name]
    model = work / (name.replace(" ", "_").replace("%", "pct") + ".safetensors")
    if not model.exists():
        det = DETECTORS[method](backbone=LITE0, image_size=256, batch_size=8, **params)
        det.fit(BOTTLE / "train" / "good")
        det.save(model)
    return model


def _evaluate(model, test_set) -> tuple[object, list[np.ndarray]]:
    from patchad.evaluate import evaluate

    maps: list[np.ndarray] = []
    report = evaluate(
        model, test_set, on_map=lambda i, s, score, amap, mask, img: maps.append(amap)
    )
    return report, maps


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _cli(python: str) -> list[str]:
    return [python, "-m", "patchad.cli", "-q"]


def bottle_rows(work: Path, venv: Path | None, repeats: int, names: list[str]) -> list[str]:
    from patchad.datasets import load_category
    from patchad.detectors import load
    from patchad.runtime import load as load_onnx

    test_set = load_category(BOTTLE)
    n = len(test_set.samples)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    rows = []
    for name in names:
        model = _fit(name, work)
        onnx_path = model.with_suffix(".onnx")
        export_s, export_rss, _ = _time_v(
            [*_cli(sys.executable), "export", "--model", str(model), "--out", str(onnx_path),
             "--force"], env)  # fmt: skip
        det, rt = load(model), load_onnx(onnx_path)
        ov = load_onnx(onnx_path, engine="openvino") if _has_openvino() else None
        best = {"torch": np.inf, "onnx": np.inf, "openvino": np.inf}
        for _ in range(repeats):
            (ref, ref_maps), (got, got_maps) = _evaluate(det, test_set), _evaluate(rt, test_set)
            best["torch"] = min(best["torch"], ref.predict_s)
            best["onnx"] = min(best["onnx"], got.predict_s)
            if ov is not None:
                ov_report, ov_maps = _evaluate(ov, test_set)
                best["openvino"] = min(best["openvino"], ov_report.predict_s)
        score_rel = float(np.max(np.abs(got.scores - ref.scores) / np.abs(ref.scores)))
        map_rel = max(
            float(np.abs(a - b).max() / (b.max() - b.min()))
            for a, b in zip(got_maps, ref_maps, strict=True)
        )
        threshold = det.image_threshold_
        same = bool(np.array_equal(got.scores > threshold, ref.scores > threshold))
        diffs = {
            m: abs(getattr(got, m) - getattr(ref, m))
            for m in ("image_auroc", "pixel_auroc", "aupro")
        }
        out_torch, out_onnx = work / "out_torch", work / "out_onnx"
        _, torch_rss, _ = _time_v(
            [*_cli(sys.executable), "predict", "--model", str(model), str(BOTTLE / "test"),
             "--out", str(out_torch), "--force"], env)  # fmt: skip
        python = str(venv / "bin" / "python") if venv else sys.executable
        _, onnx_rss, _ = _time_v(
            [*_cli(python), "predict", "--model", str(onnx_path), str(BOTTLE / "test"),
             "--out", str(out_onnx), "--force"], None if venv else env)  # fmt: skip
        from patchad.outputs import read_scores_csv

        a, b = read_scores_csv(out_torch / "scores.csv"), read_scores_csv(out_onnx / "scores.csv")
        cli_same = [p for p, _ in a] == [p for p, _ in b] and all(
            abs(x - y) <= 1e-4 * abs(x) for (_, x), (_, y) in zip(a, b, strict=True)
        )
        ms_t, ms_o = best["torch"] / n * 1000, best["onnx"] / n * 1000
        ov_cells = "not installed | | | | | "
        if ov is not None:
            ov_rel = float(np.max(np.abs(ov_report.scores - ref.scores) / np.abs(ref.scores)))
            ov_map = max(
                float(np.abs(a - b).max() / (b.max() - b.min()))
                for a, b in zip(ov_maps, ref_maps, strict=True)
            )
            ov_same = bool(np.array_equal(ov_report.scores > threshold, ref.scores > threshold))
            ov_metric = max(
                abs(getattr(ov_report, m) - getattr(ref, m))
                for m in ("image_auroc", "pixel_auroc", "aupro")
            )
            _, ov_rss, _ = _time_v(
                [*_cli(python), "predict", "--model", str(onnx_path), "--engine", "openvino",
                 str(BOTTLE / "test"), "--out", str(work / "out_ov"), "--force"],
                None if venv else env)  # fmt: skip
            ms_v = best["openvino"] / n * 1000
            ov_cells = (
                f"{ms_v:.1f} | {ms_v / ms_t:.2f} | {ov_rss:.0f} | {ov_rel:.1e} | {ov_map:.1e} | "
                f"{ov_same} | {ov_metric:.1e}"
            )
        rows.append(
            f"{name} | {export_s:.1f} | {export_rss:.0f} | "
            f"{onnx_path.stat().st_size / 2**20:.1f} | "
            f"{ms_t:.1f} | {ms_o:.1f} | {ms_o / ms_t:.2f} | {torch_rss:.0f} | {onnx_rss:.0f} | "
            f"{score_rel:.1e} | {map_rel:.1e} | {same} | {ref.image_auroc:.4f} / "
            f"{got.image_auroc:.4f} | {ref.pixel_auroc:.4f} / {got.pixel_auroc:.4f} | "
            f"{ref.aupro:.4f} / {got.aupro:.4f} | {max(diffs.values()):.1e} | {cli_same} | "
            f"{ov_cells}"
        )
        print(rows[-1], flush=True)
        rows.append(
            f"#   load average after {name}: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
    return rows


def mtd_rows(work: Path, venv: Path | None, bank_rows: int, batches: list[int]) -> list[str]:
    """A PatchCore 1 % bottle model whose bank is replaced by ``bank_rows`` random rows (drawn
    from a normal distribution with the real bank's per-channel mean and std): export, file size,
    predict speed of both paths and peak RSS of ``patchad predict`` without torch."""
    import torch

    from patchad.detectors import load

    det = load(_fit("patchcore 1%", work))
    bank = det.memory_bank_
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(bank_rows, bank.shape[1], generator=generator)
    det.memory_bank_ = (noise * bank.std(0) + bank.mean(0)).contiguous()
    model = work / f"bank_{bank_rows}.safetensors"
    det.save(model, force=True)
    onnx_path = model.with_suffix(".onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    export_s, export_rss, _ = _time_v(
        [*_cli(sys.executable), "export", "--model", str(model), "--out", str(onnx_path),
         "--force"], env)  # fmt: skip
    images = sorted(str(p) for p in (BOTTLE / "test").rglob("*.png"))
    start = time.perf_counter()
    det.predict(images)
    ms_t = (time.perf_counter() - start) / len(images) * 1000
    python = str(venv / "bin" / "python") if venv else sys.executable
    code = (
        "import json, sys, time, patchad.runtime as r\n"
        "m = r.load(sys.argv[3], batch_size=int(sys.argv[2]), engine=sys.argv[1])\n"
        "t = time.perf_counter(); m.predict(sys.argv[4:])\n"
        "ms = (time.perf_counter() - t) / (len(sys.argv) - 4) * 1000\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps({'ms': ms, 'rss': int(hwm) / 1024}))\n"
    )
    rows = []
    for engine in ("onnxruntime", "openvino") if _has_openvino() else ("onnxruntime",):
        for batch in batches:
            run = subprocess.run(
                [python, "-c", code, engine, str(batch), str(onnx_path), *images],
                capture_output=True, text=True, check=True, env=None if venv else env,
            )  # fmt: skip
            result = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append(
                f"{bank_rows:,} x {bank.shape[1]} (random rows) | {export_s:.1f} | "
                f"{export_rss:.0f} | {onnx_path.stat().st_size / 2**20:.1f} | {engine} | "
                f"{batch} | {ms_t:.1f} | {result['ms']:.1f} | {result['ms'] / ms_t:.2f} | "
                f"{result['rss']:.0f}"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench_export", help="models and outputs")
    parser.add_argument("--venv", help="a virtual environment without torch, with patchad")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--mtd-rows", default="20000,78000", help="random bank sizes ('' skips them)"
    )
    parser.add_argument("--batches", default="1,8", help="runtime batch sizes for those banks")
    parser.add_argument("--out", help="results file under benchmarks/results/")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    venv = Path(args.venv) if args.venv else None
    text = header()
    if venv is not None:
        freeze = subprocess.run([str(venv / "bin" / "pip"), "freeze"], capture_output=True,
                                text=True, check=True).stdout.split()  # fmt: skip
        size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True).stdout
        text += f"# torch-free venv {venv}: {size.split()[0]} MiB; pip freeze: {' '.join(freeze)}\n"
    text += (
        "\nmethod | export s | export peak RSS MiB | .onnx MiB | torch ms/img | onnxruntime "
        "ms/img | ratio | predict CLI peak RSS MiB, torch | predict CLI peak RSS MiB, onnx "
        "(no torch) | max score rel diff | max map diff / range | same decisions | image AUROC "
        "torch / onnx | pixel AUROC torch / onnx | AU-PRO torch / onnx | max metric diff | "
        "CLI scores.csv equal (1e-4) | openvino ms/img | openvino / torch | predict CLI peak "
        "RSS MiB, openvino (no torch) | openvino max score rel diff | openvino max map diff / "
        "range | openvino same decisions | openvino max metric diff\n" + "-" * 100 + "\n"
    )
    names = [c for c in args.configs.split(",") if c]
    text += "\n".join(bottle_rows(work, venv, args.repeats, names)) + "\n"
    write_results(args.out, text)  # the bottle rows are kept if a later part fails
    sizes = [int(x) for x in args.mtd_rows.split(",") if x]
    if sizes:
        text += (
            "\nbank | export s | export peak RSS MiB | .onnx MiB | engine | batch | torch "
            "ms/img | runtime ms/img | ratio | runtime peak RSS MiB (no torch)\n" + "-" * 100 + "\n"
        )
        batches = [int(x) for x in args.batches.split(",")]
        for rows in sizes:
            text += "\n".join(mtd_rows(work, venv, rows, batches)) + "\n"
            write_results(args.out, text)
    text += f"\n# load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    print(text)
    write_results(args.out, text)


if __name__ == "__main__":
    main()
