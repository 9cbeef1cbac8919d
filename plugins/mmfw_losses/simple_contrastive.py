"""The seeds' SimpleContrastiveLoss: InfoNCE + MSE alignment + decorrelation (seed 001 §4.3.2)."""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import (
    LossOutput,
    Temperature,
    learn_temperature_option,
    max_scale_option,
    option,
    pair_indices,
    positives,
    soft_cross_entropy,
    temperature_option,
)

from .decorrelation import decorrelation


@attrs.frozen
class SimpleContrastiveOptions:
    temperature: float = temperature_option(0.1, doc="initial tau: cosine similarity is "
                                            "divided by it")
    learn_temperature: bool = learn_temperature_option(False, doc="learn tau (the seed "
                                                       "keeps it fixed)")
    mse_weight: float = option(0.5, doc="weight of the MSE alignment of matched pairs",
                               validator=attrs.validators.ge(0))
    decor_weight: float = option(0.2, doc="weight of the decorrelation penalty",
                                 validator=attrs.validators.ge(0))
    max_scale: float = max_scale_option()


class SimpleContrastive(nn.Module):
    r"""InfoNCE + direct alignment + decorrelation (seed 001 §4.3.2; van den Oord et al. 2018).

    On normalised embeddings :math:`\hat v, \hat t`, with :math:`P` the positive pairs by id:

    .. math::
        L = \tfrac12 (L_{i2t} + L_{t2i})
            + w_{mse} \frac{1}{|P|}\sum_{(i,j)\in P} \|\hat v_i - \hat t_j\|^2
            + w_{dec} \Big(\sum_{a\ne b} (C^{v}_{ab})^2 + \sum_{a\ne b} (C^{t}_{ab})^2\Big)

    :math:`L_{i2t}, L_{t2i}` are ``infonce``'s multi-positive terms; :math:`C` is the sample
    covariance of each modality (``decorrelation``), taken here on the *normalised* rows so the
    whole loss is invariant to rescaling. Terms ``i2t``, ``t2i``, ``mse``, ``decor`` (unweighted).
    """

    Options = SimpleContrastiveOptions

    def __init__(self, options: SimpleContrastiveOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or SimpleContrastiveOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        o = self.options
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        logits = self.temperature.scale() * v @ t.T
        pos = positives(v.shape[0], t.shape[0], image_ids, text_ids, logits.device)
        i2t, t2i = soft_cross_entropy(logits, pos), soft_cross_entropy(logits.T, pos.T)
        i, j = pair_indices(pos)
        mse = (v[i] - t[j]).pow(2).sum(1).sum() / max(len(i), 1)
        decor = decorrelation(v) + decorrelation(t)
        loss = (i2t + t2i) / 2 + o.mse_weight * mse + o.decor_weight * decor
        terms = {"i2t": i2t, "t2i": t2i, "mse": mse, "decor": decor}
        return LossOutput(loss, {k: x.detach() for k, x in terms.items()})
