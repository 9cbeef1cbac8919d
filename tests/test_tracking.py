"""Experiment tracking (``run.report_to``), system metrics in the train rows, in-run profiling.

The trackers are exercised with the real libraries, offline: TensorBoard's event files read
back with tensorboard's ``EventAccumulator``, MLflow with a local ``file:`` store read back
through ``MlflowClient``, W&B in offline mode with its run folder's transaction log read with
wandb's own protobuf records. A run logging to all three is SIGKILLed and resumed: each tracker
continues the same run.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import mmfw
from helpers import SUBPROCESS_ENV, assert_user_error, cli, tiny_recipe
from mmfw.spi import EVENTS, RecipeError

TRACKERS = ["tensorboard", "mlflow", "wandb"]
LIBRARIES = ("tensorboard", "torch.utils.tensorboard", "mlflow", "wandb")


def tracker_env(tmp_path: Path) -> dict[str, str]:
    """Quiet, offline, and nothing written under the home directory."""
    return {"WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}


def tracked(tmp_path: Path, name: str = "tracked") -> dict:
    """8 steps, a row every 2, a checkpoint every 4, diagnostics every 3, all trackers."""
    return tiny_recipe(
        tmp_path / "runs", name,
        run={"max_steps": 8, "log_every": 2, "checkpoint_every": 4, "keep_last": 3,
             "report_to": TRACKERS},
        eval={"val_split": ""}, diagnostics={"every": 3, "map_points": 0},
        plots={"enabled": True},  # the trackers get the plots too
        report={"mlflow": {"tracking_uri": f"file:{tmp_path / 'mlruns'}"}})


def rows(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["type"] == kind]


# ---- the recipe ----------------------------------------------------------------------------


def test_report_to_lists_trackers_configured_by_their_report_tables(write_recipe, tmp_path):
    recipe = mmfw.load_recipe(write_recipe(tracked(tmp_path)))
    assert recipe.run.report_to == tuple(TRACKERS)
    assert {n: recipe.callbacks[n].section for n in TRACKERS} == {
        n: f"report.{n}" for n in TRACKERS}
    assert recipe.callback_options("wandb").mode == "offline"
    assert recipe.callback_options("mlflow").experiment == "mmfw"
    table = recipe.to_dict()["report"]  # the resolved recipe: every option of every tracker
    assert table == {"tensorboard": {"log_dir": ""}, "wandb": {
        "project": "mmfw", "entity": "", "mode": "offline"}, "mlflow": {
        "tracking_uri": f"file:{tmp_path / 'mlruns'}", "experiment": "mmfw"}}
    again = mmfw.load_recipe(write_recipe(recipe.to_toml(), "resolved.toml"))
    assert again.digest() == recipe.digest()
    plain = mmfw.load_recipe(write_recipe(tiny_recipe(tmp_path)))
    assert plain.run.report_to == () and not set(TRACKERS) & set(plain.callbacks)
    assert plain.run.profile.steps == 0


def test_trackers_and_profiling_may_be_added_on_resume_but_nothing_else(write_recipe, tmp_path):
    from mmfw.run.resume import recipe_changes

    plain = mmfw.load_recipe(write_recipe(tiny_recipe(tmp_path)))
    observed = mmfw.load_recipe(write_recipe(tiny_recipe(
        tmp_path, run={"max_steps": 8, "report_to": TRACKERS, "profile": {"start": 2}},
        report={"mlflow": {"tracking_uri": f"file:{tmp_path / 'mlruns'}"}}), "b.toml"))
    trained = mmfw.load_recipe(write_recipe(tiny_recipe(
        tmp_path, run={"report_to": ["tensorboard"]}, loss={"temperature": 0.1}), "c.toml"))
    assert recipe_changes(plain, observed) == []
    assert recipe_changes(plain, trained) == ["loss.temperature: 0.07 -> 0.1"]


@pytest.mark.parametrize(("change", "key", "fragment"), [
    ({"run": {"report_to": ["tensorbord"]}}, "run.report_to[0]", "Did you mean 'tensorboard'"),
    ({"run": {"report_to": ["console"]}}, "run.report_to[0]", "unknown tracker"),
    ({"run": {"report_to": ["wandb"]}}, "report.mlflow", "List it in run.report_to"),
    ({"report": {"wandb": {"mode": "sometimes"}}}, "report.wandb.mode", "offline"),
    ({"report": {"tensorboard": {"logdir": "x"}}}, "report.tensorboard.logdir", "log_dir"),
    ({"run": {"profile": {"steps": -1}}}, "run.profile.steps", ">= 0"),
])
def test_recipe_mistakes_name_the_key(write_recipe, tmp_path, change, key, fragment):
    data = tracked(tmp_path)
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    with pytest.raises(RecipeError) as err:
        mmfw.load_recipe(write_recipe(data))
    assert err.value.key == key, str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize("library", TRACKERS)
def test_a_tracker_whose_library_is_missing_is_a_one_line_error_naming_the_extra(
        write_recipe, tmp_path, monkeypatch, library):
    monkeypatch.setitem(sys.modules, library, None)  # what an uninstalled package looks like
    path = write_recipe(tracked(tmp_path))
    with pytest.raises(RecipeError) as err:
        mmfw.load_recipe(path)
    assert err.value.key == f"run.report_to[{TRACKERS.index(library)}]"
    assert f'pip install "mmfw[{library}]"' in str(err.value)
    assert "\n" not in str(err.value)
    out = assert_user_error(cli("check", path), f"mmfw[{library}]", "run.report_to")
    assert len([line for line in out.splitlines() if line.strip()]) == 1, out


def test_without_trackers_or_profiling_those_callbacks_implement_no_event(write_recipe,
                                                                          tmp_path):
    from mmfw.train.callbacks import Callbacks

    callbacks = Callbacks.build(mmfw.load_recipe(write_recipe(tiny_recipe(tmp_path))))
    assert not set(TRACKERS) & set(callbacks.items)
    profiler = callbacks.items["profiler"]
    assert not any(getattr(call, "__self__", None) is profiler
                   for event in EVENTS for call in callbacks.calls[event])


# ---- the console ---------------------------------------------------------------------------


class Say:
    """The part of a run context the console reads."""

    def __init__(self, recipe: mmfw.Recipe) -> None:
        self.recipe, self.total_steps, self.lines = recipe, 100, []
        self.is_main = True

    def say(self, line: str) -> None:
        self.lines.append(line)


def test_console_shows_the_data_wait_and_once_the_keys_that_help(write_recipe, tmp_path):
    recipe = mmfw.load_recipe(write_recipe(tiny_recipe(tmp_path)))
    console = mmfw.create("callback", "console", options=recipe.run)
    ctx = Say(recipe)
    row = {"type": "train", "step": 20, "loss": 1.0, "lr": 1e-3, "samples_per_s": 100.0,
           "sim/gap": 0.1, "time/data_frac": 0.05}
    console.on_log_row(ctx, row)
    assert ctx.lines[-1].endswith("sim gap 0.100")  # below the threshold: the usual line
    for step in (40, 60, 80):
        console.on_log_row(ctx, {**row, "step": step, "time/data_frac": 0.5})
    assert [line for line in ctx.lines if line.startswith("step ")][1:] == [
        f"step {s}/100 loss 1.0000 lr 1.00e-03 100 samples/s sim gap 0.100 data wait 50%"
        for s in (40, 60, 80)]
    hints = [line for line in ctx.lines if line.startswith("note:")]
    assert len(hints) == 1
    assert "data.num_workers (now 0)" in hints[0] and "data.cache" in hints[0]


# ---- system metrics, profiling, and nothing imported without a tracker -----------------------

PLAIN_RUN = r"""
import json, sys, traceback

