"""A temperature that can be learned: public for every loss that divides similarities by one."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Temperature(nn.Module):
    """Stores ``log(1/tau)`` like CLIP's ``logit_scale``; the scale is clamped to ``max_scale``.

    Learned in log space so a step changes it multiplicatively; the clamp (CLIP: 100) stops the
    runaway sharpening that destabilises training.
    """

    def __init__(self, tau: float, learn: bool, max_scale: float = 100.0) -> None:
        super().__init__()
        value = torch.tensor(math.log(1.0 / tau))
        if learn:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.max_log = math.log(max_scale)

    def scale(self) -> Tensor:
        """``1 / tau``, clamped."""
        return self.log_scale.clamp(max=self.max_log).exp()

    @property
    def value(self) -> float:
        """Current ``tau``."""
        return float(1.0 / self.scale().detach())
