"""Recipes: loading, resolving, round-tripping, overrides, and the message of every mistake."""

from __future__ import annotations

import re
import sys

import attrs
import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

import mmfw
from helpers import TINY, assert_user_error, cli, deep_merge, run_module
from mmfw.config.recipe import TOP_LEVEL

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _error(path, overrides=()) -> mmfw.RecipeError:
    with pytest.raises(mmfw.RecipeError) as info:
        mmfw.load_recipe(path, overrides)
    return info.value


def _assert_message(err: mmfw.RecipeError, *, file, key, expected=None, given=None) -> str:
    """The message names the file, the key path, and (when given) what was expected/given."""
    text = str(err)
    assert f"recipe {file}" in text
    assert err.key == key
    assert f"key '{key}'" in text
    if expected is not None:
        assert f"expected: {expected}" in text
    if given is not None:
        assert f"given:    {given!r}" in text
    return text


# valid recipes ------------------------------------------------------------------------------


def test_valid_recipe_loads_with_defaults_filled_in(write_recipe) -> None:
    path = write_recipe(TINY)
    r = mmfw.load_recipe(path)
    assert isinstance(r, mmfw.Recipe)
    assert r.path == str(path)
    assert r.run.epochs == 2
    assert r.data.dataset.name == "synthetic"
    assert r.data.dataset.options.train_images == 64
    assert r.model.vision.options.patch_size == 8
    # sections and keys left out get their defaults
    assert r.model.adapter.name == "linear"
    assert r.loss.options.temperature == pytest.approx(0.07)
    assert r.loss.options.learn_temperature is True
    assert r.eval.split == "test"
    assert r.sampler.drop_last is True


def test_minimal_recipe_needs_only_data_and_encoders(write_recipe) -> None:
    minimal = {"data": {"dataset": "synthetic"}, "model": {"vision": {"name": "scratch-vision"},
                                                           "text": {"name": "scratch-text"}}}
    r = mmfw.load_recipe(write_recipe(minimal))
    resolved = r.to_dict()
    # the core's sections (an empty [callbacks] or [report] is left out) and the built-in
    # callbacks'
    assert set(resolved) == (set(TOP_LEVEL) - {"callbacks", "report"}) | {"diagnostics",
                                                                          "distill", "plots"}
    assert resolved["loss"]["name"] == "infonce"
    assert resolved["backend"]["name"] == "auto"
    assert resolved["sampler"]["name"] == "random"
    assert resolved["schedule"]["name"] == "warmup-cosine"


def test_load_recipe_accepts_a_parsed_dict() -> None:
    r = mmfw.load_recipe(TINY, ["run.epochs=5"])
    assert r.path is None
    assert r.run.epochs == 5


def test_resolved_recipe_round_trips(write_recipe) -> None:
    original = mmfw.load_recipe(write_recipe(TINY))
    resolved = original.to_dict()
    again = mmfw.load_recipe(write_recipe(original.to_toml(), "resolved.toml"))
    assert again.to_dict() == resolved
    assert attrs.evolve(again, path=None) == attrs.evolve(original, path=None)
    assert again.digest() == original.digest()
    # to_toml is the TOML form of to_dict
    assert tomllib.loads(original.to_toml()) == resolved


@settings(max_examples=25)
@given(
    temperature=st.floats(1e-3, 10.0),
    epochs=st.integers(1, 1000),
    lr=st.floats(1e-6, 1.0),
    betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.999)),
    name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12),
    learn=st.booleans(),
)
def test_round_trip_property(tmp_path_factory, temperature, epochs, lr, betas, name,
                             learn) -> None:
    data = deep_merge(TINY, {
        "run": {"epochs": epochs, "name": name},
        "loss": {"temperature": temperature, "learn_temperature": learn},
        "optim": {"lr": lr, "betas": list(betas)},
    })
    path = tmp_path_factory.mktemp("rt") / "r.toml"
    path.write_text(tomli_w.dumps(data))
    r = mmfw.load_recipe(path)
    assert (r.run.epochs, r.run.name, r.optim.betas) == (epochs, name, betas)
    assert r.loss.options.temperature == temperature
    path.write_text(r.to_toml())
    assert mmfw.load_recipe(path).to_dict() == r.to_dict()


def test_digest_ignores_only_the_given_keys() -> None:
    a = mmfw.load_recipe(TINY)
    b = mmfw.load_recipe(TINY, ["run.epochs=9"])
    c = mmfw.load_recipe(TINY, ["loss.temperature=0.5"])
    assert a.digest() != b.digest()
    assert a.digest(["run.epochs"]) == b.digest(["run.epochs"])
    assert a.digest(["run.epochs"]) != c.digest(["run.epochs"])


# mistakes ---------------------------------------------------------------------------------


def test_unknown_section_suggests_a_close_match(write_recipe) -> None:
    data = dict(TINY)
    data["mdoel"] = {"embed_dim": 8}
    path = write_recipe(data)
    text = _assert_message(_error(path), file=path, key="mdoel", given="[mdoel] table")
    assert "unknown section" in text
    assert "Did you mean [model]?" in text
    assert "expected: one of [run]" in text


