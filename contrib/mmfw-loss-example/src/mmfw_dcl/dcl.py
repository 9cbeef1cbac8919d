"""Decoupled contrastive learning: DCL and its weighted form DCLW (Yeh et al., ECCV 2022)."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import (
    EXCLUDED,
    LossOutput,
    Temperature,
    learn_temperature_option,
    max_scale_option,
    option,
    positives,
    temperature_option,
)


@attrs.frozen
class DCLOptions:
    temperature: float = temperature_option(0.1, doc="initial tau: cosine similarity is "
                                            "divided by it")
    learn_temperature: bool = learn_temperature_option(False, doc="learn tau (DCL has no "
                                                       "lower bound as tau shrinks: 1/tau "
                                                       "is clamped to max_scale)")
    max_scale: float = max_scale_option()
    weighted: bool = option(False, doc="DCLW: weight each positive by the negative "
                            "von Mises-Fisher function of its similarity")
    sigma: float = option(0.5, doc="DCLW: the weighting function's temperature",
                          validator=attrs.validators.gt(0))


def vmf_weights(sim: Tensor, pos: Tensor, sigma: float) -> Tensor:
    """DCLW's ``w = 2 - |P| softmax_P(s / sigma)`` on the positive pairs, 0 elsewhere."""
    z = (sim / sigma).masked_fill(~pos, EXCLUDED)
    soft = z.flatten().softmax(0).view_as(sim)
    return (2 - pos.sum() * soft) * pos


def decoupled(logits: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
    """Mean over anchors (rows with a positive and a negative) of pull + push."""
    pull = -(weights * logits).sum(1) / pos.sum(1).clamp_min(1)
    push = logits.masked_fill(pos, EXCLUDED).logsumexp(1)
    anchors = pos.any(1) & (~pos).any(1)
    return torch.where(anchors, pull + push, 0.0).sum() / anchors.sum().clamp_min(1)


class DCL(nn.Module):
    r"""Decoupled contrastive loss (Yeh et al., "Decoupled Contrastive Learning", ECCV 2022).

    InfoNCE's denominator holds the positive itself, which couples the two: a confident
    positive shrinks the gradient from the negatives (the paper's negative-positive coupling,
    worst at small batches). DCL removes the positives from the denominator. With
    :math:`l_{ij} = \hat v_i^\top \hat t_j / \tau`, :math:`P_i = \{j : id^v_i = id^t_j\}` and
    :math:`A` the anchors with at least one positive and one negative:

    .. math::
        L_{i2t} = \frac{1}{|A|}\sum_{i\in A}\Big[-\frac{1}{|P_i|}\sum_{j\in P_i} w_{ij}\,l_{ij}
                  + \log\sum_{k\notin P_i} e^{l_{ik}}\Big],\qquad
        L = \tfrac12 (L_{i2t} + L_{t2i})

    DCL: :math:`w = 1`. DCLW (``weighted``): :math:`w_{ij} = 2 - |P|\,e^{s_{ij}/\sigma} /
    \sum_{(a,b)\in P} e^{s_{ab}/\sigma}` over all positive pairs :math:`P` of the batch
    (:math:`s` the cosine similarity), which puts more weight on the harder positives. With
    unique ids this is the paper's loss between two views, here the two modalities, negatives
    taken across modalities as in CLIP. Defaults follow the paper's reference code:
    :math:`\tau = 0.1`, :math:`\sigma = 0.5`. Unlike InfoNCE it is not bounded below by 0.
    """

    Options = DCLOptions

    def __init__(self, options: DCLOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or DCLOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        sim = v @ t.T
        pos = positives(v.shape[0], t.shape[0], image_ids, text_ids, sim.device)
        if self.options.weighted:
            weights = vmf_weights(sim, pos, self.options.sigma)
        else:
            weights = pos.to(sim.dtype)
        logits = self.temperature.scale() * sim
        i2t = decoupled(logits, pos, weights)
        t2i = decoupled(logits.T, pos.T, weights.T)
        return LossOutput((i2t + t2i) / 2, {"i2t": i2t.detach(), "t2i": t2i.detach()})
