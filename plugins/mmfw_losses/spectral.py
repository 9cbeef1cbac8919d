"""Spectral contrastive loss (HaoChen, Wei, Gaidon and Ma, NeurIPS 2021), across modalities."""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import LossOutput, option, positives


@attrs.frozen
class SpectralOptions:
    mu: float = option(1.0, doc="rows longer than sqrt(mu) are scaled back to that length, and "
                       "the loss is divided by mu (the authors' code)",
                       validator=attrs.validators.gt(0))


def into_ball(z: Tensor, mu: float) -> Tensor:
    """Rows of norm ``>= sqrt(mu)`` scaled to norm ``sqrt(mu)``; shorter rows unchanged."""
    r = math.sqrt(mu)
    inside = z.norm(dim=1, keepdim=True) < r
    return torch.where(inside, z, F.normalize(z, dim=1) * r)


class Spectral(nn.Module):
    r"""Spectral contrastive loss (HaoChen et al. 2021, eq. 5), image rows :math:`f` against
    text rows :math:`g`, positives by id.

    With :math:`P` the positive pairs (:math:`id^v_i = id^t_j`) and :math:`N` every other
    (image, text) pair of the batch:

    .. math::
        L = \frac{1}{\mu}\Big(-\frac{2}{|P|}\sum_{(i,j)\in P} f_i^\top g_j
            + \frac{1}{|N|}\sum_{(i,j)\in N} (f_i^\top g_j)^2\Big)

    the empirical form of :math:`-2\,E[f(x)^\top g(x^+)] + E[(f(x)^\top g(x^-))^2]`. Minimising
    it is a low-rank factorisation of the (normalised) positive-pair graph, so the embedding's
    spectrum is what the loss shapes. As in the authors' code a row is first scaled into the
    ball of radius :math:`\sqrt\mu` (a row inside it is left as it is). An empty :math:`P` or
    :math:`N` adds 0. Terms: ``pos`` (the first sum with its factor), ``neg`` (the second).
    Symmetric in the two modalities; a loss on raw scale inside the ball.
    """

    Options = SpectralOptions

    def __init__(self, options: SpectralOptions | None = None) -> None:
        super().__init__()
        self.options = options or SpectralOptions()

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        mu = self.options.mu
        f, g = into_ball(image.float(), mu), into_ball(text.float(), mu)
        pos = positives(f.shape[0], g.shape[0], image_ids, text_ids, f.device)
        sim = f @ g.T
        posf = pos.to(sim.dtype)
        negf = 1.0 - posf
        attract = -2.0 * (sim * posf).sum() / posf.sum().clamp_min(1.0) / mu
        repel = (sim.square() * negf).sum() / negf.sum().clamp_min(1.0) / mu
        return LossOutput(attract + repel, {"pos": attract.detach(), "neg": repel.detach()})
