"""NT-Xent over the 2N image and text views (SimCLR, Chen et al. 2020)."""

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
    match_ids,
    max_scale_option,
    soft_cross_entropy,
    temperature_option,
)


@attrs.frozen
class NTXentOptions:
    temperature: float = temperature_option(0.5, doc="tau: cosine similarity is divided by it")
    learn_temperature: bool = learn_temperature_option(False, doc="learn tau")
    max_scale: float = max_scale_option()


class NTXent(nn.Module):
    r"""Normalized temperature-scaled cross entropy (SimCLR, Chen et al. 2020, eq. 1).

    Stack :math:`z = [\hat v; \hat t]` (:math:`B_i + B_t` rows), :math:`l_{ab} = z_a^\top z_b/\tau`.
    Each row's candidates are all other rows, both modalities (:math:`2N-1` with unique ids):

    .. math::
        L = -\frac{1}{|A|}\sum_{a\in A} \frac{1}{|P_a|}\sum_{p\in P_a}
            \log\frac{e^{l_{ap}}}{\sum_{b\ne a} e^{l_{ab}}}

    With no ids (or unique ids) :math:`P_a` is the one matching row of the other modality, the
    paper's loss exactly. With repeated ids, :math:`P_a` is every other row with :math:`a`'s id
    (same-modality ones too: they are views of the same item, never negatives). :math:`A` are
    the rows with a positive. Terms ``image`` / ``text``: the mean over each modality's anchors.
    Local loss: a rank sums :math:`a` over its ``image_rows`` and ``text_rows`` against all of
    :math:`z`, divided by its share of :math:`|A|`.
    """

    Options = NTXentOptions
    supports_local_loss = True

    def __init__(self, options: NTXentOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or NTXentOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, image_rows: slice | None = None,
                text_rows: slice | None = None, shards: int | None = None,
                **context) -> LossOutput:
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        bi, bt = v.shape[0], t.shape[0]
        z = torch.cat([v, t])
        # one id per row of z (with no ids, the row index: an image's only positive is its text)
        zid = torch.cat(match_ids(bi, bt, image_ids, text_ids, z.device))
        index = torch.arange(bi + bt, device=z.device)
        ri, rt = image_rows or slice(None), text_rows or slice(None)
        rows = torch.cat([index[:bi][ri], index[bi:][rt]])  # this rank's anchors, images first
        k = len(range(bi)[ri])
        self_mask = rows.view(-1, 1) == index.view(1, -1)
        pos = (zid[rows].view(-1, 1) == zid.view(1, -1)) & ~self_mask
        logits = (self.temperature.scale() * z[rows] @ z.T).masked_fill(self_mask, EXCLUDED)
        img, txt = soft_cross_entropy(logits[:k], pos[:k]), soft_cross_entropy(logits[k:],
                                                                             pos[k:])
        # the mean over all anchors A (rows of z whose id occurs again); on one of ``shards``
        # ranks A / shards, so that the ranks' mean is the batch's loss
        ni, nt = pos[:k].any(1).sum(), pos[k:].any(1).sum()
        _, which, counts = zid.unique(return_inverse=True, return_counts=True)
        anchors = (counts[which] > 1).sum().clamp_min(1)
        if image_rows is not None or text_rows is not None:
            anchors = anchors / shards if shards else anchors * (len(rows) / (bi + bt))
        loss = (img * ni + txt * nt) / anchors
        return LossOutput(loss, {"image": img.detach(), "text": txt.detach()})
