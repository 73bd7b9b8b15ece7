"""A multivariate Gaussian per patch position, and Mahalanobis distances (PaDiM, Defard et al.
2021, Sec. 3.2-3.3).

At every position (i, j) PaDiM fits N(mu_ij, Sigma_ij) to the N training embeddings x^k_ij:

    mu_ij    = 1/N sum_k x^k_ij
    Sigma_ij = 1/(N-1) sum_k (x^k_ij - mu_ij)(x^k_ij - mu_ij)^T + eps I               (Eq. 1)

and scores a test embedding by its Mahalanobis distance (not squared):

    M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))                        (Eq. 2)

The fit streams: :func:`accumulate` keeps running sums of *shifted* embeddings, x - K with K the
first batch's mean (the "shifted data" algorithm), so the covariance is computed without the
catastrophic cancellation of ``E[x x^T] - mu mu^T``, and memory does not grow with N.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

#: Positions whose covariance is finalised and inverted at once by :func:`fit_gaussians`.
POSITION_CHUNK = 256


class Moments(NamedTuple):
    """Running sums of shifted embeddings, per position.

    Attributes:
        count: N, embeddings seen per position.
        shift: K, the first batch's mean, shape (P, d), float32.
        sum: sum_k (x_k - K), shape (P, d).
        sum_outer: sum_k (x_k - K)(x_k - K)^T, shape (P, d, d).
    """

    count: int
    shift: Tensor
    sum: Tensor
    sum_outer: Tensor


def accumulate(
    moments: Moments | None, x: Tensor, *, dtype: torch.dtype = torch.float64
) -> Moments:
    """Add a batch of embeddings to the running sums, with one batched matrix product.

    The product of each batch is formed in ``x``'s precision on shifted values (small, so this
    loses nothing measurable) and added to sums of ``dtype``. The sums are updated in place.

    Args:
        moments: the sums so far, or None to start from this batch.
        x: embeddings, shape (B, P, d) (B images, P positions, d channels).
        dtype: precision of the sums when starting (float64, or float32 to halve their memory).

    Returns:
        The updated :class:`Moments`.
    """
    if moments is None:
        shift = x.mean(0, dtype=torch.float64).to(x.dtype)
        p, d = shift.shape
        device = x.device  # the sums live on x's device
        moments = Moments(
            0,
            shift,
            torch.zeros(p, d, dtype=dtype, device=device),
            torch.zeros(p, d, d, dtype=dtype, device=device),
        )
    centred = (x - moments.shift).transpose(0, 1).contiguous()  # x - K, (P, B, d)
    moments.sum.add_(centred.sum(1))
    if moments.sum_outer.dtype == centred.dtype:
        # in place: a separate product and add tripled the memory traffic over the (P, d, d)
        # sums (bottle, d = 100: 6.8 -> 1.5 ms per image)
        moments.sum_outer.baddbmm_(centred.transpose(1, 2), centred)  # += (x - K)^T (x - K)
    else:  # sums of another precision
        moments.sum_outer.add_(torch.bmm(centred.transpose(1, 2), centred))
    return moments._replace(count=moments.count + x.shape[0])


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The sums of two disjoint sets of embeddings together, with ``a``'s shift (exact up to
    rounding: with ``delta = K_b - K_a``, ``x - K_a = (x - K_b) + delta``); ``a`` is updated.

    Args:
        a, b: sums from :func:`accumulate` over the same positions and channels.

    Returns:
        The merged :class:`Moments` (``a``'s tensors).
    """
    delta = b.shift.double() - a.shift.double()  # (P, d)
    s = b.sum.double()
    outer = b.sum_outer.double()
    outer += s[:, :, None] * delta[:, None, :]
    outer += delta[:, :, None] * s[:, None, :]
    outer += b.count * delta[:, :, None] * delta[:, None, :]
    a.sum.add_((s + b.count * delta).to(a.sum.dtype))
    a.sum_outer.add_(outer.to(a.sum_outer.dtype))
    return a._replace(count=a.count + b.count)


def mean_covariance(
    moments: Moments, epsilon: float = 0.0, positions: slice = slice(None)
) -> tuple[Tensor, Tensor]:
    """Mean and regularised sample covariance (Eq. 1, N - 1 in the denominator), in float64.

    Args:
        moments: sums from :func:`accumulate`, with ``count >= 2``.
        epsilon: added to the diagonal (eps I).
        positions: the positions to compute (all by default).

    Returns:
        mu, shape (p, d), and Sigma, shape (p, d, d), for the p selected positions.
    """
    n = moments.count
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    s1 = moments.sum[positions].double()  # sum (x - K)
    s2 = moments.sum_outer[positions].double()  # sum (x - K)(x - K)^T
    mean_shifted = s1 / n  # mu - K
    cov = (s2 - n * mean_shifted[:, :, None] * mean_shifted[:, None, :]) / (n - 1)
    cov.diagonal(dim1=1, dim2=2).add_(epsilon)  # + eps I
    return moments.shift[positions].double() + mean_shifted, cov


