"""``mmfw sweep``: a grid over recipe keys, one run directory each, one comparison (seed 001 §5.4).

Every combination's recipe is validated before anything trains. Runs go to
``<run.output_dir>/<run.name>-sweep/<setting>/`` (``setting`` spells the grid values, e.g.
``temperature=0.05-lr=0.0003``); the sweep directory then holds ``sweep.csv``, ``sweep.md``,
``sweep.json`` and ``sweep.png``. Settings are ranked by the rsum of the last validation
evaluation when every run has one (choosing on the test split would leak it), else by the final
rsum.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs

from ..config.recipe import Recipe, load_recipe, parse_overrides
from ..eval.retrieval import METRIC_KEYS
from ..run.rundir import WARNINGS_JSONL, RunDir
from ..spi.errors import MmfwError, RecipeError

SWEEP_KEYS = ("run.name", "run.output_dir")
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def split_values(text: str) -> list[str]:
    """``"0.1,0.2"`` -> ``["0.1", "0.2"]``; commas inside ``[...]``, ``{...}`` or quotes do not
    split, so ``optim.betas=[0.9,0.98],[0.9,0.999]`` gives two lists."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["loss.temperature=0.02,0.05", ...]`` -> ``[("loss.temperature", ["0.02", "0.05"])]``."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, _ = parse_overrides([item])[0]
        values = split_values(item.partition("=")[2])
        if any(not v for v in values):
            raise RecipeError("a grid needs non-empty, comma-separated values", key="--grid",
                              expected="e.g. --grid loss.temperature=0.02,0.05,0.07", given=item)
        if key in SWEEP_KEYS:
            raise RecipeError("the sweep sets this key itself (one run directory per setting)",
                              key="--grid", given=item)
        if key in dict(grid):
            raise RecipeError("the same key is gridded twice", key="--grid", given=item)
        if len(set(values)) != len(values):
            raise RecipeError("a value is repeated", key="--grid", given=item)
        grid.append((key, values))
    if not grid:
        raise RecipeError("a sweep needs at least one --grid", key="--grid",
                          expected="e.g. --grid loss.temperature=0.02,0.05,0.07")
    return grid


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each key (``temperature``), or more of it where that is ambiguous."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if sum(k.split(".")[-n:] == parts[-n:] for k in keys) == 1:
                break
        names[key] = short
    return names


@attrs.frozen
class Setting:
    """One combination of grid values and the recipe it makes."""

    name: str
    values: dict[str, str]
    overrides: tuple[str, ...]
    recipe: Recipe

    @property
    def rundir(self) -> RunDir:
        return RunDir.of(self.recipe)

    @property
    def run_dir(self) -> Path:
        return self.rundir.path


@attrs.frozen
class SweepPlan:
    recipe_path: Path
    grid: list[tuple[str, list[str]]]
    settings: list[Setting]
    sweep_dir: Path


def plan_sweep(recipe: str | Path, grid_items: Sequence[str], overrides: Sequence[str] = ()
               ) -> SweepPlan:
    """Expand the grid and validate every combination's recipe before anything runs."""
    path = Path(recipe)
    grid = parse_grid(grid_items)
    fixed = dict(parse_overrides(overrides))
    for key, _ in grid:
        if key in fixed:
            raise RecipeError("a key is both in --set and in --grid", key=key,
                              given=f"--set {key}={fixed[key]}")
    base = load_recipe(path, overrides)
    sweep_dir = Path(base.run.output_dir) / f"{base.run.name}-sweep"
    short = _short_names([k for k, _ in grid])
    settings, names = [], set()
    for combo in itertools.product(*[values for _, values in grid]):
        values = dict(zip([k for k, _ in grid], combo))
        name = "-".join(f"{short[k]}={v}" for k, v in values.items())
        name = _SAFE.sub("_", name).strip("._") or "run"
        if name in names:  # two values that only differ in unsafe characters
            name = f"{name}-{len(settings)}"
        names.add(name)
        extra = (*overrides, *[f"{k}={v}" for k, v in values.items()],
                 f"run.output_dir={sweep_dir}", f"run.name={name}")
        try:
            r = load_recipe(path, extra)
        except MmfwError as err:
            label = ", ".join(f"{k}={v}" for k, v in values.items())
            raise MmfwError(f"sweep setting {label} is not a valid recipe (nothing was run):\n"
                            f"{err}") from None
        settings.append(Setting(name, values, extra, r))
    return SweepPlan(path, grid, settings, sweep_dir)


# running ---------------------------------------------------------------------------------------


def _last_val_rsum(rows: list[dict[str, Any]], val_split: str) -> float | None:
    rsum = None
    for row in rows:
        if val_split and row.get("type") == "eval" and row.get("split") == val_split and \
                not row.get("final"):
            rsum = row.get("rsum")
    return rsum


