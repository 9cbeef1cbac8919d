"""SigLIP: pairwise sigmoid loss (Zhai et al. 2023)."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import (
    LossOutput,
    Temperature,
    learn_temperature_option,
    max_scale_option,
    option,
    positives,
    temperature_option,
)


@attrs.frozen
class SigLIPOptions:
    temperature: float = temperature_option(0.1, doc="initial tau: cosine similarity is "
                                            "divided by it (the paper's logit scale 10)")
    learn_temperature: bool = learn_temperature_option(True, doc="learn tau (in log space, "
                                                       "as the paper's t')")
    bias: float = option(-10.0, doc="initial logit bias b")
    learn_bias: bool = option(True, doc="learn the bias")
    max_scale: float = max_scale_option()


class SigLIP(nn.Module):
    r"""Sigmoid loss for language-image pre-training (SigLIP, Zhai et al. 2023, eq. 1).

    With :math:`l_{ij} = \hat v_i^\top \hat t_j / \tau + b` and :math:`z_{ij} = +1` if
    :math:`id^v_i = id^t_j` else :math:`-1`:

    .. math::
        L = -\frac{1}{B_i} \sum_i \sum_j \log \sigma(z_{ij}\, l_{ij})

    Every pair is an independent binary problem, so there is no softmax over the batch and
    repeated ids simply give more +1 labels. Terms ``pos`` / ``neg`` split the sum by label.
    Local loss: a rank sums :math:`i` over its ``image_rows`` only (every pair once) and divides
    by their count; ``text_rows`` is not needed.
    """

    Options = SigLIPOptions
    supports_local_loss = True

    def __init__(self, options: SigLIPOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or SigLIPOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)
        bias = torch.tensor(float(o.bias))
        if o.learn_bias:
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, image_rows: slice | None = None,
                shards: int | None = None, **context) -> LossOutput:
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        pos = positives(v.shape[0], t.shape[0], image_ids, text_ids, v.device, image_rows)
        bi = v.shape[0]
        v = v[slice(None) if image_rows is None else image_rows]
        logits = self.temperature.scale() * v @ t.T + self.bias
        nll = -F.logsigmoid(torch.where(pos, logits, -logits))
        # on one of ``shards`` ranks B_i / shards: the ranks' mean is the batch's sum / B_i
        n = bi / shards if image_rows is not None and shards else v.shape[0]
        pos_part, neg_part = nll.mul(pos).sum() / n, nll.mul(~pos).sum() / n
        return LossOutput(pos_part + neg_part, {"pos": pos_part.detach(),
                                                "neg": neg_part.detach()})
