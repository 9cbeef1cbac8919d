"""Finished runs: load a model back from its run directory, evaluate it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import attrs
import torch

from ..config.recipe import Recipe, apply_overrides, from_dict, load_recipe
from ..data.augment import encoder_input_size
from ..data.datasource import BadData, CheckedSource
from ..eval.protocols import evaluate_protocol
from ..eval.retrieval import embed_options, evaluate_ensemble, placement
from ..eval.zeroshot import evaluate_zeroshot
from ..model import DualEncoder, build_model
from ..registry import create
from ..spi.errors import MmfwError
from . import checkpoint as ckpt
from .rundir import CHECKPOINTS, ENSEMBLE_FILE, RECIPE_FILE

#: what ``evaluate`` / ``mmfw eval --task`` measures
TASKS = ("retrieval", "zeroshot")


@attrs.frozen
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    model: DualEncoder
    step: int

    def placed(self, device: str | torch.device | None = None
               ) -> tuple[torch.device, Callable[[], AbstractContextManager[object]]]:
        """The device and forward context to embed with, the model moved there: the run's
        backend and its precision where that backend is available here (what training's
        evaluation used), else the CPU in fp32; a ``device`` given runs fp32 there."""
        backend = self.recipe.backend
        dev, _, ctx = placement((backend.name, backend.values()), device, None)
        self.model.to(dev)
        return dev, ctx


def ensemble_members(run_dir: str | Path) -> list[Path] | None:
    """The member run directories of an ensemble directory, or None for a plain run."""
    d = Path(run_dir)
    path = d / ENSEMBLE_FILE
    if not path.is_file():
        return None
    return [d / m for m in json.loads(path.read_text())["members"]]


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu",
             checkpoint: str = "auto") -> LoadedRun:
    """The model of a run directory and its resolved recipe.

    ``checkpoint``: ``"latest"``, ``"best"`` (best val rsum), or ``"auto"``: the best when the
    recipe says ``eval.restore_best``, else the latest (the weights metrics.json was made with).
    A run trained with ``[optim.ema]`` gives its EMA weights (what it was evaluated with).
    """
    d = Path(run_dir)
    members = ensemble_members(d)
    if members is not None:
        names = ", ".join(m.name for m in members)
        raise MmfwError(f"{d} is an ensemble directory (members {names}): load a member, "
                        f"or evaluate the ensemble with `mmfw eval {d}`")
    if not (d / RECIPE_FILE).is_file():
        raise MmfwError(f"{d} is not a run directory (no {RECIPE_FILE} in it)")
    recipe = load_recipe(d / RECIPE_FILE)  # its mistakes name that file
    if checkpoint not in ("auto", "latest", "best"):
        raise MmfwError(f"checkpoint must be 'auto', 'latest' or 'best', not {checkpoint!r}")
    step = ckpt.latest(d / CHECKPOINTS)
    best = ckpt.best(d / CHECKPOINTS)
    if checkpoint == "best" or (checkpoint == "auto" and recipe.eval.restore_best):
        if best is None and checkpoint == "best":
            raise MmfwError(f"{d} has no best checkpoint (it needs a val split: eval.val_split)")
        step = best if best is not None else step
    if step is None:
        raise MmfwError(f"{d} has no checkpoint yet (is the run still starting?)")
    ckpt.verify(d / CHECKPOINTS, step)  # a damaged checkpoint is named, never loaded
    model = build_model(recipe.model)
    model.load_assets(d)
    model.load_state_dict(ckpt.read_eval_weights(d / CHECKPOINTS, step))
    model.to(device).eval()
    return LoadedRun(d, recipe, model, step)


def evaluate(run: str | Path | LoadedRun | Sequence[str | Path | LoadedRun], *,
             split: str | None = None, data: Iterable[str] = (), batch_size: int | None = None,
             device: str | torch.device | None = None,
             console: Callable[[str], None] | None = None, task: str = "retrieval",
             zeroshot: Iterable[str] = ()) -> dict[str, float]:
    """Recall@1/5/10 both ways and rsum of a run on a split of its dataset, by the recipe's
    ``eval.protocol``; with ``task = "zeroshot"``, the zero-shot classification metrics of its
    ``[eval.zeroshot]`` (``split`` naming the labelled split, ``zeroshot`` overriding keys of
    that table: ``"dataset=labelled"``, ``"options.path=/x"``).

    ``data`` overrides keys of the run's ``[data]`` section (``"annotations=/x.json"``), so the
    same model can be evaluated on another copy or another dataset. Several runs (or an
    ensemble directory) are evaluated as an ensemble: their cosine similarities are averaged
    (seed 000 §5), each model embedding with its own preprocessing, on the first run's data.

    Bad data follows the recipe's ``data.on_bad``, as in training (override it with
    ``data=["on_bad=skip"]``): ``"error"`` raises a DataError naming the items; ``"skip"``
    leaves them out, says so through ``console`` (default: stderr) and lists each in the run
    directory's ``skipped.jsonl`` (``when = "eval"``) when it is writable (a single run only).

    ``device``: by default the run's backend and its precision where that backend is
    available here (a bf16 run is evaluated in bf16, as its training evaluated it), else the
    CPU in fp32; a device given runs fp32 there.
    """
    say = console if console is not None else (lambda s: print(s, file=sys.stderr, flush=True))
    if isinstance(run, (str, Path)) and (members := ensemble_members(run)) is not None:
        run = members
    if not isinstance(run, (str, Path, LoadedRun)):
        paths: list[str | Path | LoadedRun] = []
        for r in run:  # an ensemble directory among several runs stands for its members
            inner = None if isinstance(r, LoadedRun) else ensemble_members(r)
            paths.extend(inner if inner is not None else [r])
        runs = [r if isinstance(r, LoadedRun) else load_run(r) for r in paths]
        if not runs:
            raise MmfwError("evaluate() needs at least one run directory")
        if len(runs) > 1:
            if task != "retrieval":
                raise MmfwError(f"--task {task} evaluates one run, not an ensemble")
            return _evaluate(runs, split, data, batch_size, device, say)
        run = runs[0]
    if task not in TASKS:
        raise MmfwError(f"unknown evaluation task {task!r} (one of {', '.join(TASKS)})")
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    if task == "zeroshot":
        return _evaluate_zeroshot(loaded, split, data, zeroshot, batch_size, device, say)
    return _evaluate([loaded], split, data, batch_size, device, say)


def _overridden(recipe: Recipe, data: Iterable[str], zeroshot: Iterable[str] = ()) -> Recipe:
    """The run's recipe with ``--data`` / ``--zeroshot`` overrides, validated again."""
    data, zeroshot = list(data), list(zeroshot)
    if data:
        raw = apply_overrides(recipe.to_dict(), [f"data.{d}" for d in data])
        recipe = from_dict(raw, "--data")
    if zeroshot:
        raw = apply_overrides(recipe.to_dict(), [f"eval.zeroshot.{z}" for z in zeroshot])
        recipe = from_dict(raw, "--zeroshot")
    return recipe


