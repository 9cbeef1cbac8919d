"""Setting a run up: claiming its directory, the encoders' assets, and the checks of what
the parts need of each other, all before the first step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from ..config.recipe import Recipe, load_recipe
from ..model import DualEncoder
from ..parallel.distributed import World
from ..parallel.strategy import SingleProcess
from ..run import checkpoint as ckpt
from ..run.resume import RESUMABLE_CHANGES, recipe_changes
from ..run.rundir import RunDir
from ..spi.capabilities import SuggestsTemperature
from ..spi.errors import RecipeError, ResumeError
from .callbacks import Callbacks
from .optimisation import Optimisation


def claim(d: RunDir, world: World, say: Callable[[str], None], *, resume: bool,
          overwrite: bool) -> int | None:
    """Lock and check the run directory (rank 0); the checkpoint to resume from, if any.
    Done before the model is built, so a directory in use is refused at once."""
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
    return start


def record_recipe(d: RunDir, recipe: Recipe, world: World, strategy: SingleProcess, *,
                  resume: bool) -> None:
    """Write the resolved recipe into the run directory; on resume, first refuse one that
    differs from the recorded recipe in more than run length. Done once the model is built,
    because the model may resolve part of the recipe (:func:`loss_start`)."""
    if resume:
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


def loss_start(recipe: Recipe, model: DualEncoder, say: Callable[[str], None]) -> Recipe:
    """The recipe with ``[loss]``'s unset ``temperature`` / ``bias`` taken from the encoders'
    suggestion (:class:`~mmfw.spi.capabilities.SuggestsTemperature`: a pretrained CLIP's
    ``1 / exp(logit_scale)``, SigLIP's ``logit_bias``), so fine-tuning starts where the
    pretrained pair ended. A value the recipe gives always wins.

    The value belongs to a *pair*: it is taken only when both towers suggest the same one. A
    pretrained image tower beside a new text tower (or towers of two checkpoints) makes a new
    embedding space, whose start is the loss's own default; the console says so."""
    options = recipe.loss.options
    fields = attrs.fields_dict(type(options)) if attrs.has(type(options)) else {}
    changes: dict[str, float] = {}
    for key, method in (("temperature", "initial_temperature"), ("bias", "initial_bias")):
        if key not in fields or key in recipe.loss.given:
            continue
        values = [getattr(enc, method)() if isinstance(enc, SuggestsTemperature) else None
                  for enc in (model.vision, model.text)]
        if values == [None, None]:
            continue
        image, text = values
        if image is None or text is None or not math.isclose(image, text, rel_tol=1e-6):
            said = ", ".join(f"the {m} encoder {'none' if v is None else f'{v:.4g}'}"
                             for m, v in zip(("image", "text"), values))
            say(f"loss.{key} keeps its default {getattr(options, key):g}: the towers do not "
                f"suggest one value ({said}), so they are not one pretrained pair")
            continue
        changes[key] = float(image)
        say(f"loss.{key} starts at {image:.4g}, from the pretrained pair (set loss.{key} to "
            "start elsewhere)")
    if not changes:
        return recipe
    limit = getattr(options, "max_scale", None)
    if "temperature" in changes and limit and 1.0 / changes["temperature"] > limit:
        say(f"  1/temperature = {1.0 / changes['temperature']:.4g} is above loss.max_scale = "
            f"{limit:g}: it starts at the clamp")
    loss = attrs.evolve(recipe.loss, options=attrs.evolve(options, **changes),
                        given=recipe.loss.given | set(changes))
    return attrs.evolve(recipe, loss=loss)


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
