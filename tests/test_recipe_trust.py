"""A recipe is input, not code: pipe: shard URLs and trust_remote_code are refused unless code is
allowed (``mmfw --allow-code`` / ``MMFW_ALLOW_CODE=1``), before anything runs."""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.spi import ALLOW_ENV, RecipeError, code_allowed, require_code

REFUSED = "runs code on this machine"
HINT = "pass --allow-code to mmfw (or set MMFW_ALLOW_CODE=1)"


@pytest.fixture(autouse=True)
def not_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with code refused (whatever the calling shell has set)."""
    monkeypatch.setenv(ALLOW_ENV, "0")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file a shell command in a recipe would create if it ran."""
    return tmp_path / f"ran-{uuid.uuid4().hex}"


def write_shard(path: Path, n: int = 4) -> Path:
    """A tiny uncompressed shard: ``n`` samples of a 4x4 PNG and a caption."""
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(png, format="PNG")
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for ext, data in (("png", png.getvalue()), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def shard_recipe(tmp_path: Path, **data: Any) -> dict[str, Any]:
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["data"] = {"dataset": "webdataset", **data}
    return recipe


def write_toml(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(content), encoding="utf-8")
    return path


# the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "allowed"), [("1", True), ("true", True), ("YES", True),
                                                ("0", False), ("", False), ("no", False)])
def test_code_allowed_reads_the_environment(monkeypatch: pytest.MonkeyPatch, value: str,
                                            allowed: bool) -> None:
    monkeypatch.setenv(ALLOW_ENV, value)
    assert code_allowed() is allowed


def test_require_code_refuses_then_says_once_what_runs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    what = f"thing {uuid.uuid4().hex}"
    with pytest.raises(RecipeError) as err:
        require_code(what, key="a.b", given="x")
    assert err.value.key == "a.b" and err.value.given == "x"
    assert str(err.value).startswith(f"key 'a.b': {what} {REFUSED}")
    assert HINT in str(err.value)
    monkeypatch.setenv(ALLOW_ENV, "1")
    require_code(what, key="a.b", given="x")
    require_code(what, key="a.b", given="x")
    assert capsys.readouterr().err == f"mmfw: running code from the recipe: {what}\n"


# pipe: shard URLs -------------------------------------------------------------------------


def test_pipe_url_in_a_recipe_is_refused_before_it_runs(tmp_path: Path, marker: Path) -> None:
    recipe = shard_recipe(tmp_path, train=f"pipe:touch {marker}", pairs_per_epoch=8)
    with pytest.raises(RecipeError) as err:
        mmfw.load_recipe(recipe)
    assert err.value.key == "data.train"
    assert err.value.given == f"pipe:touch {marker}"
    assert REFUSED in str(err.value) and HINT in str(err.value)
    with pytest.raises(RecipeError, match=REFUSED) as err:
        mmfw.create("dataset", "webdataset", train=f"pipe:touch {marker}", pairs_per_epoch=8)
    assert err.value.key == "train"
    assert not marker.exists()


@pytest.mark.parametrize("spec", [
    "{local}::pipe:touch {marker}",  # '::' joins lists: the second one runs
    "PIPE:touch {marker}",  # the scheme as gopen parses it: any case
    "pi\tpe:touch {marker}",  # urlparse drops tabs: still gopen's pipe handler
    "pipe:touch {marker}-{{0..2}}",  # brace notation: three commands, the first named
])
def test_every_form_of_a_pipe_url_is_refused(tmp_path: Path, marker: Path, spec: str) -> None:
    local = write_shard(tmp_path / "a.tar")
    url = spec.format(local=local, marker=marker)
    with pytest.raises(RecipeError, match=REFUSED) as err:
        mmfw.load_recipe(shard_recipe(tmp_path, train=str(local), test=url))
    assert err.value.key == "data.test"
    assert not list(tmp_path.glob(f"{marker.name}*"))


def test_local_and_http_shards_need_no_permission(tmp_path: Path) -> None:
    local = write_shard(tmp_path / "a.tar")
    recipe = mmfw.load_recipe(shard_recipe(tmp_path, train=str(local),
                                           val="https://example.com/val-{0..1}.tar"))
    assert recipe.data.dataset.options.train == str(local)


def test_pipe_url_allowed_really_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ALLOW_ENV, "1")
    url = f"pipe:cat {write_shard(tmp_path / 'train-000.tar', n=4)}"
    recipe = mmfw.load_recipe(shard_recipe(tmp_path, train=url, pairs_per_epoch=4))
    d = mmfw.create("dataset", "webdataset", options=recipe.data.dataset.options)
    s = d.stream("train", batch_size=2, seed=0, drop_last=True)
    assert sum(len(b) for b in s) == 4
    assert capsys.readouterr().err.count(f"mmfw: running code from the recipe: shard URL {url!r}"
                                         ) == 1


