"""``mmfw.train``: a recipe to a single run or to a seed ensemble of runs.

It sits above both the trainer and the ensemble, which therefore do not know each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..config.recipe import Recipe, load_recipe
from ..parallel import distributed
from ..train.loop import Trainer
from .ensemble import train_ensemble
from .result import RunResult


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1f}" for k, v in metrics.items())


def train_run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
              console: Callable[[str], None] | None = None) -> RunResult:
    """Train one run into its run directory and evaluate it."""
    t0 = time.perf_counter()
    trainer = None
    owner = not distributed.active()  # an ensemble keeps one group open for its members
    try:
        trainer = Trainer(recipe, resume=resume, overwrite=overwrite, console=console)
        stopped_by = trainer.fit()
        metrics = trainer.ctx.final or {}
        trainer.strategy.barrier()  # no rank leaves while another still talks to it
    finally:
        if trainer is not None:
            trainer.release()
        if owner:
            distributed.shutdown()  # a no-op without torchrun
    seconds = time.perf_counter() - t0
    if metrics:
        trainer.say(f"final {recipe.eval.split}: " + _fmt(metrics))
    trainer.say(f"run directory: {trainer.run_dir} ({seconds:.0f}s, {trainer.step} steps, "
                f"stopped by {stopped_by})")
    return RunResult(trainer.run_dir.path, metrics, trainer.step, seconds, stopped_by)


def train(recipe: Recipe | str | Path, *, resume: bool = False, overwrite: bool = False,
          console: Callable[[str], None] | None = None) -> RunResult:
    """Train a recipe into its run directory and evaluate it; see DESIGN.md for the layout.
    ``[ensemble] seeds`` trains one member run per seed and evaluates their ensemble."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.ensemble.seeds:
        return train_ensemble(recipe, train_run, resume=resume, overwrite=overwrite,
                              console=console)
    return train_run(recipe, resume=resume, overwrite=overwrite, console=console)


__all__ = ["RunResult", "train", "train_run"]
