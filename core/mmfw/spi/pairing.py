"""The pairing rule of the loss contract, as masks: public so every loss (built-in or a
plugin's) pairs rows the same way. Rows i, j are positives iff ``image_ids[i] == text_ids[j]``."""

from __future__ import annotations

import torch
from torch import Tensor


def match_ids(bi: int, bt: int, image_ids: Tensor | None, text_ids: Tensor | None,
              device: torch.device) -> tuple[Tensor, Tensor]:
    """The ids that pair rows, flattened: the given ones or, with no ids, each row's index."""
    if image_ids is None and text_ids is None:
        if bi != bt:
            raise ValueError(f"image ({bi}) and text ({bt}) batches differ: pass ids")
        index = torch.arange(bi, device=device)
        return index, index
    if image_ids is None or text_ids is None:
        raise ValueError("pass both image_ids and text_ids, or neither")
    if image_ids.numel() != bi or text_ids.numel() != bt:
        raise ValueError(f"{image_ids.numel()} image ids for {bi} image rows and "
                         f"{text_ids.numel()} text ids for {bt} text rows: one id per row")
    return image_ids.to(device).view(-1), text_ids.to(device).view(-1)


def positives(bi: int, bt: int, image_ids: Tensor | None, text_ids: Tensor | None,
              device: torch.device, rows: slice | None = None) -> Tensor:
    """Bool ``[Bi, Bt]``: ``image_ids[i] == text_ids[j]``; with no ids, the diagonal.

    ``rows`` keeps only those image rows (``[len(rows), Bt]``) without building the others: a
    rank's share of the global batch under ``distributed.local_loss``.
    """
    iid, tid = match_ids(bi, bt, image_ids, text_ids, device)
    return iid[slice(None) if rows is None else rows].view(-1, 1) == tid.view(1, -1)


def anchor_share(bi: int, bt: int, image_ids: Tensor | None, text_ids: Tensor | None,
                 device: torch.device, rows: slice | None = None,
                 shards: int | None = None) -> Tensor:
    """The divisor of the summed row losses of image ``rows``: the whole batch's rows with a
    positive (at least 1), divided by the number of ``shards`` (ranks) the rows are one of.

    The mean over the shards of ``sum / share`` (what DDP's gradient averaging takes) is then
    the batch's mean over anchors exactly, whatever each shard holds: ranks may hold different
    numbers of image rows (a rank's batch keeps one row per image) and of anchors. Without
    ``shards``, ``rows``' fraction of the batch stands in (exact for equal shards).
    Costs ``O(B log B)``.
    """
    iid, tid = match_ids(bi, bt, image_ids, text_ids, device)
    count = torch.isin(iid, tid).sum().clamp_min(1)
    if rows is None:
        return count
    if shards:
        return count / shards
    return count * (len(range(bi)[rows]) / max(bi, 1))


def pair_indices(pos: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices of every positive pair in a ``[Bi, Bt]`` mask (row-major order)."""
    return pos.nonzero(as_tuple=True)

__all__ = ['anchor_share', 'match_ids', 'pair_indices', 'positives']
