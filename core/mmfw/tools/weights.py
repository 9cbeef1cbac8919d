"""Weight arithmetic over finished runs, each result written as a run directory of its own.

- :func:`average_run` (``mmfw average RUN_DIR --last N``): the uniform average of a run's
  last N checkpoints (checkpoint averaging as in Vaswani et al. 2017 §6.1; a "uniform soup"
  of one trajectory in Wortsman et al. 2022).
- :func:`interpolate_runs` (``mmfw interpolate RUN_A RUN_B --alpha ...``): WiSE-FT
  (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022):
  ``theta = (1 - alpha) * theta_A + alpha * theta_B`` over matching weights, one run per alpha.

The weights taken from a checkpoint are those the run is evaluated with (the EMA's, for a run
with ``[optim.ema]``). Each result is evaluated on the validation split (``eval.val_split``,
else ``eval.split``) for the comparison table (``average.md`` / ``interpolate.md`` and their
``.json``), and on ``eval.split`` for its ``metrics.json``, like any run; its directory holds
the recipe, the assets (tokenizer) and one checkpoint in the usual layout, so ``mmfw eval``,
``mmfw.load_run`` and the exporters open it. Averages are computed in float64 and cast back,
so ``alpha = 0`` and ``alpha = 1`` give the end runs' weights exactly.
"""

from __future__ import annotations

import filecmp
import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from ..config.recipe import Recipe, load_recipe
from ..eval.retrieval import METRIC_KEYS
from ..model import build_model
from ..run import checkpoint as ckpt
from ..run.loaded import LoadedRun, evaluate, load_run
from ..run.rundir import RECIPE_FILE, RunDir, RunDirError
from ..spi.contracts import asset_dir
from ..spi.errors import MmfwError, RecipeError

Weights = dict[str, Tensor]
Say = Callable[[str], None]


@attrs.frozen
class Source:
    """One run directory's recipe and the steps of its intact checkpoints."""

    path: Path
    recipe: Recipe
    steps: list[int]

    @classmethod
    def open(cls, path: str | Path) -> Source:
        d = RunDir.existing(path).path
        if not (d / RECIPE_FILE).is_file():
            raise RunDirError(f"{d} is not a run directory (no {RECIPE_FILE} in it)")
        return cls(d, load_recipe(d / RECIPE_FILE), ckpt.list_steps(d / "checkpoints"))

    def weights(self, step: int) -> tuple[Weights, Weights]:
        """Checkpoint ``step``'s evaluated model weights (EMA when the run had it) and its
        losses' tensors, after checking the hashes."""
        directory = self.path / "checkpoints"
        ckpt.verify(directory, step)
        return ckpt.read_eval_weights(directory, step), ckpt.read_weights(directory, step)[1]

    def result(self) -> int:
        """The checkpoint the run's result was measured with (as ``load_run``'s "auto"): the
        best by val rsum with ``eval.restore_best``, else the latest."""
        if not self.steps:
            raise RunDirError(f"{self.path} has no checkpoint")
        best = ckpt.best(self.path / "checkpoints")
        return best if self.recipe.eval.restore_best and best is not None else self.steps[-1]


# arithmetic ----------------------------------------------------------------------------------


def check_matching(named: Sequence[tuple[str, Mapping[str, Tensor]]]) -> None:
    """Refuse state dicts whose keys, shapes or dtypes differ, naming the first difference."""
    (first, ref), rest = named[0], named[1:]
    for name, other in rest:
        for key in sorted(set(ref) | set(other)):
            if key not in other or key not in ref:
                owner, lacking = (first, name) if key in ref else (name, first)
                raise MmfwError(f"the weights differ in architecture: {owner} has {key!r}, "
                                f"{lacking} has not")
            a, b = ref[key], other[key]
            if a.shape != b.shape:
                raise MmfwError(f"the weights differ in architecture: {key!r} is "
                                f"{list(a.shape)} in {first} but {list(b.shape)} in {name}")
            if a.dtype != b.dtype:
                raise MmfwError(f"the weights differ in dtype: {key!r} is {a.dtype} in {first} "
                                f"but {b.dtype} in {name}")


