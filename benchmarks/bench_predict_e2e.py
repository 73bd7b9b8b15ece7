"""What a user waits for: ``patchad predict`` writing every output against the same run writing
only ``scores.csv``, and ``patchad serve``'s latency with and without ``?overlay=png`` (issue 28).

    PYTHONPATH=src python3 benchmarks/bench_predict_e2e.py --before-src /path/to/old/src \\
        --out predict_e2e.md

Data: ``--images`` generated RGB images of 800 x 600 (the demo's machined ``part`` rendered at
800 px and cropped), deterministic, and 40 training images; model: PatchCore with
``tf_efficientnet_lite0`` and ``coreset_ratio=0.01`` at the default 256 px, calibrated by ``fit``
(so masks are written). Both are kept in ``--work`` and reused.

1. predict: the real CLI as subprocesses (``python -m patchad.cli predict``), the full run and
   the ``--outputs scores`` run alternating, ``--repeats`` each; medians of wall time and of the
   children's CPU time. ``--before-src`` adds the full run of another source tree (the code
   before this change) to the same alternation.
2. serve: a real ``patchad serve`` on a free loopback port; one client sends one image per
   request, alternating with and without ``?overlay=png``, ``--requests`` each after 5 warm-up
   requests; p50 per image. ``--before-src`` repeats it with that tree's server.
3. stages: each output step timed alone in this process over 20 images (before: matplotlib's
   heat map and Pillow's default PNG; after: the library's functions), for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_results

SRC = ROOT / "src"
N_TRAIN = 40
WARMUP = 5


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


def prepare(work: Path, n_images: int) -> tuple[Path, Path]:
    """The test folder and the calibrated model, made once under ``work``."""
    from patchad.demo import render

    data, model = work / "data", work / "model.safetensors"
    for split, count in (("train", N_TRAIN), ("test", n_images)):
        folder = data / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            target = folder / f"{i:03d}.png"
            if target.exists():
                continue
            defect = (
                None if split == "train" or i % 2 == 0 else ("scratch", "spot", "missing")[i % 3]
            )
            index = i if split == "train" else 100_000 + i
            image, _ = render("part", index, defect, size=800, seed=0)
            image.crop((0, 100, 800, 700)).save(target)
    if not model.exists():
        command = [sys.executable, "-m", "patchad.cli", "-q", "fit", "--data", str(data / "train")]
        command += ["--backbone", "tf_efficientnet_lite0", "--set", "coreset_ratio=0.01"]
        subprocess.run([*command, "--out", str(model)], check=True, env=_env(SRC))
    return data / "test", model


def _predict(
    src: Path, model: Path, test: Path, out: Path, extra: list[str]
) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the child) of one ``patchad predict``."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "patchad.cli", "-q", "predict", "--model", str(model)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([*command, str(test), "--out", str(out), *extra], check=True, env=_env(src))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def bench_predict(
    model: Path, test: Path, work: Path, repeats: int, before: Path | None
) -> dict[str, dict[str, float]]:
    variants: dict[str, tuple[Path, list[str]]] = {}
    if before is not None:
        variants["full, before"] = (before, [])
    variants["scores only"] = (SRC, ["--outputs", "scores"])
    variants["full"] = (SRC, [])  # last, so that the sizes below are its outputs
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, (src, extra) in variants.items():
            times[name].append(_predict(src, model, test, work / "out", extra))
            print(
                f"repeat {repeat}: {name}: {times[name][-1][0]:.1f} s, load {_load()}", flush=True
            )
    sizes = _folder_sizes(work / "out")
    result = {
        name: {
            "wall": median(w for w, _ in runs),
            "cpu": median(c for _, c in runs),
            "walls": [round(w, 1) for w, _ in runs],
        }
        for name, runs in times.items()
    }
    return {**result, "_sizes": sizes}  # type: ignore[dict-item]


def _folder_sizes(out: Path) -> dict[str, float]:
    return {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
        for p in sorted(out.iterdir())
        if p.is_dir()
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(src: Path, model: Path, test: Path, requests: int, log: Path) -> dict[str, float]:
    """p50 seconds per one-image request, with and without ``?overlay=png``."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "patchad.cli", "serve", "--model", str(model)]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env=_env(src),
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server not ready; see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        images = sorted(test.glob("*.png"))
        latencies: dict[str, list[float]] = {"plain": [], "overlay": []}
        with httpx.Client(timeout=120) as client:
            for i in range(WARMUP + requests):
                for kind in ("plain", "overlay"):
                    path = images[i % len(images)]
                    files = [("files", (path.name, path.read_bytes(), "image/png"))]
                    query = "?overlay=png" if kind == "overlay" else ""
                    start = time.perf_counter()
                    answer = client.post(f"{url}/predict{query}", files=files)
                    elapsed = time.perf_counter() - start
                    answer.raise_for_status()
                    assert ("overlay_png" in answer.json()["results"][0]) == (kind == "overlay")
                    if i >= WARMUP:
                        latencies[kind].append(elapsed)
        return {kind: median(values) for kind, values in latencies.items()}
    finally:
        server.terminate()
        server.wait(timeout=60)


