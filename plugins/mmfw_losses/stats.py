"""Batch statistics shared by the redundancy-reduction losses (decorrelation, VICReg, Barlow)."""

from __future__ import annotations

import torch
from torch import Tensor


def covariance(x: Tensor) -> Tensor:
    """``[D, D]`` sample covariance over rows, ``/ max(B - 1, 1)`` so one row gives zeros."""
    xc = x - x.mean(0, keepdim=True)
    return xc.T @ xc / max(x.shape[0] - 1, 1)


def off_diagonal_sq(m: Tensor) -> Tensor:
    """``sum_{a != b} m_ab^2`` (masked, not ``total - diagonal``, so it never goes negative)."""
    eye = torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
    return m.pow(2).masked_fill(eye, 0).sum()
