"""`mmfw sweep`: grid parsing, validation before any run, runs, the comparison table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import tomli_w

from helpers import assert_user_error, cli, tiny_recipe
from mmfw.errors import RecipeError
from mmfw.tools.sweep import parse_grid, plan_sweep, split_values

pytestmark = pytest.mark.slow


def _recipe(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(tiny_recipe(tmp_path / "runs", **sections)), encoding="utf-8")
    return path


def test_split_values_keeps_lists_and_strings_whole() -> None:
    assert split_values("0.02, 0.05,0.07") == ["0.02", "0.05", "0.07"]
    assert split_values("[0.9,0.98],[0.9, 0.999]") == ["[0.9,0.98]", "[0.9, 0.999]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_parse_grid_errors() -> None:
    assert parse_grid(["loss.temperature=0.02,0.05", "optim.lr=1e-4"]) == [
        ("loss.temperature", ["0.02", "0.05"]), ("optim.lr", ["1e-4"])]
    for bad, fragment in ((["loss.temperature"], "section.key=value"),
                          (["loss.temperature=0.1,"], "non-empty"),
                          (["run.name=a,b"], "sets this key itself"),
                          (["optim.lr=1,2", "optim.lr=3"], "gridded twice"),
                          (["optim.lr=1,1"], "repeated"),
                          ([], "at least one --grid")):
        with pytest.raises(RecipeError, match=fragment):
            parse_grid(bad)


def test_every_setting_is_validated_before_anything_runs(tmp_path) -> None:
    recipe = _recipe(tmp_path)
    out = assert_user_error(cli("sweep", recipe, "--grid", "loss.temperature=0.05,-1",
                                "--grid", "optim.lr=1e-3"),
                            "sweep setting loss.temperature=-1, optim.lr=1e-3",
                            "nothing was run", "key 'loss.temperature'", "must be > 0")
    assert "Traceback" not in out
    assert not (tmp_path / "runs").exists()
    assert_user_error(cli("sweep", recipe, "--grid", "loss.temperatur=0.05"),
                      "Did you mean 'temperature'")
    assert_user_error(cli("sweep", recipe, "--grid", "optim.lr=1e-3,1e-4", "--set",
                          "optim.lr=1e-2"), "both in --set and in --grid")


def test_setting_names_and_run_dirs(tmp_path) -> None:
    recipe = _recipe(tmp_path)
    plan = plan_sweep(recipe, ["model.vision.width=32,64", "model.text.width=32",
                               "optim.betas=[0.9,0.98]"])
    assert [s.name for s in plan.settings] == [
        "vision.width=32-text.width=32-betas=_0.9_0.98",
        "vision.width=64-text.width=32-betas=_0.9_0.98"]
    assert plan.sweep_dir == tmp_path / "runs" / "tiny-sweep"
    assert plan.settings[1].run_dir == plan.sweep_dir / plan.settings[1].name
    assert plan.settings[1].recipe.model.vision.options.width == 64
    assert plan.settings[1].recipe.optim.betas == (0.9, 0.98)


def test_sweep_2x1_on_the_tiny_recipe(tmp_path) -> None:
    recipe = _recipe(tmp_path, run={"epochs": 1})
    result = cli("sweep", recipe, "--grid", "loss.temperature=0.05,0.2",
                 "--grid", "optim.lr=2e-3", "--set", "diagnostics.map_points=0",
                 "--set", "plots.enabled=true")
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    names = ["temperature=0.05-lr=2e-3", "temperature=0.2-lr=2e-3"]
    for name in names:
        run_dir = sweep_dir / name
        assert (run_dir / "metrics.json").is_file()
        assert (run_dir / "plots" / "training.png").is_file()
    with open(sweep_dir / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    assert [r["loss.temperature"] for r in rows] == ["0.05", "0.2"]
    assert all(r["status"] == "ok" and r["steps"] == "20" for r in rows)
    for r, name in zip(rows, names):
        metrics = json.loads((sweep_dir / name / "metrics.json").read_text())
        assert float(r["rsum"]) == pytest.approx(metrics["rsum"])
    # ranked on validation rsum, never on the test split
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["ranked_by"] == "val_rsum"
    best = max(rows, key=lambda r: float(r["val_rsum"]))
    assert summary["best"]["run"] == best["run"]
    assert f"best setting: loss.temperature={best['loss.temperature']}, optim.lr=2e-3" \
        in result.output
    md = (sweep_dir / "sweep.md").read_text()
    assert f"| {best['run']} **(best)** |" in md
    assert md.count("\n| temperature=") == 2
    assert (sweep_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    # the same sweep again: refused, then --resume keeps the finished settings
    assert_user_error(cli("sweep", recipe, "--grid", "loss.temperature=0.05,0.2", "--grid",
                          "optim.lr=2e-3", "--set", "diagnostics.map_points=0",
                          "--set", "plots.enabled=true"),
                      "already exist", "--resume", "--overwrite")
    again = cli("sweep", recipe, "--grid", "loss.temperature=0.05,0.2", "--grid",
                "optim.lr=2e-3", "--set", "diagnostics.map_points=0",
                "--set", "plots.enabled=true", "--resume")
    assert again.exit_code == 0, again.output
    assert "2 settings (2 already done)" in again.output
    assert "training:" not in again.output


def test_sweep_in_parallel_processes(tmp_path) -> None:
    recipe = _recipe(tmp_path, run={"max_steps": 2}, eval={"val_split": ""},
                     diagnostics={"map_points": 0})
    result = cli("sweep", recipe, "--grid", "loss.name=infonce,siglip", "--jobs", "2")
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    for name in ("name=infonce", "name=siglip"):
        assert (sweep_dir / name / "metrics.json").is_file()
        log = (sweep_dir / "logs" / f"{name}.log").read_text()
        assert "run directory:" in log and "Traceback" not in log
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["ranked_by"] == "rsum"  # no validation split: the final rsum decides
    assert {r["status"] for r in summary["runs"]} == {"ok"}