def bench_stages(test: Path, model: Path) -> list[tuple[str, float, float]]:
    """(stage, ms per image before, ms per image after), each step alone on 20 images."""
    from matplotlib import colormaps
    from PIL import Image

    import patchad
    from patchad.atomic import atomic_write_bytes, save_npy_atomic, write_png_atomic
    from patchad.calibration import region_boxes
    from patchad.images import read_image
    from patchad.outputs import overlay_scale
    from patchad.png import encode_png
    from patchad.visualize import heatmap

    detector = patchad.load(model)
    paths = sorted(test.glob("*.png"))[:20]
    pred = detector.predict([str(p) for p in paths])
    scale = overlay_scale(detector.pixel_threshold_, 0.0, 1.0)
    pictures = [read_image(p) for p in paths]
    scratch = Path(tempfile.mkdtemp(prefix="bench-e2e-"))

    def old_heatmap(amap: np.ndarray) -> np.ndarray:
        normed = np.clip((amap - scale[0]) / (scale[1] - scale[0]), 0.0, 1.0)
        return (colormaps["jet"](normed)[..., :3] * 255).round().astype(np.uint8)

    def pillow_png(image: object) -> bytes:
        picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()

    def per_image(step) -> float:
        step(0)
        start = time.perf_counter()
        for i in range(len(paths)):
            step(i)
        return (time.perf_counter() - start) / len(paths) * 1000

    overlays = [
        Image.blend(pictures[i], Image.fromarray(heatmap(m, *scale)), 0.45)
        for i, m in enumerate(pred.maps)
    ]
    masks = [m.astype(np.uint8) * 255 for m in pred.masks]
    rows = [
        (
            "decode the image again (for its overlay)",
            per_image(lambda i: read_image(paths[i])),
            per_image(lambda i: read_image(paths[i])),
        ),
        (
            "heat map (jet colours)",
            per_image(lambda i: old_heatmap(pred.maps[i])),
            per_image(lambda i: heatmap(pred.maps[i], *scale)),
        ),
        (
            "PNG encoding, overlay",
            per_image(lambda i: pillow_png(overlays[i])),
            per_image(lambda i: encode_png(overlays[i])),
        ),
        (
            "PNG encoding, mask",
            per_image(lambda i: pillow_png(masks[i])),
            per_image(lambda i: encode_png(masks[i])),
        ),
        (
            "write a map (.npy, atomic)",
            per_image(lambda i: save_npy_atomic(scratch / f"{i}.npy", pred.maps[i])),
            per_image(lambda i: save_npy_atomic(scratch / f"{i}.npy", pred.maps[i])),
        ),
        (
            "write an overlay PNG (atomic)",
            per_image(
                lambda i: atomic_write_bytes(
                    scratch / f"{i}.png", pillow_png(overlays[i]), force=True
                )
            ),
            per_image(lambda i: write_png_atomic(scratch / f"{i}.png", overlays[i])),
        ),
        (
            "boxes of the mask (results.jsonl)",
            per_image(lambda i: _old_region_boxes(pred.masks[i])),
            per_image(lambda i: region_boxes(pred.masks[i])),
        ),
    ]
    sizes = [
        (
            "overlay PNG KiB",
            len(pillow_png(overlays[0])) / 1024,
            len(encode_png(overlays[0])) / 1024,
        ),
        ("mask PNG KiB", len(pillow_png(masks[0])) / 1024, len(encode_png(masks[0])) / 1024),
    ]
    shutil.rmtree(scratch, ignore_errors=True)
    return rows + sizes


