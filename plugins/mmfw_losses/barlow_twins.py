"""Barlow Twins: make the cross-correlation of matched embeddings the identity (Zbontar et al.
2021)."""

from __future__ import annotations

import attrs
from torch import Tensor, nn

from mmfw.spi import LossOutput, option, pair_indices, positives

from .stats import off_diagonal_sq


@attrs.frozen
class BarlowTwinsOptions:
    lambd: float = option(0.0051, doc="weight of the off-diagonal (redundancy) term",
                          validator=attrs.validators.ge(0))
    eps: float = option(1e-5, doc="added to the variance when standardising (as BatchNorm)",
                        validator=attrs.validators.gt(0))


def standardise(x: Tensor, eps: float) -> Tensor:
    """Per-dimension ``(x - mean) / sqrt(var + eps)`` over rows (biased variance, as BatchNorm)."""
    xc = x - x.mean(0)
    return xc / (xc.pow(2).mean(0) + eps).sqrt()


class BarlowTwins(nn.Module):
    r"""Barlow Twins (Zbontar et al. 2021, eq. 1-2) between matched image and text rows.

    Take every positive pair :math:`(i, j)` by id as one row of two ``[N, D]`` matrices, each
    standardised per dimension over the :math:`N` pairs (:math:`\tilde a, \tilde b`); then
    :math:`C_{ab} = \frac1N \sum_n \tilde a_{na} \tilde b_{nb}` and

    .. math::
        L = \sum_a (1 - C_{aa})^2 + \lambda \sum_{a\ne b} C_{ab}^2

    Several captions of one image each make a row. Standardisation makes it invariant to
    rescaling wherever the variance is large against ``eps``. Terms ``on_diag``, ``off_diag``.
    """

    Options = BarlowTwinsOptions

    def __init__(self, options: BarlowTwinsOptions | None = None) -> None:
        super().__init__()
        self.options = options or BarlowTwinsOptions()

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        o = self.options
        v, t = image.float(), text.float()
        i, j = pair_indices(positives(v.shape[0], t.shape[0], image_ids, text_ids, v.device))
        if len(i) == 0:  # no matched pair: nothing to correlate
            zero = (v.sum() + t.sum()) * 0
            return LossOutput(zero, {"on_diag": zero.detach(), "off_diag": zero.detach()})
        a, b = standardise(v[i], o.eps), standardise(t[j], o.eps)
        c = a.T @ b / len(i)
        on = (1 - c.diagonal()).pow(2).sum()
        off = off_diagonal_sq(c)
        return LossOutput(on + o.lambd * off, {"on_diag": on.detach(), "off_diag": off.detach()})
