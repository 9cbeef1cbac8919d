"""Train a tiny model through the CLI and check everything a run promises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import attrs
import pytest
import tomli_w
import torch
from safetensors.torch import load_file

import mmfw
from helpers import assert_user_error, cli, run_module, tiny_recipe
from mmfw.eval.retrieval import METRIC_KEYS, evaluate_split

pytestmark = pytest.mark.slow

TRAIN_KEYS = {"type", "step", "epoch", "loss", "lr", "samples_per_s", "sim/gap"}


def _write(path: Path, data: dict) -> Path:
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _printed_metrics(output: str) -> dict[str, float]:
    """The metrics JSON object the CLI prints last."""
    start = output.rindex('{\n  "i2t_R@1"')
    return json.loads(output[start:])


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.json"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    """One tiny run, trained with `mmfw run` in-process: (recipe path, run dir, CLI output)."""
    root = tmp_path_factory.mktemp("e2e")
    recipe = _write(root / "tiny.toml", tiny_recipe(root / "runs", plots={"enabled": True}))
    result = cli("run", recipe)
    assert result.exit_code == 0, result.output
    return recipe, root / "runs" / "tiny", result.output


# the run and its directory ----------------------------------------------------------------


def test_run_prints_the_final_metrics(trained) -> None:
    _, run_dir, output = trained
    assert "Traceback" not in output
    printed = _printed_metrics(output)
    assert printed == json.loads((run_dir / "metrics.json").read_text())


def test_run_directory_layout(trained) -> None:
    _, run_dir, _ = trained
    assert (run_dir / "recipe.toml").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
    assert (run_dir / "metrics.json").is_file()
    assert (run_dir / "assets" / "text" / "tokenizer.json").is_file()
    png = run_dir / "plots" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = run_dir / "checkpoints"
    weights = sorted(ckpts.glob("*.safetensors"))
    states = sorted(ckpts.glob("*.json"))
    assert weights
    assert states
    # 2 epochs x (64 images x 5 captions / 16 per batch) steps; the last checkpoint is the end
    assert _steps(run_dir)[-1] == 2 * 64 * 5 // 16
    for state in states:
        assert state.with_suffix(".safetensors").is_file()
        assert json.loads(state.read_text())["step"] == int(state.stem.split("-")[1])


def test_saved_recipe_is_the_resolved_recipe(trained) -> None:
    recipe, run_dir, _ = trained
    saved = mmfw.load_recipe(run_dir / "recipe.toml")
    assert saved.to_dict() == mmfw.load_recipe(recipe).to_dict()


def test_metrics_jsonl(trained) -> None:
    _, run_dir, _ = trained
    rows = _rows(run_dir)
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert train
    for row in train:
        assert set(row) >= TRAIN_KEYS
        assert row["loss"] == row["loss"]  # not NaN
        assert row["lr"] > 0
        assert row["samples_per_s"] > 0
        assert -2.0 <= row["sim/gap"] <= 2.0
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)
    # one val evaluation per epoch, then the final one on the test split
    val = [r for r in evals if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2]
    final = [r for r in evals if r.get("final")]
    assert len(final) == 1
    assert final[0]["split"] == "test"
    for row in evals:
        assert set(METRIC_KEYS) <= set(row)


def test_metrics_json_has_exactly_the_seven_keys(trained) -> None:
    _, run_dir, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics) == list(METRIC_KEYS)
    assert set(metrics) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
                            "t2i_R@10", "rsum"}
    for key in METRIC_KEYS[:6]:
        assert 0.0 <= metrics[key] <= 100.0
    assert 0.0 <= metrics["rsum"] <= 600.0
    assert metrics["rsum"] == pytest.approx(sum(metrics[k] for k in METRIC_KEYS[:6]))


def test_rerun_without_overwrite_is_refused(trained) -> None:
    recipe, run_dir, _ = trained
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert_user_error(cli("run", recipe), "already exists", "--resume", "--overwrite",
                      str(run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_resume_and_overwrite_together_is_a_usage_error(trained) -> None:
    recipe, _, _ = trained
    result = cli("run", recipe, "--resume", "--overwrite")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# evaluating and loading a finished run ----------------------------------------------------


def test_eval_command_reproduces_metrics_json(trained) -> None:
    _, run_dir, _ = trained
    result = cli("eval", run_dir)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads((run_dir / "metrics.json").read_text())


def test_eval_on_val_reproduces_the_last_val_row(trained) -> None:
    _, run_dir, _ = trained
    last_val = [r for r in _rows(run_dir) if r["type"] == "eval" and r["split"] == "val"][-1]
    result = cli("eval", run_dir, "--split", "val")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics == {k: last_val[k] for k in METRIC_KEYS}


def test_eval_errors_are_friendly(trained, tmp_path) -> None:
    _, run_dir, _ = trained
    assert_user_error(cli("eval", run_dir, "--split", "dev"), "no split 'dev'")
    assert_user_error(cli("eval", tmp_path), "not a run directory")


def test_eval_with_other_data(trained) -> None:
    """--data overrides [data] keys: the same model on a smaller copy of the test split."""
    _, run_dir, _ = trained
    result = cli("eval", run_dir, "--data", "test_images=8", "--data", "captions_per_image=2")
    assert result.exit_code == 0, result.output
    loaded = mmfw.load_run(run_dir)
    options = attrs.evolve(loaded.recipe.data.dataset.options, test_images=8,
                           captions_per_image=2)
    split = mmfw.create("dataset", "synthetic", options=options).split("test")
    assert json.loads(result.output) == evaluate_split(loaded.model, split)


def test_load_run(trained) -> None:
    recipe, run_dir, _ = trained
    loaded = mmfw.load_run(run_dir)
    r = mmfw.load_recipe(recipe)
    assert loaded.recipe.to_dict() == r.to_dict()
    assert loaded.step == _steps(run_dir)[-1]
    model = loaded.model
    assert not model.training
    source = mmfw.create("dataset", "synthetic", options=r.data.dataset.options)
    split = source.split("test")
    pixels = torch.stack([model.vision.preprocess(split[i].image) for i in range(3)])
    with torch.no_grad():
        image = model.encode_image(pixels)
        text = model.encode_text(model.text.tokenize(list(split.captions(0))))
    assert image.shape == (3, r.model.embed_dim)
    assert text.shape == (len(split.captions(0)), r.model.embed_dim)
    assert torch.isfinite(image).all()
    assert torch.isfinite(text).all()
    # the weights are the checkpoint's
    weights = load_file(str(run_dir / "checkpoints" / f"step-{loaded.step:08d}.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[f"model.{name}"]), name
    # and evaluate() on the loaded run gives metrics.json
    assert mmfw.evaluate(loaded) == json.loads((run_dir / "metrics.json").read_text())


# resume -----------------------------------------------------------------------------------


def test_resume_extends_a_run_and_refuses_a_changed_recipe(tmp_path) -> None:
    recipe = _write(tmp_path / "r.toml", tiny_recipe(tmp_path / "runs", name="res"))
    run_dir = tmp_path / "runs" / "res"
    assert cli("run", recipe).exit_code == 0
    steps_per_epoch = 64 * 5 // 16

    # a changed loss is refused, and nothing is touched
    before = (run_dir / "metrics.jsonl").read_text()
    out = assert_user_error(cli("run", recipe, "--resume", "--set", "loss.temperature=0.5"),
                            "loss.temperature", "differs")
    assert "0.5" in out
    assert (run_dir / "metrics.jsonl").read_text() == before

    # extending the run length is allowed and continues from the last checkpoint
    result = cli("run", recipe, "--resume", "--set", "run.epochs=3")
    assert result.exit_code == 0, result.output
    assert f"resumed {run_dir} at step {2 * steps_per_epoch}" in result.output
    assert _steps(run_dir)[-1] == 3 * steps_per_epoch
    rows = _rows(run_dir)
    train_steps = [r["step"] for r in rows if r["type"] == "train"]
    assert train_steps == sorted(set(train_steps))  # no step logged twice
    assert max(train_steps) == 3 * steps_per_epoch
    val_epochs = [r["epoch"] for r in rows if r["type"] == "eval" and r["split"] == "val"]
    assert val_epochs == [1, 2, 3]
    assert _printed_metrics(result.output) == json.loads((run_dir / "metrics.json").read_text())
    assert mmfw.load_recipe(run_dir / "recipe.toml").run.epochs == 3


def test_resume_without_a_checkpoint_is_refused(tmp_path) -> None:
    recipe = _write(tmp_path / "r.toml", tiny_recipe(tmp_path / "runs", name="none"))
    assert_user_error(cli("run", recipe, "--resume"), "nothing to resume")


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run_dir) if r["type"] == "train"}


# constant LR: the schedule does not depend on the planned run length
CONSTANT = {"schedule": {"name": "constant", "warmup_steps": 0}}


def test_resume_after_a_kill_reproduces_the_run(tmp_path) -> None:
    """Train 3 epochs; drop the last checkpoint as if the process had died after epoch 2;
    resuming recomputes the last epoch bit for bit (weights, optimizer, RNG, data order)."""
    recipe = _write(tmp_path / "r.toml", tiny_recipe(tmp_path / "runs", name="kill",
                                                     run={"epochs": 3, "log_every": 5},
                                                     **CONSTANT))
    run_dir = tmp_path / "runs" / "kill"
    assert cli("run", recipe).exit_code == 0
    steps = _steps(run_dir)
    last, previous = steps[-1], steps[-2]
    want_weights, want_losses = _weights(run_dir, last), _losses(run_dir)
    want_metrics = json.loads((run_dir / "metrics.json").read_text())
    for suffix in (".json", ".safetensors", ".train.safetensors"):
        (run_dir / "checkpoints" / f"step-{last:08d}{suffix}").unlink()
    (run_dir / "metrics.json").unlink()

    result = cli("run", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert f"at step {previous}" in result.output
    _assert_same_weights(_weights(run_dir, last), want_weights)
    assert _losses(run_dir) == want_losses  # the rows logged after the checkpoint are redone
    assert json.loads((run_dir / "metrics.json").read_text()) == want_metrics


def test_resume_mid_epoch_equals_resume_in_one_go(tmp_path) -> None:
    """Stop at step 30 (mid epoch 2); continuing 30 -> 45 -> 60 (45 is mid epoch 3) equals
    continuing 30 -> 60: mid-epoch checkpoints keep the sampler's place."""
    recipe = _write(tmp_path / "r.toml", tiny_recipe(tmp_path / "runs", name="mid",
                                                     run={"epochs": 3, "max_steps": 30},
                                                     **CONSTANT))
    run_dir = tmp_path / "runs" / "mid"
    assert cli("run", recipe).exit_code == 0
    assert _steps(run_dir)[-1] == 30
    snapshot = tmp_path / "snapshot"
    shutil.copytree(run_dir, snapshot)

    for max_steps in (45, 0):  # 0: no limit, i.e. the 3 epochs = 60 steps
        result = cli("run", recipe, "--resume", "--set", f"run.max_steps={max_steps}")
        assert result.exit_code == 0, result.output
    assert _steps(run_dir)[-1] == 60
    in_two = _weights(run_dir, 60)

    shutil.rmtree(run_dir)
    shutil.copytree(snapshot, run_dir)
    result = cli("run", recipe, "--resume", "--set", "run.max_steps=0")
    assert result.exit_code == 0, result.output
    _assert_same_weights(_weights(run_dir, 60), in_two)