def _old_region_boxes(mask: np.ndarray) -> list[list[int]]:
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    return [[c.start, r.start, c.stop, r.stop] for r, c in ndimage.find_objects(labels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=112, help="test images (800 x 600)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30, help="serve requests of each kind")
    parser.add_argument("--before-src", type=Path, help="src/ of the code before, to compare")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_e2e")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-predict", action="store_true", help="serve and stages only")
    parser.add_argument("--out", help="results file under benchmarks/results/")
    args = parser.parse_args()
    command = "PYTHONPATH=src python3 " + " ".join(sys.argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = _load()
    args.work.mkdir(parents=True, exist_ok=True)
    test, model = prepare(args.work, args.images)
    before = args.before_src.resolve() if args.before_src else None

    predict, sizes = {}, {}
    if not args.skip_predict:
        predict = bench_predict(model, test, args.work, args.repeats, before)
        sizes = predict.pop("_sizes")
    load_predict = _load()
    serve: dict[str, dict[str, float]] = {}
    if not args.skip_serve:
        serve["after"] = bench_serve(SRC, model, test, args.requests, args.work / "serve.log")
        if before is not None:
            serve["before"] = bench_serve(before, model, test, args.requests, args.work / "s0.log")
    stages = bench_stages(test, model)
    load_end = _load()

    lines = [
        f"# command: {command}",
        f"# date: {date}",
        f"# machine: {platform.machine()}, {os.cpu_count()} cores; load average (1, 5, 15 min) "
        f"at start {load_start}, after predict {load_predict}, at end {load_end} (other jobs "
        "shared the cores: above ~0.3 the timings are noisy)",
        "",
        f"{args.images} generated RGB images of 800 x 600; PatchCore, tf_efficientnet_lite0, "
        "coreset 1 %, 256 px, calibrated (masks written). Wall time of the whole command "
        "(imports included), median of the runs; CPU = user + system of the child.",
    ]
    if predict:
        base = predict["scores only"]["wall"]
        lines += [
            "",
            "## patchad predict",
            "",
            "| run | wall s (median) | / scores only | CPU s | runs, wall s |",
            "|---|---|---|---|---|",
        ]
        for name, row in predict.items():
            walls = ", ".join(f"{w:.1f}" for w in row["walls"])
            ratio, cpu = row["wall"] / base, row["cpu"]
            lines.append(f"| {name} | {row['wall']:.1f} | {ratio:.2f}x | {cpu:.1f} | {walls} |")
        lines += ["", "Output sizes of the full run (MiB): "]
        lines[-1] += ", ".join(f"{k} {v:.1f}" for k, v in sizes.items())
    if serve:
        lines += [
            "",
            "## patchad serve: one image per request, p50",
            "",
            "| server | p50 ms, no overlay | p50 ms, ?overlay=png | ratio |",
            "|---|---|---|---|",
        ]
        for name, p50 in serve.items():
            plain, over = p50["plain"] * 1000, p50["overlay"] * 1000
            lines.append(f"| {name} | {plain:.0f} | {over:.0f} | {over / plain:.2f}x |")
    lines += [
        "",
        "## Each output step alone (this process, 20 images, one thread)",
        "",
        "| step | before, ms/img | after, ms/img |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {old:.1f} | {new:.1f} |" for name, old, new in stages]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, text)


if __name__ == "__main__":
    main()
