"""Decorrelation: penalise covariance between embedding dimensions (seed 001 §4.3.1)."""

from __future__ import annotations

import attrs
from torch import Tensor, nn

from mmfw.spi import LossOutput, option

from .stats import covariance, off_diagonal_sq


@attrs.frozen
class DecorrelationOptions:
    weight: float = option(1.0, doc="multiplies the sum of both modalities' penalties",
                           validator=attrs.validators.ge(0))


def decorrelation(x: Tensor) -> Tensor:
    """``sum_{a != b} C_ab^2`` of the sample covariance ``C`` of the rows of ``x``."""
    return off_diagonal_sq(covariance(x))


class Decorrelation(nn.Module):
    r"""Off-diagonal covariance penalty per modality (seed 001 §4.3.1; cf. Zbontar et al. 2021).

    With :math:`C^v = \frac{1}{B_i-1}(V-\bar V)^\top (V-\bar V)` over the raw image rows (and
    :math:`C^t` likewise over the text rows):

    .. math::
        L = w \Big(\sum_{a\ne b} (C^v_{ab})^2 + \sum_{a\ne b} (C^t_{ab})^2\Big)

    Pairing plays no part (ids are ignored). A batch of one row has zero covariance (the
    divisor is :math:`\max(B-1, 1)`). Terms ``vision`` and ``text`` are unweighted.
    """

    Options = DecorrelationOptions

    def __init__(self, options: DecorrelationOptions | None = None) -> None:
        super().__init__()
        self.options = options or DecorrelationOptions()

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        vision, txt = decorrelation(image.float()), decorrelation(text.float())
        loss = self.options.weight * (vision + txt)
        return LossOutput(loss, {"vision": vision.detach(), "text": txt.detach()})
