"""MoCo-style memory queue of past embeddings and their ids (He et al. 2020), or a bank of the
whole training set (the seeds' "global" strategy), or neither: ``mode``."""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import (
    EXCLUDED,
    LossOutput,
    Temperature,
    anchor_share,
    learn_temperature_option,
    max_scale_option,
    option,
    positives,
    soft_cross_entropy,
    temperature_option,
)

#: id stored for entries enqueued without ids: matches no anchor (reserved value)
NO_ID = torch.iinfo(torch.int64).min


@attrs.frozen
class MemoryQueueOptions:
    size: int = option(4096, doc="entries kept per modality", validator=attrs.validators.gt(0))
    temperature: float = temperature_option(0.07, doc="initial tau: cosine similarity is "
                                            "divided by it")
    learn_temperature: bool = learn_temperature_option(True, doc="learn tau (as CLIP's "
                                                       "logit_scale)")
    dim: int = option(0, doc="embedding width; 0 = allocate the queue at the first batch",
                      validator=attrs.validators.ge(0))
    max_scale: float = max_scale_option()
    mode: Literal["queue", "global", "batch", "auto"] = option(
        "queue", doc="extra negatives: a FIFO queue of past batches (queue), every training "
        "image and caption embedded once per epoch (global), none (batch), or chosen by the "
        "training set's size when the run starts (auto)")
    global_limit: int = option(20000, doc="auto: the largest training split (images) that "
                               "gets global negatives; larger ones get the queue",
                               validator=attrs.validators.ge(0))


def auto_mode(images: int, batch_size: int, global_limit: int) -> str:
    """``mode = "auto"``: in-batch negatives when a batch holds about the whole training set
    (``images <= batch_size``), the whole set when it has at most ``global_limit`` images,
    else the queue."""
    if images <= batch_size:
        return "batch"
    return "global" if images <= global_limit else "queue"