WATCH = ("tensorboard", "torch.utils.tensorboard", "mlflow", "wandb")
importers = {}  # tracker module -> the file whose import statement loaded it first


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in WATCH and name not in importers:
            files = [f.filename for f in traceback.extract_stack()[:-1]
                     if not f.filename.startswith("<") and "importlib" not in f.filename]
            importers[name] = files[-1] if files else "?"
        return None


sys.meta_path.insert(0, Watch())
import mmfw
mmfw.train(mmfw.load_recipe(sys.argv[1]), console=lambda s: None)
print(json.dumps(importers))
"""


@pytest.mark.slow
def test_a_run_without_trackers_imports_none_and_profiles_its_steps(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe(
        tmp_path / "runs", "plain", run={"max_steps": 4, "log_every": 2,
                                         "profile": {"start": 2, "steps": 2}},
        eval={"val_split": ""}, diagnostics={"every": 0, "map_points": 0})))
    proc = subprocess.run([sys.executable, "-c", PLAIN_RUN, str(recipe)], cwd=tmp_path,
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    importers = json.loads(proc.stdout.splitlines()[-1])
    root = Path(__file__).resolve().parents[1]
    assert not [f for f in importers.values()  # not by mmfw
                if Path(f).resolve().is_relative_to(root)], importers
    # (timm imports wandb when it is installed: timm/utils/summary.py, `try: import wandb`)
    assert "mlflow" not in importers and "torch.utils.tensorboard" not in importers, importers
    run_dir = tmp_path / "runs" / "plain"

    train = rows(run_dir)
    assert [r["step"] for r in train] == [2, 4]
    for r in train:  # where the steps' time went, and the process's resources
        assert r["time/data_s"] >= 0 and r["time/compute_s"] > 0
        assert r["time/data_s"] + r["time/compute_s"] <= r["time/step_s"] * 1.001
        assert 0 <= r["time/data_frac"] <= 1
        assert r["sys/rss_mb"] > 50 and r["sys/threads"] == 1 and r["sys/cpu_util"] >= 0

    profile = run_dir / "profile"
    trace = json.loads((profile / "steps-2-3.pt.trace.json").read_text())
    spans = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("mmfw")}
    assert spans == {"mmfw step 2", "mmfw step 3"}
    top = (profile / "top_ops.txt").read_text()
    assert "Self CPU" in top and "aten::" in top


# ---- the trackers, killed and resumed --------------------------------------------------------

KILLED_RUN = r"""
import os, signal, sys
import mmfw
from mmfw.run import rundir

