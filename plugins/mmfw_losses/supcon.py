"""Supervised contrastive loss, cross-modal form (Khosla et al. 2020)."""

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
    positives,
    soft_cross_entropy,
    temperature_option,
)


@attrs.frozen
class SupConOptions:
    temperature: float = temperature_option(0.07, doc="tau: cosine similarity is divided by "
                                            "it")
    learn_temperature: bool = learn_temperature_option(False, doc="learn tau (the paper "
                                                       "keeps it fixed)")
    max_scale: float = max_scale_option()


def label_positives(labels, bi: int, bt: int, device: torch.device) -> Tensor:
    """``[Bi, Bt]`` same-label mask from ``labels=(image_labels, text_labels)`` or one tensor."""
    if isinstance(labels, (tuple, list)):
        if len(labels) != 2:
            raise ValueError("labels must be (image_labels, text_labels) or one tensor")
        li, lt = (torch.as_tensor(x, device=device) for x in labels)
    else:
        li = lt = torch.as_tensor(labels, device=device)
        if bi != bt:
            raise ValueError(f"one labels tensor needs equal batches, got {bi} images and "
                             f"{bt} texts: pass labels=(image_labels, text_labels)")
    if li.numel() != bi or lt.numel() != bt:
        raise ValueError(f"labels have {li.numel()} and {lt.numel()} entries for {bi} images "
                         f"and {bt} texts")
    return li.view(-1, 1) == lt.view(1, -1)


class SupCon(nn.Module):
    r"""SupCon :math:`L^{sup}_{out}` (Khosla et al. 2020, eq. 2) with anchors in one modality.

    Anchors are images and candidates texts (and vice versa); :math:`P_i` are the texts
    sharing image :math:`i`'s label, :math:`l_{ij} = \hat v_i^\top \hat t_j / \tau`:

    .. math::
        L_{i2t} = -\frac{1}{B_i}\sum_i \frac{1}{|P_i|}\sum_{p\in P_i}
                  \log\frac{e^{l_{ip}}}{\sum_{a} e^{l_{ia}}},\qquad
        L = \tfrac12(L_{i2t}+L_{t2i})

    Labels come from ``context["labels"]`` (``(image_labels, text_labels)``, or one tensor
    when :math:`B_i = B_t`); without labels the match ids are the labels (then it equals
    ``infonce`` at this temperature). Anchors with no positive are left out of the mean.
    """

    Options = SupConOptions

    def __init__(self, options: SupConOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or SupConOptions()
        self.temperature = Temperature(o.temperature, o.learn_temperature, o.max_scale)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, labels=None, **context) -> LossOutput:
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        logits = self.temperature.scale() * v @ t.T
        if labels is None:
            pos = positives(v.shape[0], t.shape[0], image_ids, text_ids, logits.device)
        else:
            pos = label_positives(labels, v.shape[0], t.shape[0], logits.device)
        i2t, t2i = soft_cross_entropy(logits, pos), soft_cross_entropy(logits.T, pos.T)
        return LossOutput((i2t + t2i) / 2, {"i2t": i2t.detach(), "t2i": t2i.detach()})
