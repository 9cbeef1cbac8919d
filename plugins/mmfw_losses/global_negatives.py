"""The ``global-negatives`` callback: the training-set bank of every ``memory_queue`` loss whose
``mode`` is ``"global"`` (or ``"auto"`` on a small enough training split).

It runs in every run and does nothing unless such a loss is among the run's losses
(``ctx.losses``: ``[loss]``, a ``mixture`` term, a stage's loss). When the run starts it
resolves ``mode = "auto"`` from the training split's size and the batch size (and says what
it chose); a loss in global mode then gets its bank: every training image and caption
embedded by the model in eval mode, before the first step (unless a resumed checkpoint
brought one) and again after every epoch, so the bank is never more than one epoch old. The
bank is in the loss's buffers, hence in checkpoints: a resumed run continues with the bank it
was using.
"""

from __future__ import annotations

import time

import torch

from mmfw.spi import Callback, RunContext

from .memory_queue import MemoryQueue
from .training_set import embed_training_set, share, training_split


class GlobalNegatives(Callback):
    """Fills and refreshes the banks of the run's global-mode memory queues."""

    order = 20  # after validation: the bank is refreshed by the model of the epoch's end

    def __init__(self) -> None:
        self.losses: list[MemoryQueue] = []

    def on_run_start(self, ctx: RunContext) -> None:
        queues = [m for m in ctx.losses.modules() if isinstance(m, MemoryQueue)]
        images = len(ctx.source.split(ctx.recipe.data.train_split)) \
            if hasattr(ctx.pairs, "__getitem__") else None
        for loss in queues:
            if loss.options.mode != "auto":
                loss.resolve(0, 0)
                continue
            if images is None:  # a stream: its size is not known ahead
                loss.active = "queue"
                ctx.say("memory_queue: mode auto -> queue (the training split is streamed)")
                continue
            mode = loss.resolve(images, ctx.recipe.sampler.batch_size)
            ctx.say(f"memory_queue: mode auto -> {mode} ({images} training images, batch "
                    f"{ctx.recipe.sampler.batch_size}, global_limit "
                    f"{loss.options.global_limit})")
        self.losses = [m for m in queues if m.active == "global"]
        if not self.losses:
            return
        training_split(ctx, "memory_queue with mode = \"global\"")
        if any(len(m.text_bank) == 0 for m in self.losses):
            self.refresh(ctx)

    def on_epoch_end(self, ctx: RunContext, epoch: int) -> None:
        if self.losses:
            self.refresh(ctx)

    def refresh(self, ctx: RunContext) -> None:
        t0 = time.perf_counter()
        split = training_split(ctx, "memory_queue with mode = \"global\"")
        emb = share(ctx, embed_training_set(ctx, split))
        for loss in self.losses:
            loss.fill_bank(emb.images, torch.arange(emb.images.shape[0]), emb.texts, emb.owner)
        when = "before the first step" if ctx.step == 0 else f"after epoch {ctx.epoch}"
        ctx.say(f"global negatives: {emb.images.shape[0]} images and {emb.texts.shape[0]} "
                f"captions embedded {when} ({time.perf_counter() - t0:.1f}s)")


def global_negatives_callback(options: None = None) -> GlobalNegatives:
    """The ``global-negatives`` callback (no options: ``memory_queue`` carries them)."""
    return GlobalNegatives()


global_negatives_callback.default = True  # type: ignore[attr-defined]  # inert without one
