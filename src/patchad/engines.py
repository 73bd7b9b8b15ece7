"""The backbone on another engine: the feature extractor's layers exported once to ONNX (cached
on disk) and run by onnxruntime or OpenVINO, returning the same torch tensors as torch's forward,
so every detector's fit, predict, calibrate and evaluate is unchanged downstream.

``engine="auto"`` (the default) takes the first installed engine of the backbone's order in
:data:`AUTO_ORDER` (:data:`DEFAULT_ORDER` for a backbone not measured);
``"torch"``, ``"onnxruntime"`` and ``"openvino"`` ask for one, and one not installed is a one-line
error. The order was measured with ``benchmarks/bench_engines.py`` on a 2-core x86 CPU
(``benchmarks/results/engines.md``; summary in ``docs/engines.md``).

The graph of one backbone, weights fingerprint, layer set and input shape (batch dynamic) is
written to :func:`cache_dir` atomically and verified by its checksum on every read; a missing,
corrupt or stale entry is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from patchad.errors import PatchadError

if TYPE_CHECKING:
    from patchad.features import FeatureExtractor

#: The values of ``engine``.
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
#: What ``engine="auto"`` takes per backbone architecture, fastest first. Measured at 256 px,
#: batch 8, on a 2-core x86 CPU shared with other jobs (three runs: 2 threads twice, 1 thread):
#: OpenVINO was the fastest for EfficientNet-Lite0 and -Lite1 in every run and for -Lite2 in two
#: of three; onnxruntime for ResNet-18 in every run and WideResNet-50 in two of three.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "tf_efficientnet_lite0": ("openvino", "onnxruntime", "torch"),
    "tf_efficientnet_lite1": ("openvino", "onnxruntime", "torch"),
    "tf_efficientnet_lite2": ("openvino", "onnxruntime", "torch"),
    "resnet18": ("onnxruntime", "openvino", "torch"),
    "wide_resnet50_2": ("onnxruntime", "openvino", "torch"),
}
#: ``engine="auto"``'s order for backbones not measured: both engines were faster than torch on
#: every backbone and run measured; onnxruntime, the exported runtime's default, first.
DEFAULT_ORDER = ("onnxruntime", "openvino", "torch")
#: ONNX opset of the backbone graphs.
OPSET = 17
#: Graph format; a change rebuilds every cached graph.
GRAPH_FORMAT = "patchad-engine-1"
#: Input shapes with a live session per extractor (tiles and strips may bring several).
MAX_SESSIONS = 4
_METADATA_KEY, _CHECKSUM_KEY = "patchad_engine", "patchad_engine_checksum"


def is_installed(engine: str) -> bool:
    """Whether ``engine``'s package, and ``onnx`` to export the backbone, can be imported
    (torch always can)."""
    return engine == "torch" or all(importlib.util.find_spec(n) for n in (engine, "onnx"))


def resolve_engine(engine: str, backbone: str = "") -> str:
    """The engine that runs ``backbone`` (a timm name) for ``engine`` (``"auto"``: the first
    installed one of its :data:`AUTO_ORDER`, or of :data:`DEFAULT_ORDER`).

    Raises:
        PatchadError: an unknown engine, or one whose package is not installed.
    """
    if engine not in ENGINES:
        raise PatchadError(f"unknown engine {engine!r} (expected one of {', '.join(ENGINES)})")
    if engine == "auto":
        order = AUTO_ORDER.get(backbone.split(".", 1)[0], DEFAULT_ORDER)
        return next(e for e in order if is_installed(e))
    for package in (engine, "onnx"):
        if engine != "torch" and importlib.util.find_spec(package) is None:
            raise PatchadError(
                f"engine {engine} needs the {package} package, which is not installed "
                f"(pip install {package})"
            )
    return engine


def cache_dir() -> Path:
    """Where backbone graphs are kept: ``$PATCHAD_CACHE/engines``, else
    ``$XDG_CACHE_HOME/patchad/engines``, else ``~/.cache/patchad/engines``."""
    root = os.environ.get("PATCHAD_CACHE")
    if root:
        return Path(root) / "engines"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "patchad" / "engines"


def graph_key(extractor: FeatureExtractor, height: int, width: int) -> dict[str, Any]:
    """Everything the exported graph depends on; its hash names the cache entry."""
    from patchad import __version__
    from patchad.features import FOLD_BATCH_NORMS

    return {
        "format": GRAPH_FORMAT,
        "backbone": extractor.backbone_name,
        "fingerprint": extractor.fingerprint,
        "layers": list(extractor.layers),
        "input": [3, int(height), int(width)],
        "fold_batch_norms": FOLD_BATCH_NORMS,
        "opset": OPSET,
        "patchad": __version__,
        "torch": torch.__version__,
    }


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def _entry_path(key: dict[str, Any]) -> Path:
    import hashlib

    digest = hashlib.sha256(_key_text(key).encode("utf-8")).hexdigest()[:24]
    return cache_dir() / f"{key['backbone'].replace('/', '_')}-{digest}.onnx"


def _verified(path: Path, key: dict[str, Any]) -> bool:
    """Whether ``path`` is a whole, unmodified graph for ``key`` (checksum of its graph and key)."""
    import hashlib

    from patchad.onnxfile import _scan_into, _Truncated

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            pairs = _scan_into(handle, digest)
    except (OSError, _Truncated, UnicodeDecodeError):
        return False
    text = _key_text(key)
    digest.update(text.encode("utf-8"))
    return pairs.get(_METADATA_KEY) == text and pairs.get(_CHECKSUM_KEY) == digest.hexdigest()


def backbone_graph(extractor: FeatureExtractor, height: int, width: int) -> Path:
    """The cached ONNX graph of ``extractor``'s inference model for inputs (B, 3, height, width),
    exported first if missing or corrupt.

    The graph takes normalised float32 images ``images`` (B, 3, H, W), B dynamic, and returns
    ``features_<i>`` (B, C_i, H / stride_i, W / stride_i), one per layer.
    """
    key = graph_key(extractor, height, width)
    path = _entry_path(key)
    if path.is_file() and _verified(path, key):
        return path
    _write_graph(extractor, key, path)
    return path


def _write_graph(extractor: FeatureExtractor, key: dict[str, Any], path: Path) -> None:
    import onnx

    from patchad.atomic import atomic_write_bytes
    from patchad.onnxfile import graph_digest

    outputs = [f"features_{i}" for i in range(len(extractor.layers))]
    axes = {name: {0: "batch"} for name in ["images", *outputs]}
    example = torch.zeros(2, *key["input"])
    with tempfile.TemporaryDirectory(prefix="patchad-engine-") as tmp:
        raw = Path(tmp) / "graph.onnx"
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                extractor.inference_model,
                (example,),
                str(raw),
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=outputs,
                dynamic_axes=axes,
            )
        model = onnx.load(str(raw))
    model.producer_name = "patchad"
    del model.metadata_props[:]
    text = _key_text(key)
    checksum = graph_digest([model.graph.SerializeToString()], text)
    for name, value in ((_METADATA_KEY, text), (_CHECKSUM_KEY, checksum)):
        entry = model.metadata_props.add()
        entry.key, entry.value = name, value
    atomic_write_bytes(path, model.SerializeToString(), force=True)


def _session(engine: str, path: Path, threads: int) -> Any:
    """A session running ``path``: ``run(None, {"images": float32 (B, 3, H, W)})`` returns one
    array per layer. OpenVINO's is the exported runtime's (float32 inference, asked for
    explicitly); onnxruntime's runs ``threads`` threads within an operator, one across."""
    if engine == "openvino":
        from patchad.runtime import _openvino_session

        return _openvino_session(path, threads)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


