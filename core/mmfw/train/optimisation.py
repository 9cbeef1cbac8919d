"""Optimisation: parameter groups, stage plans, the learning rate, AdamW, the GradScaler,
modality balancing, clipping and the guard against non-finite steps.

One :class:`Optimisation` per run. The loop asks it to ``begin`` a step (plan and LR for that
step), the contrastive step computes gradients, and ``finish`` applies them: unscale,
balance the towers, let callbacks read the gradients, clip, check they are finite, step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config.recipe import Recipe
from ..registry import create
from ..spi.capabilities import MomentumScheduler, StagedScheduler, StageLosses, Stateful, check
from ..spi.contracts import LossOutput, StagePlan
from ..spi.errors import MmfwError, RecipeError
from ..spi.temperature import Temperature
from .budget import BudgetClock
from .params import ParamTable, balance_towers, lr_multipliers


class NonFiniteError(MmfwError):
    """A training step produced a NaN or infinite loss or gradient."""


class LossBank(nn.Module):
    """The recipe's ``[loss]`` and the losses a staged schedule names, built before training so
    all their parameters are in the optimizer and all their state in the checkpoint."""

    def __init__(self, default: nn.Module, stages: dict[str, nn.Module]) -> None:
        super().__init__()
        self.default = default
        self.stages = nn.ModuleDict(stages)


def adamw(params: list[dict], recipe: Recipe) -> torch.optim.AdamW:
    o = recipe.optim
    kwargs = dict(lr=o.lr, betas=o.betas, eps=o.eps)
    try:  # fused AdamW: one kernel for all parameters, on CPU and CUDA alike
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


#: recipe keys that usually cure a diverging run, with why (said when a step is non-finite)
NONFINITE_CURES = {
    "optim.lr": "a lower peak LR (divergence is most often a too-large step)",
    "optim.grad_clip": "clip the global gradient norm, e.g. 1.0",
    "schedule.warmup_steps": "a longer warm-up",
    "backend.precision": '"bf16" or "fp32" instead of "fp16" (fp16 overflows past 65504)',
    "loss.max_scale": "a lower clamp on 1/temperature",
}


class Optimisation:
    """Everything that turns gradients into a parameter update, for one run."""

    def __init__(self, recipe: Recipe, model: nn.Module, loss: nn.Module, backend: Any,
                 device: torch.device, *, total_steps: int, steps_per_epoch: int,
                 say: Callable[[str], None]) -> None:
        r, self.recipe, self.say = recipe, recipe, say
        groups = (*ParamTable(model, {}).groups, "loss")
        self.scheduler = create("scheduler", r.schedule.name, options=r.schedule.options,
                                total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                groups=groups)
        check(self.scheduler, f"scheduler '{r.schedule.name}'")
        self.staged = isinstance(self.scheduler, StagedScheduler)
        self.momentum = isinstance(self.scheduler, MomentumScheduler)
        self.default_loss = self.loss = loss
        specs = self.scheduler.losses() if isinstance(self.scheduler, StageLosses) else {}
        self.stage_losses = {label: create("loss", name, **opts).to(device)
                             for label, (name, opts) in specs.items()}
        self.losses: nn.Module = (LossBank(loss, self.stage_losses) if self.stage_losses
                                  else loss)
        self.params = ParamTable(model, {"loss": self.losses})
        self.towers = (self.params.tower("vision"), self.params.tower("text"))
        self.optimizer = adamw(self.params.optimizer_groups(r.optim.weight_decay), r)
        self.scaler = backend.grad_scaler()
        self.temperatures = [m for m in self.losses.modules() if isinstance(m, Temperature)]
        self._layer_mult = self.params.layer_decay(r.optim.layer_decay)
        self.plan: StagePlan | None = None
        self._unmatched: set[str] = set()
        self._announced: str | None = None
        self.stats: dict[str, Tensor | float] = {}
        self.nonfinite_steps = self.scaler_skips = 0
        self.steps_per_epoch = steps_per_epoch
        #: ``schedule.fit_budget``: the scheduler is asked about the budget's position
        self.clock: BudgetClock | None = None
        self.apply(self.current_plan(0, 0), 0)

    def loss_names(self) -> set[str]:
        """Every loss plugin the run uses: [loss], its mixture terms, the stages' losses."""
        names = {self.recipe.loss.name}
        for term in getattr(self.recipe.loss.options, "terms", None) or ():
            if isinstance(term, dict) and isinstance(term.get("name"), str):
                names.add(term["name"])
        if isinstance(self.scheduler, StageLosses):
            names.update(name for name, _ in self.scheduler.losses().values())
        return names

    def all_losses(self) -> dict[str, nn.Module]:
        return {self.recipe.loss.name: self.default_loss, **self.stage_losses}

    # stage plans and the learning rate ----------------------------------------------------
    def position(self, step: int, epoch: int) -> tuple[int, int]:
        """The (step, epoch) the scheduler is asked about: the run's, or with a budget clock
        the schedule position that ends with the budget."""
        return self.clock.schedule_step(self.steps_per_epoch) if self.clock else (step, epoch)

    def current_plan(self, step: int, epoch: int) -> StagePlan:
        step, epoch = self.position(step, epoch)
        return self.scheduler.plan(step, epoch) if self.staged else StagePlan()

    def apply(self, plan: StagePlan, step: int) -> None:
        """Freeze, set each group's LR multiplier and pick the active loss for ``plan``."""
        o = self.recipe.optim
        for pattern in self.params.freeze((*o.freeze, *plan.frozen)):
            if pattern not in self._unmatched:
                self._unmatched.add(pattern)
                self.say(f"note: freeze pattern '{pattern}' matches no parameter "
                         f"(groups: {', '.join(self.params.groups)})")
        mults = lr_multipliers(self.params, tuple(o.lr_mult.items()), plan.lr_mult,
                               base=self._layer_mult)
        for g in self.optimizer.param_groups:
            g["lr_mult"] = mults[g["group"]]
        if plan.loss is not None and plan.loss not in self.stage_losses:
            raise MmfwError(f"scheduler '{self.recipe.schedule.name}' names loss "
                            f"'{plan.loss}' for stage '{plan.stage}', which its losses() "
                            f"does not build ({', '.join(self.stage_losses) or 'none'})")
        self.loss = self.default_loss if plan.loss is None else self.stage_losses[plan.loss]
        self.plan = plan

    def _announce(self, plan: StagePlan, step: int) -> None:
        frozen = self.params.frozen()
        mults = sorted({(g["group"], g["lr_mult"]) for g in self.optimizer.param_groups
                        if g["lr_mult"] != 1.0})
        self.say(f"stage '{plan.stage}' from step {step}: {len(frozen)}/{len(self.params)} "
                 f"parameter tensors frozen, loss {plan.loss or self.recipe.loss.name}"
                 + (", lr x " + ", ".join(f"{g} {m:.3g}" for g, m in mults[:8])
                    + (f" (+{len(mults) - 8} more)" if len(mults) > 8 else "") if mults else ""))

    def begin(self, step: int, epoch: int) -> float:
        """Plan and learning rate of the step after ``step``; returns the base LR."""
        plan = self.current_plan(step, epoch)
        if plan != self.plan:
            self.apply(plan, step)
        if plan.stage and plan.stage != self._announced:
            self._announced = plan.stage
            self._announce(plan, step)
        at, _ = self.position(step, epoch)
        lr = self.recipe.optim.lr * self.scheduler.lr_factor(at)
        beta1 = self.scheduler.momentum(at) if self.momentum else None
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            if beta1 is not None:
                g["betas"] = (beta1, g["betas"][1])
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def trainable(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # the update ---------------------------------------------------------------------------
    def finish(self, step: int, output: LossOutput, *, after_backward: Callable[[], None],
               clip: Callable[[list[Tensor], float], Tensor]) -> bool:
        """Apply the gradients of step ``step`` (counted from 1); False when it was skipped
        (non-finite with ``optim.on_nonfinite = "skip"``, or the GradScaler's overflow)."""
        o = self.recipe.optim
        self.stats = {}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if o.modality_balance:
            self.stats.update(balance_towers(*self.towers, ratio=o.modality_ratio,
                                             strength=o.modality_balance))
        after_backward()
        params = self.trainable()
        if o.grad_clip:
            norm = clip(params, o.grad_clip)
            self.stats["optim/grad_norm"] = norm
        if self.scaler is not None:  # fp16: inf gradients are the scaler's to skip
            if not math.isfinite(float(output.loss.detach())):
                self._nonfinite(step, output)
                return False
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
            self.scaler_skips += skipped
            self.stats["optim/grad_scale"] = self.scaler.get_scale()
            self.stats["optim/skipped_steps"] = self.scaler_skips
            return not skipped
        if not o.grad_clip:
            grads = [p.grad for p in params if p.grad is not None]
            norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                    if grads else torch.zeros(()))
        # one host sync for both checks: loss + norm is finite iff both are
        if not bool(torch.isfinite(output.loss.detach().float() + norm.float())):
            self._nonfinite(step, output)
            return False
        self.optimizer.step()
        for t in self.temperatures:  # CLIP clamps the logit scale after the step
            t.clamp_()
        return True

    def _nonfinite(self, step: int, output: LossOutput) -> None:
        o = self.recipe.optim
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self.stats["optim/nonfinite_steps"] = self.nonfinite_steps
        terms = ", ".join(f"{k} {float(torch.as_tensor(v).detach()):.4g}"
                          for k, v in output.terms.items())
        what = (f"step {step}: the loss is {float(output.loss.detach()):.4g}"
                + (f" ({terms})" if terms else "")
                + " or its gradients are not finite (NaN or inf)")
        if o.on_nonfinite == "skip":
            self.say(f"warning: {what}; the step is skipped (optim.on_nonfinite = \"skip\", "
                     f"{self.nonfinite_steps} so far)")
            return
        cures = "\n".join(f"    {k}: {v}" for k, v in NONFINITE_CURES.items())
        raise NonFiniteError(
            f"training diverged at {what}. Stopped before the update, so no checkpoint holds "
            f"NaN weights (the last good one is kept).\n  Usually cured by (recipe keys):\n"
            f"{cures}\n  Or skip such steps: optim.on_nonfinite = \"skip\"")

    def check_local_loss(self) -> None:
        """``distributed.local_loss`` needs losses whose terms split by rows."""
        bad = [n for n, m in self.all_losses().items()
               if not getattr(m, "supports_local_loss", False)]
        if bad:
            raise RecipeError(
                f"loss {', '.join(repr(b) for b in bad)} needs the whole batch (its terms "
                "do not split by rows), so each rank cannot compute only its own rows",
                key="distributed.local_loss", expected="false, or losses that split by "
                "rows (infonce, siglip, ...: see docs/losses.md)", given=True)

    # checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"nonfinite_steps": self.nonfinite_steps,
                                 "scaler_skips": self.scaler_skips}
        if isinstance(self.scheduler, Stateful):
            state["scheduler"] = self.scheduler.state_dict()
        if self.clock is not None:
            state["budget_clock"] = self.clock.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.scaler_skips = int(state.get("scaler_skips", 0))
        if state.get("scheduler") is not None and isinstance(self.scheduler, Stateful):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.clock is not None and state.get("budget_clock") is not None:
            self.clock.load_state_dict(state["budget_clock"])
