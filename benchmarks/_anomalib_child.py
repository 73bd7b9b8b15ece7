"""anomalib's side of ``bench_vs_anomalib.py``; runs in anomalib's own virtual environment.

It imports neither patchad nor anything outside anomalib's own dependencies. It fits anomalib's
PaDiM or PatchCore with ``Engine.fit`` (validation turned off, no logger), on the MVTec-layout
category folder given, with the lite0 backbone whose bundled weights file the parent passes in
(loaded in order into timm's keys, as patchad does, so that nothing is downloaded). Then it scores
the test images with anomalib's own pre-processor and torch model (raw scores and maps, before
anomalib's min-max post-processing, which clamps), restores each map to its image's size
(bilinear) and writes ``<maps>/scores.csv`` and ``<maps>/<type>/<name>.npy`` for
``recompute_metrics.py``. Its last line of output is a JSON object with the timings.

Usage (the parent builds this command)::

    .venv-anomalib/bin/python benchmarks/_anomalib_child.py --method patchcore --ratio 0.01 \
        --category /data/mvtec_ad/bottle --weights lite0.pth --maps /tmp/maps --workdir /tmp/w
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import Resize

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def load_bundled(extractor: torch.nn.Module, backbone: str, weights: Path) -> None:
    """Load the bundled lite0 file (other key names) in order into timm's full-model keys."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    full_keys = list(timm.create_model(backbone, pretrained=False).state_dict())
    values = list(state.values())
    if len(full_keys) != len(values):
        raise SystemExit(f"{weights}: {len(values)} tensors, {backbone} has {len(full_keys)}")
    renamed = dict(zip(full_keys, values, strict=True))
    target = extractor.state_dict()
    extractor.load_state_dict({k: renamed[k] for k in target}, strict=True)


def test_images(category: Path) -> list[tuple[Path, str]]:
    return [
        (p, p.parent.name)
        for p in sorted((category / "test").glob("*/*"))
        if p.suffix.lower() in SUFFIXES
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=("padim", "patchcore"), required=True)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--category", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--maps", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", default="blocks.2,blocks.4")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seeds torch's global generator")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # anomalib's PatchCore draws its projection and first greedy point from torch's global
    # generator (no seed argument in its API): seeding it is how a run picks its draw
    torch.manual_seed(args.seed)
    start_all = time.perf_counter()

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim, Patchcore
    from anomalib.models.components.sampling import k_center_greedy

    layers = args.layers.split(",")
    size = (args.image_size, args.image_size)
    if args.method == "padim":
        from anomalib.models.image.padim.torch_model import PadimModel

        info = timm.create_model(args.backbone, pretrained=False, features_only=True).feature_info
        n_all = sum(
            c for n, c in zip(info.module_name(), info.channels(), strict=True) if n in layers
        )
        model = Padim(
            backbone=args.backbone,
            layers=layers,
            pre_trained=False,
            n_features=n_all,
            pre_processor=Padim.configure_pre_processor(image_size=size),
            evaluator=False,
            visualizer=False,
        )
        assert isinstance(model.model, PadimModel)
    else:
        model = Patchcore(
            backbone=args.backbone,
            layers=layers,
            pre_trained=False,
            coreset_sampling_ratio=args.ratio,
            pre_processor=Patchcore.configure_pre_processor(image_size=size),
            evaluator=False,
            visualizer=False,
        )
    load_bundled(model.model.feature_extractor.feature_extractor, args.backbone, args.weights)

    # torch 2.14.1's batched CPU torch.linalg.inv fails here (oneMKL "Parameter 6 was incorrect
    # on entry to SLASWP", then hangs) on anomalib's 1,024 covariances; they are symmetric
    # positive definite (+ 0.01 I), so the Cholesky inverse gives the same matrix (measured:
    # 6e-7 relative) and is what anomalib's PaDiM gets here instead.
    inv_s = [0.0]

    def cholesky_inv(matrix: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = torch.cholesky_inverse(torch.linalg.cholesky(matrix))
        inv_s[0] += time.perf_counter() - t
        return out

    torch.linalg.inv = cholesky_inv  # this child process only

    # time anomalib's greedy coreset selection, to state its rate per selected row
    greedy = {"s": 0.0, "iterations": 0, "rows": 0, "dim": 0}
    original = k_center_greedy.KCenterGreedy.select_coreset_idxs

    def timed_select(self):
        t = time.perf_counter()
        out = original(self)
        greedy["s"] += time.perf_counter() - t
        greedy["iterations"] += len(out)
        greedy["rows"] = int(self.embedding.shape[0])
        greedy["dim"] = int(self.embedding.shape[1])
        return out

    k_center_greedy.KCenterGreedy.select_coreset_idxs = timed_select

    datamodule = MVTecAD(
        root=args.category.parent,
        category=args.category.name,
        train_batch_size=args.batch,
        eval_batch_size=args.batch,
        num_workers=args.workers,
        augmentations=Resize(size, antialias=True),
    )
    engine = Engine(
        logger=False,
        default_root_dir=args.workdir,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - t0

    # predict: decode, anomalib's pre-processor (resize 256, ImageNet normalisation), the raw
    # torch model, and the bilinear restore to each image's size
    model.eval()
    items = test_images(args.category)
    resize = Resize(size, antialias=True)
    maps: list[np.ndarray] = []
    scores: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(items), args.batch):
            chunk = items[i : i + args.batch]
            tensors, sizes = [], []
            for path, _ in chunk:
                image = Image.open(path).convert("RGB")
                sizes.append(image.size)
                array = np.asarray(image, dtype=np.float32) / 255.0
                tensors.append(resize(torch.from_numpy(array).permute(2, 0, 1)))
            out = model.model(model.pre_processor(torch.stack(tensors)))
            amap = out.anomaly_map.reshape(len(chunk), 1, *size)
            for m, (w, h) in zip(amap, sizes, strict=True):
                full = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)
                maps.append(full[0, 0].numpy().astype(np.float32))
            scores.extend(out.pred_score.reshape(-1).tolist())
    predict_s = time.perf_counter() - t0

    args.maps.mkdir(parents=True, exist_ok=True)
    with (args.maps / "scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "defect_type", "score"])
        for (path, kind), score, amap in zip(items, scores, maps, strict=True):
            (args.maps / kind).mkdir(exist_ok=True)
            np.save(args.maps / kind / f"{path.stem}.npy", amap)
            writer.writerow([str(path), int(kind != "good"), kind, repr(float(score))])
    print(
        json.dumps(
            {
                "fit_s": fit_s,
                "predict_ms_img": predict_s / len(items) * 1000,
                "n_test": len(items),
                "cholesky_inverse_s": inv_s[0],
                "greedy_s": greedy["s"],
                "greedy_iterations": greedy["iterations"],
                "embedding_rows": greedy["rows"],
                "embedding_dim": greedy["dim"],
                "total_s": time.perf_counter() - start_all,
            }
        )
    )


if __name__ == "__main__":
    main()
