"""InfoNCE with mined hard or semi-hard negatives up-weighted (Schroff et al. 2015; Faghri et al.
2018)."""

from __future__ import annotations

import math
from typing import Literal

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
class HardNegativeOptions:
    mining: Literal["hard", "semi-hard"] = option("hard", doc="which negatives are up-weighted")
    factor: float = option(2.0, doc="weight on a mined negative's exp(logit) (adds log factor)",
                           validator=attrs.validators.gt(0))
    margin: float = option(0.2, doc="cosine margin of the mining rule",
                           validator=attrs.validators.ge(0))
    top_k: int = option(0, doc="hard: mine the k most similar negatives (0 = the margin rule)",
                        validator=attrs.validators.ge(0))
    temperature: float = temperature_option(0.07, doc="initial tau: cosine similarity is "
                                            "divided by it")
    learn_temperature: bool = learn_temperature_option(False, doc="learn tau (as CLIP's "
                                                       "logit_scale)")
    max_scale: float = max_scale_option()


def mine(sim: Tensor, pos: Tensor, o: HardNegativeOptions) -> Tensor:
    """Bool mask of mined negatives per row of cosine similarities ``sim`` (no gradient)."""
    sim = sim.detach()
    neg = ~pos
    s_pos = sim.masked_fill(neg, math.inf).amin(1, keepdim=True)  # +inf for rows w/o positive
    if o.mining == "semi-hard":
        mined = (sim > s_pos - o.margin) & (sim < s_pos)
    elif o.top_k:
        k = min(o.top_k, sim.shape[1])
        top = sim.masked_fill(pos, -math.inf).topk(k, dim=1).indices
        mined = torch.zeros_like(pos).scatter_(1, top, True)
    else:
        mined = sim > s_pos - o.margin
    return mined & neg & pos.any(1, keepdim=True)


class HardNegative(nn.Module):
    r"""Symmetric InfoNCE whose mined negatives count ``factor`` times in the denominator.

    With cosine similarities :math:`s_{ij}`, :math:`l_{ij} = s_{ij}/\tau` and the anchor's
    *hardest positive* :math:`s^+_i = \min_{j\in P_i} s_{ij}`, a negative :math:`j\notin P_i`
    is mined when

    - ``hard``: :math:`s_{ij} > s^+_i - m` (ranked above, or within the margin of, a positive;
      VSE++, Faghri et al. 2018), or, with ``top_k = k > 0``, it is one of the :math:`k` most
      similar negatives of row :math:`i`;
    - ``semi-hard``: :math:`s^+_i - m < s_{ij} < s^+_i` (FaceNet, Schroff et al. 2015).

    Mined logits become :math:`l_{ij} + \log f` (i.e. :math:`f e^{l_{ij}}` in the softmax), then
    ``infonce``'s multi-positive loss is taken both ways (columns mined on columns). Mining is
    a selection, so no gradient flows through it. With ``factor = 1`` this is ``infonce``.
    Terms ``i2t``, ``t2i``, and ``mined`` (mean mined negatives per anchor, both ways).
    Local loss: mining and the loss are per row, so a rank takes its ``image_rows`` and
    ``text_rows`` against the whole batch, as ``infonce`` does.
    """

    Options = HardNegativeOptions
    supports_local_loss = True

    def __init__(self, options: HardNegativeOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or HardNegativeOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)

    def one_way(self, queries: Tensor, keys: Tensor, query_ids: Tensor | None,
                key_ids: Tensor | None, rows: slice | None, shards: int | None = None
                ) -> tuple[Tensor, Tensor]:
        """The loss of ``queries[rows]`` (all when ``None``) against every key, and the mask
        of their mined negatives."""
        n, m = len(queries), len(keys)
        pos = positives(n, m, query_ids, key_ids, queries.device, rows)
        sim = queries[slice(None) if rows is None else rows] @ keys.T
        mined = mine(sim, pos, self.options)
        logits = self.temperature.scale() * sim + math.log(self.options.factor) * mined
        share = anchor_share(n, m, query_ids, key_ids, queries.device, rows, shards)
        return soft_cross_entropy(logits, pos, divisor=share), mined

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, image_rows: slice | None = None,
                text_rows: slice | None = None, shards: int | None = None,
                **context) -> LossOutput:
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        i2t, mined_i = self.one_way(v, t, image_ids, text_ids, image_rows, shards)
        t2i, mined_t = self.one_way(t, v, text_ids, image_ids, text_rows, shards)
        mined = (mined_i.sum() + mined_t.sum()).float() / (len(mined_i) + len(mined_t))
        return LossOutput((i2t + t2i) / 2, {"i2t": i2t.detach(), "t2i": t2i.detach(),
                                            "mined": mined})
