"""Ray's overhead and scaling on this machine: ``patchad benchmark``, ``predict`` and ``fit``
run locally and with ``--ray`` (a local Ray cluster started by the command), each as a fresh
``python -m patchad.cli`` process.

Wall time is the command's, Ray's start and shutdown included. Peak RSS is the largest sum of
the resident sets of the command's process tree (the driver, Ray's daemons and workers),
sampled every 0.1 s from /proc; shared pages count once per process, so for Ray it overstates
the memory actually used.

Sections: ``demo`` (the ``patchad demo`` benchmark: 2 categories x 3 methods, with the shift
and rotation variants), ``predict`` (1,000 demo images of 128 px), ``mtd`` (PatchCore on MTD's
761 training images at 256 px: 779,264 patches, coreset by image-range shards, 2 Ray workers
against the same shards one after the other in one process), ``sweep`` (``benchmark --ray`` over
bottle and MTD, 3 methods: 1 worker x 2 CPUs against 2 workers x 1 CPU).

    PYTHONPATH=src python3 benchmarks/bench_ray.py --out ray.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, header, write_results

MTD = Path(os.environ.get("PATCHAD_MTD", ROOT.parent / "shared/data/mtd"))
LITE0 = ["--backbone", "tf_efficientnet_lite0"]


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(statm.split()[1]) * page
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run(argv: list[str], script: str | None = None) -> dict[str, float]:
    """Run ``patchad -q argv...`` (or ``python script argv...``); return wall seconds and the
    peak tree RSS in MiB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    command = [script] if script else ["-m", "patchad.cli", "-q"]
    proc = subprocess.Popen(
        [sys.executable, *command, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"patchad {' '.join(argv)} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2**20}


def _line(name: str, r: dict[str, float], base: dict[str, float] | None) -> str:
    ratio = f"{r['wall_s'] / base['wall_s']:.2f}" if base else "1.00"
    return f"| {name} | {r['wall_s']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} |"


TABLE = "| run | wall s | / local | peak tree RSS MiB |\n|---|---|---|---|"


def demo(tmp: Path) -> str:
    from patchad.demo import make_demo_dataset

    data = make_demo_dataset(tmp / "data", n_train=30, n_test_good=10, n_test_defect=5, size=128)
    base = ["benchmark", "--data", str(data), *LITE0, "--set", "image_size=128"]
    base += ["--set", "coreset_ratio=0.1", "--shift-test", "4"]
    runs = {
        "local (torch 2 threads)": [*base, "--out", str(tmp / "local")],
        "local --threads 1": ["--threads", "1", *base, "--out", str(tmp / "local1")],
        "--ray, 2 workers x 1 CPU": [*base, "--out", str(tmp / "ray2"), "--ray"],
        "--ray --cpus-per-task 2, 1 worker x 2 CPUs": [
            *base,
            "--out",
            str(tmp / "ray1"),
            "--ray",
            "--cpus-per-task",
            "2",
        ],
    }
    results = {name: run(argv) for name, argv in runs.items()}
    first = results["local (torch 2 threads)"]
    lines = [TABLE, *(_line(n, r, first) for n, r in results.items())]

    def rows(folder: str) -> dict[tuple[str, str, str], dict]:
        doc = json.loads((tmp / folder / "results.json").read_text())
        return {(r["method"], r["category"], r["variant"]): r for r in doc["rows"]}

    local1, ray2, ray1 = rows("local1"), rows("ray2"), rows("ray1")
    metrics = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
    same = all(local1[k][m] == ray2[k][m] for k in local1 for m in metrics)
    cells = [r for k, r in rows("local").items() if k[1] != "mean" and k[2] == "original"]
    lines += [
        "",
        f"Metrics of `--ray` (1 CPU per task) identical to `local --threads 1`: {same} "
        f"({len(local1)} rows x {len(metrics)} metrics).",
        "",
        "Per-cell costs of the local run (fit, then evaluation of the original and the two "
        "variants; wall s = cell total from the log is not recorded, fit_s is):",
        "",
        "| method | category | fit s | ms/img | peak MiB |",
        "|---|---|---|---|---|",
        *(
            f"| {r['method']} | {r['category']} | {r['fit_s']:.1f} | "
            f"{r['ms_per_image']:.0f} | {r['peak_mem_mb']:.0f} |"
            for r in cells
        ),
        "",
        "Per-cell fit s in the Ray runs (2 workers x 1 CPU / 1 worker x 2 CPUs): "
        + ", ".join(
            f"{k[0]}/{k[1]} {ray2[k]['fit_s']:.1f}/{ray1[k]['fit_s']:.1f}"
            for k in sorted(ray2)
            if k[1] != "mean" and k[2] == "original"
        ),
    ]
    return "\n".join(lines)


def predict(tmp: Path) -> str:
    from patchad import PatchCore
    from patchad.demo import CATEGORY_DEFECTS, render

    good = [render("object", i, None, size=128, seed=0)[0] for i in range(30)]
    kinds = [None, *CATEGORY_DEFECTS["object"]]
    folder = tmp / "images"
    folder.mkdir()
    for i in range(1000):  # 1,000 test images: good and each defect kind in turn
        render("object", 1000 + i, kinds[i % len(kinds)], size=128, seed=0)[0].save(
            folder / f"{i:04d}.png"
        )
    model = tmp / "m.safetensors"
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=128, coreset_ratio=0.1)
    det.fit(good).save(model)
    base = ["predict", "--model", str(model), str(folder)]
    runs = {
        "local (torch 2 threads)": [*base, "--out", str(tmp / "p_local")],
        "--ray, 2 actors x 1 CPU": [*base, "--out", str(tmp / "p_ray2"), "--ray"],
        "--ray --cpus-per-task 2, 1 actor x 2 CPUs": [
            *base,
            "--out",
            str(tmp / "p_ray1"),
            "--ray",
            "--cpus-per-task",
            "2",
        ],
    }
    results = {name: run(argv) for name, argv in runs.items()}
    first = results["local (torch 2 threads)"]
    same = (tmp / "p_ray2" / "scores.csv").read_text().splitlines()[1:]
    local = (tmp / "p_local" / "scores.csv").read_text().splitlines()[1:]
    paths_same = [s.split(",")[0] for s in same] == [s.split(",")[0] for s in local]
    return "\n".join(
        [
            TABLE,
            *(_line(n, r, first) for n, r in results.items()),
            "",
            f"scores.csv rows in the same (input) order as local: {paths_same}, {len(same)} rows.",
        ]
    )


def sweep(tmp: Path) -> str:
    """``patchad benchmark --ray`` over bottle and MTD, 3 methods (6 cells): 1 worker x 2 CPUs
    against 2 workers x 1 CPU, the scaling of the sweep on this machine."""
    bottle = Path(os.environ.get("PATCHAD_BOTTLE", ROOT.parent / "shared/data/mvtec_ad/bottle"))
    if not (MTD / "train").is_dir() or not (bottle / "train").is_dir():
        return f"skipped: {MTD} or {bottle} not found"
    data = tmp / "sweep_data"
    data.mkdir()
    (data / "bottle").symlink_to(bottle)
    (data / "mtd").symlink_to(MTD)
    base = ["benchmark", "--data", str(data), *LITE0, "--methods", "patchcore,padim,spade"]
    runs = {
        "--ray --cpus-per-task 2, 1 worker x 2 CPUs": [
            *base, "--out", str(tmp / "sweep1"), "--ray", "--cpus-per-task", "2"],
        "--ray, 2 workers x 1 CPU": [*base, "--out", str(tmp / "sweep2"), "--ray"],
    }  # fmt: skip
    results = {name: run(argv) for name, argv in runs.items()}
    first = results["--ray --cpus-per-task 2, 1 worker x 2 CPUs"]
    second = results["--ray, 2 workers x 1 CPU"]

    def rows(folder: str) -> dict[tuple[str, str, str], dict]:
        doc = json.loads((tmp / folder / "results.json").read_text())
        return {(r["method"], r["category"], r["variant"]): r for r in doc["rows"]}

    one, two = rows("sweep1"), rows("sweep2")
    metrics = ("image_auroc", "pixel_auroc", "aupro")
    worst = max(abs(one[k][m] - two[k][m]) for k in one for m in metrics)
    cells = sorted(k for k in one if k[1] != "mean")
    return "\n".join(
        [
            TABLE.replace("/ local", "/ 1 worker"),
            *(_line(n, r, first) for n, r in results.items()),
            "",
            f"speed-up of 2 workers over 1: {first['wall_s'] / second['wall_s']:.2f}x "
            f"wall; largest metric difference between the two runs {worst:.2g} "
            "(torch 2 threads vs 1 thread per cell)",
            "",
            "| method | category | fit s, 1 worker x 2 CPUs | fit s, 2 workers x 1 CPU | ms/img "
            "(1 / 2) | image AUROC | pixel AUROC | AU-PRO |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {k[0]} | {k[1]} | {one[k]['fit_s']:.1f} | {two[k]['fit_s']:.1f} | "
                f"{one[k]['ms_per_image']:.0f} / {two[k]['ms_per_image']:.0f} | "
                f"{one[k]['image_auroc']:.4f} | {one[k]['pixel_auroc']:.4f} | "
                f"{one[k]['aupro']:.4f} |"
                for k in cells
            ),
        ]
    )


