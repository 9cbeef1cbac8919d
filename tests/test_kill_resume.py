"""A run killed with SIGKILL mid-epoch and resumed with --resume ends exactly like an unbroken
run: same metrics.json, same logged losses (CPU, deterministic)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from helpers import SUBPROCESS_ENV, cli, tiny_recipe
from mmfw.run import checkpoint as ckpt

pytestmark = pytest.mark.slow

#: three epochs of 20 steps; a checkpoint every 5 steps; the second stage trains with a memory
#: queue (state in the checkpoint) and the schedule restarts its warm-up at the stage switch
RECIPE = tiny_recipe("runs", run={"epochs": 3, "checkpoint_every": 5, "log_every": 5,
                                  "keep_last": 3},
                     optim={"grad_clip": 1.0, "modality_balance": 0.5})
RECIPE["schedule"] = {
    "name": "three-stage", "warmup_steps": 3,
    "stages": [{"name": "first", "epochs": 1, "loss": "infonce"},
               {"name": "queue", "loss": {"name": "memory_queue", "size": 48},
                "lr_mult": {"vision": 0.5}}],
}


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in rows if r["type"] == "train"}


def _evals(run_dir: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [(r["step"], r["split"], r["rsum"]) for r in rows if r["type"] == "eval"]


def test_sigkill_mid_epoch_then_resume_equals_an_unbroken_run(tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    data = {**RECIPE, "run": {**RECIPE["run"], "output_dir": str(tmp_path / "runs")}}
    recipe.write_text(tomli_w.dumps(data), encoding="utf-8")

    unbroken = cli("run", recipe, "--set", "run.name=unbroken")
    assert unbroken.exit_code == 0, unbroken.output
    want = tmp_path / "runs" / "unbroken"

    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfw", "run", "r.toml", "--set", "run.name=killed"],
        cwd=tmp_path, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            steps = ckpt.list_steps(run_dir / "checkpoints")
            if steps and steps[-1] >= 25:  # mid epoch 2, in the memory-queue stage
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + (
            proc.stderr.read().decode() if proc.stderr else "")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()
    assert not (run_dir / "metrics.json").exists()
    at = ckpt.latest(run_dir / "checkpoints")
    assert at is not None and at < 60
    assert at % 20, "a mid-epoch checkpoint"

    resumed = cli("run", recipe, "--set", "run.name=killed", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed {run_dir} at step {at}" in resumed.output
    assert json.loads((run_dir / "metrics.json").read_text()) == \
        json.loads((want / "metrics.json").read_text())
    assert _losses(run_dir) == _losses(want)
    assert _evals(run_dir) == _evals(want)