def average(states: Sequence[Mapping[str, Tensor]]) -> Weights:
    """The uniform average of state dicts of one architecture (floating-point entries; the
    others, such as integer position ids, are taken from the last)."""
    out: Weights = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            total = torch.zeros(last.shape, dtype=torch.float64)
            for s in states:
                total += s[key].double()
            out[key] = (total / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float) -> Weights:
    """``(1 - alpha) * a + alpha * b`` (floating-point entries; the others from the nearer
    end: ``a`` below alpha 0.5, ``b`` from it)."""
    out: Weights = {}
    for key, x in a.items():
        y = b[key]
        if x.is_floating_point():
            out[key] = ((1.0 - alpha) * x.double() + alpha * y.double()).to(x.dtype)
        else:
            out[key] = (x if alpha < 0.5 else y).clone()
    return out


def parse_alphas(text: str) -> list[float]:
    """``"0,0.25,0.5"`` -> ``[0.0, 0.25, 0.5]``: numbers in [0, 1], each once."""
    items = [t.strip() for t in text.split(",")]
    values: list[float] = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not item or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise RecipeError("not a comma-separated list of numbers in [0, 1]", key="--alpha",
                              expected="e.g. --alpha 0,0.25,0.5,0.75,1", given=text)
        if value in values:
            raise RecipeError(f"{item} is listed twice", key="--alpha",
                              expected="each alpha once", given=text)
        values.append(value)
    return values


# run directories -----------------------------------------------------------------------------


def write_run(output: Path, recipe: Recipe, assets_from: Path, model_state: Mapping[str, Tensor],
              loss_state: Mapping[str, Tensor], *, step: int, epoch: int, made: dict[str, Any],
              overwrite: bool = False, kind: str = "weights") -> RunDir:
    """Write a run directory holding ``model_state`` as its one checkpoint (step ``step``):
    the recipe (renamed to the directory), ``assets_from``'s assets and a checkpoint with
    hashes (:func:`mmfw.run.checkpoint.save`, no optimizer state: it evaluates and exports,
    it does not resume). ``made`` says how the weights were made (in the checkpoint JSON)."""
    run_dir = RunDir(output.parent, output.name)
    run_dir.claim(resume=False, overwrite=overwrite, kind=kind)
    try:
        recipe = attrs.evolve(recipe, run=attrs.evolve(recipe.run, name=run_dir.name,
                                                       output_dir=str(run_dir.parent)))
        run_dir.write_recipe(recipe.to_toml())
        src = asset_dir(assets_from, "text").parent
        if src.is_dir():
            shutil.copytree(src, asset_dir(run_dir.path, "text").parent, dirs_exist_ok=True)
        ckpt.save(run_dir.checkpoints, step, model=None, loss=None, optimizer=None,
                  state={"epoch": epoch, "recipe": recipe.digest(), "made": made},
                  keep=1, model_state=model_state, loss_state=loss_state)
    finally:
        run_dir.unlock()
    return run_dir


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (without ``overwrite``) or that mmfw
    did not make (``--overwrite`` empties only run directories with mmfw's marker)."""
    run_dir = RunDir(output.parent, output.name)
    if run_dir.in_use() and not overwrite:
        raise RunDirError(f"{output} already exists: pass --overwrite to replace it, or "
                          "--output another folder")
    if run_dir.in_use() and not run_dir.has_marker():
        raise RunDirError(f"{output} was not made by mmfw, so --overwrite will not empty it: "
                          "choose another --output")


def _loaded(source: Source, weights: Mapping[str, Tensor], step: int) -> LoadedRun:
    model = build_model(source.recipe.model)
    model.load_assets(source.path)
    model.load_state_dict(weights)
    return LoadedRun(source.path, source.recipe, model.eval(), step)


def val_split(recipe: Recipe) -> str:
    """The split the comparison is made on: ``eval.val_split``, else ``eval.split``."""
    return recipe.eval.val_split or recipe.eval.split


def _finish(run_dir: RunDir, split: str, say: Say) -> tuple[dict[str, float], dict[str, float]]:
    """Evaluate a written run directory (through load_run, as a user would) on ``split`` and
    on its eval split, whose metrics become its metrics.json."""
    loaded = load_run(run_dir.path)
    val = evaluate(loaded, split=split, console=say)
    final = val if split == loaded.recipe.eval.split else evaluate(loaded, console=say)
    run_dir.write_metrics(final)
    return val, final


def _table(rows: list[dict[str, Any]], split: str, first: str) -> str:
    """Markdown: one row per set of weights, its ``split`` rsum first, then the recalls."""
    recalls = [k for k in METRIC_KEYS if k != "rsum"]
    lines = [f"| {first} | {split} rsum | " + " | ".join(recalls) + " |",
             "|" + "---|" * (2 + len(recalls))]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['weights']} | {m['rsum']:.2f} | "
                     + " | ".join(f"{m[k]:.2f}" for k in recalls) + " |")
    return "\n".join(lines) + "\n"


