"""Weights beyond the last step: the EMA of the weights (``[optim.ema]``), checkpoint averaging
(``mmfw average``) and WiSE-FT interpolation (``mmfw interpolate``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import attrs
import pytest
import torch

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.model import build_model
from mmfw.run import checkpoint as ckpt
from mmfw.spi import RecipeError
from mmfw.tools.weights import write_run
from mmfw.train.loop import Trainer

QUIET = {"console": lambda _: None}
DECAY, WARMUP = 0.8, 3

#: 2 epochs of 5 steps (16 images x 5 captions, batch 16), a checkpoint every step, all kept,
#: a constant LR (so a run cut by max_steps and resumed follows the unbroken run's schedule)
EMA = {"ema": {"decay": DECAY, "warmup_steps": WARMUP}}


def _recipe(out: Path, name: str, **run: int) -> dict:
    return tiny_recipe(out, name=name, run={"checkpoint_every": 1, "keep_last": 20, **run},
                       eval={"restore_best": True},  # the best step's EMA: load_weights
                       data={"train_images": 16, "val_images": 16, "test_images": 16},
                       schedule={"name": "constant"}, optim=EMA)


def _train(data: dict, resume: bool = False) -> Path:
    trainer = Trainer(mmfw.load_recipe(data), resume=resume, **QUIET)
    try:
        trainer.fit()
    finally:
        trainer.release()
    return trainer.run_dir.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("weights")
    unbroken = _train(_recipe(out, "unbroken"))
    _train(_recipe(out, "resumed", max_steps=3))
    resumed = _train(_recipe(out, "resumed"), resume=True)
    return {"unbroken": unbroken, "resumed": resumed, "out": out}


def _ckpts(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _rows(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r["type"] == kind]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# EMA --------------------------------------------------------------------------------------


def test_ema_table_is_validated_and_round_trips(runs) -> None:
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(RecipeError, match="between 0 and 1") as err:
            mmfw.load_recipe(tiny_recipe("runs", optim={"ema": {"decay": bad}}))
        assert err.value.key == "optim.ema.decay"
    with pytest.raises(RecipeError) as err:  # [optim]'s own unknown keys: refused as before
        mmfw.load_recipe(tiny_recipe("runs", optim={"emaa": {"decay": 0.9}}))
    assert err.value.key == "optim.emaa" and "unknown option" in str(err.value)
    with pytest.raises(RecipeError) as err:
        mmfw.load_recipe(tiny_recipe("runs", optim={"ema": 0.99}))
    assert err.value.key == "optim.ema"
    assert "ema" not in mmfw.load_recipe(tiny_recipe("runs")).callbacks  # off without it
    saved = mmfw.load_recipe(runs["unbroken"] / "recipe.toml")  # the resolved recipe
    assert attrs.asdict(saved.callbacks["ema"].options) == {
        "decay": DECAY, "warmup_steps": WARMUP, "every": 1}


def test_ema_follows_its_update_rule_at_every_step(runs) -> None:
    """ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t, with timm ModelEmaV3's warm-up d_t =
    min(decay, s / (s + W)), s = t - 1, checked on every checkpoint's tensors."""
    d = _ckpts(runs["unbroken"])
    steps = ckpt.list_steps(d)
    assert steps == list(range(1, 11))
    prev = None
    for t in steps:
        ema = ckpt.read_callback_tensors(d, t)["ema"]
        trained = ckpt.read_weights(d, t)[0]
        assert ckpt.load_state(d, t)["eval_weights"] == "ema"
        assert ckpt.load_state(d, t)["callbacks"]["ema"]["updates"] == t
        s = t - 1
        decay = 0.0 if s == 0 else min(DECAY, s / (s + WARMUP))
        for k, w in trained.items():
            if not w.is_floating_point():
                assert torch.equal(ema[k], w)
                continue
            want = w.double() if prev is None else (
                decay * prev[k].double() + (1 - decay) * w.double())
            assert torch.allclose(ema[k].double(), want, atol=1e-6), (t, k)
        prev = ema
    assert any(not torch.equal(ema[k], trained[k]) for k in trained)  # an average, not a copy


