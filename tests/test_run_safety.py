"""Nothing lost: the run directory's name, marker and lock; non-finite steps; resume after
damage (torn log, damaged checkpoint, SIGTERM); what a checkpoint must carry."""

from __future__ import annotations

import json
import math
import os
import signal
import types

import pytest
import torch
from safetensors.torch import load_file

import mmfw
from helpers import tiny_recipe
from mmfw.run.checkpoint import CheckpointError
from mmfw.run.rundir import RunDir, RunDirError
from mmfw.spi import Callback, LossOutput, RecipeError, ResumeError, Temperature, hookimpl
from mmfw.train.loop import Preempted, Trainer
from mmfw.train.optimisation import NonFiniteError

QUIET = {"console": lambda _: None}


def _train(data: dict, **kw):
    return mmfw.train(mmfw.load_recipe(data), **QUIET, **kw)


def _rows(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


# run.name ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "..", ".", "../x", "a/b", "~x"])
def test_run_name_must_be_one_plain_component(tmp_path, name) -> None:
    out = tmp_path / "runs"
    (out / "sibling").mkdir(parents=True)
    (out / "sibling" / "keep.txt").write_text("mine")
    with pytest.raises(RecipeError) as err:
        _train(tiny_recipe(out, name=name, run={"max_steps": 1}), overwrite=True)
    assert err.value.key == "run.name"
    assert (out / "sibling" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_overwrite_never_deletes_a_directory_mmfw_did_not_make(tmp_path) -> None:
    target = tmp_path / "runs" / "mine"
    target.mkdir(parents=True)
    (target / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match="not made by mmfw"):
        _train(tiny_recipe(tmp_path / "runs", name="mine", run={"max_steps": 1}),
               overwrite=True)
    assert (target / "thesis.tex").read_text() == "years of work"


def test_output_dir_tilde_is_expanded(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    d = RunDir("~/runs", "x")
    assert d.path == tmp_path / "runs" / "x"


# the lock ----------------------------------------------------------------------------------

def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path) -> None:
    data = tiny_recipe(tmp_path / "runs", name="live", run={"max_steps": 2})
    _train(data)
    before = (tmp_path / "runs" / "live" / "metrics.jsonl").read_text()
    holder = RunDir(tmp_path / "runs", "live")
    holder.lock()  # a live run holds it
    try:
        for kw in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()} on host"):
                _train(data, **kw)
        assert (tmp_path / "runs" / "live" / "metrics.jsonl").read_text() == before
    finally:
        holder.unlock()
    _train(data, overwrite=True)  # free again: the lock went with its holder


def test_a_stale_lock_file_is_taken_over(tmp_path) -> None:
    d = tmp_path / "runs" / "stale"
    d.mkdir(parents=True)
    (d / ".lock").write_text("pid 999999 on host gone (since long ago)\n")
    result = _train(tiny_recipe(tmp_path / "runs", name="stale", run={"max_steps": 2}))
    assert result.steps == 2


# non-finite steps --------------------------------------------------------------------------

class _NaNAt(torch.nn.Module):
    """infonce that returns NaN from step ``at`` on (a diverging run, deterministically)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.inner, self.at = mmfw.create("loss", "infonce"), at

    def forward(self, image, text, **kw) -> LossOutput:
        out = self.inner(image, text, **kw)
        if kw.get("step", 0) + 1 >= self.at:
            return LossOutput(out.loss * float("nan"), {"nce": out.loss * float("nan")})
        return out


@pytest.fixture
def nan_loss():
    plugin = types.SimpleNamespace(mmfw_losses=hookimpl(lambda: {"nan-at-3": lambda o: _NaNAt(3)}))
    mmfw.register(plugin, name="nan-test")
    yield "nan-at-3"
    from mmfw.registry import unregister

    unregister(plugin)


def test_non_finite_loss_stops_before_the_update_and_keeps_good_checkpoints(tmp_path,
                                                                              nan_loss) -> None:
    data = tiny_recipe(tmp_path / "runs", name="nan", loss={"name": nan_loss},
                       run={"checkpoint_every": 2, "max_steps": 10})
    with pytest.raises(NonFiniteError) as err:
        _train(data)
    text = str(err.value)
    assert "step 3" in text and "optim.lr" in text and "on_nonfinite" in text
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.json")) == ["step-00000002.json"]
    weights = load_file(str(ckpts / "step-00000002.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_steps_are_skipped_and_counted_by_option(tmp_path, nan_loss) -> None:
    data = tiny_recipe(tmp_path / "runs", name="skip", loss={"name": nan_loss},
                       optim={"on_nonfinite": "skip"}, run={"max_steps": 6, "log_every": 1},
                       eval={"val_split": ""})
    result = _train(data)
    train = [r for r in _rows(result.run_dir) if r["type"] == "train"]
    assert train[-1]["optim/nonfinite_steps"] == 4  # steps 3..6
    run = mmfw.load_run(result.run_dir)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_temperature_at_its_limit_still_gets_a_gradient() -> None:
    t = Temperature(0.001, learn=True, max_scale=100.0)  # 1/tau = 1000 starts at the clamp
    assert t.scale().item() == pytest.approx(100.0)
    t.scale().backward()
    assert t.log_scale.grad is not None and t.log_scale.grad.item() != 0.0
    with torch.no_grad():
        t.log_scale += 1.0  # a step past the limit ...
    t.clamp_()  # ... is brought back after it, as CLIP does
    assert t.scale().item() == pytest.approx(100.0)


# resume after damage -----------------------------------------------------------------------

def test_resume_after_a_torn_log_line_and_a_damaged_checkpoint(tmp_path) -> None:
    data = tiny_recipe(tmp_path / "runs", name="torn", run={"max_steps": 10,
                                                              "checkpoint_every": 3})
    _train(data)
    d = tmp_path / "runs" / "torn"
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 11, "lo')  # killed mid-append
    newest = d / "checkpoints" / "step-00000010.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"step-00000010\.safetensors"):
        mmfw.load_run(d)
    said: list[str] = []
    data["run"]["max_steps"] = 12
    result = mmfw.train(mmfw.load_recipe(data), resume=True, console=said.append)
    assert any("torn last line" in s for s in said)
    assert any("step-00000010 is damaged" in s and "step-00000009" in s for s in said)
    assert result.steps == 12
    steps = [r["step"] for r in _rows(d) if r["type"] == "train"]
    assert steps == sorted(set(steps))


class _Kill(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, ctx, step) -> None:
        if ctx.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption, at a chosen step


def test_sigterm_checkpoints_and_resume_continues(tmp_path) -> None:
    data = tiny_recipe(tmp_path / "runs", name="term", run={"max_steps": 8},
                       eval={"val_split": ""})
    trainer = Trainer(mmfw.load_recipe(data), **QUIET)
    trainer.callbacks.add("kill", _Kill(3))
    try:
        with pytest.raises(Preempted, match="--resume"):
            trainer.fit()
    finally:
        trainer.release()
    assert RunDir(tmp_path / "runs", "term").checkpoint_steps() == [3]
    assert _train(data, resume=True).steps == 8


def test_checkpoint_carries_time_spent_world_size_and_detector_streaks(tmp_path) -> None:
    data = tiny_recipe(tmp_path / "runs", name="state", run={"max_steps": 4},
                       diagnostics={"every": 2, "grace_steps": 0, "gap_threshold": 2.0,
                                    "patience": 50, "probe_size": 8})
    _train(data)
    state = json.loads((tmp_path / "runs" / "state" / "checkpoints" /
                        "step-00000004.json").read_text())
    assert state["world_size"] == 1 and state["seconds"] > 0
    assert state["callbacks"]["diagnostics"]["streak"]["no-gap"] == 2  # gap <= 2.0 always
    data["run"]["max_steps"] = 6
    trainer = Trainer(mmfw.load_recipe(data), resume=True, **QUIET)
    try:
        assert trainer.progress.seconds == pytest.approx(state["seconds"])
        assert trainer.callbacks.items["diagnostics"].detector.streak["no-gap"] == 2
    finally:
        trainer.release()
    state["world_size"] = 2
    path = tmp_path / "runs" / "state" / "checkpoints" / "step-00000004.json"
    path.write_text(json.dumps(state))
    with pytest.raises(ResumeError, match="2 process"):
        Trainer(mmfw.load_recipe(data), resume=True, **QUIET)
    assert math.isfinite(state["seconds"])


DISK_FULL = r'''
import resource, signal, sys
import mmfw
data = __import__("json").loads(sys.argv[1])
recipe = mmfw.load_recipe(data)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # a disk that fills up
try:
    mmfw.train(recipe, console=lambda s: None)
except mmfw.MmfwError as err:
    print(f"error: {err}")
    sys.exit(2)
'''


def test_a_full_disk_is_one_clear_error_naming_the_run_dir(tmp_path) -> None:
    """A real write limit (RLIMIT_FSIZE, the OS refusing bytes as a full disk does)."""
    import subprocess
    import sys

    from helpers import SUBPROCESS_ENV

    data = tiny_recipe(tmp_path / "runs", name="full", run={"max_steps": 4,
                                                            "checkpoint_every": 2},
                       eval={"val_split": ""}, diagnostics={"every": 0})
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, json.dumps(data)], env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "cannot write checkpoint step 2" in proc.stdout
    assert str(tmp_path / "runs" / "full") in proc.stdout and "disk full" in proc.stdout
