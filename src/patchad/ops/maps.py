"""From patch scores to anomaly maps: bilinear upsampling and Gaussian smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> Tensor:
    """1-D Gaussian kernel of radius ``round(truncate * sigma)``, as scipy.ndimage uses."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _pad_symmetric(x: Tensor, pad: int, dim: int) -> Tensor:
    """Half-sample symmetric padding (scipy's ``reflect``: ``d c b a | a b c d | d c b a``)."""
    size = x.shape[dim]
    parts = []
    left = pad
    while left > 0:  # repeat the mirror for pads longer than the signal
        take = min(left, size)
        parts.append(
            x.narrow(dim, 0, take).flip(dim)
            if (len(parts) % 2 == 0)
            else x.narrow(dim, size - take, take)
        )
        left -= take
    right_parts = []
    right = pad
    while right > 0:
        take = min(right, size)
        right_parts.append(
            x.narrow(dim, size - take, take).flip(dim)
            if (len(right_parts) % 2 == 0)
            else x.narrow(dim, 0, take)
        )
        right -= take
    return torch.cat([*reversed(parts), x, *right_parts], dim=dim)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing, equal to ``scipy.ndimage.gaussian_filter(sigma=sigma)``
    on each map (mode ``reflect``, truncate 4).

    Args:
        maps: shape (B, H, W).
        sigma: standard deviation in pixels; 0 returns the maps unchanged.

    Returns:
        Smoothed maps, shape (B, H, W).
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps)
    radius = (kernel.numel() - 1) // 2
    x = maps[:, None]
    x = _pad_symmetric(x, radius, dim=3)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = _pad_symmetric(x, radius, dim=2)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def anomaly_map(patch_scores: Tensor, size: int | tuple[int, int], sigma: float) -> Tensor:
    """Upsample patch scores bilinearly to the input size, then smooth (PatchCore Sec. 3.3).

    Args:
        patch_scores: shape (B, h, w).
        size: input resolution (S or (H, W)).
        sigma: Gaussian sigma in input pixels (4 in all three papers).

    Returns:
        Maps of shape (B, H, W).
    """
    out = F.interpolate(patch_scores[:, None], size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(out[:, 0], sigma)