def test_resume_gives_bit_identical_ema_and_weights(runs) -> None:
    a, b = _ckpts(runs["unbroken"]), _ckpts(runs["resumed"])
    assert ckpt.list_steps(b) == list(range(1, 11))
    for step in (3, 4, 10):
        _equal(ckpt.read_weights(a, step)[0], ckpt.read_weights(b, step)[0])
        _equal(ckpt.read_callback_tensors(a, step)["ema"],
               ckpt.read_callback_tensors(b, step)["ema"])
    assert json.loads((runs["resumed"] / "metrics.json").read_text()) == \
        json.loads((runs["unbroken"] / "metrics.json").read_text())
    assert _rows(runs["resumed"], "eval") == _rows(runs["unbroken"], "eval")


def test_ema_part_is_hashed_and_verified(runs, tmp_path) -> None:
    d = tmp_path / "checkpoints"
    shutil.copytree(_ckpts(runs["unbroken"]), d)
    part = d / "step-00000010.callbacks.safetensors"
    assert part.name in ckpt.load_state(d, 10)["files"]
    raw = bytearray(part.read_bytes())
    raw[-1] ^= 0xFF
    part.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="does not match the hash"):
        ckpt.verify(d, 10)
    ckpt.remove(d, 9)
    assert not (d / "step-00000009.callbacks.safetensors").exists()


def test_evaluations_and_load_run_use_the_ema_weights(runs) -> None:
    run_dir = runs["unbroken"]
    d = _ckpts(run_dir)
    loaded = mmfw.load_run(run_dir)  # eval.restore_best: the best validation's checkpoint
    assert loaded.step == ckpt.best(d)
    ema = ckpt.read_callback_tensors(d, loaded.step)["ema"]
    _equal(loaded.model.state_dict(), ema)
    assert mmfw.evaluate(loaded, console=lambda _: None) == \
        json.loads((run_dir / "metrics.json").read_text())
    recipe = loaded.recipe
    for row in _rows(run_dir, "eval"):  # validation at each epoch's end: the EMA at that step
        if row.get("final"):
            continue
        model = build_model(recipe.model)
        model.load_assets(run_dir)
        model.load_state_dict(ckpt.read_callback_tensors(d, row["step"])["ema"])
        again = mmfw.evaluate(mmfw.LoadedRun(run_dir, recipe, model.eval(), row["step"]),
                              split=row["split"], console=lambda _: None)
        assert again == {k: row[k] for k in again}
    trained = mmfw.load_run(run_dir).model
    trained.load_state_dict(ckpt.read_weights(d, loaded.step)[0])
    assert any(not torch.equal(trained.state_dict()[k], ema[k]) for k in ema)


# average ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def averaged(runs) -> Path:
    result = cli("average", runs["unbroken"], "--last", "6")
    assert result.exit_code == 0, result.output
    assert "average of the last 6" in result.output
    return runs["unbroken"].with_name("unbroken-avg6")


def test_average_of_the_last_checkpoints_is_a_run_directory(runs, averaged) -> None:
    src = _ckpts(runs["unbroken"])
    states = [ckpt.read_callback_tensors(src, s)["ema"] for s in range(5, 11)]
    assert ckpt.list_steps(_ckpts(averaged)) == [10]
    ckpt.verify(_ckpts(averaged), 10)
    loaded = mmfw.load_run(averaged)
    for k, v in loaded.model.state_dict().items():
        if v.is_floating_point():
            mean = sum(s[k].double() for s in states) / len(states)
            assert torch.equal(v, mean.to(v.dtype)), k
    metrics = json.loads((averaged / "metrics.json").read_text())
    out = cli("eval", averaged)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output[out.output.index("{"):]) == metrics
    table = json.loads((averaged / "average.json").read_text())
    assert table["split"] == "val" and table["steps"] == list(range(5, 11))
    assert [r["step"] for r in table["rows"]] == [5, 6, 7, 8, 9, 10, 10]
    by_step = {r["step"]: r for r in _rows(runs["unbroken"], "eval") if not r.get("final")}
    for row in table["rows"][:-1]:  # the source's own validation rows, where it has them
        if row["step"] in by_step:
            assert row["metrics"]["rsum"] == by_step[row["step"]]["rsum"]
    assert "| average of the last 6 |" in (averaged / "average.md").read_text()


