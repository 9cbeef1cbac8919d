"""InfoNCE / CLIP loss with multiple positives by id."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import (
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


@attrs.frozen
class InfoNCEOptions:
    temperature: float = temperature_option(0.07, doc="initial tau: cosine similarity is "
                                            "divided by it")
    learn_temperature: bool = learn_temperature_option(True, doc="learn tau (as CLIP's "
                                                       "logit_scale)")
    max_scale: float = max_scale_option()
    label_smoothing: float = option(0.0, doc="mass spread uniformly over all candidates",
                                    validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    soft_targets: float = option(0.0, doc="mass of each anchor's target given by caption-"
                                 "caption similarity in the batch (SoftCLIP): a caption's "
                                 "near-synonyms are partly positives, not pushed away",
                                 validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    soft_temperature: float = option(0.1, doc="temperature of the caption-caption cosine "
                                     "similarity that soft_targets takes a softmax of",
                                     validator=attrs.validators.gt(0))


def caption_similarity(text: Tensor, pos: Tensor) -> Tensor:
    """``[Bi, Bt]`` cosine similarity of each image's captions (the mean direction of its
    positives in ``pos``) to every caption, detached: the soft targets' logits before their
    temperature. Rows of an image without a positive are 0 (they add no loss)."""
    t = F.normalize(text.detach().float(), dim=-1)
    weights = pos.float() / pos.sum(1, keepdim=True).clamp_min(1)
    return F.normalize(weights @ t, dim=-1) @ t.T


def one_way(queries: Tensor, keys: Tensor, query_ids: Tensor | None, key_ids: Tensor | None,
            rows: slice | None, scale: Tensor, smoothing: float = 0.0,
            shards: int | None = None, target: Tensor | None = None,
            target_weight: float = 0.0) -> Tensor:
    """One direction of InfoNCE: ``queries[rows]`` (all when ``None``) against every key;
    ``target`` (``[len(queries), len(keys)]``) the soft targets of every query."""
    n, m = len(queries), len(keys)
    pos = positives(n, m, query_ids, key_ids, queries.device, rows)
    logits = scale * queries[slice(None) if rows is None else rows] @ keys.T
    share = anchor_share(n, m, query_ids, key_ids, queries.device, rows, shards)
    if target is not None and rows is not None:
        target = target[rows]
    return soft_cross_entropy(logits, pos, smoothing, share, target, target_weight)


class InfoNCE(nn.Module):
    r"""Symmetric InfoNCE (CLIP, Radford et al. 2021; van den Oord et al. 2018).

    With :math:`\hat x = x/\|x\|`, :math:`l_{ij} = \hat v_i^\top \hat t_j / \tau` and
    :math:`P_i = \{j : id^v_i = id^t_j\}`:

    .. math::
        L_{i2t} = -\frac{1}{B_i}\sum_i \frac{1}{|P_i|}\sum_{j\in P_i}
                  \log \frac{e^{l_{ij}}}{\sum_k e^{l_{ik}}},\qquad
        L = \tfrac12 (L_{i2t} + L_{t2i})

    and :math:`L_{t2i}` the same over columns. With unique ids this is CLIP's loss exactly;
    with repeated ids other captions of the same image are positives, never false negatives.

    ``soft_targets`` :math:`= \lambda` replaces the uniform target over :math:`P_i` by
    :math:`(1-\lambda)\,\mathbb 1[j\in P_i]/|P_i| + \lambda\,\mathrm{softmax}_j(g_{ij}/\tau_s)`
    with :math:`g_{ij}` the cosine similarity of the mean direction of image :math:`i`'s
    captions to caption :math:`j` (detached; :math:`L_{t2i}` takes the softmax over
    :math:`i`): soft targets from intra-modal similarity (SoftCLIP, Gao et al., AAAI 2024),
    which keep near-synonymous captions of different images from being pushed apart, the
    false negatives of small caption sets with shared words.
    Local loss: a rank sums :math:`i` over its ``image_rows`` (columns: its ``text_rows``)
    against the whole batch, divided by the batch's anchors over the number of ``shards``
    (ranks; ``masks.anchor_share``).
    """

    Options = InfoNCEOptions
    supports_local_loss = True

    def __init__(self, options: InfoNCEOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or InfoNCEOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, image_rows: slice | None = None,
                text_rows: slice | None = None, shards: int | None = None,
                **context) -> LossOutput:
        o = self.options
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        scale, ls, w = self.temperature.scale(), o.label_smoothing, o.soft_targets
        soft_i2t = soft_t2i = None
        if w:
            g = caption_similarity(t, positives(v.shape[0], t.shape[0], image_ids, text_ids,
                                                t.device)) / o.soft_temperature
            soft_i2t, soft_t2i = torch.softmax(g, dim=1), torch.softmax(g.T, dim=1)
        if image_rows is None and text_rows is None:  # the whole batch: one product, both ways
            logits = scale * v @ t.T
            pos = positives(v.shape[0], t.shape[0], image_ids, text_ids, logits.device)
            i2t = soft_cross_entropy(logits, pos, ls, target=soft_i2t, target_weight=w)
            t2i = soft_cross_entropy(logits.T, pos.T, ls, target=soft_t2i, target_weight=w)
        else:
            i2t = one_way(v, t, image_ids, text_ids, image_rows, scale, ls, shards, soft_i2t, w)
            t2i = one_way(t, v, text_ids, image_ids, text_rows, scale, ls, shards, soft_t2i, w)
        return LossOutput((i2t + t2i) / 2, {"i2t": i2t.detach(), "t2i": t2i.detach()})

