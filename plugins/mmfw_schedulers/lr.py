"""Learning-rate schedules as factors of ``optim.lr``."""

from __future__ import annotations

import math

import attrs

from mmfw.options import option


@attrs.frozen
class ConstantOptions:
    warmup_steps: int = option(0, doc="linear warm-up from 0", validator=attrs.validators.ge(0))


class Constant:
    Options = ConstantOptions

    def __init__(self, options: ConstantOptions | None = None, *, total_steps: int = 0) -> None:
        self.options = options or ConstantOptions()

    def lr_factor(self, step: int) -> float:
        w = self.options.warmup_steps
        return min(1.0, (step + 1) / w) if w else 1.0


@attrs.frozen
class WarmupCosineOptions:
    warmup_steps: int = option(100, doc="linear warm-up steps", validator=attrs.validators.ge(0))
    min_lr_ratio: float = option(0.0, doc="final LR as a fraction of optim.lr",
                                 validator=[attrs.validators.ge(0), attrs.validators.le(1)])


class WarmupCosine:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``total_steps`` (open_clip's)."""

    Options = WarmupCosineOptions

    def __init__(self, options: WarmupCosineOptions | None = None, *, total_steps: int) -> None:
        self.options = options or WarmupCosineOptions()
        self.total_steps = max(1, total_steps)

    def lr_factor(self, step: int) -> float:
        w, lo = self.options.warmup_steps, self.options.min_lr_ratio
        if step < w:
            return (step + 1) / w
        span = max(1, self.total_steps - w)
        progress = min(1.0, (step - w) / span)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
