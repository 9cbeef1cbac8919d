"""The whole training split embedded by the run's model: what the ``prototypes`` and
``global-negatives`` callbacks build their loss state from.

Rank 0 embeds (inside ``ctx.whole_model()``, so FSDP gathers the weights with every rank) and
:func:`share` hands its result to the other ranks, so every rank's loss holds the same state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from mmfw.eval.retrieval import embed_split
from mmfw.spi import MmfwError, RecipeError, RunContext


class Embedded(NamedTuple):
    """Every training image ``[N, D]`` and caption ``[M, D]`` (CPU, float32); ``owner[j]`` is
    caption ``j``'s image, whose index is also its match id."""

    images: Tensor
    texts: Tensor
    owner: Tensor


def training_split(ctx: RunContext, who: str) -> Any:
    """The training split as the sampler indexes it (image ``i`` has match id ``i``).

    Refused, naming ``who`` (the loss that asked), when the split is streamed (it cannot be
    embedded ahead of an epoch) or the sampler batches by another id than the image's.
    """
    r = ctx.recipe
    if not hasattr(ctx.pairs, "__getitem__"):
        raise MmfwError(f"{who} needs the whole training split before each epoch, but "
                        f"'{r.data.dataset.name}' streams it: use a map-style split "
                        "(data.mode = \"indexed\" for local shards)")
    if getattr(r.sampler.plugin.options, "by", "image") != "image":
        raise RecipeError(f"{who} keys its state by the training image of each row, and this "
                          "sampler batches by group ids", key="sampler.by",
                          expected='"image"', given=r.sampler.plugin.options.by)
    return ctx.source.split(r.data.train_split)


def share(ctx: RunContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``None`` elsewhere before the call)."""
    if ctx.world_size > 1 and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


@torch.no_grad()
def embed_training_set(ctx: RunContext, split: Any) -> Embedded | None:
    """The model's eval-mode embeddings of every image and caption of ``split`` on rank 0
    (None on the other ranks); each module's train/eval mode is restored."""
    out = None
    with ctx.whole_model() as model:
        if ctx.is_main:
            modes = [(m, m.training) for m in model.modules()]
            try:
                img, txt, owner = embed_split(model, split, batch_size=ctx.recipe.eval.batch_size,
                                              device=ctx.device, autocast=ctx.backend.autocast)
            finally:
                for m, mode in modes:
                    m.training = mode
            out = Embedded(img.float().cpu(), txt.float().cpu(), owner.cpu())
    return out


__all__ = ["Embedded", "embed_training_set", "share", "training_split"]