def _write_table(folder: Path, stem: str, title: str, table: str, data: dict[str, Any]) -> None:
    ckpt.atomic_text(folder / f"{stem}.md", f"# {title}\n\n{table}")
    ckpt.atomic_text(folder / f"{stem}.json", json.dumps(data, indent=2))


def average_run(run_dir: str | Path, last: int, output: str | Path | None = None, *,
                overwrite: bool = False, say: Say = print) -> dict[str, Any]:
    """Average the last ``last`` checkpoints of ``run_dir`` into a new run directory (default
    ``<run_dir>-avg<last>``), compare it on val with each averaged checkpoint; returns the
    comparison (also ``average.md`` / ``average.json`` in the new directory)."""
    if last < 1:
        raise RecipeError("must be at least 1", key="--last", given=last)
    source = Source.open(run_dir)
    if len(source.steps) < last:
        raise MmfwError(
            f"{source.path} has {len(source.steps)} checkpoint(s) (steps "
            f"{', '.join(map(str, source.steps)) or 'none'}), fewer than --last {last}: a run "
            f"keeps run.keep_last = {source.recipe.run.keep_last} (plus the best); train with "
            "a larger run.keep_last and run.checkpoint_every to average more")
    steps = source.steps[-last:]
    states = [(f"step {s}", source.weights(s)) for s in steps]
    check_matching([(n, w[0]) for n, w in states])
    check_matching([(n, w[1]) for n, w in states])
    model_state = average([w[0] for _, w in states])
    loss_state = average([w[1] for _, w in states])
    out = Path(output) if output else source.path.with_name(f"{source.path.name}-avg{last}")
    check_output(out, overwrite)
    split = val_split(source.recipe)
    rows = []
    for step, (_, (weights, _)) in zip(steps, states):
        metrics = evaluate(_loaded(source, weights, step), split=split, console=say)
        rows.append({"weights": f"checkpoint step {step}", "step": step, "metrics": metrics})
    epoch = int(ckpt.load_state(source.path / "checkpoints", steps[-1]).get("epoch", 0))
    made = {"average": {"run": str(source.path), "steps": steps}}
    written = write_run(out, source.recipe, source.path, model_state, loss_state,
                        step=steps[-1], epoch=epoch, made=made, overwrite=overwrite,
                        kind="average")
    val, final = _finish(written, split, say)
    rows.append({"weights": f"average of the last {last}", "step": steps[-1], "metrics": val})
    result = {"split": split, "source": str(source.path), "output": str(written.path),
              "steps": steps, "rows": rows, "metrics": final}
    table = _table(rows, split, "weights")
    _write_table(written.path, "average", f"Average of the last {last} checkpoints of "
                 f"{source.path.name}", table, result)
    say(table.rstrip())
    return result


