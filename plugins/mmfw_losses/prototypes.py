"""The ``prototypes`` callback: k-means of the training split for every ``prototypical`` loss.

It runs in every run and does nothing unless a ``prototypical`` loss is among the run's losses
(``[loss]``, a ``mixture`` term or a stage's loss: it looks in ``ctx.losses``). Then, once an
epoch is done and the loss's schedule says so (``warmup_epochs``, ``every_epochs``), it embeds
every training image and caption with the model in eval mode, builds the features the loss
clusters (``features``), runs one k-means per granularity with the concentration estimate,
and installs the result in the loss's buffers. A run with ``warmup_epochs = 0`` clusters
before its first step. The state is the loss's, so it is in every checkpoint; on ``--resume``
a clustering that is due but missing (none is, unless the run was stopped between the two)
is made before the first step.
"""

from __future__ import annotations

import time

import torch

from mmfw.spi import Callback, RunContext

from .prototypical import Prototypical, joint_features
from .training_set import embed_training_set, share, training_split


class Prototypes(Callback):
    """Clusters the training set for the run's ``prototypical`` losses; inert without one."""

    order = 20  # after validation and the other epoch-end work: it does not change the model

    def __init__(self) -> None:
        self.losses: list[Prototypical] = []

    def on_run_start(self, ctx: RunContext) -> None:
        self.losses = [m for m in ctx.losses.modules() if isinstance(m, Prototypical)]
        if not self.losses:
            return
        training_split(ctx, "loss 'prototypical'")  # refuse a streamed split before step 1
        missing = [loss for loss in self.losses if loss.stale(ctx.epoch)]
        if missing:
            self.cluster(ctx, missing)

    def on_epoch_end(self, ctx: RunContext, epoch: int) -> None:
        due = [loss for loss in self.losses if loss.due(epoch)]
        if due:
            self.cluster(ctx, due)

    def cluster(self, ctx: RunContext, losses: list[Prototypical]) -> None:
        t0 = time.perf_counter()
        split = training_split(ctx, "loss 'prototypical'")
        emb = embed_training_set(ctx, split)
        states = None
        if emb is not None:  # rank 0
            ids = torch.arange(emb.images.shape[0])
            states = []
            for loss in losses:
                x = joint_features(emb.images, emb.texts, emb.owner, loss.options.features)
                ks = loss.cluster(x, ids, epoch=ctx.epoch, seed=ctx.recipe.run.seed)
                states.append((ks, {k: v.cpu() for k, v in loss.state_dict().items()
                                    if k in ("proto_ids", "assign", "centroids", "density",
                                             "sizes", "clustered_epoch")}))
        states = share(ctx, states)
        if not ctx.is_main:
            for loss, (_, state) in zip(losses, states):
                loss.set_prototypes(state["proto_ids"], state["assign"], state["centroids"],
                                    state["density"], state["sizes"],
                                    int(state["clustered_epoch"]))
        n = int(states[0][1]["proto_ids"].numel()) if states else 0
        when = "before the first step" if ctx.step == 0 else f"after epoch {ctx.epoch}"
        for ks, _ in states:
            ctx.say(f"prototypes: k-means of {n} training images into "
                    f"{', '.join(map(str, ks))} clusters {when} "
                    f"({time.perf_counter() - t0:.1f}s)")


def prototypes_callback(options: None = None) -> Prototypes:
    """The ``prototypes`` callback (no options: the ``prototypical`` loss carries them)."""
    return Prototypes()


prototypes_callback.default = True  # type: ignore[attr-defined]  # inert without the loss
