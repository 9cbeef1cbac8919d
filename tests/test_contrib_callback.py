"""The third-party callback in contrib/: ``csv-log`` (contrib/mmfw-callback-example).

As in test_contrib.py, the distribution is pip-installed into a private folder that only a
``python -m mmfw`` subprocess sees (on its PYTHONPATH), so the shared environment never holds
it; the in-process tests import its sources by file and register the plugin module with
``mmfw.register`` for the duration of this module, as an entry point would.
"""

from __future__ import annotations

import csv
import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmfw
from helpers import deep_merge, load_package, mmfw_cli, tiny_recipe
from mmfw.registry import get_factory, plugin_manager, unregister
from mmfw.run import checkpoint as ckpt
from mmfw.spi import RecipeError

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib"
DIST = "mmfw-callback-example"
PKG = CONTRIB / DIST / "src" / "mmfw_csv_log"

#: small runs: 2 epochs of 20 steps, a train row every 5 steps, no embedding plots
FAST = {"run": {"log_every": 5}, "diagnostics": {"map_points": 0}}
#: what switches the callback on and configures it
CSV_LOG = {"run": {"callbacks": ["csv-log"]}, "callbacks": {"csv-log": {"file": "m.csv"}}}


def small(output_dir: Path | str, name: str = "tiny", **sections) -> dict:
    return tiny_recipe(output_dir, name, **deep_merge(FAST, sections))


def using_csv_log(output_dir: Path | str, name: str = "tiny", **sections) -> dict:
    return small(output_dir, name, **deep_merge(CSV_LOG, sections))


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_train_rows_match(run_dir: Path, file: str = "m.csv") -> list[int]:
    """The CSV's rows are metrics.jsonl's train rows: same steps, same values."""
    rows = read_csv(run_dir / file)
    want = [r for r in jsonl(run_dir) if r["type"] == "train"]
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "samples_per_s", "sim/gap"]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in want]
    for got, row in zip(rows, want, strict=True):
        assert int(got["epoch"]) == row["epoch"]
        for key in ("loss", "lr", "samples_per_s", "sim/gap"):
            assert float(got[key]) == row[key], (row["step"], key)  # exact: repr round trip
    return [int(r["step"]) for r in rows]