def test_mid_epoch_checkpoint_with_workers_resumes_at_the_next_untrained_batch(tmp_path) -> None:
    recipe = _write(tmp_path / "r.toml", tiny_recipe(
        tmp_path / "runs", name="nw", run={"epochs": 3, "max_steps": 30},
        data={"num_workers": 2}, **CONSTANT))
    run_dir = tmp_path / "runs" / "nw"
    assert cli("run", recipe).exit_code == 0
    r = mmfw.load_recipe(recipe)
    state = json.loads((run_dir / "checkpoints" / "step-00000030.json").read_text())
    pairs = r.data.dataset.options.train_images * r.data.dataset.options.captions_per_image

    def sampler():
        return mmfw.create("sampler", r.sampler.plugin.name, match_ids=list(range(pairs)),
                           batch_size=r.sampler.batch_size, seed=r.run.seed,
                           drop_last=r.sampler.drop_last)

    full = sampler()
    full.set_epoch(1)
    trained_in_epoch = 30 - len(full)  # step 30 is 10 batches into the second epoch
    remaining = list(full)[trained_in_epoch:]
    resumed = sampler()
    resumed.load_state_dict(state["sampler"])
    resumed.set_epoch(1)
    assert list(resumed) == remaining


def test_same_recipe_trains_the_same_tokenizer() -> None:
    split = mmfw.create("dataset", "synthetic", train_images=40, image_size=16).split("train")
    texts = [c for i in range(len(split)) for c in split.captions(i)]
    vocabs = []
    for _ in range(3):
        text = mmfw.create("encoder", "scratch-text", vocab_size=200, width=32, heads=2,
                           depth=1)
        text.prepare(texts)
        vocabs.append(text.tokenizer.get_vocab())
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_train_api_and_wall_clock_budget(tmp_path) -> None:
    """mmfw.train stops on run.max_minutes, still evaluates, and says what stopped it."""
    data = tiny_recipe(tmp_path / "runs", name="budget", run={"max_minutes": 1e-6})
    result = mmfw.train(mmfw.load_recipe(data), console=lambda _: None)
    assert isinstance(result, mmfw.RunResult)
    assert result.stopped_by == "max_minutes"
    assert result.steps == 1
    assert result.run_dir == tmp_path / "runs" / "budget"
    assert result.metrics == json.loads((result.run_dir / "metrics.json").read_text())
    assert _steps(result.run_dir) == [1]


