"""Patch features from multi-layer CNN feature maps (PatchCore Sec. 3.1, PaDiM Sec. 3.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def local_aggregate(feature: Tensor, patch_size: int = 3) -> Tensor:
    """Average each position's ``p x p`` neighbourhood, channel by channel (PatchCore Eq. 2-3).

    ``phi_{i,j}(p)`` aggregates the features around (h, w) with adaptive average pooling; for
    ``p = 3`` this is a 3x3 mean per channel with zero padding at the border, as the official
    ``Unfold(3, padding=1)`` + ``adaptive_avg_pool1d`` does.

    Args:
        feature: shape (B, C, h, w).
        patch_size: neighbourhood side p (odd); 1 disables aggregation.

    Returns:
        Aggregated features, shape (B, C, h, w).
    """
    if patch_size == 1:
        return feature
    return F.avg_pool2d(
        feature, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True
    )


def align_and_concat(features: Sequence[Tensor], mode: str = "bilinear") -> Tensor:
    """Resize every layer to the first (finest) layer's grid and concatenate channels.

    Args:
        features: shapes (B, C_l, h_l, w_l), finest first.
        mode: ``"bilinear"`` (PatchCore) or ``"nearest"`` (PaDiM's ``embedding_concat``).

    Returns:
        Shape (B, sum C_l, h_0, w_0).
    """
    size = features[0].shape[-2:]
    aligned = [features[0]]
    for f in features[1:]:
        if mode == "nearest":
            aligned.append(F.interpolate(f, size=size, mode="nearest"))
        else:
            aligned.append(F.interpolate(f, size=size, mode=mode, align_corners=False))
    return torch.cat(aligned, dim=1)


def reduce_channels(embedding: Tensor, dim: int) -> Tensor:
    """Adaptive average pooling over the channel axis to ``dim`` channels (official PatchCore's
    ``Aggregator``).

    Args:
        embedding: shape (B, C, h, w).
        dim: output channels (<= C).

    Returns:
        Shape (B, dim, h, w).
    """
    b, c, h, w = embedding.shape
    if dim == c:
        return embedding
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)