def test_unknown_key_in_run(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"run": {"epoch": 3}}))
    text = _assert_message(_error(path), file=path, key="run.epoch", given=3)
    assert "'epochs'" in text  # close match
    assert "expected: one of " in text
    assert "max_steps" in text  # the valid keys are listed


def test_unknown_key_in_a_plugin_section(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"loss": {"temperatur": 0.1}}))
    text = _assert_message(_error(path), file=path, key="loss.temperatur", given=0.1)
    assert "Did you mean 'temperature'" in text
    assert "learn_temperature" in text  # in the list of valid keys


def test_unknown_key_in_a_nested_plugin_section(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"model": {"vision": {"patch": 4}}}))
    text = _assert_message(_error(path), file=path, key="model.vision.patch", given=4)
    assert "'patch_size'" in text


@pytest.mark.parametrize(("section", "typo", "near"), [
    ("data", "uint9", "'uint8'"), ("data", "train_imgs", "'train_images'"),
    ("data", "num_worker", "'num_workers'"), ("sampler", "batchsize", "'batch_size'")])
def test_unknown_key_in_a_section_shared_with_a_plugin(write_recipe, section, typo,
                                                       near) -> None:
    """[data] and [sampler] hold the core's keys and the plugin's options: a typo is matched
    against both, and both lists are shown."""
    path = write_recipe(deep_merge(TINY, {section: {typo: 1}}))
    text = _assert_message(_error(path), file=path, key=f"{section}.{typo}", given=1)
    assert f"Did you mean {near}" in text
    own = "num_workers" if section == "data" else "batch_size"
    assert f"[{section}]'s own keys" in text and own in text
    if section == "data":
        assert "dataset 'synthetic''s options" in text and "train_images" in text


def test_wrong_type(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"run": {"epochs": "three"}}))
    text = _assert_message(_error(path), file=path, key="run.epochs", expected="int",
                           given="three")
    assert "wrong type" in text


def test_wrong_type_in_a_plugin_section(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"loss": {"learn_temperature": "yes"}}))
    _assert_message(_error(path), file=path, key="loss.learn_temperature", expected="bool",
                    given="yes")


def test_literal_choice(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"data": {"difficulty": "extreme"}}))
    text = _assert_message(_error(path), file=path, key="data.difficulty", given="extreme")
    for choice in ("easy", "medium", "hard"):
        assert repr(choice) in text


def test_validator_failure(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"loss": {"temperature": -1}}))
    err = _error(path)
    text = _assert_message(err, file=path, key="loss.temperature")
    assert "> 0" in text  # what was expected
    assert err.given == -1  # what was given
    assert "-1" in text


def test_cross_field_validation_names_a_key(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"model": {"vision": {"patch_size": 7}}}))
    text = str(_error(path))
    assert "model.vision." in text
    assert "multiple of" in text


def test_unknown_plugin_name(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"loss": {"name": "infonse"}}))
    text = _assert_message(_error(path), file=path, key="loss.name", given="infonse")
    assert "Did you mean 'infonce'" in text
    assert "Installed losses: " in text


def test_unknown_dataset_name(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"data": {"dataset": "synthetik"}}))
    text = _assert_message(_error(path), file=path, key="data.dataset", given="synthetik")
    assert "'synthetic'" in text


def test_missing_data_section(write_recipe) -> None:
    data = {k: v for k, v in TINY.items() if k != "data"}
    path = write_recipe(data)
    text = _assert_message(_error(path), file=path, key="data")
    assert "missing section [data]" in text
    assert "expected: [data] with dataset" in text


def test_missing_dataset_name(write_recipe) -> None:
    data = deep_merge(TINY, {})
    del data["data"]["dataset"]
    path = write_recipe(data)
    text = _assert_message(_error(path), file=path, key="data.dataset")
    assert "mmfw list dataset" in text


def test_missing_model_vision(write_recipe) -> None:
    data = deep_merge(TINY, {})
    del data["model"]["vision"]
    path = write_recipe(data)
    text = _assert_message(_error(path), file=path, key="model.vision")
    assert "missing section [model.vision]" in text
    assert "expected: [model.vision] with name" in text


def test_section_that_is_not_a_table(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"optim": 3}))
    _assert_message(_error(path), file=path, key="optim", given=3)


def test_missing_recipe_file(tmp_path) -> None:
    missing = tmp_path / "nope.toml"
    err = _error(missing)
    assert "recipe file not found" in str(err)
    assert str(missing) in str(err)
    assert err.given == str(missing)
    err = _error(tmp_path)  # a directory
    assert "it is a directory" in str(err)


def test_invalid_toml(write_recipe) -> None:
    path = write_recipe("[run]\nepochs = \n")
    err = _error(path)
    assert err.file == str(path)
    assert f"recipe {path}" in str(err)
    assert "not valid TOML" in str(err)
    assert "line 2" in str(err)