def mtd(tmp: Path) -> str:
    if not (MTD / "train" / "good").is_dir():
        return f"skipped: {MTD} not found"
    base = ["fit", "--data", str(MTD), *LITE0, "--set", "calibration_split=0"]
    local = tmp / "local.py"
    local.write_text(
        "import sys\n"
        "import torch\n"
        "torch.set_num_threads(1)  # as each Ray worker (1 CPU): same floats, same bank\n"
        "from patchad import PatchCore\n"
        "from patchad.data import training_images\n"
        "from patchad.sharded import fit_sharded\n"
        "det = PatchCore(backbone='tf_efficientnet_lite0', calibration_split=0.0)\n"
        "fit_sharded(det, training_images(sys.argv[1]), say=lambda m: print(m, file=sys.stderr))\n"
        "det.save(sys.argv[2])\n"
    )
    results = {
        "one process (1 thread), shards one after the other": run(
            [str(MTD), str(tmp / "local.safetensors")], script=str(local)
        )
    }
    results["--ray, 2 workers x 1 CPU"] = run(
        [*base, "--out", str(tmp / "ray.safetensors"), "--ray"]
    )
    from safetensors.torch import load_file

    a = load_file(tmp / "local.safetensors")["memory_bank_"]
    b = load_file(tmp / "ray.safetensors")["memory_bank_"]
    diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
    first = results["one process (1 thread), shards one after the other"]
    return "\n".join(
        [
            TABLE,
            *(_line(n, r, first) for n, r in results.items()),
            "",
            f"bank {tuple(a.shape)} vs {tuple(b.shape)}; largest difference {diff:.3g} "
            "(torch 1 thread in every process, so that the one-process run's floats, hence "
            "its greedy choices, are the workers')",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="demo,predict,mtd,sweep")
    parser.add_argument("--out", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    text = [header(), f"# load average now: {os.getloadavg()}\n"]
    for section in args.sections.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            t0 = os.getloadavg()[0]
            body = {"demo": demo, "predict": predict, "mtd": mtd, "sweep": sweep}[section](
                Path(tmp)
            )
            t1 = os.getloadavg()[0]
        block = f"## {section} (load average {t0:.1f} at start, {t1:.1f} at end)\n\n{body}\n"
        print(block, flush=True)
        text.append(block)
    write_results(args.out, "\n".join(text))


if __name__ == "__main__":
    main()
