"""Image–text matching loss on in-batch hard negatives (ALBEF, Li et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import LossOutput, MmfwError, option, pair_indices, positives, temperature_option

Match = Callable[[Tensor, Tensor], Tensor]


@attrs.frozen
class ITMOptions:
    temperature: float = temperature_option(0.07, doc="hard negatives are drawn from "
                                            "softmax(cosine / temperature) over the "
                                            "non-matching rows")
    hard: bool = option(True, doc="sample negatives by similarity (false: uniformly)")


def sample_negatives(sim: Tensor, pos: Tensor, temperature: float, hard: bool
                     ) -> tuple[Tensor, Tensor]:
    """For each row of ``sim`` one column that is not a positive: ``(rows, columns)``.

    Rows whose every column is a positive have no negative and are left out.
    """
    has_neg = (~pos).any(1)
    logits = sim / temperature if hard else torch.zeros_like(sim)
    weights = logits.float().masked_fill(pos, float("-inf"))
    weights = torch.softmax(weights[has_neg], dim=1)
    rows = has_neg.nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return rows, rows
    return rows, torch.multinomial(weights, 1).squeeze(1)


class ITM(nn.Module):
    r"""Binary cross-entropy of a fusion head's match logits on positives and hard negatives.

    For each image :math:`i` a negative caption :math:`j^-` is drawn with probability
    :math:`\propto e^{\hat v_i^\top \hat t_j/\tau}` over the captions with another id, and for
    each caption an image likewise, so the head learns the pairs the dual encoder confuses.
    With :math:`s` the head's logit and :math:`\mathcal{P}` the positive pairs:

    .. math::
        L = \mathrm{mean}_{(i,j)\in \mathcal{P}\cup\mathcal{N}}\,
            \mathrm{BCE}\big(s(i, j),\ [(i,j)\in\mathcal{P}]\big)

    The sampling is done without gradient. The scorer comes from the engine as the
    ``match(image_rows, text_rows) -> logits`` context keyword when ``[model.fusion]`` is set.
    A scorer with ``rows`` (slices of the image and text batches: under torchrun, this rank's
    rows of the gathered batch) scores only those, so positives and negatives are drawn among
    them (ALBEF's per-GPU negatives); the mean over ranks is then the distributed loss, which
    is what ``distributed.local_loss`` asks of a loss.
    """

    Options = ITMOptions
    supports_local_loss = True

    def __init__(self, options: ITMOptions | None = None) -> None:
        super().__init__()
        self.options = options or ITMOptions()

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, match: Match | None = None,
                **context) -> LossOutput:
        if match is None:
            raise MmfwError("the itm loss scores pairs with a fusion head: add a [model.fusion] "
                            'section with name = "cross-attention" to the recipe')
        o = self.options
        rows = getattr(match, "rows", None)
        if rows is not None:  # the rows the scorer has token features of
            image, text = image[rows[0]], text[rows[1]]
            if image_ids is not None and text_ids is not None:
                image_ids, text_ids = image_ids[rows[0]], text_ids[rows[1]]
        with torch.no_grad():
            v = F.normalize(image.detach().float(), dim=-1)
            t = F.normalize(text.detach().float(), dim=-1)
            sim = v @ t.T
            pos = positives(v.shape[0], t.shape[0], image_ids, text_ids, sim.device)
            if v.shape[0] == t.shape[0] and bool(pos.diagonal().all()):
                pi = pj = torch.arange(v.shape[0], device=sim.device)  # the batch's own pairs
            else:
                pi, pj = pair_indices(pos)
            ni, nj = sample_negatives(sim, pos, o.temperature, o.hard)  # image -> hard caption
            mj, mi = sample_negatives(sim.T, pos.T, o.temperature, o.hard)  # caption -> image
        rows_i = torch.cat([pi, ni, mi])
        rows_t = torch.cat([pj, nj, mj])
        target = torch.cat([torch.ones(pi.numel()), torch.zeros(ni.numel() + mi.numel())]
                           ).to(sim.device)
        logits = match(rows_i, rows_t).float()
        loss = F.binary_cross_entropy_with_logits(logits, target)
        acc = ((logits.detach() > 0).float() == target).float().mean()
        return LossOutput(loss, {"accuracy": acc})
