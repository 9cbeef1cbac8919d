"""``[model.lock_text]``: a locked text tower, its outputs for the training captions computed
once.

With a pretrained text tower that does not train (``optim.freeze = ["text"]``), every step
would run the same captions through the same weights again. Locked, the tower is kept in eval
mode (no dropout, so a caption has one output) and, when the run starts, embeds every distinct
caption of the training split once, in a fixed order and batching (shortest first, so little
padding is computed); steps then look their captions up (``mmfw.spi.FeatureTable``) and train
only the image side and the text adapter: the text tower costs nothing per step. This is
the "locked tower" of LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text
Tuning"), here on the text side, with the outputs cached as their section 5 suggests for a
locked tower.

The table is rebuilt the same way on ``--resume`` (so a resumed run is the unbroken one) and is
not saved: the tower's weights are the checkpoint's. Captions it does not hold (text
augmentation, a stream, evaluation splits) are embedded by the locked tower as they come.
"""

from __future__ import annotations

import time

import attrs
import torch

from mmfw.spi import Callback, FeatureTable, MmfwError, RunContext, option


@attrs.frozen
class LockTextOptions:
    """A frozen text tower in eval mode whose outputs for the training captions are computed
    once at the start (LiT-style locked tower). The table's presence turns it on; the tower
    must be frozen (optim.freeze = ["text"])."""

    batch_size: int = option(256, doc="captions embedded at a time when the table is built",
                             validator=attrs.validators.ge(1))


class LockText(Callback):
    """Builds the dual encoder's text table at run start (see the module docstring)."""

    order = -50  # before the callbacks that evaluate or probe the model at run start

    def __init__(self, options: LockTextOptions) -> None:
        self.options = options

    def on_run_start(self, ctx: RunContext) -> None:
        model = ctx.model
        if not hasattr(model, "text_table"):
            raise MmfwError("[model.lock_text] needs mmfw's dual encoder (its text_table) as "
                            "the run's model")
        if ctx.world_size > 1 and ctx.recipe.distributed.strategy == "fsdp":
            raise MmfwError("[model.lock_text] looks captions up outside the sharded text "
                            "tower, which FSDP cannot do: use distributed.strategy = \"ddp\"")
        trainable = [n for n, p in model.text.named_parameters() if p.requires_grad]
        if trainable:
            raise MmfwError(f"[model.lock_text] locks a frozen text tower, but {len(trainable)} "
                            f"of its parameters train (first: text.{trainable[0]}): add "
                            f"\"text\" to optim.freeze")
        t0 = time.perf_counter()
        model.text.eval()
        # shortest first: a batch pads to its longest caption, so batches of similar lengths
        # skip most padding (a stable sort: the same order, so the same table, on --resume)
        captions = sorted(dict.fromkeys(self._captions(ctx)), key=len)
        keys: list[bytes] = []
        parts: list[torch.Tensor] = []
        seen: set[bytes] = set()
        b = self.options.batch_size
        with torch.no_grad(), ctx.backend.autocast():
            for i in range(0, len(captions), b):
                tokens = {k: v.to(ctx.device) for k, v in
                          model.text.tokenize(captions[i:i + b]).items()}
                row_keys = FeatureTable.keys(tokens)
                if row_keys is None:
                    ctx.say("note: [model.lock_text]: the text tokenizer gives no attention "
                            "mask to key captions by; the locked tower runs at every step")
                    model.text_table = FeatureTable([], torch.empty(0))
                    return
                new = []
                for j, k in enumerate(row_keys):  # once each, also within a batch
                    if k not in seen:
                        seen.add(k)
                        new.append(j)
                if not new:
                    continue
                out = model.text({k: v[new] for k, v in tokens.items()})
                keys += [row_keys[j] for j in new]
                parts.append(out)
        features = torch.cat(parts) if parts else torch.empty(0, device=ctx.device)
        model.text_table = FeatureTable(keys, features)  # model.train() now keeps it in eval
        ctx.say(f"locked text tower: {len(keys)} training captions embedded once "
                f"({time.perf_counter() - t0:.1f} s); steps look them up")

    @staticmethod
    def _captions(ctx: RunContext) -> list[str]:
        """The training split's captions in its order (none for a stream)."""
        split = ctx.source.split(ctx.recipe.data.train_split)
        try:
            n = len(split)
        except TypeError:
            return []
        return [c for i in range(n) for c in split.captions(i)]

    def on_run_end(self, ctx: RunContext, stopped_by: str) -> None:
        model = ctx.model
        if hasattr(model, "text_table"):
            model.text_table = None  # the model leaves the run as a plain dual encoder


def lock_text(options: LockTextOptions) -> LockText:
    return LockText(options)


lock_text.Options = LockTextOptions  # type: ignore[attr-defined]
lock_text.section = "model.lock_text"  # type: ignore[attr-defined]
lock_text.when_configured = True  # type: ignore[attr-defined]
lock_text.__doc__ = LockTextOptions.__doc__