append = rundir.append_jsonl
def append_jsonl(path, rows):
    rows = list(rows)
    if rows[0].get("type") == "train" and rows[0].get("step") == 8:
        os.kill(os.getpid(), signal.SIGKILL)  # steps 5-7 logged to the trackers, not saved
    append(path, rows)
rundir.append_jsonl = append_jsonl
mmfw.train(mmfw.load_recipe(sys.argv[1]), console=lambda s: None)
"""


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B transaction log (``run-<id>.wandb``): LevelDB-log framing (32 KiB
    blocks, 7-byte chunk headers) around wandb's own protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, block, out, pending, pos = path.read_bytes(), 32768, [], b"", 7  # 7: file header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_history(run_folder: Path) -> list[dict[str, Any]]:
    """The history rows of an offline run folder (an image: ``{"_type": "image-file", ...}``)."""
    out = []
    for record in wandb_records(next(run_folder.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            *head, last = list(item.nested_key) or [item.key]
            node = row
            for key in head:
                node = node.setdefault(key, {})
            node[last] = json.loads(item.value_json)
        out.append(row)
    return out


@pytest.mark.slow
def test_trackers_get_every_row_and_a_killed_run_resumes_the_same_tracker_runs(
        tmp_path, write_recipe, monkeypatch):
    env = tracker_env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    recipe = write_recipe(tracked(tmp_path))
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(recipe)], cwd=tmp_path,
                            env={**SUBPROCESS_ENV, **env}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    run_dir = tmp_path / "runs" / "tracked"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.json")) == [
        "step-00000004.json"]

    result = mmfw.train(mmfw.load_recipe(recipe), resume=True, console=lambda s: None)
    assert result.steps == 8
    train = {r["step"]: r for r in rows(run_dir)}
    assert sorted(train) == [2, 4, 6, 8]
    diagnostics = {r["step"]: r for r in rows(run_dir, "diagnostics")}
    assert sorted(diagnostics) == [3, 6]
    final = json.loads((run_dir / "metrics.json").read_text())
    state = json.loads((run_dir / "checkpoints" / "step-00000008.json").read_text())
    ids = {name: state["callbacks"][name]["run_id"] for name in TRACKERS}
    before = json.loads((run_dir / "checkpoints" / "step-00000004.json").read_text())
    assert ids == {name: before["callbacks"][name]["run_id"] for name in TRACKERS}

    # TensorBoard: one folder, two event files; the killed run's steps 5-7 purged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert ids["tensorboard"] == str(run_dir / "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0,
                                                                         "images": 0})
    events.Reload()
    tb = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()["scalars"]}
    for key in ("loss", "lr", "sim/gap", "time/data_s", "time/step_s", "sys/rss_mb"):
        assert [s for s, _ in tb[f"train/{key}"]] == [2, 4, 6, 8], key
        assert [v for _, v in tb[f"train/{key}"]] == pytest.approx(
            [train[s][key] for s in (2, 4, 6, 8)], rel=1e-6), key
    assert [s for s, _ in tb["diagnostics/batch/image/eff_rank"]] == [3, 6]
    assert tb["eval/test/rsum"] == [(8, pytest.approx(final["rsum"], rel=1e-6))]
    assert set(events.Tags()["images"]) == {"plots/training", "plots/diagnostics"}
    assert events.Tags()["tensors"] == ["recipe/text_summary"]
    assert set(events.PluginTagToContent("hparams")) == {  # the HPARAMS tab
        "_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}

    # MLflow: one run in the experiment, finished, the same id; params, metrics, artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    experiment = client.get_experiment_by_name("mmfw")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    assert run.info.run_name == "tracked" and run.data.tags["mmfw.resumed_at_step"] == "4"
    assert run.data.params["model.embed_dim"] == "32"
    assert run.data.params["run.report_to"] == str(TRACKERS)
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert {(m.step, m.value) for m in loss} == {(s, r["loss"]) for s, r in train.items()}
    assert {m.step for m in client.get_metric_history(run.info.run_id,
                                                       "train/time.data_s")} == set(train)
    assert run.data.metrics["eval/test/i2t_R_at_1"] == final["i2t_R@1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.toml", "metrics.json", "plots"} <= artifacts
    assert "plots/training.png" in {a.path for a in client.list_artifacts(run.info.run_id,
                                                                          "plots")}

    # W&B offline: two offline-run folders with the same id; the killed one holds what W&B's
    # service had written when it died, the resumed one every row (those up to the
    # checkpoint logged again from metrics.jsonl)
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{ids['wandb']}") for f in folders)
    history = wandb_history(folders[1])
    logged = {h["_step"]: h for h in history if "train/loss" in h}
    assert sorted(logged) == [2, 4, 6, 8]
    assert all(logged[s]["train/loss"] == train[s]["loss"] for s in logged)
    assert any(h.get("eval/test/rsum") == final["rsum"] for h in history)
    images = [h["plots/training"] for h in history if "plots/training" in h]
    assert len(images) == 1 and images[0]["_type"] == "image-file"
    assert (folders[1] / "files" / images[0]["path"]).is_file()
    assert {"recipe.toml", "metrics.json"} <= {p.name for p in (folders[1] / "files").iterdir()}
    assert {h["_step"] for h in wandb_history(folders[0])} <= {2, 4, 6}  # killed before 8
    records = wandb_records(next(folders[1].glob("run-*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == ids["wandb"] and run.display_name == "tracked"
    assert {u.key for u in run.config.update} >= {"run", "model", "loss", "report"}