def _outcome(setting: Setting, status: str, seconds: float, error: str = "") -> dict[str, Any]:
    d = setting.rundir
    row: dict[str, Any] = {"run": setting.name, **setting.values, "status": status,
                           "run_dir": str(d), "minutes": round(seconds / 60, 2), "error": error}
    if status == "ok" and d.metrics_file.is_file():
        row.update(d.read_metrics())
        rows = d.rows()
        row["val_rsum"] = _last_val_rsum(rows, setting.recipe.eval.val_split)
        row["steps"] = max((r.get("step", 0) for r in rows), default=0)
        row["warnings"] = len(d.rows(WARNINGS_JSONL))
    return row


def _started(setting: Setting) -> bool:
    """A setting a killed sweep left half-trained: a checkpoint, the same recipe."""
    from ..run.resume import recipe_changes

    d = setting.rundir
    return (bool(d.checkpoint_steps()) and d.recipe_file.is_file()
            and not recipe_changes(load_recipe(d.recipe_file), setting.recipe))


def _run_inline(setting: Setting, overwrite: bool, say: Callable[[str], None],
                resume: bool = False) -> dict[str, Any]:
    from ..run.dispatch import train

    t0 = time.perf_counter()
    try:
        train(setting.recipe, overwrite=overwrite and not resume, resume=resume, console=say)
    except MmfwError as err:
        return _outcome(setting, "failed", time.perf_counter() - t0, str(err))
    except Exception as err:  # one broken setting must not end the sweep
        return _outcome(setting, "failed", time.perf_counter() - t0,
                        f"{type(err).__name__}: {err}")
    return _outcome(setting, "ok", time.perf_counter() - t0)


def _run_process(setting: Setting, plan: SweepPlan, overwrite: bool, threads: int,
                 resume: bool = False) -> dict[str, Any]:
    """``python -m mmfw run`` in its own process; its output goes to ``logs/<setting>.log``."""
    logs = plan.sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mmfw", "run", str(plan.recipe_path)]
    for o in setting.overrides:
        cmd += ["--set", o]
    cmd += ["--set", "run.progress=false"] + (["--resume"] if resume else
                                              ["--overwrite"] if overwrite else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    t0 = time.perf_counter()
    log = logs / f"{setting.name}.log"
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False
                            ).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return _outcome(setting, "failed", time.perf_counter() - t0,
                        f"exit {rc} (see {log}): " + " | ".join(tail))
    return _outcome(setting, "ok", time.perf_counter() - t0)


