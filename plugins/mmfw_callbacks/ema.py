"""``[optim.ema]``: an exponential moving average (EMA) of the model's weights, the weights the
run is evaluated with.

After every ``every``-th optimizer step ``t`` the average moves toward the trained weights,
``ema = decay_t * ema + (1 - decay_t) * weights``, over every floating-point entry of the
model's state dict (parameters and buffers; the others are copied), as timm's
``ModelEmaV3.apply_update_`` does (``timm/utils/model_ema.py``). ``decay_t`` follows
``ModelEmaV3.get_decay``: 0 at the first step (the average starts at the trained weights),
then ``decay``, or with ``warmup_steps = W`` its warm-up with ``warmup_gamma = W`` and
``warmup_power = 1`` (after K. Crowson's EMA warm-up): ``min(decay, s / (s + W))`` with
``s = t - 1``, so early weights, still far from where training goes, leave the average soon.

Validation and the final evaluation embed with the EMA weights (put into the model in
``on_eval_start``, the trained ones back after each validation); the average is saved in every
checkpoint (``tensor_state_dict``), restored bit for bit on ``--resume``, and the checkpoint
names it as the evaluated weights, so ``mmfw.load_run`` / ``mmfw eval`` / exports use it.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor

from mmfw.spi import Callback, MmfwError, RunContext, StepEnd, option

#: the share of the average the starting weights may keep before the run warns
START_LEFT = 0.05


def _open_unit(_inst: Any, attribute: Any, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"'{attribute.name}' must be between 0 and 1, both excluded (e.g. "
                         f"0.999; 1 would never move, 0 would be no average): {value!r}")


@attrs.frozen
class EmaOptions:
    """An exponential moving average of the weights, used for validation, the final evaluation
    and load_run (timm's ModelEmaV3). The table's presence turns it on."""

    decay: float = option(0.999, doc="weight of the old average at each update, in (0, 1); "
                          "the average spans about every / (1 - decay) steps",
                          validator=_open_unit)
    warmup_steps: int = option(0, doc="decay warm-up: min(decay, s / (s + warmup_steps)) at "
                               "step s + 1 (timm ModelEmaV3, power 1); 0: decay from the "
                               "second step on", validator=attrs.validators.ge(0))
    every: int = option(1, doc="update the average every N optimizer steps",
                        validator=attrs.validators.ge(1))


class Ema(Callback):
    """The EMA of ``ctx.model``'s state dict (see the module docstring)."""

    order = 50  # after the callbacks that evaluate in on_epoch_end (the guard below)
    eval_weights = True  # its tensors are the weights the run is evaluated with

    def __init__(self, options: EmaOptions) -> None:
        self.options = options
        self.ema: dict[str, Tensor] | None = None
        self.loaded: dict[str, Tensor] | None = None  # from a checkpoint, before run start
        self.live: dict[str, Tensor] = {}  # the model's state-dict tensors (share storage)
        self.backup: dict[str, Tensor] | None = None  # trained weights while EMA is in
        self.updates = 0

    def decay_at(self, step: int) -> float:
        """``decay_t`` of optimizer step ``step`` (counted from 1), as ModelEmaV3.get_decay."""
        s = step - 1
        if s <= 0:
            return 0.0
        o = self.options
        return min(o.decay, s / (s + o.warmup_steps)) if o.warmup_steps else o.decay

    # state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))

    def tensor_state_dict(self) -> dict[str, Tensor]:
        return dict(self.ema or {})

    def load_tensor_state_dict(self, tensors: dict[str, Tensor]) -> None:
        if self.ema is None:  # on --resume, before the run starts: placed in on_run_start
            self.loaded = dict(tensors)
            return
        self._check_keys(tensors)
        with torch.no_grad():
            for k, v in self.ema.items():
                v.copy_(tensors[k])
        self.backup = None  # ctx.load_weights replaced the trained weights it held

    def _check_keys(self, tensors: dict[str, Tensor]) -> None:
        if set(tensors) != set(self.live):
            missing = sorted(set(self.live) - set(tensors)) or sorted(set(tensors) - set(self.live))
            raise MmfwError(f"the checkpoint's EMA weights do not match the model (first "
                            f"differing key: {missing[0]})")

    # events -----------------------------------------------------------------------------
    def on_run_start(self, ctx: RunContext) -> None:
        if ctx.world_size > 1 and ctx.recipe.distributed.strategy == "fsdp":
            raise MmfwError("[optim.ema] keeps a whole copy of the weights on every rank, "
                            "which FSDP shards: use distributed.strategy = \"ddp\" with EMA")
        self.live = dict(ctx.model.state_dict())
        with torch.no_grad():
            if self.loaded is not None:
                self._check_keys(self.loaded)
                self.ema = {k: self.loaded[k].to(device=v.device, dtype=v.dtype).clone()
                            for k, v in self.live.items()}
                self.loaded = None
            else:
                self.ema = {k: v.detach().clone() for k, v in self.live.items()}
        self.floats = [k for k, v in self.live.items() if v.is_floating_point()]
        self.others = [k for k, v in self.live.items() if not v.is_floating_point()]
        o = self.options
        ctx.say(f"EMA of the weights: decay {o.decay}, every {o.every} step(s)"
                + (f", warm-up {o.warmup_steps}" if o.warmup_steps else "")
                + "; validation and the final evaluation use it")
        if not o.warmup_steps:
            # after n updates the starting weights keep decay**n of the average
            needed = math.ceil(math.log(START_LEFT) / math.log(o.decay)) * o.every
            budget = bool(ctx.recipe.run.max_minutes)
            if ctx.total_steps < needed or budget:
                ctx.say(f"note: [optim.ema]: with decay {o.decay} and no warm-up the initial "
                        f"weights weigh more than {START_LEFT:.0%} of the average until step "
                        f"{needed}" + (f", and this run has {ctx.total_steps}"
                                       if ctx.total_steps < needed
                                       else ", which a time budget may cut short")
                        + ": a short run needs a smaller decay or optim.ema.warmup_steps")

    @torch.no_grad()
    def on_step_end(self, ctx: RunContext, step: StepEnd) -> None:
        self._restore()  # an evaluation with no on_eval_end left the average in
        if ctx.step % self.options.every or self.ema is None:
            return
        weight = 1.0 - self.decay_at(ctx.step)
        ema, live = self.ema, self.live
        torch._foreach_lerp_([ema[k] for k in self.floats], [live[k] for k in self.floats],
                             weight)
        for k in self.others:
            ema[k].copy_(live[k])
        self.updates += 1

    @torch.no_grad()
    def on_eval_start(self, ctx: RunContext, split: str, final: bool) -> None:
        if self.ema is None or self.backup is not None:
            return
        self.backup = {k: v.clone() for k, v in self.live.items()}
        for k, v in self.live.items():
            v.copy_(self.ema[k])

    def on_eval_end(self, ctx: RunContext, split: str, metrics: dict[str, float],
                    final: bool) -> None:
        if not final:  # after the final evaluation the model stays the one it measured
            self._restore()

    def on_epoch_end(self, ctx: RunContext, epoch: int) -> None:
        self._restore()  # the epoch's checkpoint, written next, holds the trained weights

    @torch.no_grad()
    def _restore(self) -> None:
        if self.backup is None:
            return
        for k, v in self.live.items():
            v.copy_(self.backup[k])
        self.backup = None


def ema(options: EmaOptions) -> Ema:
    return Ema(options)


ema.Options = EmaOptions  # type: ignore[attr-defined]
ema.section = "optim.ema"  # type: ignore[attr-defined]
ema.when_configured = True  # type: ignore[attr-defined]
ema.__doc__ = EmaOptions.__doc__