class Bank(nn.Module):
    """Embeddings of a whole training split and their ids, replaced at once (``fill``); all
    state in buffers, resized on load. A checkpoint without a bank loads as an empty one."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("feats", torch.zeros(0, 0))
        self.register_buffer("ids", torch.zeros(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("feats", "ids"):
            saved = state_dict.get(prefix + name)
            if saved is None:  # a checkpoint of mmfw before the bank: keep it empty
                state_dict[prefix + name] = getattr(self, name)
            elif saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __len__(self) -> int:
        return int(self.ids.numel())

    @torch.no_grad()
    def fill(self, x: Tensor, ids: Tensor) -> None:
        """Hold the normalised rows of ``x`` and their ``ids`` (and nothing else)."""
        device = self.feats.device
        self.feats = F.normalize(x.float(), dim=-1).to(device)
        self.ids = ids.to(device, torch.long).view(-1)

    def contents(self) -> tuple[Tensor, Tensor]:
        return self.feats, self.ids


class Queue(nn.Module):
    """A FIFO ring of ``size`` detached rows and their ids; all state is in buffers.

    ``feats`` is ``[size, dim]`` (``[0, 0]`` until the width is known), ``ptr`` the next slot,
    ``count`` how many slots are filled. Loading a state dict resizes a lazy queue to match.
    """

    def __init__(self, size: int, dim: int = 0) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("feats", torch.zeros(size if dim else 0, dim))
        self.register_buffer("ids", torch.full((size if dim else 0,), NO_ID, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("feats", "ids"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def contents(self) -> tuple[Tensor, Tensor]:
        """Filled rows and ids, oldest first."""
        n, p = int(self.count), int(self.ptr)
        order = torch.arange(p - n, p, device=self.feats.device) % self.size
        return self.feats[order], self.ids[order]

    @torch.no_grad()
    def push(self, x: Tensor, ids: Tensor) -> None:
        if self.feats.shape[0] == 0:  # lazy: the width is known now
            self.feats = x.new_zeros(self.size, x.shape[1])
            self.ids = torch.full((self.size,), NO_ID, dtype=torch.long, device=x.device)
        x, ids = x[-self.size:], ids[-self.size:]  # a batch larger than the queue keeps its tail
        slots = (self.ptr + torch.arange(len(x), device=x.device)) % self.size
        self.feats[slots] = x.detach().to(self.feats.dtype)
        self.ids[slots] = ids.to(self.ids.device, torch.long)
        self.ptr.copy_((self.ptr + len(x)) % self.size)
        self.count.copy_((self.count + len(x)).clamp(max=self.size))


class MemoryQueue(nn.Module):
    r"""Symmetric InfoNCE against the batch plus queues of past embeddings (MoCo, He et al. 2020),
    or plus the whole training set (``mode = "global"``).

    Each image's candidates are the batch texts and the queued texts :math:`Q^t`; each text's
    the batch images and :math:`Q^v`. Batch positives are by id as in ``infonce``; a queued
    entry with the anchor's id is *excluded* (neither positive nor negative):

    .. math::
        L_{i2t} = -\frac{1}{B_i}\sum_i \frac{1}{|P_i|}\sum_{j\in P_i}\log
        \frac{e^{l_{ij}}}{\sum_k e^{l_{ik}} + \sum_{q\in Q^t,\ id_q \ne id^v_i} e^{l_{iq}}}

    and :math:`L_{t2i}` likewise; :math:`L = \frac12(L_{i2t}+L_{t2i})`. After the loss, the
    batch's normalised, detached rows and ids are enqueued (FIFO, training mode only). Rows
    passed without ids are stored with a reserved id that matches nothing. With ``dim = 0``
    the queues are allocated at the first batch; ``load_state_dict`` resizes them.
    Local loss: a rank's ``image_rows`` and ``text_rows`` are the anchors (against the whole
    batch and the queues), as in ``infonce``; every rank enqueues the same, whole batch.

    ``mode = "global"``: the extra candidates are a bank of every training image and caption
    (their ids: the training split's image indices, the engine's match ids), filled by the
    ``global-negatives`` callback when the run starts and after every epoch
    (:meth:`fill_bank`); nothing is enqueued. ``"batch"``: no extra candidates (``infonce``
    at this loss's temperature). ``"auto"``: the callback picks one of the three from the
    training split's size (:func:`auto_mode`) and sets :attr:`active`; until then it acts as
    ``"queue"``. Same-id entries are excluded in every mode.
    """

    Options = MemoryQueueOptions
    supports_local_loss = True

    def __init__(self, options: MemoryQueueOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or MemoryQueueOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)
        self.image_queue, self.text_queue = Queue(o.size, o.dim), Queue(o.size, o.dim)
        self.image_bank, self.text_bank = Bank(), Bank()
        #: the mode in use: ``options.mode``, or what ``auto`` resolved to (:meth:`resolve`)
        self.active = "queue" if o.mode == "auto" else o.mode

    def resolve(self, images: int, batch_size: int) -> str:
        """Fix the mode of a run whose training split has ``images`` images."""
        o = self.options
        self.active = auto_mode(images, batch_size, o.global_limit) if o.mode == "auto" \
            else o.mode
        return self.active

    def fill_bank(self, images: Tensor, image_ids: Tensor, texts: Tensor, text_ids: Tensor
                  ) -> None:
        """``mode = "global"``: the training set's embeddings become the extra candidates."""
        self.image_bank.fill(images, image_ids)
        self.text_bank.fill(texts, text_ids)

    def _extra(self, queue: Queue, bank: Bank) -> tuple[Tensor, Tensor] | None:
        if self.active == "queue":
            return queue.contents()
        if self.active == "global":
            return bank.contents()
        return None

    def _side(self, queries: Tensor, keys: Tensor, query_ids: Tensor | None,
              key_ids: Tensor | None, rows: slice | None,
              extra: tuple[Tensor, Tensor] | None, shards: int | None = None) -> Tensor:
        """``queries[rows]`` (all when ``None``) against every key and the ``extra`` keys (the
        queue's or the bank's rows and ids)."""
        n, m = len(queries), len(keys)
        rows = slice(None) if rows is None else rows
        pos = positives(n, m, query_ids, key_ids, queries.device, rows)
        anchors = queries[rows]
        scale = self.temperature.scale()
        logits = scale * anchors @ keys.T
        feats, qids = extra if extra is not None else (keys[:0], keys.new_zeros(0))
        if len(feats):
            qlogits = scale * anchors @ feats.to(anchors.dtype).T
            if query_ids is not None:
                ids = query_ids.to(queries.device, torch.long).view(-1)[rows]
                qlogits = qlogits.masked_fill(ids.view(-1, 1) == qids.view(1, -1), EXCLUDED)
            logits = torch.cat([logits, qlogits], 1)
            pos = torch.cat([pos, pos.new_zeros(len(anchors), len(feats))], 1)
        share = anchor_share(n, m, query_ids, key_ids, queries.device, rows, shards)
        return soft_cross_entropy(logits, pos, divisor=share)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, image_rows: slice | None = None,
                text_rows: slice | None = None, shards: int | None = None,
                **context) -> LossOutput:
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        i2t = self._side(v, t, image_ids, text_ids, image_rows,
                         self._extra(self.text_queue, self.text_bank), shards)
        t2i = self._side(t, v, text_ids, image_ids, text_rows,
                         self._extra(self.image_queue, self.image_bank), shards)
        if self.training and self.active == "queue":  # the whole batch: same queues everywhere
            none = torch.full((1,), NO_ID, dtype=torch.long, device=v.device)
            iid = none.expand(len(v)) if image_ids is None else image_ids.to(v.device, torch.long)
            tid = none.expand(len(t)) if text_ids is None else text_ids.to(v.device, torch.long)
            self.image_queue.push(v, iid.view(-1))
            self.text_queue.push(t, tid.view(-1))
        return LossOutput((i2t + t2i) / 2, {"i2t": i2t.detach(), "t2i": t2i.detach()})
