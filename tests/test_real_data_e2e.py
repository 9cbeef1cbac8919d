"""A real-format dataset end to end through the CLI: a tiny Flickr30k-style folder in Karpathy's
layout (images written with Pillow, several captions each, one corrupt file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from PIL import Image, ImageDraw

import mmfw
from helpers import TINY, cli, deep_merge, run_module, wordpiece_tokenizer
from mmfw.eval.retrieval import METRIC_KEYS

pytestmark = pytest.mark.slow

SHAPES = ("circle", "square")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (235, 215, 40)}
CORRUPT = "flickr30k-images/1000000007.jpg"
SEEDS_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "flickr30k_vit_bert.toml"


@pytest.fixture(scope="module")
def flickr(tmp_path_factory) -> Path:
    """dataset_flickr30k.json + flickr30k-images/: 16 train, 4 val, 6 test images."""
    root = tmp_path_factory.mktemp("flickr")
    (root / "flickr30k-images").mkdir()
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 6
    images = []
    for i, split in enumerate(splits):
        colour = list(COLOURS)[i % 4]
        shape = SHAPES[(i // 4) % 2]
        img = Image.new("RGB", (40 + i % 3 * 8, 32), (20, 20, 24))
        draw = ImageDraw.Draw(img)
        box = (8 + i % 5, 6, 28 + i % 5, 26)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        name = f"{1000000000 + i}.jpg"
        img.save(root / "flickr30k-images" / name, quality=90)
        images.append({
            "filename": name, "imgid": i, "split": split,
            "sentids": [i * 5 + c for c in range(3)],
            "sentences": [{"raw": text, "tokens": text.split(), "imgid": i, "sentid": i * 5 + c}
                          for c, text in enumerate([f"a {colour} {shape} on a dark background",
                                                    f"one {colour} {shape}",
                                                    f"there is a {shape} coloured {colour}"])],
        })
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " * 8)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images,
                                                             "dataset": "flickr30k"}))
    return root


def recipe(root: Path, out: Path, **data) -> Path:
    r = deep_merge(TINY, {
        "run": {"name": "flickr", "output_dir": str(out / "runs"), "epochs": 2},
        "data": {"dataset": "karpathy", "annotations": str(root / "dataset_flickr30k.json"),
                 "images": str(root / "flickr30k-images"), **data},
        "sampler": {"name": "semantic-groups", "k": 2, "batch_size": 8},
        "eval": {"split": "test", "val_split": "val"},
    })
    for key in ("train_images", "val_images", "test_images", "image_size"):
        r["data"].pop(key)
    path = out / "flickr.toml"
    path.write_text(tomli_w.dumps(r), encoding="utf-8")
    return path


def test_corrupt_file_stops_the_run_with_its_path(flickr: Path, tmp_path: Path) -> None:
    proc = run_module("run", recipe(flickr, tmp_path), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "error:" in out and "Traceback" not in out
    assert str(flickr / CORRUPT) in out and "cannot decode image" in out
    assert "1 problem(s)" in out and 'data.on_bad = "skip"' in out
    assert not (tmp_path / "runs" / "flickr" / "checkpoints").exists()  # before training


def test_skip_trains_evaluates_on_test_and_logs_the_skip(flickr: Path, tmp_path: Path) -> None:
    result = cli("run", recipe(flickr, tmp_path, num_workers=1), "--set", "data.on_bad=skip")
    out = result.output
    assert result.exit_code == 0, out
    assert "skipped 1 bad item(s) of the 'train' split" in out
    run_dir = tmp_path / "runs" / "flickr"
    skipped = [json.loads(x) for x in (run_dir / "skipped.jsonl").read_text().splitlines()]
    assert [(s["where"], s["split"], s["when"]) for s in skipped] == [
        (str(flickr / CORRUPT), "train", "scan")]
    assert "cannot decode image" in skipped[0]["reason"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= set(METRIC_KEYS)
    assert 0 <= metrics["i2t_R@1"] <= 100
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # 15 usable train images x 3 captions = 45 pairs: 5 batches of 8 per epoch, 2 epochs
    assert max(r["step"] for r in rows if r["type"] == "train") == 10
    evals = [r for r in rows if r["type"] == "eval"]
    assert {r["split"] for r in evals} == {"val", "test"}
    assert "data: karpathy 'train' split, 15 images, 45 pairs" in out


def test_the_seeds_recipe_validates() -> None:
    result = cli("check", SEEDS_RECIPE)
    assert result.exit_code == 0, result.output
    r = mmfw.load_recipe(SEEDS_RECIPE)
    assert (r.model.vision.name, r.model.vision.options.model) == (
        "hf-vision", "google/vit-base-patch16-224")
    assert (r.model.text.name, r.model.text.options.model) == ("hf-text", "bert-base-uncased")
    assert r.data.dataset.name == "karpathy" and r.sampler.plugin.name == "semantic-groups"
    assert r.data.dataset.options.annotations.endswith("dataset_flickr30k.json")


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory, flickr: Path) -> dict[str, Path]:
    """ViT and BERT folders written by save_pretrained: tiny, random, loaded like hub names."""
    import transformers as tf

    root = tmp_path_factory.mktemp("hub")
    words = sorted({w for p in (flickr / "dataset_flickr30k.json",)
                    for img in json.loads(p.read_text())["images"]
                    for s in img["sentences"] for w in s["raw"].lower().split()})
    tok = wordpiece_tokenizer(root, words)
    text = tf.BertModel(tf.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64,
                                      max_position_embeddings=64))
    text.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, image_size=32, patch_size=8))
    vit.save_pretrained(root / "vit")
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    return {"vision": root / "vit", "text": root / "bert"}


def test_the_seeds_recipe_runs_on_a_tiny_flickr(flickr: Path, tiny_hub, tmp_path: Path) -> None:
    """recipes/flickr30k_vit_bert.toml as written (semantic groups, seed 000 augmentation with
    WordNet synonyms, GradCache accumulation, OneCycle), with tiny local models for the hub
    names and the tiny folder for Flickr30k."""
    sets = [f"model.vision.model={tiny_hub['vision']}", f"model.text.model={tiny_hub['text']}",
            f"data.annotations={flickr / 'dataset_flickr30k.json'}",
            f"data.images={flickr / 'flickr30k-images'}", "data.on_bad=skip",
            "data.num_workers=0", "run.epochs=1", f"run.output_dir={tmp_path / 'runs'}",
            "run.progress=false", "sampler.batch_size=8", "optim.accumulate=2",
            "model.embed_dim=32", "backend.name=cpu", "eval.batch_size=8"]
    result = cli("run", SEEDS_RECIPE, *[x for s in sets for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "runs" / "flickr30k_vit_bert" / "metrics.json").read_text())
    assert set(metrics) >= set(METRIC_KEYS)