def test_run_directory_with_a_pipe_url_is_refused(tmp_path: Path, marker: Path) -> None:
    run_dir = tmp_path / "someone-elses-run"
    run_dir.mkdir()
    write_toml(run_dir / "recipe.toml",
               shard_recipe(tmp_path, train=f"pipe:touch {marker}", pairs_per_epoch=8))
    with pytest.raises(RecipeError, match=REFUSED) as err:
        mmfw.load_run(run_dir)
    assert err.value.key == "data.train"
    assert_user_error(cli("eval", run_dir), "key 'data.train'", REFUSED, HINT)
    assert not marker.exists()


# the command line -------------------------------------------------------------------------


def test_cli_refuses_without_allow_code_and_passes_with_it(tmp_path: Path,
                                                          marker: Path) -> None:
    path = write_toml(tmp_path / "recipe.toml",
                      shard_recipe(tmp_path, train=f"pipe:touch {marker}", pairs_per_epoch=8))
    assert_user_error(cli("check", path), "key 'data.train'", REFUSED, HINT)
    assert_user_error(cli("run", path), "key 'data.train'", REFUSED)
    result = cli("--allow-code", "check", path)
    assert result.exit_code == 0, result.output
    assert f"{path}: ok" in result.output
    assert os.environ[ALLOW_ENV] == "1"  # inherited by torchrun ranks and sweep subprocesses
    assert not marker.exists()  # check validates; it opens no shard


def test_cli_help_names_allow_code() -> None:
    out = cli("--help").output
    assert "--allow-code" in out and ALLOW_ENV in out


# trust_remote_code ------------------------------------------------------------------------


def test_trust_remote_code_in_a_recipe_is_refused(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["model"]["text"] = {"name": "hf-text", "model": "someone/custom-code-model",
                               "kwargs": {"trust_remote_code": True}}
    with pytest.raises(RecipeError) as err:
        mmfw.load_recipe(recipe)
    assert err.value.key == "model.text.kwargs.trust_remote_code" and err.value.given is True
    assert str(err.value).startswith("key 'model.text.kwargs.trust_remote_code': "
                                     "trust_remote_code for model 'someone/custom-code-model' "
                                     f"{REFUSED}")
    path = write_toml(tmp_path / "text.toml", recipe)
    assert_user_error(cli("check", path), "key 'model.text.kwargs.trust_remote_code'", REFUSED,
                      HINT)
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["model"]["vision"] = {"name": "hf-vision", "model": "someone/vit"}
    path = write_toml(tmp_path / "vision.toml", recipe)
    assert_user_error(cli("check", path, "--set", "model.vision.kwargs.trust_remote_code=true"),
                      "key 'model.vision.kwargs.trust_remote_code'", REFUSED)
    assert cli("check", path).exit_code == 0  # no remote code: nothing to allow


def test_trust_remote_code_is_refused_before_transformers_is_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfw_encoders import hf_text, hub

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(hub, "resolve", no_loading)
    monkeypatch.setattr(hub, "load", no_loading)
    for name in ("hf-text", "hf-vision"):
        with pytest.raises(RecipeError, match=REFUSED) as err:
            mmfw.create("encoder", name, model="someone/custom-code-model",
                        kwargs={"trust_remote_code": True})
        assert err.value.key == "kwargs.trust_remote_code"
    source = hub.Source("someone/x", "someone/x", "hub")
    with pytest.raises(RecipeError) as err:  # the loader checks again, with the full key
        hf_text.load_model(source, "hf-vision", True, {"trust_remote_code": True})
    assert err.value.key == "model.vision.kwargs.trust_remote_code"


def test_trust_remote_code_allowed_reaches_transformers(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers as tf

    from mmfw_encoders import hub

    folder = tmp_path / "tiny-bert"
    (tmp_path / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]), encoding="utf-8")
    tf.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    config = tf.BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32)
    tf.BertModel(config).save_pretrained(folder)
    asked: list[tuple[str, Any]] = []
    load = hub.load

    def spy(source: Any, loader: Any, encoder: str, what: str, **kwargs: Any) -> Any:
        asked.append((what, kwargs.get("trust_remote_code")))
        return load(source, loader, encoder, what, **kwargs)

    monkeypatch.setattr(hub, "load", spy)
    enc = mmfw.create("encoder", "hf-text", model=str(folder), max_length=16)
    assert enc.dim == 16
    assert asked == [("tokenizer", False), ("model", False)]  # never asked on the terminal
    asked.clear()
    monkeypatch.setenv(ALLOW_ENV, "1")
    mmfw.create("encoder", "hf-text", model=str(folder), max_length=16,
                kwargs={"trust_remote_code": True})
    assert asked == [("tokenizer", True), ("model", True)]


def test_url_gopen_rewrites_into_a_pipe_is_refused(tmp_path: Path, marker: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOPEN_REWRITE", f"https://mirror.example/=pipe:touch {marker}")
    with pytest.raises(RecipeError, match=REFUSED) as err:
        mmfw.create("dataset", "webdataset", train="https://mirror.example/a.tar",
                    pairs_per_epoch=4)
    assert err.value.key == "train"
    assert not list(tmp_path.glob(f"{marker.name}*"))
