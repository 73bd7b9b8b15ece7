"""Image scores from patch scores."""

from __future__ import annotations

import torch
from torch import Tensor

from patchad.ops.knn import knn


def reweighted_image_score(
    patch_scores: Tensor, nn_index: Tensor, queries: Tensor, bank: Tensor, b: int
) -> Tensor:
    """PatchCore's image score with the paper's Eq. 7 re-weighting.

    With ``m_test,*`` the test patch of largest nearest-neighbour distance ``s* = ||m_test,* -
    m*||`` and ``N_b(m*)`` the ``b`` nearest memory-bank neighbours *of m\\** (m* included):

        s = (1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||) * s*

    The factor lies in [1 - 1/b, 1): images whose worst patch sits in a sparse part of the bank
    score higher than those whose worst patch has many close bank neighbours.

    Args:
        patch_scores: nearest-neighbour distance per patch, shape (B, P).
        nn_index: bank index of each patch's nearest neighbour, shape (B, P).
        queries: patch features, shape (B, P, D).
        bank: memory bank, shape (N, D).
        b: neighbourhood size (9 in anomalib; the paper does not state it).

    Returns:
        Image scores, shape (B,).
    """
    s_star, i_star = patch_scores.max(dim=1)  # s*, index of m_test,*
    rows = torch.arange(len(s_star), device=s_star.device)
    m_test = queries[rows, i_star]  # (B, D)
    m_star = bank[nn_index[rows, i_star]]  # (B, D)
    _, neighbours = knn(m_star, bank, k=min(b, bank.shape[0]))  # N_b(m*), (B, b)
    d = torch.linalg.vector_norm(m_test[:, None, :] - bank[neighbours], dim=-1)  # (B, b)
    d_star = torch.linalg.vector_norm(m_test - m_star, dim=-1)  # ||m_test,* - m*||
    ratio = torch.exp(d_star - torch.logsumexp(d, dim=1))  # exp(d*) / sum exp(d)
    return (1 - ratio) * s_star