def _same_assets(a: Path, b: Path) -> None:
    """Refuse runs whose assets (a tokenizer trained on the training captions) differ: the
    same weights would read other tokens."""
    da, db = asset_dir(a, "text").parent, asset_dir(b, "text").parent
    files_a = sorted(p.relative_to(da) for p in da.rglob("*") if p.is_file()) \
        if da.is_dir() else []
    files_b = sorted(p.relative_to(db) for p in db.rglob("*") if p.is_file()) \
        if db.is_dir() else []
    only_one = sorted(set(files_a) ^ set(files_b))
    if only_one:
        raise MmfwError(f"{a.name} and {b.name} have different assets: only one has "
                        f"assets/{only_one[0]}; interpolate runs whose encoders share them")
    for rel in files_a:
        if not filecmp.cmp(da / rel, db / rel, shallow=False):
            raise MmfwError(f"{a.name} and {b.name} have different assets/{rel} (a tokenizer "
                            "trained on other captions?): the same weights would read other "
                            "tokens; interpolate runs whose encoders share them")


def _alpha_name(alpha: float) -> str:
    return f"alpha-{alpha:g}"


def interpolate_runs(run_a: str | Path, run_b: str | Path, alphas: Sequence[float],
                     output: str | Path | None = None, *, overwrite: bool = False,
                     say: Say = print) -> dict[str, Any]:
    """WiSE-FT between the result checkpoints (:meth:`Source.result`) of two runs of one
    architecture: one run
    directory per alpha (``alpha-0.25``) under ``output`` (default: :func:`default_output`),
    each evaluated on RUN_A's val split; returns the comparison (also ``interpolate.md`` /
    ``interpolate.json`` in ``output``)."""
    a, b = Source.open(run_a), Source.open(run_b)
    step_a, step_b = a.result(), b.result()
    (wa, la), (wb, lb) = a.weights(step_a), b.weights(step_b)
    check_matching([(a.path.name, wa), (b.path.name, wb)])
    check_matching([(f"{a.path.name} (losses)", la), (f"{b.path.name} (losses)", lb)])
    _same_assets(a.path, b.path)
    if a.recipe.to_dict()["model"] != b.recipe.to_dict()["model"]:
        say(f"note: the [model] sections of {a.path.name} and {b.path.name} differ though "
            f"their weights match; the interpolated runs use {a.path.name}'s")
    folder = Path(output) if output else default_output(a.path, b.path)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder} is a file, not a folder for the interpolated runs")
    for alpha in alphas:
        check_output(folder / _alpha_name(alpha), overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    split = val_split(a.recipe)
    rows = []
    for alpha in alphas:
        made = {"interpolate": {"run_a": str(a.path), "step_a": step_a,
                                "run_b": str(b.path), "step_b": step_b, "alpha": alpha}}
        written = write_run(folder / _alpha_name(alpha), a.recipe, a.path,
                            interpolate(wa, wb, alpha), interpolate(la, lb, alpha),
                            step=step_a, epoch=0, made=made, overwrite=overwrite,
                            kind="interpolate")
        val, final = _finish(written, split, say)
        rows.append({"weights": f"alpha {alpha:g}", "alpha": alpha, "run": str(written.path),
                     "metrics": val, "final": final})
    result = {"split": split, "run_a": str(a.path), "run_b": str(b.path),
              "output": str(folder), "rows": rows}
    table = _table(rows, split, "theta = (1-alpha) A + alpha B")
    _write_table(folder, "interpolate", f"Interpolating {a.path.name} (alpha 0) and "
                 f"{b.path.name} (alpha 1)", table, result)
    say(table.rstrip())
    return result


def default_output(a: Path, b: Path) -> Path:
    """``<parent of RUN_A>/<RUN_A name>-to-<RUN_B name>``."""
    return a.with_name(f"{a.name}-to-{b.name}")


__all__ = ["Source", "average", "average_run", "check_matching", "check_output", "default_output",
           "interpolate", "interpolate_runs", "parse_alphas", "val_split", "write_run"]