def inverse_covariance(cov: Tensor) -> Tensor:
    """Inverse of symmetric positive-definite matrices through their Cholesky factors.

    With Sigma = L L^T, Sigma^-1 = L^-T L^-1: one batched triangular solve and one batched
    product. (``torch.cholesky_inverse`` gives the same values, as fast on an idle CPU, but was
    up to 7x slower on the shared 2-core development machine.)

    Args:
        cov: shape (p, d, d).

    Returns:
        Sigma^-1, shape (p, d, d), same dtype.

    Raises:
        ValueError: a matrix is not positive definite (raise epsilon).
    """
    factor, info = torch.linalg.cholesky_ex(cov)
    bad = int((info > 0).sum())
    if bad:
        raise ValueError(
            f"covariance not positive definite at {bad} positions; use a larger epsilon"
        )
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    factor_inv = torch.linalg.solve_triangular(factor, eye, upper=False)  # L^-1
    return factor_inv.transpose(1, 2) @ factor_inv


def fit_gaussians(
    moments: Moments, epsilon: float, *, out: Tensor | None = None, cov_out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """mu and Sigma^-1 at every position, inverted once, :data:`POSITION_CHUNK` at a time.

    Args:
        moments: sums from :func:`accumulate`.
        epsilon: eps of Eq. 1.
        out: float32 tensor of shape (P, d, d) to write Sigma^-1 into; it may be
            ``moments.sum_outer`` itself when that is float32 (each chunk is read before it is
            overwritten), so that the fit never holds two (P, d, d) tensors.
        cov_out: float32 tensor of shape (P, d, d) to write Sigma (with eps I) into as well,
            the statistic an exact update starts from (:func:`moments_from_gaussians`).

    Returns:
        mu, shape (P, d), and Sigma^-1, shape (P, d, d), both float32, on the sums' device.
    """
    p, d = moments.shift.shape
    device = moments.sum_outer.device
    mean = torch.empty(p, d, device=device)
    inv = torch.empty(p, d, d, device=device) if out is None else out
    for start in range(0, p, POSITION_CHUNK):
        part = slice(start, min(p, start + POSITION_CHUNK))
        mu, cov = mean_covariance(moments, epsilon, part)
        mean[part] = mu.float()
        if cov_out is not None:
            cov_out[part] = cov.float()
        inv[part] = inverse_covariance(cov).float()
    return mean, inv


def moments_from_gaussians(mean: Tensor, cov: Tensor, count: int, epsilon: float) -> Moments:
    """The sums :func:`accumulate` would hold for ``count`` embeddings with this mean and
    covariance (Eq. 1 inverted), float64, shifted by the mean itself:

        K = mu,   sum (x - K) = 0,   sum (x - K)(x - K)^T = (N - 1)(Sigma - eps I)

    so that :func:`merge_moments` with new embeddings' sums gives what one fit on all of them
    gives (up to the rounding of the stored float32 Sigma).

    Args:
        mean: mu, shape (P, d).
        cov: Sigma with eps I, shape (P, d, d), as :func:`fit_gaussians` writes to ``cov_out``.
        count: N >= 2.
        epsilon: the eps that ``cov`` includes.
    """
    outer = cov.double() * (count - 1)
    outer.diagonal(dim1=1, dim2=2).sub_(epsilon * (count - 1))
    return Moments(count, mean.double(), torch.zeros_like(mean, dtype=torch.float64), outer)


def mahalanobis(x: Tensor, mean: Tensor, inv_cov: Tensor) -> Tensor:
    """Mahalanobis distance (not squared) of each embedding to its position's Gaussian (Eq. 2).

    One batched quadratic form: ``delta^T Sigma^-1 delta`` for all positions and images at once.

    Args:
        x: embeddings, shape (B, P, d).
        mean: mu, shape (P, d).
        inv_cov: Sigma^-1, shape (P, d, d).

    Returns:
        Distances, shape (B, P), >= 0.
    """
    delta = (x - mean).transpose(0, 1).contiguous()  # x - mu, (P, B, d)
    squared = (torch.bmm(delta, inv_cov) * delta).sum(-1)  # delta^T Sigma^-1 delta, (P, B)
    return squared.clamp_min_(0).sqrt_().T
