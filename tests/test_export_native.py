"""The ``mmfw`` export of towers loaded from Hugging Face folders is self-contained: with the
original model folders moved away, ``mmfw.load`` rebuilds both towers from the export alone
(``pretrained = false`` from the saved config, weights from the export) and embeds as the run
did: bit for bit for the plain vision tower, to float precision for the text tower, whose
LoRA adapters the export folds into its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from PIL import Image

import mmfw
from helpers import cli, tiny_recipe

WORDS = ["a", "red", "blue", "green", "small", "large", "circle", "square", "triangle",
         "star", "left", "right", "of", "above"]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-step run of a tiny ViT and a tiny BERT with LoRA, each saved by save_pretrained."""
    root = tmp_path_factory.mktemp("hf-export")
    models = root / "models"
    chars = sorted({c for w in WORDS for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars),
             *WORDS]
    models.mkdir()
    (models / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tok = tf.BertTokenizerFast(vocab=str(models / "vocab.txt"))
    torch.manual_seed(0)
    tf.AutoModel.from_config(tf.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=len(tok), max_position_embeddings=32)).save_pretrained(models / "bert")
    tok.save_pretrained(models / "bert")
    tf.AutoModel.from_config(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=8)).save_pretrained(models / "vit")
    tf.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(models / "vit")
    recipe = tiny_recipe(root / "runs", "hf", run={"epochs": 1, "max_steps": 2},
                         diagnostics={"every": 0, "map_points": 0})
    recipe["model"]["vision"] = {"name": "hf-vision", "model": str(models / "vit")}
    recipe["model"]["text"] = {"name": "hf-text", "model": str(models / "bert"),
                               "max_length": 16, "lora": {"rank": 4}}
    return mmfw.train(mmfw.load_recipe(recipe)).run_dir, models


def test_hf_towers_export_without_their_original_folders(hf_run: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    run_dir, models = hf_run
    images = [Image.new("RGB", (20 + i, 18), (40 * i, 120, 60)) for i in range(5)]
    texts = ["a red circle", "blue square left of a star", "large green triangle"]
    run = mmfw.load(run_dir, precision="fp32")  # bf16 would round the merged sums apart
    want_img, want_txt = run.encode_images(images), run.encode_texts(texts)
    result = cli("export", run_dir, "--output", tmp_path / "export")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "export" / "mmfw-export.json").read_text())
    assert "lora" not in manifest["model"]["text"]  # merged: rebuilt as a plain tower
    for section in ("vision", "text"):
        assert manifest["model"][section]["pretrained"] is False
        assert manifest["paths"][f"{section}.model"].startswith("{folder}/towers/")
    away = shutil.move(models, tmp_path / "away")  # the towers' own folders are gone
    try:
        exported = mmfw.load(tmp_path / "export", precision="fp32")
        assert torch.equal(exported.encode_images(images), want_img)
        # LoRA folded into the text tower's weights: the same function, other float sums
        assert torch.allclose(exported.encode_texts(texts), want_txt, atol=1e-6)
    finally:
        shutil.move(away, models)
