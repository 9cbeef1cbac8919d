"""Fault injection: SIGKILL at a chosen point of a run (not at a time), then ``--resume``; the
resumed run must end with exactly the unbroken run's metrics and logs.

Each point is reached deterministically: the killed process wraps the call that lands a file
(``os.replace``, which every atomic write ends with), checkpoint pruning or the log append, and
kills itself there. A
representative subset runs by default; ``MMFW_FAULT_SWEEP=1 python -m pytest
tests/test_fault_injection.py`` runs every point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from helpers import SUBPROCESS_ENV, cli, tiny_recipe

pytestmark = pytest.mark.slow

#: two epochs of 20 steps, a checkpoint every 5 (two kept: pruning happens), every step
#: logged, val each epoch (the best marker)
RECIPE = tiny_recipe("runs", run={"epochs": 2, "checkpoint_every": 5, "log_every": 1,
                                  "keep_last": 2},
                     diagnostics={"every": 10, "probe_size": 8, "map_points": 0})

#: where the process dies: point -> what the wrapped writer does before the kill
POINTS = {
    "weights": "after step 15's weights file, before its optimizer file and .json marker",
    "train-state": "after step 15's optimizer/RNG file, before its .json marker",
    "marker": "after step 15's .json marker (a complete checkpoint), before pruning",
    "prune": "while pruning step 5: its .json removed, its weights not yet",
    "best": "after the best marker of epoch 1",
    "log": "mid-append of step 17's train row (a torn line)",
}
DEFAULT = ("marker", "prune", "log")

KILLER = r'''
import json, os, signal, sys
from pathlib import Path
import mmfw
from mmfw.run import checkpoint as ckpt, rundir

point, recipe, name = sys.argv[1], sys.argv[2], sys.argv[3]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
files = {"weights": "step-00000015.safetensors", "train-state": "step-00000015.train.safetensors",
         "marker": "step-00000015.json", "best": "best"}
if point in files:  # every file mmfw writes lands by os.replace: die right after it
    replace = os.replace
    def replaced(src, dst, **kw):
        replace(src, dst, **kw)
        if Path(dst).name == files[point]:
            die()
    os.replace = replaced
elif point == "prune":
    def remove(directory, step):
        Path(directory, f"step-{step:08d}.json").unlink()
        die()
    ckpt.remove = remove
elif point == "log":
    append = rundir.append_jsonl
    def append_jsonl(path, rows):
        rows = list(rows)
        if rows[0].get("type") == "train" and rows[0].get("step") == 17:
            with open(path, "a") as f:
                f.write(json.dumps(rows[0])[:25])
            die()
        append(path, rows)
    rundir.append_jsonl = append_jsonl
mmfw.train(mmfw.load_recipe(recipe, [f"run.name={name}"]), console=lambda s: None)
'''


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _comparable(run_dir: Path) -> dict:
    rows = _rows(run_dir)
    return {
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "train": [(r["step"], r["loss"], r["sim/gap"]) for r in rows if r["type"] == "train"],
        "eval": [(r["step"], r["split"], r["rsum"], bool(r.get("final"))) for r in rows
                 if r["type"] == "eval"],
        "diagnostics": [(r["step"], r["probe/sim/gap"]) for r in rows
                        if r["type"] == "diagnostics"],
    }


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("faults")
    recipe = root / "r.toml"
    recipe.write_text(tomli_w.dumps({**RECIPE, "run": {**RECIPE["run"],
                                                       "output_dir": str(root / "runs")}}))
    result = cli("run", recipe, "--set", "run.name=unbroken")
    assert result.exit_code == 0, result.output
    return recipe, _comparable(root / "runs" / "unbroken")


def _selected() -> list[str]:
    return list(POINTS) if os.environ.get("MMFW_FAULT_SWEEP") == "1" else list(DEFAULT)


@pytest.mark.parametrize("point", _selected())
def test_kill_at_a_chosen_point_then_resume_equals_the_unbroken_run(unbroken, point) -> None:
    recipe, want = unbroken
    name = f"killed-{point}"
    run_dir = recipe.parent / "runs" / name
    proc = subprocess.run([sys.executable, "-c", KILLER, point, str(recipe), name],
                          cwd=recipe.parent, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, f"{POINTS[point]}: {proc.stderr[-2000:]}"
    assert not (run_dir / "metrics.json").exists()
    resumed = cli("run", recipe, "--set", f"run.name={name}", "--resume")
    assert resumed.exit_code == 0, f"{POINTS[point]}: {resumed.output}"
    assert _comparable(run_dir) == want, POINTS[point]
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir()
                 if p.name.startswith(".")]
    assert not leftovers, f"temp files left after resume: {leftovers}"
