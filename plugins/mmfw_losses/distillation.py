"""Knowledge distillation of a teacher's similarity distributions (Hinton et al. 2015)."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import (
    LossOutput,
    Temperature,
    option,
    positives,
    soft_cross_entropy,
    temperature_option,
)


@attrs.frozen
class DistillationOptions:
    temperature: float = temperature_option(2.0, doc="distillation T: both logit matrices "
                                            "are divided by it")
    student_temperature: float = option(0.07, doc="tau forming logits from cosine similarity",
                                        validator=attrs.validators.gt(0))
    alpha: float = option(0.5, doc="weight of the hard-label InfoNCE; 1 - alpha on the KL",
                          validator=[attrs.validators.ge(0), attrs.validators.le(1)])


def kl_rows(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_i KL(softmax(teacher_i) || softmax(student_i))`` (``batchmean``)."""
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                    reduction="batchmean")


class Distillation(nn.Module):
    r"""Hinton et al. 2015 (seed 000 §5) on the image-text similarity matrix, both directions.

    Student logits :math:`s_{ij} = \hat v_i^\top \hat t_j / \tau_s`. Teacher logits
    :math:`u_{ij}`: ``context["teacher_logits"]`` ``[Bi, Bt]`` as given, else
    :math:`\hat v'^\top_i \hat t'_j / \tau_s` from ``context["teacher_image"]`` ``[Bi, D']`` and
    ``context["teacher_text"]`` ``[Bt, D']``. The teacher is detached. With distillation
    temperature :math:`T` and :math:`\sigma` the softmax over a row:

    .. math::
        L_{soft} = \frac{T^2}{2}\Big(\frac{1}{B_i}\sum_i KL(\sigma(u_{i\cdot}/T)\,\|\,
                   \sigma(s_{i\cdot}/T)) + \frac{1}{B_t}\sum_j KL(\sigma(u_{\cdot j}/T)\,\|\,
                   \sigma(s_{\cdot j}/T))\Big)

    :math:`L = \alpha L_{hard} + (1-\alpha) L_{soft}`, :math:`L_{hard}` ``infonce`` on
    :math:`s` (positives by id). Terms ``hard``, ``soft``.
    """

    Options = DistillationOptions
    #: the teacher's embeddings come from the ``teacher`` callback, which ``[distill]
    #: teacher`` switches on (the run refuses to start without them)
    requires_context: ClassVar[dict[str, str]] = {"teacher_image": "distill.teacher",
                                                  "teacher_text": "distill.teacher"}

    def __init__(self, options: DistillationOptions | None = None) -> None:
        super().__init__()
        self.options = o = options or DistillationOptions()
        self.temperature = Temperature(o.student_temperature, False,
                                       max(100.0, 1.0 / o.student_temperature))

    def teacher(self, context: dict) -> Tensor:
        if context.get("teacher_logits") is not None:
            return context["teacher_logits"].detach().float()
        ti, tt = context.get("teacher_image"), context.get("teacher_text")
        if ti is None or tt is None:
            raise ValueError("the distillation loss needs a teacher in its context: "
                             "teacher_logits=[Bi, Bt], or teacher_image=[Bi, D'] and "
                             "teacher_text=[Bt, D']")
        ti, tt = F.normalize(ti.detach().float(), dim=-1), F.normalize(tt.detach().float(), dim=-1)
        return self.temperature.scale() * ti @ tt.T

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        o, T = self.options, self.options.temperature
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        s = self.temperature.scale() * v @ t.T
        u = self.teacher(context).to(s.device)
        if u.shape != s.shape:
            raise ValueError(f"teacher similarities are {tuple(u.shape)}, the student's "
                             f"{tuple(s.shape)}")
        pos = positives(v.shape[0], t.shape[0], image_ids, text_ids, s.device)
        hard = (soft_cross_entropy(s, pos) + soft_cross_entropy(s.T, pos.T)) / 2
        soft = T * T * (kl_rows(s / T, u / T) + kl_rows(s.T / T, u.T / T)) / 2
        loss = o.alpha * hard + (1 - o.alpha) * soft
        return LossOutput(loss, {"hard": hard.detach(), "soft": soft.detach()})