def test_average_refuses_more_checkpoints_than_there_are(runs, averaged) -> None:
    assert_user_error(cli("average", runs["unbroken"], "--last", "11"),
                      "10 checkpoint(s)", "fewer than --last 11", "run.keep_last")
    assert_user_error(cli("average", runs["unbroken"], "--last", "0"), "--last")
    assert_user_error(cli("average", runs["unbroken"], "--last", "6"),  # written already
                      "already exists", "--overwrite")


# interpolate -----------------------------------------------------------------------------


def test_interpolation_between_two_runs(runs, averaged) -> None:
    out = runs["out"] / "soup"
    result = cli("interpolate", averaged, runs["unbroken"], "--alpha", "0,0.5,1",
                 "--output", out)
    assert result.exit_code == 0, result.output
    a = mmfw.load_run(averaged).model.state_dict()
    b = mmfw.load_run(runs["unbroken"]).model.state_dict()
    ends = {"0": a, "1": b}
    for name, want in ends.items():
        _equal(mmfw.load_run(out / f"alpha-{name}").model.state_dict(), want)
    mid = mmfw.load_run(out / "alpha-0.5").model.state_dict()
    for k, v in mid.items():
        if v.is_floating_point():
            assert torch.equal(v, ((a[k].double() + b[k].double()) / 2).to(v.dtype)), k
    table = json.loads((out / "interpolate.json").read_text())
    assert [r["alpha"] for r in table["rows"]] == [0.0, 0.5, 1.0]
    best = ckpt.best(_ckpts(runs["unbroken"]))  # B's result: its best checkpoint's EMA
    val = next(r for r in _rows(runs["unbroken"], "eval") if r["step"] == best
               and not r.get("final"))
    assert table["rows"][-1]["metrics"]["rsum"] == val["rsum"]
    assert table["rows"][-1]["final"] == json.loads(
        (runs["unbroken"] / "metrics.json").read_text())
    assert "| alpha 0.5 |" in (out / "interpolate.md").read_text()


def test_interpolate_refuses_bad_alphas_and_other_architectures(runs, averaged) -> None:
    for alpha in ("0,x", "0,1.5", "", "0.5,0.5"):
        assert_user_error(cli("interpolate", averaged, runs["unbroken"], "--alpha", alpha),
                          "--alpha")
    other = mmfw.load_recipe(tiny_recipe(runs["out"], name="wide", model={"embed_dim": 16}))
    model = build_model(other.model)
    write_run(runs["out"] / "wide", other, runs["unbroken"], model.state_dict(), {}, step=1,
              epoch=0, made={})
    out = assert_user_error(cli("interpolate", runs["unbroken"], runs["out"] / "wide"),
                            "differ in architecture", "[32, 32]", "[16, 32]")
    assert len(out.strip().splitlines()) == 1


def test_a_run_too_short_for_its_ema_decay_is_told(tmp_path) -> None:
    """decay 0.99 without warm-up keeps over 5% of the random start until step 299: a 10-step
    run hears it; with a warm-up, or a decay whose average this run outlasts, it does not."""
    said: list[str] = []

    def run(name: str, ema: dict) -> None:
        data = tiny_recipe(tmp_path, name=name, optim={"ema": ema},
                           data={"train_images": 16, "val_images": 16, "test_images": 16})
        trainer = Trainer(mmfw.load_recipe(data), console=said.append)
        try:
            trainer.fit()
        finally:
            trainer.release()

    run("short", {"decay": 0.99})
    note = [s for s in said if s.startswith("note: [optim.ema]")]
    assert note and "until step 299, and this run has 10" in note[0], said
    said.clear()
    run("warm", {"decay": 0.99, "warmup_steps": 3})
    run("fast", {"decay": 0.1})
    assert not [s for s in said if s.startswith("note: [optim.ema]")], said
