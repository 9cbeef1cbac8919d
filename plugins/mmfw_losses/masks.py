"""Positive masks from match ids: the one place the pairing rule lives."""

from __future__ import annotations

import torch
from torch import Tensor


def positives(bi: int, bt: int, image_ids: Tensor | None, text_ids: Tensor | None,
              device: torch.device) -> Tensor:
    """Bool ``[Bi, Bt]``: ``image_ids[i] == text_ids[j]``; with no ids, the diagonal."""
    if image_ids is None and text_ids is None:
        if bi != bt:
            raise ValueError(f"image ({bi}) and text ({bt}) batches differ: pass ids")
        return torch.eye(bi, dtype=torch.bool, device=device)
    if image_ids is None or text_ids is None:
        raise ValueError("pass both image_ids and text_ids, or neither")
    return image_ids.to(device).view(-1, 1) == text_ids.to(device).view(1, -1)


def pair_indices(pos: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices of every positive pair in a ``[Bi, Bt]`` mask (row-major order)."""
    return pos.nonzero(as_tuple=True)
