"""VICReg: variance-invariance-covariance regularisation (Bardes et al. 2022)."""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import LossOutput, option, pair_indices, positives

from .stats import covariance, off_diagonal_sq


@attrs.frozen
class VICRegOptions:
    sim_weight: float = option(25.0, doc="lambda: weight of the invariance (MSE) term",
                               validator=attrs.validators.ge(0))
    var_weight: float = option(25.0, doc="mu: weight of the variance hinge",
                               validator=attrs.validators.ge(0))
    cov_weight: float = option(1.0, doc="nu: weight of the covariance term",
                               validator=attrs.validators.ge(0))
    gamma: float = option(1.0, doc="target standard deviation of every dimension",
                          validator=attrs.validators.gt(0))
    eps: float = option(1e-4, doc="added to the variance under the square root",
                        validator=attrs.validators.gt(0))


def std_hinge(x: Tensor, gamma: float, eps: float) -> Tensor:
    """``mean_d relu(gamma - sqrt(Var(x_d) + eps))`` (unbiased variance; one row: variance 0)."""
    var = (x - x.mean(0)).pow(2).sum(0) / max(x.shape[0] - 1, 1)
    return F.relu(gamma - (var + eps).sqrt()).mean()


class VICReg(nn.Module):
    r"""VICReg on raw (un-normalised) embeddings (Bardes et al. 2022, eq. 6).

    With :math:`P` the positive pairs by id, :math:`V` the image rows, :math:`T` the text rows:

    .. math::
        L = \lambda \frac{1}{|P|\,D}\sum_{(i,j)\in P}\|v_i - t_j\|^2
          + \mu\,\tfrac12\big(h(V) + h(T)\big) + \nu\,\tfrac1D\big(c(V) + c(T)\big)

    :math:`h(Z) = \frac1D\sum_d \max(0, \gamma - \sqrt{\mathrm{Var}(z_d)+\epsilon})` and
    :math:`c(Z) = \sum_{a\ne b} C(Z)_{ab}^2`, as in the authors' reference code (hinge averaged
    over the two branches, covariance summed). Invariance averages over *all* positive pairs (so
    several captions of one image each pull on it); variance and covariance use each modality's
    own rows. A loss on raw scale: it is not invariant to rescaling by design.
    """

    Options = VICRegOptions

    def __init__(self, options: VICRegOptions | None = None) -> None:
        super().__init__()
        self.options = options or VICRegOptions()

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        o = self.options
        v, t = image.float(), text.float()
        d = v.shape[1]
        i, j = pair_indices(positives(v.shape[0], t.shape[0], image_ids, text_ids, v.device))
        inv = (v[i] - t[j]).pow(2).sum() / max(len(i) * d, 1)
        var = (std_hinge(v, o.gamma, o.eps) + std_hinge(t, o.gamma, o.eps)) / 2
        cov = (off_diagonal_sq(covariance(v)) + off_diagonal_sq(covariance(t))) / d
        loss = o.sim_weight * inv + o.var_weight * var + o.cov_weight * cov
        terms = {"invariance": inv, "variance": var, "covariance": cov}
        return LossOutput(loss, {k: x.detach() for k, x in terms.items()})
