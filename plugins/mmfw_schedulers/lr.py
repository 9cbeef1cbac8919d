"""Learning-rate schedules as factors of ``optim.lr``."""

from __future__ import annotations

import math
from typing import Literal

import attrs

from mmfw.spi import option


@attrs.frozen
class ConstantOptions:
    warmup_steps: int = option(0, doc="linear warm-up from 0", validator=attrs.validators.ge(0))


class Constant:
    Options = ConstantOptions

    def __init__(self, options: ConstantOptions | None = None, *, total_steps: int = 0,
                 **context: object) -> None:
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

    def __init__(self, options: WarmupCosineOptions | None = None, *, total_steps: int,
                 **context: object) -> None:
        self.options = options or WarmupCosineOptions()
        self.total_steps = max(1, total_steps)

    def lr_factor(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.options.warmup_steps,
                             self.options.min_lr_ratio)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@attrs.frozen
class OneCycleOptions:
    pct_start: float = option(0.1, doc="fraction of the run spent rising to optim.lr (the "
                              "seeds' 10%)", validator=[attrs.validators.ge(0),
                                                        attrs.validators.le(1)])
    div_factor: float = option(25.0, doc="the run starts at optim.lr / div_factor",
                               validator=attrs.validators.gt(0))
    final_div_factor: float = option(1e4, doc="it ends at the start LR / final_div_factor",
                                     validator=attrs.validators.gt(0))
    anneal: Literal["cos", "linear"] = option("cos", doc="interpolation within each phase")
    three_phase: bool = option(False, doc="rise, fall back to the start LR, then anneal "
                               "(fast.ai's variant)")
    cycle_momentum: bool = option(True, doc="cycle AdamW's beta1 inversely to the LR")
    base_momentum: float = option(0.85, doc="beta1 at the LR peak",
                                  validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    max_momentum: float = option(0.95, doc="beta1 at the start and end",
                                 validator=[attrs.validators.ge(0), attrs.validators.lt(1)])


def _anneal(kind: str, start: float, end: float, pct: float) -> float:
    if kind == "linear":
        return (end - start) * pct + start
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


class OneCycle:
    """Smith & Topin's 1cycle policy with the parameters of seed 000 §3 (``pct_start=0.1``,
    ``div_factor=25``, ``final_div_factor=1e4``), step for step what
    ``torch.optim.lr_scheduler.OneCycleLR(max_lr=optim.lr, total_steps=...)`` gives, beta1
    cycling included."""

    Options = OneCycleOptions

    def __init__(self, options: OneCycleOptions | None = None, *, total_steps: int,
                 **context: object) -> None:
        o = self.options = options or OneCycleOptions()
        self.total_steps = max(2, total_steps)
        start, low = 1.0 / o.div_factor, 1.0 / (o.div_factor * o.final_div_factor)
        up = float(o.pct_start * self.total_steps) - 1
        last = self.total_steps - 1
        # (end step, start lr, end lr, start beta1, end beta1), as torch's _schedule_phases
        hi_m, lo_m = o.max_momentum, o.base_momentum
        if o.three_phase:
            self.phases = [(up, start, 1.0, hi_m, lo_m),
                           (float(2 * o.pct_start * self.total_steps) - 2, 1.0, start, lo_m, hi_m),
                           (last, start, low, hi_m, hi_m)]
        else:
            self.phases = [(up, start, 1.0, hi_m, lo_m), (last, 1.0, low, lo_m, hi_m)]

    def _at(self, step: int) -> tuple[float, float]:
        begin = 0.0
        step = min(step, self.total_steps - 1)
        for i, (end, lr0, lr1, m0, m1) in enumerate(self.phases):
            if step <= end or i == len(self.phases) - 1:
                pct = (step - begin) / (end - begin) if end != begin else 1.0
                kind = self.options.anneal
                return _anneal(kind, lr0, lr1, pct), _anneal(kind, m0, m1, pct)
            begin = end
        raise AssertionError("unreachable")

    def lr_factor(self, step: int) -> float:
        return self._at(step)[0]

    def momentum(self, step: int) -> float | None:
        return self._at(step)[1] if self.options.cycle_momentum else None
