"""A temperature that can be learned: public for every loss that divides similarities by one."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Temperature(nn.Module):
    """Stores ``log(1/tau)`` like CLIP's ``logit_scale``; the scale is kept at most
    ``max_scale``.

    Learned in log space so a step changes it multiplicatively. The limit (CLIP: 100) stops
    the runaway sharpening that destabilises training; as in CLIP it is applied to the
    parameter after each optimizer step (:meth:`clamp_`, which mmfw's trainer calls), not in
    the forward pass, where a clamp would zero the gradient at the limit so the temperature
    could never come back from it.
    """

    def __init__(self, tau: float, learn: bool, max_scale: float = 100.0) -> None:
        super().__init__()
        self.max_log = math.log(max_scale)
        value = torch.tensor(min(math.log(1.0 / tau), self.max_log))
        if learn:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def scale(self) -> Tensor:
        """``1 / tau``."""
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Bring ``1 / tau`` back to at most ``max_scale`` (after an optimizer step)."""
        self.log_scale.clamp_(max=self.max_log)

    @property
    def value(self) -> float:
        """Current ``tau``."""
        return float(1.0 / self.scale().detach())


__all__ = ["Temperature"]
