"""Pieces several contrastive losses share: the soft-target cross-entropy, the logit that
excludes a candidate, and the temperature option triple.

A loss plugin writes its options with the three option helpers so every loss with a
temperature reads ``temperature`` / ``learn_temperature`` / ``max_scale`` alike, with its own
defaults (each paper's), and builds :class:`~mmfw.spi.temperature.Temperature` from them.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch.nn.functional as F
from torch import Tensor

from .options import option

#: a logit that takes a candidate out of a softmax (``exp`` underflows to exactly 0 in fp32
#: and bf16) while staying finite, so ``0 * logit`` terms never make NaN the way ``-inf`` does
EXCLUDED = -1e9


def soft_cross_entropy(logits: Tensor, pos: Tensor, smoothing: float = 0.0,
                       divisor: Tensor | None = None, target: Tensor | None = None,
                       target_weight: float = 0.0) -> Tensor:
    r"""Mean over rows with a positive of :math:`-\sum_j q_{ij} \log \mathrm{softmax}(l)_{ij}`.

    ``q`` is uniform over the row's positives (``pos``, bool ``[N, M]``), mixed with a
    ``target`` distribution (``[N, M]``, rows summing to 1) by ``target_weight`` and then with
    ``smoothing`` uniform mass (Szegedy et al. 2016, label smoothing). A ``divisor``
    (:func:`mmfw.spi.pairing.anchor_share`: rows that are a shard of a batch) replaces the
    count of rows with a positive. Rows without a positive add 0 and are not counted, with no
    host sync.
    """
    has_pos = pos.any(1)
    q = pos.to(logits.dtype)
    q = q / q.sum(1, keepdim=True).clamp_min(1.0)
    if target is not None and target_weight:
        q = (1 - target_weight) * q + target_weight * target.to(logits.dtype)
    if smoothing:
        q = (1 - smoothing) * q + smoothing / logits.shape[1]
    nll = -(q * F.log_softmax(logits, dim=1)).sum(1)
    return nll.mul(has_pos).sum() / (has_pos.sum().clamp_min(1) if divisor is None else divisor)


def temperature_option(default: float, doc: str = "initial tau: cosine similarity is "
                       "divided by it") -> Any:
    """The ``temperature`` option (tau > 0)."""
    return option(default, doc=doc, validator=attrs.validators.gt(0))


def learn_temperature_option(default: bool, doc: str = "learn tau (as CLIP's logit_scale)"
                             ) -> Any:
    """The ``learn_temperature`` option."""
    return option(default, doc=doc)


def max_scale_option(default: float = 100.0) -> Any:
    """The ``max_scale`` option: the clamp on ``1 / tau`` (CLIP: 100)."""
    return option(default, doc="clamp on 1/tau", validator=attrs.validators.gt(1))


__all__ = ["EXCLUDED", "learn_temperature_option", "max_scale_option", "soft_cross_entropy",
           "temperature_option"]