# --set overrides --------------------------------------------------------------------------


def test_overrides_are_coerced_to_the_key_type(write_recipe) -> None:
    path = write_recipe(TINY)
    r = mmfw.load_recipe(path, [
        "loss.temperature=0.05",
        "run.name=try2",
        "run.epochs=3",
        "optim.betas=[0.9,0.95]",
        "loss.learn_temperature=false",
        "model.vision.pooling=cls",
    ])
    assert r.loss.options.temperature == 0.05
    assert isinstance(r.loss.options.temperature, float)
    assert r.run.name == "try2"
    assert r.run.epochs == 3
    assert isinstance(r.run.epochs, int)
    assert r.optim.betas == (0.9, 0.95)
    assert r.loss.options.learn_temperature is False
    assert r.model.vision.options.pooling == "cls"


def test_override_values_that_look_like_other_types(write_recipe) -> None:
    path = write_recipe(TINY)
    r = mmfw.load_recipe(path, ["run.name=123", "run.output_dir=true", "optim.lr=1"])
    assert r.run.name == "123"  # a str key keeps the text as written
    assert r.run.output_dir == "true"
    assert r.optim.lr == 1.0
    assert isinstance(r.optim.lr, float)  # int accepted where float is expected
    quoted = mmfw.load_recipe(path, ['run.name="with spaces"'])
    assert quoted.run.name == "with spaces"


def test_override_can_switch_plugin_and_add_sections(write_recipe) -> None:
    path = write_recipe(TINY)
    r = mmfw.load_recipe(path, ["schedule.name=constant", "schedule.warmup_steps=0",
                                "model.adapter.name=identity", "model.embed_dim=32"])
    assert r.schedule.name == "constant"
    assert r.model.adapter.name == "identity"


def test_an_inline_table_override_replaces_the_table(write_recipe) -> None:
    path = write_recipe(TINY)
    # TINY's text tower sets scratch-text options that another plugin would refuse
    r = mmfw.load_recipe(path, ['model.text={name = "scratch-text", width = 48, depth = 1, '
                                'heads = 2}'])
    assert r.model.text.options.width == 48
    assert r.model.text.options.depth == 1
    # the table's other keys are gone: the plugin's defaults stand in for them
    assert "vocab_size" not in r.model.text.given
    err = _error(path, ['model.text={name = "scratch-text", widht = 48}'])
    assert err.key == "model.text.widht"


@pytest.mark.parametrize("bad", ["runepochs3", "=3", "run..epochs=3", "run.=3"])
def test_malformed_override(write_recipe, bad) -> None:
    path = write_recipe(TINY)
    err = _error(path, [bad])
    assert err.key == "--set"
    assert err.given == bad
    assert "section.key=value" in str(err)


def test_override_with_a_wrong_value(write_recipe) -> None:
    path = write_recipe(TINY)
    text = _assert_message(_error(path, ["run.epochs=three"]), file=path, key="run.epochs",
                           expected="int", given="three")
    assert "wrong type" in text
    _assert_message(_error(path, ["optim.betas=[0.9]"]), file=path, key="optim.betas")
    _assert_message(_error(path, ["loss.temperatur=0.1"]), file=path, key="loss.temperatur")
    err = _error(path, ["run.epochs.x=1"])
    assert err.key == "run.epochs"


# the CLI ----------------------------------------------------------------------------------


def test_check_ok_prints_the_resolved_recipe(write_recipe) -> None:
    path = write_recipe(TINY)
    result = cli("check", path)
    assert result.exit_code == 0, result.output
    assert f"{path}: ok" in result.output
    body = result.output.split(": ok\n", 1)[1]
    assert tomllib.loads(body) == mmfw.load_recipe(path).to_dict()


def test_check_applies_overrides(write_recipe) -> None:
    path = write_recipe(TINY)
    result = cli("check", path, "--set", "loss.temperature=0.05")
    assert result.exit_code == 0, result.output
    assert re.search(r"^temperature = 0\.05$", result.output, re.M)


def test_check_bad_recipe_exits_2_without_traceback(write_recipe) -> None:
    path = write_recipe(deep_merge(TINY, {"loss": {"temperatur": 0.1}}))
    assert_user_error(cli("check", path), "loss.temperatur", "'temperature'", str(path))


def test_check_bad_override_exits_2(write_recipe) -> None:
    path = write_recipe(TINY)
    assert_user_error(cli("check", path, "--set", "run.epochs=three"), "run.epochs", "int")
    assert_user_error(cli("check", path, "--set", "nonsense"), "--set")


def test_check_missing_file_exits_2(tmp_path) -> None:
    assert_user_error(cli("check", tmp_path / "nope.toml"), "recipe file not found")


def test_check_in_a_subprocess(write_recipe, tmp_path) -> None:
    path = write_recipe(deep_merge(TINY, {"run": {"epochs": "three"}}), "bad.toml")
    proc = run_module("check", path.name, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error:" in proc.stderr
    assert "run.epochs" in proc.stderr
    assert "bad.toml" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