# ---- installed like a user would ---------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The distribution, pip-installed (built from a copy: the source tree stays clean)."""
    pytest.importorskip("setuptools", reason="building the contrib distribution needs it")
    root = tmp_path_factory.mktemp("contrib-callback")
    source = root / "src" / DIST
    shutil.copytree(CONTRIB / DIST, source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--no-cache-dir", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def test_shared_environment_does_not_have_it():
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution(DIST)


def test_installed_distribution_declares_its_entry_point(site):
    eps = {d.metadata["Name"]: {(e.group, e.name, e.value) for e in d.entry_points}
           for d in importlib.metadata.distributions(path=[str(site)])}
    assert eps == {DIST: {("mmfw", "csv-log", "mmfw_csv_log.plugin")}}


def test_a_run_listing_it_writes_the_csv_files(site, tmp_path, write_recipe):
    recipe = write_recipe(using_csv_log(tmp_path / "runs", "installed"))
    proc = mmfw_cli(site, "run", recipe, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "installed"
    assert assert_train_rows_match(run_dir) == [5 * k for k in range(1, 9)]
    assert not (run_dir / "metrics.csv").exists()  # file = "m.csv" was used
    evals = read_csv(run_dir / "eval.csv")
    want = [r for r in jsonl(run_dir) if r["type"] == "eval"]
    assert [(int(e["step"]), e["split"], e["final"]) for e in evals] == [
        (r["step"], r["split"], "1" if r.get("final") else "0") for r in want]
    assert [float(e["rsum"]) for e in evals] == [r["rsum"] for r in want]
    assert list(evals[0])[:4] == ["step", "epoch", "split", "final"]


# ---- in-process: the plugin module registered from its sources --------------------------------

@pytest.fixture(scope="module")
def csv_log():
    """The package, imported from contrib/ and registered for this module's tests."""
    package = load_package(PKG)
    plugin = importlib.import_module(f"{PKG.name}.plugin")
    mmfw.register(plugin, name="csv-log-under-test")
    try:
        yield package
    finally:
        if plugin_manager().is_registered(plugin):
            unregister(plugin)


def train(write_recipe, data: dict, *, resume: bool = False) -> mmfw.RunResult:
    recipe = mmfw.load_recipe(write_recipe(data))
    return mmfw.train(recipe, resume=resume, console=lambda _: None)


def test_factory_is_configured_by_its_own_table(csv_log, write_recipe):
    factory = get_factory("callback", "csv-log")
    assert factory.Options is csv_log.CSVLogOptions
    assert not hasattr(factory, "section") and factory.default is False
    recipe = mmfw.load_recipe(write_recipe(using_csv_log("runs")))
    assert recipe.callback_options("csv-log") == csv_log.CSVLogOptions(file="m.csv")
    assert recipe.to_dict()["callbacks"] == {"csv-log": {  # the resolved recipe: every option
        "file": "m.csv", "columns": list(csv_log.csv_log.DEFAULT_COLUMNS),
        "eval_file": "eval.csv"}}
    assert "csv-log" not in mmfw.load_recipe(write_recipe(small("runs"))).callbacks


@pytest.mark.parametrize(("table", "key"), [
    ({"colums": ["step"]}, "callbacks.csv-log.colums"),
    ({"file": "../outside.csv"}, "callbacks.csv-log.file"),
    ({"columns": []}, "callbacks.csv-log.columns"),
    ({"columns": "step"}, "callbacks.csv-log.columns"),
])
def test_bad_options_are_recipe_errors_naming_the_key(csv_log, write_recipe, table, key):
    data = using_csv_log("runs")
    data["callbacks"]["csv-log"] = table
    with pytest.raises(RecipeError) as err:
        mmfw.load_recipe(write_recipe(data))
    assert err.value.key == key, str(err.value)
    assert key in str(err.value)


def test_a_run_without_run_callbacks_writes_no_csv(csv_log, tmp_path, write_recipe):
    result = train(write_recipe, small(tmp_path / "runs", "plain", run={"max_steps": 5}))
    assert result.steps == 5 and (result.run_dir / "metrics.jsonl").is_file()
    assert not list(result.run_dir.glob("*.csv"))


def test_resume_rewrites_no_row_even_after_a_kill(csv_log, tmp_path, write_recipe):
    """Stop at max_steps and resume with more; then lose the last checkpoint (a run killed
    after step 30, before its checkpoint) and resume again: every step once, every value
    that of metrics.jsonl, eval rows only as the unbroken run logs them."""
    run = {"max_steps": 25, "checkpoint_every": 10, "keep_last": 10}
    data = using_csv_log(tmp_path / "runs", "resumed", run=run)
    run_dir = train(write_recipe, data).run_dir
    assert assert_train_rows_match(run_dir) == [5, 10, 15, 20, 25]
    assert [e["split"] for e in read_csv(run_dir / "eval.csv")] == ["val", "test"]

    data["run"]["max_steps"] = 35
    train(write_recipe, data, resume=True)
    assert assert_train_rows_match(run_dir) == [5, 10, 15, 20, 25, 30, 35]
    state = json.loads((run_dir / "checkpoints" / "step-00000035.json").read_text())
    assert state["callbacks"]["csv-log"]["rows"] == {"train": 7, "eval": 1}

    ckpt.remove(run_dir / "checkpoints", 35)  # killed after step 35's rows, before its save
    assert ckpt.latest(run_dir / "checkpoints") == 30
    data["run"]["max_steps"] = 0  # to the end: 2 epochs of 20 steps
    train(write_recipe, data, resume=True)
    steps = assert_train_rows_match(run_dir)
    assert steps == [5 * k for k in range(1, 9)]
    evals = [(int(e["step"]), e["split"], e["final"]) for e in read_csv(run_dir / "eval.csv")]
    assert evals == [(20, "val", "0"), (40, "val", "0"), (40, "test", "1")]
