"""Seed ensembles (seed 000 §5): one run per seed, evaluated by their averaged similarity.

``[ensemble] seeds = [42, 43, 44]`` makes ``<output_dir>/<name>/`` an *ensemble directory*: it
holds the recipe, ``ensemble.json`` (the members), ``metrics.json`` (the ensemble's retrieval
metrics) and one ordinary run directory per seed, ``seed-42/`` ... Each member is the recipe with
``run.seed`` set and no ``[ensemble]``, so it can be evaluated, loaded, resumed or used as a
teacher on its own. ``mmfw eval`` on the ensemble directory re-evaluates the ensemble.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import attrs

from ..config.recipe import EnsembleConfig, Recipe, load_recipe
from ..parallel import distributed
from ..registry import create
from ..spi.errors import MmfwError, ResumeError
from . import checkpoint as ckpt
from .loaded import evaluate
from .result import RunResult
from .resume import RESUMABLE_CHANGES, recipe_changes
from .rundir import ENSEMBLE_FILE, RunDir

#: trains one member run (the single-run trainer; passed in by the dispatcher, so this module
#: does not import the trainer)
TrainOne = Callable[..., RunResult]


def member_recipe(recipe: Recipe, seed: int) -> Recipe:
    """The recipe of the member trained with ``seed``: a plain run inside the ensemble dir."""
    run = attrs.evolve(recipe.run, seed=seed, name=f"seed-{seed}",
                       output_dir=str(RunDir.of(recipe).path))
    return attrs.evolve(recipe, run=run, ensemble=EnsembleConfig())


def _prepare(recipe: Recipe, resume: bool, overwrite: bool) -> RunDir:
    d = RunDir.of(recipe)
    main = distributed.world_from_env().is_main
    if main:
        d.claim(resume=resume, overwrite=overwrite, kind="ensemble")
    if resume:
        if not d.is_ensemble():
            raise ResumeError(f"nothing to resume in {d}: it is not an ensemble directory "
                              f"(run without --resume to start it)")
        changes = recipe_changes(load_recipe(d.recipe_file), recipe,
                                 (*RESUMABLE_CHANGES, "ensemble.seeds"))
        if changes:
            raise ResumeError(f"the recipe differs from the one {d} was started with, in more "
                              "than run length and seeds:\n  " + "\n  ".join(changes[:10]))
    # under torchrun every rank has checked the same directory; rank 0 alone changes it
    distributed.barrier()
    if main:
        d.write_recipe(recipe.to_toml())
        members = [f"seed-{s}" for s in recipe.ensemble.seeds]
        ckpt.atomic_text(d / ENSEMBLE_FILE, json.dumps({"members": members}, indent=2))
    distributed.barrier()
    return d


def train_ensemble(recipe: Recipe, train_one: TrainOne, *, resume: bool = False,
                   overwrite: bool = False, console: Callable[[str], None] | None = None
                   ) -> RunResult:
    """Train every seed's member with ``train_one`` (resuming or skipping finished ones with
    ``resume``), then evaluate the ensemble on ``eval.split`` into the ensemble directory's
    metrics.json."""
    world = distributed.world_from_env()
    say = console if console is not None else (lambda s: print(s, flush=True))
    if not world.is_main:  # under torchrun only rank 0 talks
        say = lambda s: None  # noqa: E731
    seeds = recipe.ensemble.seeds
    if len(set(seeds)) != len(seeds):
        raise MmfwError(f"ensemble.seeds repeats a seed: {list(seeds)}")
    t0 = time.perf_counter()
    d = None
    try:
        if world.distributed:  # one process group for all members (train() leaves it open)
            backend = create("backend", recipe.backend.name, options=recipe.backend.options)
            distributed.init(backend.device, recipe.distributed.timeout_minutes)
        d = _prepare(recipe, resume, overwrite)
        return _train_members(recipe, d, train_one, resume, console, say, t0)
    finally:
        if d is not None:
            d.unlock()
        distributed.shutdown()


def _train_members(recipe: Recipe, d: RunDir, train_one: TrainOne, resume: bool,
                   console: Callable[[str], None] | None, say: Callable[[str], None],
                   t0: float) -> RunResult:
    seeds = recipe.ensemble.seeds
    results = []
    for i, seed in enumerate(seeds):
        member = member_recipe(recipe, seed)
        mdir = RunDir.of(member)
        say(f"ensemble member {i + 1}/{len(seeds)}: seed {seed} -> {mdir}")
        latest = ckpt.latest(mdir.checkpoints)
        if resume and mdir.metrics_file.is_file() and latest is not None:
            metrics = mdir.read_metrics()
            results.append(RunResult(mdir.path, metrics, latest, 0.0, "done"))
            say(f"  already trained (rsum {metrics['rsum']:.1f})")
            continue
        started = latest is not None
        results.append(train_one(member, resume=resume and started,
                                 overwrite=not (resume and started), console=console))
    metrics = None
    if distributed.world_from_env().is_main:  # the ensemble's evaluation: rank 0's
        metrics = evaluate([r.run_dir for r in results], split=recipe.eval.split)
        d.write_metrics(metrics)
        summary = {"members": [f"seed-{s}" for s in seeds],
                   "member_metrics": {r.run_dir.name: r.metrics for r in results},
                   "metrics": metrics}
        ckpt.atomic_text(d / ENSEMBLE_FILE, json.dumps(summary, indent=2))
    metrics = distributed.broadcast_object(metrics)
    best = max(r.metrics["rsum"] for r in results)
    say(f"ensemble of {len(seeds)} on {recipe.eval.split}: rsum {metrics['rsum']:.1f} "
        f"(best member {best:.1f})")
    return RunResult(d.path, metrics, sum(r.steps for r in results), time.perf_counter() - t0,
                     "ensemble", tuple(results))
