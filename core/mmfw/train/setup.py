"""Setting a run up: claiming its directory, the encoders' assets, and the checks of what
the parts need of each other, all before the first step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config.recipe import Recipe, load_recipe
from ..model import DualEncoder
from ..parallel.distributed import World
from ..parallel.strategy import SingleProcess
from ..run import checkpoint as ckpt
from ..run.resume import RESUMABLE_CHANGES, recipe_changes
from ..run.rundir import RunDir
from ..spi.errors import RecipeError, ResumeError
from .callbacks import Callbacks
from .optimisation import Optimisation


def claim(d: RunDir, recipe: Recipe, world: World, strategy: SingleProcess,
          say: Callable[[str], None], *, resume: bool, overwrite: bool) -> int | None:
    """Lock and check the run directory (rank 0); the checkpoint to resume from, if any."""
    start = None
    if world.is_main:
        d.claim(resume=resume, overwrite=overwrite)
    if resume:
        if world.is_main:
            ckpt.clean(d.checkpoints)  # temp files and orphaned parts of a killed save
        start = ckpt.latest_intact(d.checkpoints, say)
        if start is None:
            raise ResumeError(f"nothing to resume in {d}: no checkpoint found (run without "
                              "--resume to start it)")
        changes = recipe_changes(load_recipe(d.recipe_file), recipe, RESUMABLE_CHANGES)
        if changes:
            raise ResumeError(
                f"the recipe differs from the one {d} was started with, in more than run "
                "length:\n  " + "\n  ".join(changes[:10]) + "\nResume with the original "
                "recipe, or start a new run (--set run.name=...)")
    strategy.barrier()  # every rank has looked before rank 0 writes
    if world.is_main:
        d.write_recipe(recipe.to_toml())
    strategy.barrier()
    return start


def prepare_assets(model: DualEncoder, d: RunDir, pairs: Any, world: World,
                   strategy: SingleProcess, *, resumed: bool) -> None:
    """Encoders' files (a tokenizer fitted on the training captions): made by rank 0 at the
    start, read back by the other ranks and on resume."""
    if resumed:
        model.load_assets(d.path)
        return
    if world.is_main:
        for enc in (model.vision, model.text):
            if callable(getattr(enc, "prepare", None)):
                enc.prepare(pairs.texts())
        model.save_assets(d.path)
    strategy.barrier()
    if not world.is_main:  # the same tokenizer on every rank: rank 0's
        model.load_assets(d.path)


def check_parts(recipe: Recipe, opt: Optimisation, callbacks: Callbacks,
                strategy: SingleProcess) -> None:
    """What the losses need of callbacks and of ``[distributed]``, checked before step 1."""
    provided = callbacks.provides()
    for name, loss in opt.all_losses().items():
        needs = getattr(loss, "requires_context", None) or {}
        missing = {k: v for k, v in needs.items() if k not in provided}
        if missing:
            key = next(iter(missing.values()))
            raise RecipeError(f"loss '{name}' needs {', '.join(missing)} in its context, which "
                              "no callback of this run provides", key=key,
                              expected=f"{key} set (it switches on what provides them)")
    if strategy.distributed and recipe.distributed.local_loss:
        opt.check_local_loss()
    if strategy.sharded and opt.scaler is not None:
        raise RecipeError("FSDP runs take bf16 or fp32, not fp16 with a GradScaler",
                          key="backend.precision", expected='"bf16" or "fp32"', given="fp16")
