"""From patch scores to anomaly maps: bilinear upsampling and Gaussian smoothing."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> Tensor:
    """1-D Gaussian kernel of radius ``round(truncate * sigma)``, as scipy.ndimage uses."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


@functools.lru_cache(maxsize=32)
def blur_matrix(size: int, sigma: float) -> Tensor:
    """The (size, size) float64 matrix of 1-D Gaussian smoothing with scipy's ``reflect`` border.

    Row i holds the kernel taps of output i, each added at its source index after half-sample
    symmetric reflection (``d c b a | a b c d | d c b a``, period 2 * size, so pads longer than
    the signal repeat the mirror as scipy does). Smoothing a signal x is then ``A @ x``.
    """
    kernel = gaussian_kernel(sigma).double()
    radius = (kernel.numel() - 1) // 2
    taps = torch.arange(size)[:, None] + torch.arange(-radius, radius + 1)[None, :]
    taps = taps % (2 * size)
    source = torch.where(taps < size, taps, 2 * size - 1 - taps)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.scatter_add_(1, source, kernel.expand(size, -1).contiguous())
    return matrix


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing, equal to ``scipy.ndimage.gaussian_filter(sigma=sigma)``
    on each map (mode ``reflect``, truncate 4).

    Computed as ``A_H @ map @ A_W^T`` with the banded :func:`blur_matrix` of each axis: two
    matrix products, several times faster on a CPU than single-channel convolutions.

    Args:
        maps: shape (B, H, W).
        sigma: standard deviation in pixels; 0 returns the maps unchanged.

    Returns:
        Smoothed maps, shape (B, H, W).
    """
    if sigma <= 0:
        return maps
    rows = blur_matrix(maps.shape[-2], float(sigma)).to(maps)
    cols = blur_matrix(maps.shape[-1], float(sigma)).to(maps)
    return rows @ maps @ cols.T


@functools.lru_cache(maxsize=32)
def upsample_matrix(size_in: int, size_out: int) -> Tensor:
    """The (size_out, size_in) float64 matrix of 1-D linear resizing as ``F.interpolate`` does it
    (``align_corners=False``); bilinear resizing is this along each axis."""
    eye = torch.eye(size_in, dtype=torch.float64)[:, None, :]  # (size_in, 1, size_in)
    out = F.interpolate(eye, size=size_out, mode="linear", align_corners=False)
    return out[:, 0, :].T.contiguous()


@functools.lru_cache(maxsize=32)
def _map_matrix(size_in: int, size_out: int, sigma: float) -> Tensor:
    resize = upsample_matrix(size_in, size_out)
    if sigma <= 0:
        return resize
    return blur_matrix(size_out, sigma) @ resize


def anomaly_map(patch_scores: Tensor, size: int | tuple[int, int], sigma: float) -> Tensor:
    """Upsample patch scores bilinearly to the input size, then smooth (PatchCore Sec. 3.3).

    Both steps are linear and separable, so the map is ``R_H @ scores @ R_W^T`` with
    ``R = blur_matrix @ upsample_matrix`` per axis (the same values as ``F.interpolate`` then
    :func:`gaussian_blur`, in a fraction of the time).

    Args:
        patch_scores: shape (B, h, w).
        size: input resolution (S or (H, W)).
        sigma: Gaussian sigma in input pixels (4 in all three papers).

    Returns:
        Maps of shape (B, H, W).
    """
    height, width = (size, size) if isinstance(size, int) else size
    h, w = patch_scores.shape[-2:]
    rows = _map_matrix(h, int(height), float(sigma)).to(patch_scores)
    cols = _map_matrix(w, int(width), float(sigma)).to(patch_scores)
    return rows @ patch_scores @ cols.T