def test_overwrite_starts_again(tmp_path) -> None:
    recipe = _write(tmp_path / "r.toml", tiny_recipe(tmp_path / "runs", name="ow",
                                                     run={"max_steps": 3, "epochs": 1}))
    run_dir = tmp_path / "runs" / "ow"
    assert cli("run", recipe).exit_code == 0
    assert _steps(run_dir) == [3]
    result = cli("run", recipe, "--overwrite", "--set", "run.max_steps=2")
    assert result.exit_code == 0, result.output
    assert _steps(run_dir) == [2]
    assert max(r["step"] for r in _rows(run_dir)) == 2


# a real process ---------------------------------------------------------------------------


def test_python_m_mmfw_run(tmp_path) -> None:
    _write(tmp_path / "tiny.toml", tiny_recipe(tmp_path / "runs", name="sub"))
    proc = run_module("run", "tiny.toml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "runs" / "sub"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert _printed_metrics(proc.stdout) == metrics
    assert list(metrics) == list(METRIC_KEYS)
    assert mmfw.load_recipe(run_dir / "recipe.toml").run.name == "sub"


# listing plugins --------------------------------------------------------------------------


def test_list_all_kinds() -> None:
    result = cli("list")
    assert result.exit_code == 0, result.output
    for kind, names in mmfw.available().items():
        assert f"{kind} ({len(names)})" in result.output
        for name in names:
            assert name in result.output
    assert "infonce" in result.output
    assert "synthetic" in result.output


def test_list_one_kind() -> None:
    result = cli("list", "loss")
    assert result.exit_code == 0, result.output
    assert "infonce" in result.output
    assert "synthetic" not in result.output
    assert "mmfw_losses" in result.output  # the providing plugin
    with_options = cli("list", "loss", "--options")
    assert "temperature = 0.07" in with_options.output
    assert_user_error(cli("list", "lossess"), "unknown kind")


def test_list_filter() -> None:
    result = cli("list", "backend", "--filter", "c*")
    assert result.exit_code == 0, result.output
    assert "cpu" in result.output
    assert "cuda" in result.output
    assert "auto" not in result.output
