"""Finished runs: load a model back from its run directory, evaluate it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import attrs
import torch

from . import checkpoint as ckpt
from .engine import CHECKPOINTS, RECIPE_FILE
from .errors import MmfwError
from .evaluation import evaluate_split
from .model import DualEncoder, build_model
from .recipe import Recipe, apply_overrides, from_dict, read_toml
from .registry import create


@attrs.frozen
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    model: DualEncoder
    step: int


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> LoadedRun:
    """The model of a run directory (latest checkpoint) and its resolved recipe."""
    d = Path(run_dir)
    if not (d / RECIPE_FILE).is_file():
        raise MmfwError(f"{d} is not a run directory (no {RECIPE_FILE} in it)")
    recipe = from_dict(read_toml(d / RECIPE_FILE), str(d / RECIPE_FILE))
    step = ckpt.latest(d / CHECKPOINTS)
    if step is None:
        raise MmfwError(f"{d} has no checkpoint yet (is the run still starting?)")
    model = build_model(recipe.model)
    model.load_assets(d)
    ckpt.load_weights(d / CHECKPOINTS, step, model, None)
    model.to(device).eval()
    return LoadedRun(d, recipe, model, step)


def evaluate(run: str | Path | LoadedRun, *, split: str | None = None,
             data: Iterable[str] = (), batch_size: int | None = None,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Recall@1/5/10 both ways and rsum of a run on a split of its dataset.

    ``data`` overrides keys of the run's ``[data]`` section (``"annotations=/x.json"``), so the
    same model can be evaluated on another copy or another dataset.
    """
    loaded = run if isinstance(run, LoadedRun) else load_run(run, device=device)
    recipe = loaded.recipe
    if data:
        raw = apply_overrides(recipe.to_dict(), [f"data.{d}" for d in data])
        recipe = from_dict(raw, "--data")
    source = create("dataset", recipe.data.dataset.name, options=recipe.data.dataset.options)
    name = split or recipe.eval.split
    if name not in source.splits:
        raise MmfwError(f"dataset '{recipe.data.dataset.name}' has no split '{name}' "
                        f"(it has {', '.join(source.splits)})")
    return evaluate_split(loaded.model, source.split(name),
                          batch_size=batch_size or recipe.eval.batch_size, device=device,
                          max_images=recipe.eval.max_images)


__all__ = ["LoadedRun", "evaluate", "load_run"]