class EngineBackbone:
    """``extractor``'s forward on onnxruntime or OpenVINO: one session per input shape (the
    :data:`MAX_SESSIONS` latest), created on first use with as many threads as torch has.

    Sessions are not pickled or copied: a copy starts without any and builds them when called.
    Calls from several threads take turns (an OpenVINO request serves one at a time).
    """

    def __init__(self, extractor: FeatureExtractor, engine: str) -> None:
        self.extractor = extractor
        self.engine = engine
        self._sessions: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"extractor": self.extractor, "engine": self.engine}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["extractor"], state["engine"])  # type: ignore[misc]

    def _get(self, height: int, width: int) -> Any:
        shape = (height, width)
        if shape in self._sessions:
            self._sessions.move_to_end(shape)
            return self._sessions[shape]
        path = backbone_graph(self.extractor, height, width)
        try:
            session = _session(self.engine, path, torch.get_num_threads())
        except PatchadError:
            raise
        except Exception as exc:  # the engines raise their own types
            reason = str(exc).strip().splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise PatchadError(
                f"{path}: {self.engine} cannot load the backbone ({reason})"
            ) from None
        self._sessions[shape] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def __call__(self, images: Tensor) -> list[Tensor]:
        """images: normalised, (B, 3, H, W); one float32 tensor (B, C_l, h_l, w_l) per layer."""
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        with self._lock:
            session = self._get(int(images.shape[-2]), int(images.shape[-1]))
            outputs = session.run(None, {"images": array})
        return [torch.from_numpy(np.ascontiguousarray(f)) for f in outputs]
