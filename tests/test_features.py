"""The feature stage: shapes, layer names and the offline weights resolution order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import LITE0
from patchad import features
from patchad.errors import PatchadError
from patchad.features import FeatureExtractor, Preprocess, layers_at_strides


def test_lite0_shapes_and_metadata() -> None:
    fx = FeatureExtractor(LITE0, ("blocks.2", "blocks.4"))
    assert fx.channels == (40, 112)
    assert fx.strides == (8, 16)
    out = fx(torch.zeros(2, 3, 64, 96))
    assert [tuple(f.shape) for f in out] == [(2, 40, 8, 12), (2, 112, 4, 6)]
    assert fx.weights_source.startswith("bundled:")
    assert fx.mean == (0.5, 0.5, 0.5)  # from the backbone's pretrained config


def test_default_layers_by_stride() -> None:
    assert layers_at_strides("wide_resnet50_2", (8, 16)) == ("layer2", "layer3")
    assert layers_at_strides(LITE0, (8, 16)) == ("blocks.2", "blocks.4")
    assert layers_at_strides("resnet18", (4, 8, 16)) == ("layer1", "layer2", "layer3")


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(PatchadError, match=r"valid layers: act1, layer1, layer2, layer3, layer4"):
        FeatureExtractor("resnet18", ("layer2", "layer9"), weights="random")


def test_unknown_backbone() -> None:
    with pytest.raises(PatchadError, match="unknown backbone"):
        FeatureExtractor("no_such_net", ("layer2",))


def test_explicit_file_by_name_and_in_order(tmp_path: Path) -> None:
    bundled = FeatureExtractor(LITE0, ("blocks.2",))
    state = bundled.model.state_dict()
    by_name = tmp_path / "named.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(by_name))
    fx = FeatureExtractor(LITE0, ("blocks.2",), weights=str(by_name))
    assert fx.fingerprint == bundled.fingerprint
    assert fx.weights_source == str(by_name)
    # the bundled .pth has foreign key names and loads in order into the full model's keys
    path = features.bundled_weights_path(LITE0)
    assert path is not None
    fx2 = FeatureExtractor(LITE0, ("blocks.2",), weights=str(path))
    assert fx2.fingerprint == bundled.fingerprint


def test_mismatched_weights_file(tmp_path: Path) -> None:
    other = tmp_path / "r18.pth"
    torch.save(
        FeatureExtractor("resnet18", ("layer2",), weights="random").model.state_dict(), other
    )
    with pytest.raises(PatchadError, match="do not match backbone"):
        FeatureExtractor(LITE0, ("blocks.2",), weights=str(other))
    with pytest.raises(PatchadError, match="weights file not found"):
        FeatureExtractor(LITE0, ("blocks.2",), weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PatchadError, match="not a readable weights file"):
        FeatureExtractor(LITE0, ("blocks.2",), weights=str(junk))


def test_offline_download_gives_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(features, "_in_hub_cache", lambda name: False)
    with pytest.raises(PatchadError) as info:
        FeatureExtractor("resnet18", ("layer2",))
    message = str(info.value)
    assert "resnet18.tv_in1k" in message  # torchvision weights, as the papers used
    assert "--weights" in message
    assert LITE0 in message
    assert "\n" not in message


def test_random_weights_are_seeded() -> None:
    a = FeatureExtractor("resnet18", ("layer2",), weights="random")
    b = FeatureExtractor("resnet18", ("layer2",), weights="random")
    assert a.fingerprint == b.fingerprint


def test_preprocess_crop_restores_full_size() -> None:
    from PIL import Image

    pre = Preprocess(64, 48, (0.5,) * 3, (0.5,) * 3)
    image = Image.new("RGB", (120, 80))
    assert pre(image).shape == (3, 48, 48)
    maps = pre.restore(torch.rand(1, 48, 48), [(120, 80)])
    assert maps[0].shape == (80, 120)
    plain = Preprocess(64, None, (0.5,) * 3, (0.5,) * 3)
    assert plain(image).shape == (3, 64, 64)
    assert plain.restore(torch.rand(1, 64, 64), [(120, 80)])[0].shape == (80, 120)
