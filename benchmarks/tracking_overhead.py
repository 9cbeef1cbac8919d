"""What experiment tracking and the system metrics cost per training step (not a test).

Trains a recipe (default: the quickstart) for ``--steps`` optimizer steps, two sides in
alternating rounds in one process (off, on, off, on, ...):

  off: ``run.report_to = []``: no tracker (the system metrics of the train rows are always on)
  on:  ``run.report_to = ["tensorboard", "mlflow", "wandb"]``: W&B offline, MLflow a ``file:``
       store, everything in a temporary folder

Validation is off and the final evaluation small (``data.test_images``) in both; neither is
in the figures. Per side:

- ``step_ms``: wall time per optimizer step, the mean of the train rows' ``time/step_s``
  after the first row of each round (warm-up);
- ``data_frac``: the share of it spent waiting for the loader (``time/data_frac``).

And, timed inside the runs (every ``Callbacks.fire`` of both sides goes through the same
timing wrapper, so the wrapper costs both alike):

- ``trackers_ms_per_step``: time in the trackers' per-row events (``on_log_row``,
  ``on_eval_end``, ``on_checkpoint_save``) per step;
- ``system_ms_per_step``: time in the system metrics (``SystemStats.take`` and
  ``Throughput.take_all``, once per train row, and the loop's three clock reads per step);
- ``overhead_pct = (trackers + system) / step_ms(off)``: what tracking with system metrics
  adds to a step; ``wall_pct``: the trackers' cost through the wall clock, the median over
  rounds of ``step_ms(on) / step_ms(off) - 1`` (rounds ordered off-on, on-off, ...; noisier:
  a shared 2-core machine drifts by several per cent between rounds);
- the one-off costs of the "on" side: opening the three tracker runs (imports, W&B's service
  process) and closing them (plots and files stored).

    python benchmarks/tracking_overhead.py                  # quickstart, 100 steps, 6 rounds
    python benchmarks/tracking_overhead.py --steps 200 --rounds 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import record  # benchmarks/record.py

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "tracking_overhead.json"
TRACKERS = ("tensorboard", "mlflow", "wandb")
PER_ROW_EVENTS = ("on_log_row", "on_eval_end", "on_checkpoint_save")


class Timers:
    """Seconds spent per (callback name or function, event)."""

    def __init__(self) -> None:
        self.total: dict[tuple[str, str], float] = {}

    def add(self, key: tuple[str, str], seconds: float) -> None:
        self.total[key] = self.total.get(key, 0.0) + seconds

    def sum(self, names: tuple[str, ...], events: tuple[str, ...]) -> float:
        return sum(v for (n, e), v in self.total.items() if n in names and e in events)


def instrument(timers: Timers) -> None:
    """Time every callback call and the system-metrics functions (both sides alike)."""
    import importlib

    callbacks = importlib.import_module("mmfw.train.callbacks")
    rows = importlib.import_module("mmfw.train.rows")
    names = {"TensorBoard": "tensorboard", "MLflow": "mlflow", "Wandb": "wandb"}

    def fire(self: Any, event: str, *args: Any) -> None:
        for call in self.calls[event]:
            t = time.perf_counter()
            call(*args)
            owner = type(getattr(call, "__self__", None)).__name__
            timers.add((names.get(owner, owner), event), time.perf_counter() - t)

    callbacks.Callbacks.fire = fire
    for cls, method in ((rows.SystemStats, "take"), (rows.Throughput, "take_all")):
        original = getattr(cls, method)

        def timed(self: Any, *a: Any, _f: Any = original, _k: str = method) -> Any:
            t = time.perf_counter()
            out = _f(self, *a)
            timers.add(("system", _k), time.perf_counter() - t)
            return out

        setattr(cls, method, timed)


def clock_reads_s(n: int = 200_000) -> float:
    """Seconds of the three ``time.perf_counter()`` calls the loop adds per step."""
    t = time.perf_counter()
    for _ in range(n):
        time.perf_counter()
        time.perf_counter()
        time.perf_counter()
    return (time.perf_counter() - t) / n


def train_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["type"] == "train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.toml"))
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per side, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(OUT), help="write the result as JSON here")
    args = ap.parse_args()

    import mmfw

    timers = Timers()
    instrument(timers)
    sides: dict[str, dict[str, list[float]]] = {s: {"step": [], "data": [], "rounds": []}
                                                for s in ("off", "on")}
    steps_on = 0
    with tempfile.TemporaryDirectory() as tmp:
        for key, value in {"WANDB_SILENT": "true", "WANDB_CONFIG_DIR": f"{tmp}/wandb-config",
                           "WANDB_CACHE_DIR": f"{tmp}/wandb-cache",
                           "WANDB_DATA_DIR": f"{tmp}/wandb-data",
                           "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
            os.environ.setdefault(key, value)
        common = [*args.overrides, f"run.output_dir={tmp}", f"run.max_steps={args.steps}",
                  "run.max_minutes=0", "run.progress=false", 'eval.val_split=""',
                  "data.test_images=100", "diagnostics.map_points=0", "backend.name=cpu",
                  f"backend.threads={args.threads}"]
        trackers = [f"run.report_to={json.dumps(list(TRACKERS))}",
                    f"report.mlflow.tracking_uri=file:{tmp}/mlruns"]
        for i in range(args.rounds):
            for side in ("off", "on") if i % 2 == 0 else ("on", "off"):  # ABBA: drift cancels
                recipe = mmfw.load_recipe(args.recipe, [*common, f"run.name={side}-{i}",
                                                        *(trackers if side == "on" else [])])
                result = mmfw.train(recipe, console=lambda _: None)
                rows = train_rows(result.run_dir)[1:]  # the first row holds the warm-up
                sides[side]["step"] += [r["time/step_s"] for r in rows]
                sides[side]["data"] += [r["time/data_frac"] for r in rows]
                sides[side]["rounds"].append(statistics.mean(r["time/step_s"] for r in rows))
                steps_on += result.steps if side == "on" else 0
                print(f"round {i + 1} {side:3}: {1e3 * sides[side]['rounds'][-1]:.1f} ms/step",
                      flush=True)
        step_off = statistics.mean(sides["off"]["step"])
        step_on = statistics.mean(sides["on"]["step"])
        paired = [on / off - 1 for on, off in zip(sides["on"]["rounds"],
                                                   sides["off"]["rounds"], strict=True)]
        trackers_s = timers.sum(TRACKERS, PER_ROW_EVENTS) / steps_on
        system_s = (timers.sum(("system",), ("take", "take_all")) / (steps_on * 2)
                    + clock_reads_s())
        opened = timers.sum(TRACKERS, ("on_run_start",)) / args.rounds
        closed = timers.sum(TRACKERS, ("on_run_end",)) / args.rounds
    result = {
        **record.new_result(), "recipe": Path(args.recipe).name, "steps": args.steps,
        "rounds": args.rounds, "threads": args.threads,
        "log_every": recipe.run.log_every,
        "step_ms": {"off": 1e3 * step_off, "on": 1e3 * step_on},
        "data_frac": {s: statistics.mean(v["data"]) for s, v in sides.items()},
        "trackers_ms_per_step": 1e3 * trackers_s,
        "system_ms_per_step": 1e3 * system_s,
        "overhead_pct": 100 * (trackers_s + system_s) / step_off,
        "wall_pct": 100 * statistics.median(paired),
        "wall_pct_by_round": [100 * d for d in paired],
        "step_ms_by_round": {s: [1e3 * x for x in v["rounds"]] for s, v in sides.items()},
        "open_trackers_s": opened, "close_trackers_s": closed,
        "per_tracker_ms_per_step": {n: 1e3 * timers.sum((n,), PER_ROW_EVENTS) / steps_on
                                    for n in TRACKERS},
    }
    print(json.dumps(result, indent=2))
    record.write(args.out, result)


if __name__ == "__main__":
    main()