def run_sweep(plan: SweepPlan, *, jobs: int = 1, overwrite: bool = False, resume: bool = False,
              console: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every setting (``jobs`` processes at a time, in this process when 1) and summarise.

    ``resume`` keeps the settings that already finished (their recipe unchanged) and reruns the
    rest; ``overwrite`` reruns all. Without either, existing run directories are an error.
    """
    say = console if console is not None else (lambda s: print(s, flush=True))
    if overwrite and resume:
        raise MmfwError("--overwrite and --resume exclude each other")
    todo, done = [], []
    for s in plan.settings:
        d = s.rundir
        finished = d.metrics_file.is_file() and d.recipe_file.is_file()
        if resume and finished and load_recipe(d.recipe_file).digest() == \
                s.recipe.digest():
            done.append(s)
        else:
            todo.append(s)
    existing = [s for s in todo if s.rundir.in_use()]
    if existing and not (overwrite or resume):
        raise MmfwError(
            "run directories of this sweep already exist:\n  " +
            "\n  ".join(str(s.run_dir) for s in existing[:10]) +
            "\nUse --resume to keep finished settings, --overwrite to rerun all, or "
            "--set run.name=<new name>")
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    say(f"sweep: {len(plan.settings)} settings ({len(done)} already done) into "
        f"{plan.sweep_dir}, {jobs} at a time")
    rows = {s.name: _outcome(s, "ok", 0.0) for s in done}
    rerun = overwrite or resume
    if jobs <= 1:
        for i, s in enumerate(todo, 1):
            say(f"[{i}/{len(todo)}] {s.name}")
            rows[s.name] = _run_inline(s, rerun, say, resume=resume and _started(s))
            say(f"[{i}/{len(todo)}] {s.name}: {_brief(rows[s.name])}")
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_run_process, s, plan, rerun, threads,
                                   resume and _started(s)): s for s in todo}
            for i, fut in enumerate(futures, 1):
                s = futures[fut]
                rows[s.name] = fut.result()
                say(f"[{i}/{len(todo)}] {s.name}: {_brief(rows[s.name])}")
    ordered = [rows[s.name] for s in plan.settings]
    return write_summary(plan, ordered, say)


def _brief(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"FAILED: {row['error'].splitlines()[0] if row['error'] else ''}"
    val = f", val rsum {row['val_rsum']:.1f}" if row.get("val_rsum") is not None else ""
    return f"rsum {row.get('rsum', float('nan')):.1f}{val} ({row['minutes']:.1f} min)"


# the comparison --------------------------------------------------------------------------------


def _columns(plan: SweepPlan, rows: list[dict[str, Any]]) -> list[str]:
    keys = [k for k, _ in plan.grid]
    val = ["val_rsum"] if any(r.get("val_rsum") is not None for r in rows) else []
    return ["run", *keys, "status", *val, *METRIC_KEYS, "steps", "minutes", "warnings"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def write_summary(plan: SweepPlan, rows: list[dict[str, Any]],
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """``sweep.csv``, ``sweep.md``, ``sweep.json`` and ``sweep.png``; returns the summary."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("rsum") is not None]
    by_val = bool(ok) and all(r.get("val_rsum") is not None for r in ok)
    metric = "val_rsum" if by_val else "rsum"
    best = max(ok, key=lambda r: r[metric]) if ok else None
    cols = _columns(plan, rows)
    d = plan.sweep_dir
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(cols)
    for r in rows:
        writer.writerow([r.get(c, "") if r.get(c) is not None else "" for c in cols])
    (d / "sweep.csv").write_text(buf.getvalue(), encoding="utf-8")
    md = [f"# Sweep of `{plan.recipe_path}`", "",
          "Grid: " + "; ".join(f"`{k}` = {', '.join(v)}" for k, v in plan.grid), "",
          f"Ranked by {'validation' if by_val else 'final'} rsum "
          f"(`{metric}`).", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: -(r.get(metric) or -1)):
        mark = " **(best)**" if r is best else ""
        md.append("| " + " | ".join(_cell(r.get(c)) + (mark if c == "run" else "")
                                    for c in cols) + " |")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        md += ["", "Failed settings:", ""] + [f"- `{r['run']}`: {r['error']}" for r in failed]
    text = "\n".join(md) + "\n"
    (d / "sweep.md").write_text(text, encoding="utf-8")
    summary = {"recipe": str(plan.recipe_path), "grid": dict(plan.grid), "ranked_by": metric,
               "best": best, "runs": rows}
    (d / "sweep.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    try:
        sweep_plot(rows, metric, best, d / "sweep.png")
    except Exception as err:  # the table is the result; the figure is a convenience
        say(f"warning: could not draw sweep.png: {type(err).__name__}: {err}")
    say(text)
    if best is None:
        raise MmfwError(f"every setting of the sweep failed; see {d / 'sweep.md'}")
    label = ", ".join(f"{k}={best[k]}" for k, _ in plan.grid)
    scores = (f"val rsum {best['val_rsum']:.1f}, final rsum {best['rsum']:.1f}" if by_val
              else f"final rsum {best['rsum']:.1f}")
    say(f"best setting: {label} ({scores}) -> {best['run_dir']}")
    if failed:
        say(f"warning: {len(failed)} of {len(rows)} settings failed (see {d / 'sweep.md'})")
    return summary


def sweep_plot(rows: list[dict[str, Any]], metric: str, best: dict[str, Any] | None,
               out: Path) -> Path:
    """Horizontal bars of rsum per setting (validation and final when both exist)."""
    from .plots import save_figure, subplots

    names = [r["run"] for r in rows]
    fig, ax = subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))
    final = [r.get("rsum") or 0.0 for r in rows]
    if metric == "val_rsum":
        val = [r.get("val_rsum") or 0.0 for r in rows]
        ax.barh([y + 0.2 for y in ys], val, height=0.4, color="C0", label="val rsum")
        ax.barh([y - 0.2 for y in ys], final, height=0.4, color="C7", label="final rsum")
        ax.legend()
    else:
        ax.barh(list(ys), final, color="C0")
    for y, r in zip(ys, rows):
        v = r.get(metric)
        text = "failed" if r["status"] != "ok" else f"{v:.1f}" + ("  best" if r is best else "")
        ax.text((v or 0.0) + 1, y, text, va="center", fontsize=8,
                color="darkred" if r["status"] != "ok" else "black",
                weight="bold" if r is best else "normal")
    top = max([*final, *[r.get(metric) or 0.0 for r in rows], 1.0])
    ax.set_xlim(0, top * 1.2)  # room for the labels
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="rsum (sum of Recall@1/5/10 both ways, max 600)",
           title=f"sweep: {metric} per setting")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)
