"""Load test of ``patchad serve`` on loopback: throughput and latency against the library's
``predict`` on the same images with the same model, the queue bound (503s), and a SIGTERM in
the middle of a run.

    PYTHONPATH=src python3 benchmarks/bench_serve.py --out serve_load.txt

Phases (bounded in count and time; the server is a real ``patchad serve`` subprocess):

1. reference: ``Detector.predict`` over the 400 images (the library's batch path);
2. load: 8 client threads send the 400 images one per request; every answer must be 200 and
   match the reference (score within 1e-5, same decision), none lost or answered twice. Timed
   runs of the library and of the server alternate, 3 each (the machine may be shared);
3. overload: 32 clients send 16-image requests at once, past the queue bound: 503s with
   Retry-After, the 200s still correct, and the server still healthy afterwards;
4. SIGTERM: 8 clients send 200 more images; after 40 answers the server gets SIGTERM; every
   request that got an answer got a correct 200, and the server exits after finishing them.

With ``--swaps N`` it runs the line test instead (``patchad serve --models DIR``):

    PYTHONPATH=src python3 benchmarks/bench_serve.py --swaps 10 --size 128 --out serve_swaps.txt

two models (``a``: object, ``b``: texture) served from one folder, 8 clients send 400 images
across both (one per request), while ``a.safetensors`` is replaced atomically N times,
alternating between two versions of ``a`` (each replacement once the server reports the
previous one). Every answer must be 200 and equal ``Detector.predict`` of the version whose
SHA-256 the answer names (score within 1e-5, same decision); none lost or answered twice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, header, write_results

N_IMAGES = 400
CLIENTS = 8
ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "patchad.cli", "serve", "--model", str(model)]
    command += ["--port", str(port)]
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env, cwd=log.parent
    )


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


def _post(client: Any, url: str, path: Path) -> tuple[int, Any, float]:
    start = time.perf_counter()
    response = client.post(
        f"{url}/predict", files=[("files", (path.name, path.read_bytes(), "image/png"))]
    )
    elapsed = time.perf_counter() - start
    body = response.json() if response.status_code == 200 else response.headers
    return response.status_code, body, elapsed


def _check(answer: Any, ref: dict[str, Any]) -> bool:
    result = answer["results"][0]
    return abs(result["score"] - ref["score"]) <= 1e-5 and result["decision"] == ref["decision"]


def _load(url: str, jobs: list[Path], refs: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """Phase 2: 8 clients share the job list; one image per request."""
    import httpx

    answers: dict[int, list[Any]] = {i: [] for i in range(len(jobs))}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_job = iter(range(len(jobs)))

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while True:
                with lock:
                    index = next(next_job, None)
                if index is None:
                    return
                try:
                    status, body, elapsed = _post(c, url, jobs[index])
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(type(exc).__name__)
                    continue
                with lock:
                    latencies.append(elapsed)
                    answers[index].append((status, body))

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client) for _ in range(CLIENTS)]:
            future.result()
    wall = time.perf_counter() - start
    wrong = sum(
        1
        for i, got in answers.items()
        for status, body in got
        if status != 200 or not _check(body, refs[jobs[i]])
    )
    return {
        "wall": wall,
        "latencies": np.array(latencies),
        "errors": len(errors) + sum(1 for got in answers.values() for s, _ in got if s != 200),
        "lost": sum(1 for got in answers.values() if not got),
        "duplicated": sum(1 for got in answers.values() if len(got) > 1),
        "wrong": wrong,
    }


def _overload(url: str, paths: list[Path], refs: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """Phase 3: 32 clients, two 16-image requests each, all at once."""
    import httpx

    batch = paths[:16]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in batch]
    outcomes: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=300) as c:
            for _ in range(2):
                response = c.post(f"{url}/predict", files=files)
                body = response.json() if response.status_code == 200 else response.headers
                with lock:
                    outcomes.append((response.status_code, body))

    with ThreadPoolExecutor(32) as pool:
        for future in [pool.submit(client) for _ in range(32)]:
            future.result()
    ok = [body for status, body in outcomes if status == 200]
    wrong = sum(
        1
        for body in ok
        for result, path in zip(body["results"], batch, strict=True)
        if abs(result["score"] - refs[path]["score"]) > 1e-5
    )
    busy = [body for status, body in outcomes if status == 503]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "busy": len(busy),
        "retry_after": sorted({b.get("retry-after") for b in busy}),
        "other": len(outcomes) - len(ok) - len(busy),
        "wrong": wrong,
        "healthy": httpx.get(f"{url}/health", timeout=10).status_code == 200,
    }


def _sigterm(
    url: str, process: subprocess.Popen, jobs: list[Path], refs: dict[Path, dict[str, Any]]
) -> dict[str, Any]:
    """Phase 4: SIGTERM after 40 answers; a new connection per request, so that a refused
    connection (never sent) is told apart from a request lost after it was sent."""
    import httpx

    answered: list[tuple[int, Any, Path]] = []
    refused, lost = [0], [0]
    lock = threading.Lock()
    next_job = iter(range(len(jobs)))
    signalled = threading.Event()

    def client() -> None:
        while True:
            with lock:
                index = next(next_job, None)
            if index is None:
                return
            try:
                with httpx.Client(timeout=120) as c:
                    status, body, _ = _post(c, url, jobs[index])
            except httpx.ConnectError:
                with lock:
                    refused[0] += 1
                continue
            except httpx.HTTPError:
                with lock:
                    lost[0] += 1
                continue
            with lock:
                answered.append((status, body, jobs[index]))
                if len(answered) >= 40 and not signalled.is_set():
                    signalled.set()
                    process.send_signal(signal.SIGTERM)

    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client) for _ in range(CLIENTS)]:
            future.result()
    code = process.wait(120)
    return {
        "answered": len(answered),
        "statuses": sorted({s for s, _, _ in answered}),
        "answered_ok": sum(1 for s, b, p in answered if s == 200 and _check(b, refs[p])),
        "refused": refused[0],
        "lost": lost[0],
        "exit": code,
    }


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _swap_run(args: argparse.Namespace) -> str:
    """The line test: 2 models from one folder, 8 clients, 400 images, N atomic swaps of one."""
    import httpx

    from patchad import PatchCore
    from patchad.demo import make_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="patchad-bench-swaps-"))
    root = make_demo_dataset(
        work / "demo", n_train=30, n_test_good=60, n_test_defect=40, size=args.size
    )
    folder, versions = work / "models", work / "versions"
    folder.mkdir()
    versions.mkdir()
    dets: dict[str, Any] = {}
    for key, category, coreset in (
        ("a0", "object", 0.1),
        ("a1", "object", 0.2),
        ("b", "texture", 0.1),
    ):
        det = PatchCore(
            backbone="tf_efficientnet_lite0",
            image_size=args.size,
            coreset_ratio=coreset,
            batch_size=8,
            calibration_split=0.25,
        )
        det.fit(root / category / "train" / "good")
        det.save(versions / f"{key}.safetensors")
        dets[key] = det
    rng = np.random.default_rng(0)
    images = {
        m: sorted((root / c / "test").glob("*/*.png"))
        for m, c in (("a", "object"), ("b", "texture"))
    }
    jobs = [(m, images[m][i % len(images[m])]) for m in ("a", "b") for i in range(N_IMAGES // 2)]
    jobs = [jobs[i] for i in rng.permutation(len(jobs))]
    # what `patchad predict` answers with each version, by the version's SHA-256
    refs: dict[tuple[str, Path], dict[str, Any]] = {}
    shas = {key: _file_sha(versions / f"{key}.safetensors") for key in dets}
    for key, det in dets.items():
        paths = images["b" if key == "b" else "a"]
        for path, record in zip(paths, det.predict(paths).records(), strict=True):
            refs[(shas[key], path)] = record
    allowed = {"a": {shas["a0"], shas["a1"]}, "b": {shas["b"]}}
    shutil.copy(versions / "a0.safetensors", folder / "a.safetensors")
    shutil.copy(versions / "b.safetensors", folder / "b.safetensors")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "patchad.cli", "serve", "--models", str(folder)]
    command += ["--port", str(port), "--watch-interval", str(args.watch_interval)]
    log = work / "server.log"
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env, cwd=work
    )
    answers: dict[int, list[tuple[int, Any]]] = {i: [] for i in range(len(jobs))}
    errors: list[str] = []
    swap_times: list[float] = []
    lock = threading.Lock()
    next_job = iter(range(len(jobs)))
    done = [0]
    try:
        _wait_ready(url, server)

        def client() -> None:
            with httpx.Client(timeout=300) as c:
                while True:
                    with lock:
                        index = next(next_job, None)
                    if index is None:
                        return
                    name, path = jobs[index]
                    files = [("files", (path.name, path.read_bytes(), "image/png"))]
                    try:
                        response = c.post(f"{url}/models/{name}/predict", files=files)
                    except httpx.HTTPError as exc:
                        with lock:
                            errors.append(type(exc).__name__)
                        continue
                    body = response.json() if response.status_code == 200 else response.text
                    with lock:
                        answers[index].append((response.status_code, body))
                        done[0] += 1

        def swapper() -> None:
            """Replace a.safetensors N times, spread over the run by answers received; each
            once the server reports the previous version."""
            with httpx.Client(timeout=60) as c:
                for k in range(1, args.swaps + 1):
                    while done[0] < k * len(jobs) // (args.swaps + 2):
                        time.sleep(0.05)
                    key = "a1" if k % 2 else "a0"
                    start = time.perf_counter()
                    tmp = folder / ".a.safetensors.new"
                    shutil.copy(versions / f"{key}.safetensors", tmp)
                    os.replace(tmp, folder / "a.safetensors")
                    deadline = time.monotonic() + 300
                    while c.get(f"{url}/models/a").json()["sha256"] != shas[key]:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the server did not pick up a swap in 300 s")
                        time.sleep(0.05)
                    swap_times.append(time.perf_counter() - start)

        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS + 1) as pool:
            futures = [pool.submit(client) for _ in range(CLIENTS)] + [pool.submit(swapper)]
            for future in futures:
                future.result()
        wall = time.perf_counter() - start
        described = httpx.get(f"{url}/models/a", timeout=30).json()
    finally:
        server.terminate()
        server.wait(60)
    wrong, by_sha = 0, {}
    for i, got in answers.items():
        name, path = jobs[i]
        for status, body in got:
            if status != 200:
                continue
            result = body["results"][0]
            sha = result["model_sha256"]
            by_sha[sha] = by_sha.get(sha, 0) + 1
            ref = refs.get((sha, path))
            if (
                sha not in allowed[name]
                or ref is None
                or abs(result["score"] - ref["score"]) > 1e-5
                or result["decision"] != ref["decision"]
            ):
                wrong += 1
    non_200 = sum(1 for got in answers.values() for s, _ in got if s != 200)
    refused = sorted({f"{s} {b}"[:200] for got in answers.values() for s, b in got if s != 200})
    label = {shas["a0"]: "a v0", shas["a1"]: "a v1", shas["b"]: "b"}
    counts = ", ".join(
        f"{label.get(sha, sha[:12])} {n}"
        for sha, n in sorted(by_sha.items(), key=lambda x: label.get(x[0], ""))
    )
    swapped = sum(1 for line in log.read_text().splitlines() if "swapped, sha256" in line)
    return (
        f"# models: PatchCore, tf_efficientnet_lite0, {args.size} px, batch_size 8, 30 training "
        f"images each; a = object (v0 coreset 0.1, v1 coreset 0.2), b = texture (coreset 0.1)\n"
        f"# server: patchad serve --models DIR --watch-interval {args.watch_interval} (other "
        f"options default)\n\n"
        f"line: {CLIENTS} clients, {len(jobs)} requests of one image "
        f"(a {sum(m == 'a' for m, _ in jobs)}, b {sum(m == 'b' for m, _ in jobs)}), "
        f"a.safetensors replaced atomically {args.swaps} times "
        f"during the run (v0 -> v1 -> v0 ...)\n"
        f"  errors {len(errors) + non_200}, lost {sum(1 for g in answers.values() if not g)}, "
        f"duplicated {sum(1 for g in answers.values() if len(g) > 1)}, answers differing from "
        f"predict with the version named by their model_sha256 (score > 1e-5 or decision) {wrong}\n"
        f"  answers by version: {counts}\n"
        + (f"  non-200 answers: {refused[:5]}\n" if refused else "")
        + f"  client errors: {sorted(set(errors))}\n"
        f"  swaps logged by the server {swapped}, "
        f"listed by GET /models/a {len(described['swaps'])}; "
        f"replace-to-serving s: median {np.median(swap_times):.2f}, max {max(swap_times):.2f}\n"
        f"  wall {wall:.1f} s, {len(jobs) / wall:.1f} images/s\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results file name under benchmarks/results")
    parser.add_argument(
        "--size",
        type=int,
        default=256,
        help="image and model input size (default 256, the library's default input size)",
    )
    parser.add_argument(
        "--swaps", type=int, default=0, help="run the line test with this many model swaps"
    )
    parser.add_argument(
        "--watch-interval", type=float, default=0.5, help="with --swaps: the server's scan period"
    )
    args = parser.parse_args()
    text = header()
    if args.swaps:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
        text += f"# uptime at start: {uptime.strip()}\n" + _swap_run(args)
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
        text += f"# uptime at end: {uptime.strip()}\n"
        print(text)
        write_results(args.out, text)
        return

    import httpx  # noqa: F401  (fail early when the serve extras are missing)

    from patchad import PatchCore
    from patchad.demo import make_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="patchad-bench-serve-"))
    root = make_demo_dataset(
        work / "demo",
        categories=("object",),
        n_train=40,
        n_test_good=110,
        n_test_defect=30,
        size=args.size,
    )
    test = sorted((root / "object" / "test").glob("*/*.png"))[:200]
    rng = np.random.default_rng(0)
    jobs = [test[i] for i in rng.permutation(np.tile(np.arange(len(test)), 2))][:N_IMAGES]
    det = PatchCore(
        backbone="tf_efficientnet_lite0",
        image_size=args.size,
        coreset_ratio=0.1,
        batch_size=8,
        calibration_split=0.25,
    )
    det.fit(root / "object" / "train" / "good")
    model = work / "model.safetensors"
    det.save(model)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(model, port, work / "server.log")
    try:
        _wait_ready(url, server)  # before timing the library: the server's start-up is idle
        det.predict(jobs[:8])  # warm-up
        reference = det.predict(jobs)
        refs = dict(zip(jobs, reference.records(), strict=True))
        _load(url, jobs[:16], refs)  # warm-up of the server
        # the machine is shared, so library and server runs alternate, ROUNDS times each
        library_times, loads = [], []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            det.predict(jobs)
            library_times.append(time.perf_counter() - start)
            loads.append(_load(url, jobs, refs))
        over = _overload(url, test, refs)
        stop = _sigterm(url, server, list(reversed(jobs))[:200], refs)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    lat = np.concatenate([load["latencies"] for load in loads]) * 1000
    library_s, server_s = sum(library_times), sum(load["wall"] for load in loads)
    library_ips = ROUNDS * len(jobs) / library_s
    server_ips = ROUNDS * len(jobs) / server_s
    count = {key: sum(load[key] for load in loads) for key in ("errors", "lost", "duplicated")}
    wrong = sum(load["wrong"] for load in loads)
    rounds = ", ".join(
        f"{len(jobs) / lib:.1f} / {len(jobs) / load['wall']:.1f}"
        for lib, load in zip(library_times, loads, strict=True)
    )
    defective = sum(p.parent.name != "good" for p in jobs)
    text += (
        f"# model: PatchCore, tf_efficientnet_lite0, {args.size} px, coreset 0.1, batch_size 8, "
        f"{det.n_train_} training images; server: patchad serve defaults (max-wait 5 ms, "
        f"max-queue 64)\n# images: {len(jobs)} demo test images ({len(jobs) - defective} good, "
        f"{defective} defective, each file twice, shuffled), one image per request\n\n"
        f"load: {CLIENTS} concurrent clients, {len(jobs)} requests, {ROUNDS} rounds\n"
        f"  errors {count['errors']}, lost {count['lost']}, duplicated {count['duplicated']}, "
        f"answers differing from predict (score > 1e-5 or decision) {wrong}\n"
        f"  latency ms: p50 {np.percentile(lat, 50):.1f}, p90 {np.percentile(lat, 90):.1f}, "
        f"p99 {np.percentile(lat, 99):.1f}, max {lat.max():.1f}\n"
        f"  images/s per round, library Detector.predict over the same {len(jobs)} files "
        f"(same model, same run) / server: {rounds}\n"
        f"  all rounds: library {library_ips:.1f} images/s ({library_s:.1f} s), server "
        f"{server_ips:.1f} images/s ({server_s:.1f} s)\n"
        f"  ratio server / library: {server_ips / library_ips:.2f} (target >= 0.8)\n\n"
        f"overload: 32 clients x 2 requests of 16 images at once (queue bound 64 images)\n"
        f"  200: {over['ok']} (score mismatches {over['wrong']}), 503: {over['busy']} "
        f"(Retry-After {over['retry_after']}), other: {over['other']}; "
        f"/health 200 afterwards: {over['healthy']}\n\n"
        f"SIGTERM after 40 answers, {CLIENTS} clients, 200 requests, a new connection each\n"
        f"  answered {stop['answered']} (statuses {stop['statuses']}, correct 200s: "
        f"{stop['answered_ok']}), refused "
        f"connections after shutdown {stop['refused']}, sent but unanswered {stop['lost']}, "
        f"server exit status {stop['exit']} (-15: uvicorn re-raises SIGTERM after its graceful "
        "shutdown)\n"
    )
    text += f"# load average at end: {os.getloadavg()[0]:.2f}\n"
    print(text)
    write_results(args.out, text)


if __name__ == "__main__":
    main()
