r"""Gradient accumulation that keeps the contrastive batch whole (GradCache, Gao et al. 2021).

A contrastive loss couples every row of a batch with every other: splitting a batch of ``B``
into ``N`` micro-batches and summing their losses (what the seeds did, ``accumulate_mode =
"naive"``) gives each anchor ``B/N - 1`` negatives instead of ``B - 1`` and a different
gradient from the batch the user asked for. GradCache gets the *same* gradient as one forward
of the whole batch with the memory of one micro-batch:

1. embed every micro-batch without a graph and remember each one's RNG state;
2. compute the loss on the concatenated embeddings :math:`z` and backpropagate it to
   :math:`\partial L/\partial z` (and to the loss's own parameters; a stateful loss such as a
   memory queue is called, hence updated, once per batch);
3. re-forward each micro-batch with a graph under its saved RNG state (same dropout masks) and
   backpropagate :math:`\partial L/\partial z` restricted to its rows.

By the chain rule the parameter gradients are those of the whole batch (up to float
reassociation), whatever the loss. Layers that couple rows inside the encoders (BatchNorm in
training mode) see micro-batch statistics, as with any accumulation; their running statistics are
updated once per micro-batch, not twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..spi.contracts import LossOutput

Scale = Callable[[Tensor], Tensor]


class RandState:
    """The CPU and (if used) CUDA RNG states at one moment, to run code again under them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block under this state; the RNG continues afterwards as if it had not run."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def chunks(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering ``range(n)``, sizes differing by at most one."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (k < extra)
        out.append(slice(start, start + size))
        start += size
    return out


def _rows(x: Any, s: slice) -> Any:
    if isinstance(x, dict):
        return {k: v[s] for k, v in x.items()}
    return x[s]


def _slice_context(context: dict[str, Any], images: Tensor | slice, texts: Tensor | slice,
                   n_images: int, n_texts: int) -> dict[str, Any]:
    """Context with per-row tensors (``teacher_image`` / ``teacher_text``) cut like the rows."""
    out = dict(context)
    for key, rows, n in (("teacher_image", images, n_images), ("teacher_text", texts, n_texts)):
        v = out.get(key)
        if torch.is_tensor(v) and v.shape[0] == n:
            out[key] = v[rows]
    return out


def gradcache_step(model: nn.Module, loss: nn.Module, batch: Any, parts: int, *,
                   autocast: Callable[[], contextlib.AbstractContextManager],
                   scale: Scale = lambda x: x, context: dict[str, Any] | None = None,
                   replay_rng: bool = True) -> tuple[LossOutput, Tensor, Tensor]:
    """Forward and backward of ``loss(model(batch))`` in ``parts`` micro-batches per modality.

    ``model`` has ``encode_image(pixels)`` / ``encode_text(tokens)``; ``batch`` has ``pixels``,
    ``tokens``, ``image_ids``, ``text_ids``. ``scale`` wraps the loss before backward (a
    GradScaler's ``scale``). Returns the loss output and the detached full-batch embeddings.
    """
    context = context or {}
    device = batch.pixels.device
    img_parts = chunks(batch.pixels.shape[0], parts)
    txt_parts = chunks(batch.text_ids.shape[0], parts)

    # 1. embeddings without a graph, RNG state remembered per micro-batch
    img_states, txt_states, imgs, txts = [], [], [], []
    with torch.no_grad():
        for s in img_parts:
            img_states.append(RandState(device))
            with autocast():
                imgs.append(model.encode_image(batch.pixels[s]))
        for s in txt_parts:
            txt_states.append(RandState(device))
            with autocast():
                txts.append(model.encode_text(_rows(batch.tokens, s)))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    # 2. the loss on the whole batch, backpropagated to the embeddings
    img = torch.cat(imgs).detach().requires_grad_()
    txt = torch.cat(txts).detach().requires_grad_()
    with autocast():
        out = loss(img, txt, image_ids=batch.image_ids, text_ids=batch.text_ids, **context)
    scale(out.loss).backward()
    img_grad = img.grad if img.grad is not None else torch.zeros_like(img)
    txt_grad = txt.grad if txt.grad is not None else torch.zeros_like(txt)

    # 3. re-forward each micro-batch with a graph and push its slice of the cached gradient
    for s, state in zip(img_parts, img_states):
        with state.replay() if replay_rng else contextlib.nullcontext(), autocast():
            emb = model.encode_image(batch.pixels[s])
        if emb.requires_grad:
            emb.backward(img_grad[s].to(emb.dtype))
    for s, state in zip(txt_parts, txt_states):
        with state.replay() if replay_rng else contextlib.nullcontext(), autocast():
            emb = model.encode_text(_rows(batch.tokens, s))
        if emb.requires_grad:
            emb.backward(txt_grad[s].to(emb.dtype))
    with torch.no_grad():  # BatchNorm running stats: keep pass 1's update, not a second one
        for b, saved in buffers:
            b.copy_(saved)
    return out, img.detach(), txt.detach()


def naive_step(model: nn.Module, loss: nn.Module, batch: Any, parts: int, *,
               autocast: Callable[[], contextlib.AbstractContextManager],
               scale: Scale = lambda x: x, context: dict[str, Any] | None = None
               ) -> tuple[LossOutput, Tensor, Tensor]:
    """The seeds' accumulation: the loss of each micro-batch alone, averaged.

    Captions are cut into ``parts`` contiguous slices; each slice is paired with the images
    its ids name. Every anchor sees only its micro-batch's negatives, so the gradient is not
    the whole batch's (see the module docstring). Kept for comparison.
    """
    context = context or {}
    n_img, n_txt = batch.pixels.shape[0], batch.text_ids.shape[0]
    img_full: Tensor | None = None
    txt_full: Tensor | None = None
    losses, terms = [], {}
    slices = chunks(n_txt, parts)
    for s in slices:
        tid = batch.text_ids[s]
        rows = torch.isin(batch.image_ids, tid).nonzero().flatten()
        ctx = _slice_context(context, rows, s, n_img, n_txt)
        with autocast():
            img = model.encode_image(batch.pixels[rows])
            txt = model.encode_text(_rows(batch.tokens, s))
            out = loss(img, txt, image_ids=batch.image_ids[rows], text_ids=tid, **ctx)
        scale(out.loss / len(slices)).backward()
        if img_full is None:
            img_full = img.new_zeros(n_img, img.shape[1])
            txt_full = txt.new_zeros(n_txt, txt.shape[1])
        img_full[rows] = img.detach()
        txt_full[s] = txt.detach()
        losses.append(out.loss.detach())
        for k, v in out.terms.items():
            terms.setdefault(k, []).append(v.detach().float())
    mean = torch.stack(losses).mean()
    out = LossOutput(mean, {k: torch.stack(v).mean() for k, v in terms.items()})
    assert img_full is not None and txt_full is not None
    return out, img_full, txt_full
