"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = Path(os.environ.get("PATCHAD_BOTTLE", ROOT.parent / "shared/data/mvtec_ad/bottle"))
RESULTS = ROOT / "benchmarks" / "results"


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_isolated(argv: list[str]) -> dict:
    """Run ``python3 argv...`` in a fresh process (so that its peak RSS is its own) and return
    the JSON object its last line of output printed; a failure raises with its stderr."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(owner: object, name: str, total: list[float]) -> None:
    """Replace ``owner.name`` (a function or method) by a wrapper that adds its wall seconds
    to ``total[0]``."""
    import time

    original = getattr(owner, name)

    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    setattr(owner, name, run)


def write_results(name: str | None, text: str) -> None:
    """Write ``text`` to ``benchmarks/results/<name>``; nothing when ``name`` is None."""
    if name:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(text)


def header() -> str:
    """First lines of every results file: the exact command, date and machine."""
    cmd = "PYTHONPATH=src python3 " + " ".join(sys.argv)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    return (
        f"# command: {cmd}\n# date: {now}\n# machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f} (above ~0.3 "
        f"other jobs shared the cores and timings are noisy), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )


def fit_and_score_bottle(det) -> dict:
    """Fit ``det`` on bottle's ``train/good`` and predict its test set.

    Returns:
        ``fit_s``, ``fit_peak_rss_mb``, ``predict_ms_img`` (end to end over the test set),
        ``image_auroc``, ``pixel_auroc`` (masks at each image's size; good images count as
        all-normal), and ``batch``: the first 8 test images preprocessed, for
        :func:`forward_times`.
    """
    import time

    import numpy as np

    from patchad.images import list_images, read_mask
    from patchad.loading import iter_batches
    from patchad.metrics import image_auroc, pixel_auroc

    start = time.perf_counter()
    det.fit(BOTTLE / "train" / "good")
    fit_s = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    test = list_images(BOTTLE / "test")
    labels = np.array([p.parent.name != "good" for p in test])
    start = time.perf_counter()
    pred = det.predict(test)
    predict_ms = (time.perf_counter() - start) / len(test) * 1000
    masks = []
    for p, m in zip(test, pred.maps, strict=True):
        mask_path = BOTTLE / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        masks.append(read_mask(mask_path) if mask_path.exists() else np.zeros(m.shape, bool))
    return {
        "fit_s": fit_s,
        "fit_peak_rss_mb": fit_rss,
        "predict_ms_img": predict_ms,
        "image_auroc": image_auroc(pred.scores, labels),
        "pixel_auroc": pixel_auroc(pred.maps, masks),
        "batch": next(iter(iter_batches(test[:8], det.preprocess_, 8))).images,
    }


def spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced over them (every defect type gets a share)."""
    return items[:: max(1, len(items) // n)][:n]


def forward_times(det, batch, repeats: int = 3) -> list[tuple[float, float, dict]]:
    """After one warm-up, ``repeats`` times: seconds of the backbone's forward on ``batch``,
    seconds of ``det.predict_tensor(batch)``, and the detector's ``last_timings_`` (or {})."""
    import time

    import torch

    out = []
    with torch.inference_mode():
        det.predict_tensor(batch)
        for _ in range(repeats):
            t = time.perf_counter()
            det.features(batch)
            backbone = time.perf_counter() - t
            t = time.perf_counter()
            det.predict_tensor(batch)
            out.append((backbone, time.perf_counter() - t, dict(getattr(det, "last_timings_", {}))))
    return out
