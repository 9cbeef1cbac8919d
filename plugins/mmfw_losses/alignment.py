"""Direct regression between paired embeddings: the seeds' supervised warm-up (seed 001 §6.1)."""

from __future__ import annotations

from typing import Literal

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import LossOutput, option, pair_indices, positives


@attrs.frozen
class AlignmentOptions:
    metric: Literal["mse", "cosine"] = option(
        "mse", doc="mse: squared difference of the raw embeddings, averaged over dimensions; "
        "cosine: 1 - cosine similarity")


class Alignment(nn.Module):
    r"""Regression of each image onto its captions (and back): no negatives at all.

    With :math:`P` the positive pairs by id,

    .. math::
        L_{mse} = \frac{1}{|P|\,D}\sum_{(i,j)\in P}\|v_i - t_j\|^2, \qquad
        L_{cosine} = \frac{1}{|P|}\sum_{(i,j)\in P}\big(1 - \hat v_i^\top \hat t_j\big)

    ``metric`` picks one. A batch without positive pairs gives 0. Terms: ``cos`` (the mean
    cosine similarity of the positive pairs, whichever metric trains).

    **Alone it collapses**: every constant embedding (all images and captions mapped to one
    vector) is a global minimum, and nothing in the loss pushes two different items apart, so
    gradient descent drifts there. It is a warm-up stage before a contrastive loss (the seeds'
    "supervised pretraining phase before contrastive training", seed 001 §6.1), or a small
    term of a ``mixture``; the collapse detector flags a run trained on it alone.
    """

    Options = AlignmentOptions

    def __init__(self, options: AlignmentOptions | None = None) -> None:
        super().__init__()
        self.options = options or AlignmentOptions()

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        v, t = image.float(), text.float()
        i, j = pair_indices(positives(v.shape[0], t.shape[0], image_ids, text_ids, v.device))
        n = max(len(i), 1)
        cos = (F.normalize(v, dim=1)[i] * F.normalize(t, dim=1)[j]).sum() / n
        if self.options.metric == "cosine":
            loss = (len(i) / n) - cos
        else:
            loss = (v[i] - t[j]).square().sum() / (n * v.shape[1])
        return LossOutput(loss, {"cos": cos.detach()})
