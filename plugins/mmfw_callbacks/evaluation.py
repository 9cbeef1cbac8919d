"""``[eval]`` during and after training: validation each ``eval.every_epochs``, early stopping
with best-checkpoint tracking, and the final evaluation that writes ``metrics.json``."""

from __future__ import annotations

import math
import time
from typing import Any

from mmfw.eval.zeroshot import check_zeroshot, evaluate_zeroshot
from mmfw.spi import Callback, RunContext


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1f}" for k, v in metrics.items())


class Validation(Callback):
    """Evaluates ``eval.val_split`` at the end of every ``eval.every_epochs``-th epoch."""

    def __init__(self, options: Any) -> None:
        self.eval = options

    def on_epoch_end(self, ctx: RunContext, epoch: int) -> None:
        e = self.eval
        if not (e.val_split and epoch % e.every_epochs == 0 and e.val_split in ctx.source.splits):
            return
        metrics = ctx.evaluate(e.val_split)
        ctx.say(f"eval {e.val_split} @ epoch {epoch}: " + _fmt(metrics))
        ctx.report_eval(e.val_split, metrics)


class EarlyStopping(Callback):
    """Tracks val rsum: marks the best checkpoint (``checkpoints/best``) and, with
    ``eval.patience``, stops after that many evaluations without a better rsum."""

    def __init__(self, options: Any) -> None:
        self.eval = options
        self.history: list[dict[str, Any]] = []  # (step, rsum) of every val evaluation

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))

    def best(self) -> tuple[int | None, float, int]:
        """(step of the best val rsum, that rsum, evaluations since) from the history."""
        best_step, best, since = None, -math.inf, 0
        for row in self.history:
            if row["rsum"] > best + self.eval.min_delta:
                best_step, best, since = int(row["step"]), float(row["rsum"]), 0
            else:
                since += 1
        return best_step, best, since

    def on_eval_end(self, ctx: RunContext, split: str, metrics: dict[str, float],
                    final: bool) -> None:
        if final or split != self.eval.val_split or "rsum" not in metrics:
            return
        self.history.append({"step": ctx.step, "epoch": ctx.epoch, **metrics})
        best_step, best, since = self.best()
        if self.eval.patience and since >= self.eval.patience and \
                ctx.epoch < ctx.recipe.run.epochs:
            ctx.say(f"early stopping: val rsum has not beaten {best:.2f} (step {best_step}) "
                    f"for {since} evaluations (eval.patience = {self.eval.patience})")
            ctx.stop("early_stopping")

    def _mark(self, ctx: RunContext, step: int) -> None:
        best_step = self.best()[0]
        if best_step == step and ctx.is_main:
            row = next(r for r in reversed(self.history) if r["step"] == step)
            ctx.run_dir.mark_best(step, {k: v for k, v in row.items() if k != "step"})

    def on_checkpoint_save(self, ctx: RunContext, step: int) -> None:
        self._mark(ctx, step)

    def on_checkpoint_restore(self, ctx: RunContext, step: int) -> None:
        best_step = self.best()[0]
        if best_step is not None and best_step in ctx.run_dir.checkpoint_steps():
            self._mark(ctx, best_step)


class FinalEvaluation(Callback):
    """At the run's end: ``eval.split`` with the last weights, or the best checkpoint's with
    ``eval.restore_best``, into ``metrics.json`` (then the plots, which come after)."""

    order = 10

    def __init__(self, options: Any) -> None:
        self.eval = options

    def on_run_start(self, ctx: RunContext) -> None:
        if self.eval.zeroshot.enabled:  # a wrong split: said before training
            line, items = check_zeroshot(ctx.recipe)
            ctx.say(line)
            ctx.final_work(items)  # a budget-fitted schedule keeps its time

    def on_run_end(self, ctx: RunContext, stopped_by: str) -> None:
        best = ctx.run_dir.best_checkpoint() if self.eval.restore_best else None
        if best is not None and best != ctx.step:
            ctx.load_weights(best)
            ctx.say(f"final evaluation with the best checkpoint, step {best} "
                    "(eval.restore_best)")
        metrics = ctx.evaluate(self.eval.split, final=True)
        if self.eval.zeroshot.enabled:  # with the weights ctx.evaluate used (EMA's, say)
            metrics = {**metrics, **self.zeroshot(ctx)}
        if ctx.is_main:
            ctx.run_dir.write_metrics(metrics)
        ctx.report_eval(self.eval.split, metrics, final=True)


    def zeroshot(self, ctx: RunContext) -> dict[str, float]:
        """``[eval.zeroshot]``'s metrics, on rank 0 (the others get none: they write nothing)."""
        t0 = time.perf_counter()
        with ctx.whole_model() as model:
            metrics = evaluate_zeroshot(
                model, ctx.recipe, run_dir=ctx.run_dir.path, say=ctx.say, device=ctx.device,
                autocast=ctx.backend.autocast, main=ctx.is_main) if ctx.is_main else {}
            model.train()
        if metrics:
            ctx.say(f"zero-shot {self.eval.zeroshot.split or 'test'} "
                    f"({time.perf_counter() - t0:.1f}s): " + _fmt(metrics))
        return metrics


def _on_eval(cls: type) -> Any:
    def factory(options: Any) -> Callback:
        return cls(options)

    factory.section = "eval"  # type: ignore[attr-defined]
    factory.default = True  # type: ignore[attr-defined]
    factory.__doc__ = cls.__doc__
    return factory


validation = _on_eval(Validation)
early_stopping = _on_eval(EarlyStopping)
final_evaluation = _on_eval(FinalEvaluation)
