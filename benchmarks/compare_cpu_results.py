"""Are CPU results bit for bit those of another source tree (issue 28: "CPU results are
unchanged" by the device work)?

Fits PatchCore (10 %-like ratio 0.25; sharded coreset; faiss search), PaDiM and SPADE on the
demo ``object`` category (64 px, 16 training images, calibrated on a 10 % hold-out) with each
source tree, in a fresh process each, and compares SHA-256 hashes of: the learned and
calibration tensors (:func:`patchad.modelfile.checksum`), the stored state without the lineage
(which holds the fit's time), the test predictions (scores and maps), and the predictions of the
saved and reloaded model. With ``--device cpu`` this tree's ``fit``/``predict``/``load`` get
``device="cpu"``; the other tree runs with its defaults.

    git archive <commit> src | tar -x -C /tmp/base
    PYTHONPATH=src python3 benchmarks/compare_cpu_results.py --base-src /tmp/base/src \
        --device cpu --out device_cpu_unchanged.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, header, write_results

CHILD = r"""
import hashlib, json, sys, tempfile
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(1)
from patchad import PatchCore, PaDiM, SPADE, load
from patchad.modelfile import checksum
root, device = Path(sys.argv[1]), sys.argv[2]
good = root / "object" / "train" / "good"
test = sorted((root / "object" / "test").rglob("*.png"))
L = "tf_efficientnet_lite0"
dets = {
    "patchcore": PatchCore(backbone=L, image_size=64, coreset_ratio=0.25),
    "patchcore_shard": PatchCore(
        backbone=L, image_size=64, coreset_ratio=0.5, coreset_shard_size=1000
    ),
    "patchcore_faiss": PatchCore(backbone=L, image_size=64, coreset_ratio=0.25, search="faiss"),
    "padim": PaDiM(backbone=L, image_size=64, n_features=20),
    "spade": SPADE(backbone=L, image_size=64, k=3),
}
kw = {} if device == "default" else {"device": device}

def digest(pred):
    h = hashlib.sha256(pred.scores.tobytes())
    for m in pred.maps:
        h.update(np.ascontiguousarray(m).tobytes())
    return h.hexdigest()[:16]

out = {}
for name, det in dets.items():
    det.fit(good, **kw)
    tensors, state = det._payload()
    state = {k: v for k, v in state.items() if k != "lineage"}
    with tempfile.TemporaryDirectory() as d:
        det.save(Path(d) / "m.safetensors")
        loaded = digest(load(Path(d) / "m.safetensors", **kw).predict(test))
    out[name] = {
        "tensors": checksum({k: v.contiguous() for k, v in tensors.items()})[:16],
        "state": hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16],
        "predict": digest(det.predict(test, **kw)),
        "loaded_predict": loaded,
    }
print(json.dumps(out))
"""


def _run(src: Path, data: Path, device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), device],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{src}: child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-src", type=Path, required=True, help="the other tree's src/")
    parser.add_argument("--device", default="cpu", help="this tree's device (or 'default')")
    parser.add_argument("--out", help="file name under benchmarks/results/")
    args = parser.parse_args()
    text = header()
    with tempfile.TemporaryDirectory() as scratch:
        from patchad.demo import make_demo_dataset

        data = make_demo_dataset(Path(scratch), n_train=16, n_test_good=4, n_test_defect=2, size=64)
        base = _run(args.base_src.resolve(), data, "default")
        mine = _run(ROOT / "src", data, args.device)
    lines = [f"{'case':<16} {'what':<15} {'base':<17} {'this tree':<17} equal"]
    for case, values in base.items():
        for what, value in values.items():
            other = mine[case][what]
            lines.append(f"{case:<16} {what:<15} {value:<17} {other:<17} {value == other}")
    same = all(base[c][w] == mine[c][w] for c in base for w in base[c])
    text += "\n".join(lines) + f"\n\nall equal bit for bit: {same}\n"
    print(text, end="")
    write_results(args.out, text)


if __name__ == "__main__":
    main()