def _evaluate_zeroshot(loaded: LoadedRun, split: str | None, data: Iterable[str],
                       zeroshot: Iterable[str], batch_size: int | None,
                       device: str | torch.device | None, say: Callable[[str], None]
                       ) -> dict[str, float]:
    recipe = _overridden(loaded.recipe, data, [*zeroshot, *([f"split={split}"] if split
                                                            else [])])
    log_dir = loaded.run_dir if os.access(loaded.run_dir, os.W_OK) else None
    dev, ctx = loaded.placed(device)
    return evaluate_zeroshot(loaded.model, recipe, run_dir=log_dir, say=say, device=dev,
                             autocast=ctx,
                             batch_size=batch_size)


def _evaluate(runs: list[LoadedRun], split: str | None, data: Iterable[str],
              batch_size: int | None, device: str | torch.device | None,
              say: Callable[[str], None]) -> dict[str, float]:
    loaded = runs[0]
    dev, ctx = loaded.placed(device)
    for r in runs[1:]:
        r.model.to(dev)
    recipe = _overridden(loaded.recipe, data)
    raw_source = create("dataset", recipe.data.dataset.name,
                        options=recipe.data.dataset.options)
    name = split or recipe.eval.split
    if name not in raw_source.splits:
        raise MmfwError(f"dataset '{recipe.data.dataset.name}' has no split '{name}' "
                        f"(it has {', '.join(raw_source.splits)})")
    log_dir = loaded.run_dir if len(runs) == 1 and os.access(loaded.run_dir, os.W_OK) else None
    policy = BadData(recipe.data.on_bad, log_dir, say, evaluating=True)
    source = CheckedSource(raw_source, recipe, policy)
    checked = source.split(name)  # scanned, as in training
    if recipe.data.cache:  # training's cache of this split, read (or filled) again
        sizes = {encoder_input_size(r.model.vision.preprocess) for r in runs}
        if len(sizes) == 1 and None not in sizes:  # members of other sizes decode the files
            source.use_cache(sizes.pop())  # type: ignore[arg-type]
    kwargs = dict(batch_size=batch_size or recipe.eval.batch_size, device=dev, autocast=ctx,
                  max_images=recipe.eval.max_images, **embed_options(recipe))
    if len(runs) == 1:
        return evaluate_protocol(loaded.model, checked, rerank_top_k=recipe.eval.rerank_top_k,
                                 protocol=recipe.eval.protocol,
                                 fold_size=recipe.eval.fold_size, **kwargs)
    return evaluate_ensemble([r.model for r in runs], checked, **kwargs)


__all__ = ["ENSEMBLE_FILE", "TASKS", "LoadedRun", "ensemble_members", "evaluate", "load_run"]
