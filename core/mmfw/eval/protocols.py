"""Retrieval protocols (``eval.protocol``): which images Recall@K ranks among.

- ``karpathy``: the whole split (what Flickr30k papers report, and COCO "5k" when the split
  is COCO's Karpathy 5k test split).
- ``coco-5k``: the same on COCO's Karpathy test split, checked to hold exactly
  ``5 * fold_size`` (5000) images, so a number labelled COCO 5k is one.
- ``coco-1k-5fold``: the 5k numbers as the main keys (they stay the keys metrics.json always
  has), plus ``coco1k/<key>``: each key's mean over 5 folds, fold ``f`` being images
  ``[f * fold_size, (f + 1) * fold_size)`` of the split and their captions, each fold ranked
  on its own. That is COCO 1k as VSE++ (Faghri et al. 2018, "VSE++: Improving
  Visual-Semantic Embeddings with Hard Negatives"), VSE∞ and ALBEF report it: "results
  averaged over 5 folds of 1K test images".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..spi.errors import RecipeError
from .retrieval import KS, METRIC_KEYS, embed_split, evaluate_split, recall_at_k

PROTOCOLS = ("karpathy", "coco-5k", "coco-1k-5fold")
FOLDS = 5
#: prefix of the 5-fold mean keys of coco-1k-5fold: ``coco1k/i2t_R@1`` ... ``coco1k/rsum``
FOLD_PREFIX = "coco1k/"


def fold_keys() -> tuple[str, ...]:
    return tuple(FOLD_PREFIX + k for k in METRIC_KEYS)


def subset(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, start: int, stop: int
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Images ``[start, stop)`` and the captions they own, owners renumbered from 0."""
    owner = text_to_image.to(image_emb.device).long()
    mine = (owner >= start) & (owner < stop)
    return image_emb[start:stop], text_emb[mine.to(text_emb.device)], owner[mine] - start


def fold_recall(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, *,
                folds: int = FOLDS, fold_size: int = 1000, ks: Sequence[int] = KS
                ) -> dict[str, float]:
    """The mean over ``folds`` consecutive blocks of ``fold_size`` images (and their
    captions) of each block's Recall@K and rsum, each block ranked on its own."""
    need = folds * fold_size
    if image_emb.shape[0] < need:
        raise ValueError(f"{folds} folds of {fold_size} images need {need} images, "
                         f"not {image_emb.shape[0]}")
    total: dict[str, float] = {}
    for f in range(folds):
        part = recall_at_k(*subset(image_emb, text_emb, text_to_image, f * fold_size,
                                   (f + 1) * fold_size), ks=ks)
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return {k: v / folds for k, v in total.items()}


def _check_size(n: int, protocol: str, fold_size: int) -> None:
    need = FOLDS * fold_size
    if n != need:
        raise RecipeError(f"the split has {n} images; {protocol} ranks exactly {FOLDS} x "
                          f"eval.fold_size = {need} (COCO's Karpathy 5k test split)",
                          key="eval.protocol", expected=f"a split of {need} images, or "
                          "protocol = \"karpathy\" (the whole split)", given=protocol)


def protocol_metrics(protocol: str, image_emb: Tensor, text_emb: Tensor,
                     text_to_image: Tensor, *, fold_size: int = 1000) -> dict[str, float]:
    """Recall@K of embedded images and captions by ``protocol`` (see the module)."""
    if protocol not in PROTOCOLS:
        raise RecipeError("unknown protocol", key="eval.protocol",
                          expected="one of " + ", ".join(PROTOCOLS), given=protocol)
    if protocol == "karpathy":
        return recall_at_k(image_emb, text_emb, text_to_image)
    _check_size(image_emb.shape[0], protocol, fold_size)
    out = recall_at_k(image_emb, text_emb, text_to_image)
    if protocol == "coco-1k-5fold":
        folds = fold_recall(image_emb, text_emb, text_to_image, fold_size=fold_size)
        out.update({FOLD_PREFIX + k: v for k, v in folds.items()})
    return out


@torch.no_grad()
def evaluate_protocol(model: Any, split: Any, *, protocol: str = "karpathy",
                      fold_size: int = 1000, rerank_top_k: int = 0, **kwargs: Any
                      ) -> dict[str, float]:
    """``evaluate_split`` by ``eval.protocol`` (``kwargs``: those of ``embed_split``)."""
    if protocol == "karpathy":
        return evaluate_split(model, split, rerank_top_k=rerank_top_k, **kwargs)
    if rerank_top_k:
        raise RecipeError("re-ranking is measured on the whole split only",
                          key="eval.rerank_top_k", expected="0 with eval.protocol = "
                          f"{protocol!r}, or protocol = \"karpathy\"", given=rerank_top_k)
    image_emb, text_emb, owner = embed_split(model, split, **kwargs)
    return protocol_metrics(protocol, image_emb, text_emb, owner, fold_size=fold_size)


__all__ = ["FOLDS", "FOLD_PREFIX", "PROTOCOLS", "evaluate_protocol", "fold_keys",
           "fold_recall", "protocol_metrics", "subset"]
