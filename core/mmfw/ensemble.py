"""Seed ensembles (seed 000 §5): one run per seed, evaluated by their averaged similarity.

``[ensemble] seeds = [42, 43, 44]`` makes ``<output_dir>/<name>/`` an *ensemble directory*: it
holds the recipe, ``ensemble.json`` (the members), ``metrics.json`` (the ensemble's retrieval
metrics) and one ordinary run directory per seed, ``seed-42/`` ... Each member is the recipe with
``run.seed`` set and no ``[ensemble]``, so it can be evaluated, loaded, resumed or used as a
teacher on its own. ``mmfw eval`` on the ensemble directory re-evaluates the ensemble.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from . import checkpoint as ckpt
from . import distributed
from .engine import (
    CHECKPOINTS,
    METRICS_JSON,
    RECIPE_FILE,
    RESUMABLE_CHANGES,
    RunResult,
    _diff,
    run_dir_of,
    train,
)
from .errors import MmfwError, ResumeError
from .recipe import EnsembleConfig, Recipe, load_recipe
from .registry import create
from .runs import ENSEMBLE_FILE, evaluate


def member_recipe(recipe: Recipe, seed: int) -> Recipe:
    """The recipe of the member trained with ``seed``: a plain run inside the ensemble dir."""
    run = attrs.evolve(recipe.run, seed=seed, name=f"seed-{seed}",
                       output_dir=str(run_dir_of(recipe)))
    return attrs.evolve(recipe, run=run, ensemble=EnsembleConfig())


def _prepare(recipe: Recipe, resume: bool, overwrite: bool) -> Path:
    d = run_dir_of(recipe)
    existing = d.is_dir() and any(d.iterdir())
    if resume:
        if not (d / ENSEMBLE_FILE).is_file():
            raise ResumeError(f"nothing to resume in {d}: it is not an ensemble directory "
                              f"(run without --resume to start it)")
        old = load_recipe(d / RECIPE_FILE)
        ignore = (*RESUMABLE_CHANGES, "ensemble.seeds")
        if old.digest(ignore) != recipe.digest(ignore):
            diff = [line for line in _diff(old.to_dict(), recipe.to_dict())
                    if not line.startswith("ensemble.seeds")]
            raise ResumeError(f"the recipe differs from the one {d} was started with, in more "
                              "than run length and seeds:\n  " + "\n  ".join(diff[:10]))
    elif existing and not overwrite:
        raise MmfwError(f"run directory {d} already exists. Use --resume to continue it, "
                        f"--overwrite to start it again, or --set run.name=<new name>")
    # under torchrun every rank has checked the same directory; rank 0 alone changes it
    distributed.barrier()
    if distributed.world_from_env().is_main:
        _write(recipe, d, clear=existing and not resume)
    distributed.barrier()
    return d


def _write(recipe: Recipe, d: Path, clear: bool) -> None:
    if clear:
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_text(d / RECIPE_FILE, recipe.to_toml())
    members = [f"seed-{s}" for s in recipe.ensemble.seeds]
    ckpt.atomic_text(d / ENSEMBLE_FILE, json.dumps({"members": members}, indent=2))


def train_ensemble(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                   console: Callable[[str], None] | None = None) -> RunResult:
    """Train every seed's member (resuming or skipping finished ones with ``resume``), then
    evaluate the ensemble on ``eval.split`` into the ensemble directory's metrics.json."""
    world = distributed.world_from_env()
    say = console if console is not None else (lambda s: print(s, flush=True))
    if not world.is_main:  # under torchrun only rank 0 talks
        say = lambda s: None  # noqa: E731
    seeds = recipe.ensemble.seeds
    if len(set(seeds)) != len(seeds):
        raise MmfwError(f"ensemble.seeds repeats a seed: {list(seeds)}")
    t0 = time.perf_counter()
    try:
        if world.distributed:  # one process group for all members (train() leaves it open)
            backend = create("backend", recipe.backend.name, options=recipe.backend.options)
            distributed.init(backend.device, recipe.distributed.timeout_minutes)
        return _train_members(recipe, resume, overwrite, console, say, t0)
    finally:
        distributed.shutdown()


def _train_members(recipe: Recipe, resume: bool, overwrite: bool,
                   console: Callable[[str], None] | None, say: Callable[[str], None],
                   t0: float) -> RunResult:
    seeds = recipe.ensemble.seeds
    d = _prepare(recipe, resume, overwrite)
    results = []
    for i, seed in enumerate(seeds):
        member = member_recipe(recipe, seed)
        mdir = run_dir_of(member)
        say(f"ensemble member {i + 1}/{len(seeds)}: seed {seed} -> {mdir}")
        done = (mdir / METRICS_JSON).is_file()
        if resume and done and ckpt.latest(mdir / CHECKPOINTS) is not None:
            metrics = json.loads((mdir / METRICS_JSON).read_text())
            steps = ckpt.latest(mdir / CHECKPOINTS) or 0
            results.append(RunResult(mdir, metrics, steps, 0.0, "done"))
            say(f"  already trained (rsum {metrics['rsum']:.1f})")
            continue
        started = ckpt.latest(mdir / CHECKPOINTS) is not None
        results.append(train(member, resume=resume and started,
                             overwrite=not (resume and started), console=console))
    metrics = None
    if distributed.world_from_env().is_main:  # the ensemble's evaluation: rank 0's
        metrics = evaluate([r.run_dir for r in results], split=recipe.eval.split)
        ckpt.atomic_text(d / METRICS_JSON, json.dumps(metrics, indent=2))
        summary = {"members": [f"seed-{s}" for s in seeds],
                   "member_metrics": {r.run_dir.name: r.metrics for r in results},
                   "metrics": metrics}
        ckpt.atomic_text(d / ENSEMBLE_FILE, json.dumps(summary, indent=2))
    metrics = distributed.broadcast_object(metrics)
    best = max(r.metrics["rsum"] for r in results)
    say(f"ensemble of {len(seeds)} on {recipe.eval.split}: rsum {metrics['rsum']:.1f} "
        f"(best member {best:.1f})")
    return RunResult(d, metrics, sum(r.steps for r in results), time.perf_counter() - t0,
                     "ensemble", tuple(results))
