"""``[model.lock_text]``: a frozen text tower in eval mode whose outputs for the training
captions are computed once (the ``lock-text`` callback and ``mmfw.model.FeatureTable``).

A tiny random BERT (dropout on) is written with ``save_pretrained`` and loaded by ``hf-text``
from its folder, as a hub name would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
import tomllib
import torch
import transformers as tf
from safetensors.torch import load_file

import mmfw
from helpers import assert_user_error, cli, tiny_recipe, wordpiece_tokenizer
from mmfw.spi import FeatureTable

WORDS = ["a", "small", "red", "circle", "left", "of", "blue", "square", "green", "star",
         "above", "yellow", "triangle", "right", "below", "big", "the"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bert")
    tok = wordpiece_tokenizer(root, WORDS)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(tf.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1))
    model.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root / "bert"


def _recipe(tmp_path: Path, bert: Path, name: str, *, lock: bool = True, freeze: bool = True,
            steps: int = 4) -> Path:
    data = tiny_recipe(tmp_path / "runs", name=name,
                       run={"epochs": 2, "max_steps": steps, "log_every": 1},
                       eval={"val_split": ""},
                       schedule={"name": "constant", "warmup_steps": 0},
                       optim={"freeze": ["text"] if freeze else []})
    data["model"]["text"] = {"name": "hf-text", "model": str(bert), "pooling": "mean"}
    if lock:
        data["model"]["lock_text"] = {"batch_size": 7}  # batches that do not divide the split
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(f for f in (run_dir / "checkpoints").glob("step-*.safetensors")
                   if not f.name.endswith(".train.safetensors"))
    return load_file(str(files[-1]))


def test_table_keys_ignore_padding() -> None:
    a = {"input_ids": torch.tensor([[5, 6, 7, 0, 0]]), "attention_mask": torch.tensor(
        [[1, 1, 1, 0, 0]])}
    b = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    assert FeatureTable.keys(a) == FeatureTable.keys(b)
    assert FeatureTable.keys({"input_ids": torch.tensor([[5, 6]])}) is None


def test_locked_run_looks_captions_up_and_matches_the_tower(bert, tmp_path) -> None:
    result = cli("run", _recipe(tmp_path, bert, "locked"))
    assert result.exit_code == 0, result.output
    assert "locked text tower:" in result.output and "training captions embedded once" in \
        result.output
    run = mmfw.load_run(tmp_path / "runs" / "locked")
    trained = _weights(tmp_path / "runs" / "locked")
    start = tf.AutoModel.from_pretrained(bert).state_dict()
    kept = {k: v for k, v in start.items() if f"model.text.model.{k}" in trained}
    assert len(kept) > 10  # all but the pooler, which mean pooling leaves out
    for k, v in kept.items():  # the locked tower did not move
        assert torch.equal(trained[f"model.text.model.{k}"], v), k
    # a table of the tower's eval-mode outputs gives what the tower gives, padding aside
    model = run.model.eval().requires_grad_(False)
    captions = ["a small red circle", "the big blue square left of a star", "a star"]
    tokens = model.text.tokenize(captions)
    with torch.no_grad():
        direct = model.text(tokens)
        model.text_table = FeatureTable(FeatureTable.keys(tokens), direct)
        model.train()
        assert not model.text.training, "a locked tower stays in eval mode"
        # one known caption among unknown ones, padded to another length
        again = model.encode_text(model.text.tokenize(["green triangle above", captions[1]]))
        alone = model.text_adapter(model.text(model.text.tokenize(["green triangle above"])))
    torch.testing.assert_close(again[1], model.text_adapter(direct)[1])
    torch.testing.assert_close(again[0], alone[0])


def test_table_embeds_each_distinct_caption_once(bert, tmp_path) -> None:
    """Built shortest caption first (little padding), a caption repeated in the split, also
    within one batch, is embedded once: the table holds one row per distinct caption."""
    from PIL import Image

    names = ["a red circle", "the big blue square left of a star", "a star", "green star"]
    entries = []
    for i in range(24):
        Image.new("RGB", (16, 16), (i * 10, 40, 200 - i * 5)).save(tmp_path / f"{i}.png")
        split = "train" if i < 16 else "test"
        # every caption of the split is one of four, most of them many times
        caps = [names[i % 4], names[(i + 1) % 4]] if split == "train" else [f"picture {i}"]
        entries.append({"filename": f"{i}.png", "imgid": i, "split": split,
                        "sentences": [{"raw": c} for c in caps]})
    ann = tmp_path / "dataset_dup.json"
    ann.write_text(json.dumps({"images": entries}), encoding="utf-8")
    path = _recipe(tmp_path, bert, "dup")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    data["data"] = {"dataset": "karpathy", "annotations": str(ann), "images": str(tmp_path)}
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert "locked text tower: 4 training captions embedded once" in result.output


def test_locked_steps_equal_the_frozen_eval_mode_tower(bert, tmp_path) -> None:
    """The same run without the table but with the frozen tower's dropout off trains to the
    same weights (the table holds the tower's own outputs, batched differently)."""
    result = cli("run", _recipe(tmp_path, bert, "locked"))
    assert result.exit_code == 0, result.output
    plain = _recipe(tmp_path, bert, "plain", lock=False)
    data = plain.read_text().replace("[model.text]", "[model.text]\nkwargs = { "
                                     "hidden_dropout_prob = 0.0, "
                                     "attention_probs_dropout_prob = 0.0 }", 1)
    plain.write_text(data, encoding="utf-8")
    result = cli("run", plain)
    assert result.exit_code == 0, result.output
    got, want = _weights(tmp_path / "runs" / "locked"), _weights(tmp_path / "runs" / "plain")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_locked_run_resumes_exactly(bert, tmp_path) -> None:
    for name, steps in (("unbroken", 4), ("resumed", 2)):
        result = cli("run", _recipe(tmp_path, bert, name, steps=steps))
        assert result.exit_code == 0, result.output
    result = cli("run", tmp_path / "resumed.toml", "--resume", "--set", "run.max_steps=4")
    assert result.exit_code == 0, result.output
    got, want = _weights(tmp_path / "runs" / "resumed"), _weights(tmp_path / "runs" / "unbroken")
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_lock_needs_a_frozen_tower(bert, tmp_path) -> None:
    result = cli("run", _recipe(tmp_path, bert, "unfrozen", freeze=False))
    assert_user_error(result, "[model.lock_text]", "add \"text\" to optim.freeze",
                      "text.model.", code=result.exit_code)
    assert result.exit_code != 0
