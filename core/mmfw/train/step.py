"""The contrastive step: loss and gradients of one batch, in the variant the recipe needs.

The variant is chosen once, when the run is built:

- ``plain``: embed the whole batch, the loss on it, backward;
- ``gradcache`` / ``naive`` (``optim.accumulate > 1``): the batch embedded in micro-batches,
  the loss on the whole batch (GradCache, exact) or averaged over micro-batch losses;
- ``fusion`` (``[model.fusion]``): one forward pass gives embeddings and token features, and
  the loss gets ``match``, the matching head's scorer over them.

Under torchrun the loss is the strategy's global-batch loss, and gradients that bypass the
wrapper (micro-batches, a fusion head, the loss's own parameters) are averaged here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from ..data.augment import mix_targets
from ..model import fused_forward, fusion_of
from ..parallel.strategy import SingleProcess
from ..spi.contracts import LossOutput
from ..spi.errors import MmfwError
from .gradcache import gradcache_step, naive_step

Scale = Callable[[Tensor], Tensor]


class ContrastiveStep:
    """``step(batch, loss, context, scale) -> (output, image, text)`` for one run."""

    def __init__(self, model: nn.Module, losses: nn.Module, strategy: SingleProcess,
                 backend: Any, *, accumulate: int, mode: str, local_loss: bool) -> None:
        self.model, self.losses, self.strategy, self.backend = model, losses, strategy, backend
        self.accumulate, self.local_loss = accumulate, local_loss
        self.memory_format = getattr(backend, "memory_format", None)
        self.step_context: Callable[[], AbstractContextManager[Any]] = getattr(
            backend, "step_context", contextlib.nullcontext)
        if fusion_of(model) is not None:
            if accumulate > 1:
                raise MmfwError("[model.fusion] is not supported yet with optim.accumulate > "
                                "1: set optim.accumulate = 1, or remove [model.fusion]")
            self.variant = "fusion"
        elif accumulate > 1:
            self.variant = mode  # "gradcache" or "naive"
        else:
            self.variant = "plain"
        self._run = {"plain": self._plain, "gradcache": self._micro, "naive": self._micro,
                     "fusion": self._fusion}[self.variant]

    def __call__(self, batch: Any, loss: Callable[..., LossOutput], context: dict[str, Any],
                 scale: Scale) -> tuple[LossOutput, Tensor, Tensor]:
        # soft targets when the images were mixed; the global batch under torchrun
        loss = mix_targets(self.strategy.global_loss(loss, self.local_loss), batch)
        if self.memory_format is not None and batch.pixels.dim() == 4:
            batch.pixels = batch.pixels.contiguous(memory_format=self.memory_format)
        with self.step_context():
            out, img, txt = self._run(batch, loss, context, scale)
        # backward is done: what the step hands on (rows, checks, callbacks) is for reading
        return LossOutput(out.loss.detach(), {
            k: v.detach() if isinstance(v, Tensor) else v for k, v in out.terms.items()}), img, txt

    def _plain(self, batch: Any, loss: Callable[..., LossOutput], context: dict[str, Any],
               scale: Scale) -> tuple[LossOutput, Tensor, Tensor]:
        with self.backend.autocast():
            img, txt = self.strategy.forward_model()(batch.pixels, batch.tokens)
            out = loss(img, txt, image_ids=batch.image_ids, text_ids=batch.text_ids,
                       **context)
        scale(out.loss).backward()
        # the loss's own parameters (temperature): equal on every rank already, kept so
        self.strategy.average(list(self.losses.parameters()))
        return out, img, txt

    def _micro(self, batch: Any, loss: Callable[..., LossOutput], context: dict[str, Any],
               scale: Scale) -> tuple[LossOutput, Tensor, Tensor]:
        run = gradcache_step if self.variant == "gradcache" else naive_step
        result = run(self.model, loss, batch, self.accumulate, autocast=self.backend.autocast,
                     scale=scale, context=context)
        # micro-batches bypass DDP's forward: average every gradient here (FSDP
        # reduce-scatters the model's own in each backward)
        self.strategy.average(list(self.losses.parameters()) if self.strategy.sharded
                              else [p for p in (*self.model.parameters(),
                                                *self.losses.parameters())
                                    if p.requires_grad])
        return result

    def _fusion(self, batch: Any, loss: Callable[..., LossOutput], context: dict[str, Any],
                scale: Scale) -> tuple[LossOutput, Tensor, Tensor]:
        """One whole batch with [model.fusion]: token features from the same forward pass,
        and ``match(image_rows, text_rows)`` (ITM logits of in-batch pairs) in the context."""
        with self.backend.autocast():
            img, txt, context = fused_forward(self.strategy.forward_model(), batch.pixels,
                                              batch.tokens, context)
            out = loss(img, txt, image_ids=batch.image_ids, text_ids=batch.text_ids,
                       **context)
        scale(out.loss).backward()
        # the head runs after DDP's forward, so DDP leaves it alone: average here
        self.strategy.average([*fusion_of(self.model).parameters(),
                               *self.losses.parameters()])
        return out, img, txt
