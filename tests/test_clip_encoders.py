"""``clip-vision`` / ``clip-text``: the towers of a pretrained CLIP or SigLIP, loaded from tiny
random ``CLIPModel`` / ``SiglipModel`` folders written by ``save_pretrained`` (the path a hub
name takes), give exactly transformers' ``get_image_features`` / ``get_text_features``, start
the loss at the pair's own temperature, train, and carry the two fine-tuning recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomli_w
import torch
import transformers as tf
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import mmfw
from helpers import assert_user_error, cli, tiny_recipe, wordpiece_tokenizer
from mmfw.eval.retrieval import METRIC_KEYS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PX, PROJ = 16, 24
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (235, 215, 40)}
SHAPES = ("circle", "square")
CAPTIONS = [f"a {c} {s} on a dark background" for c in COLOURS for s in SHAPES]


def _image(i: int, size: int = PX) -> Image.Image:
    colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
    img = Image.new("RGB", (size, size), (20, 20, 24))
    box = (2 + i % 3, 3, size - 3, size - 2 - i % 2)
    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
        box, fill=COLOURS[colour])
    return img


def _tokenizer(family: str) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions, with CLIP's or SigLIP's special tokens."""
    words = sorted({w for c in CAPTIONS for w in c.split()} | {"one", "there", "is", "coloured"})
    if family == "clip":
        bos, eos = "<|startoftext|>", "<|endoftext|>"
        specials = ["[UNK]", bos, eos]
    else:  # SigLIP: no start token, "</s>" ends and pads
        bos, eos = None, "</s>"
        specials = ["[UNK]", eos]
    vocab = {t: i for i, t in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    extra = {"model_input_names": ["input_ids"]} if family == "siglip" else {}
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=eos,
                                      pad_token=eos, **({"bos_token": bos} if bos else {}),
                                      **extra)


def _save(family: str, folder: Path) -> Path:
    tok = _tokenizer(family)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    text = dict(common, vocab_size=len(tok), max_position_embeddings=16,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(common, image_size=PX, patch_size=8)
    torch.manual_seed(0 if family == "clip" else 1)
    if family == "clip":
        text["bos_token_id"] = tok.bos_token_id
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision,
                                           projection_dim=PROJ))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": PX},
                                          crop_size={"height": PX, "width": PX})
    else:
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
        processor = tf.SiglipImageProcessor(size={"height": PX, "width": PX}, resample=2)
    with torch.no_grad():  # a trained-looking scale and bias, far from the losses' defaults
        model.logit_scale.fill_(math.log(50.0))
        if family == "siglip":
            model.logit_bias.fill_(-6.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip")
    return {family: _save(family, root / family) for family in ("clip", "siglip")}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_towers_give_transformers_features_and_ranking(folders, family: str) -> None:
    folder = folders[family]
    vision = mmfw.create("encoder", "clip-vision", model=str(folder)).eval()
    text = mmfw.create("encoder", "clip-text", model=str(folder)).eval()
    full = tf.AutoModel.from_pretrained(folder).eval()
    processor = tf.AutoImageProcessor.from_pretrained(folder)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    images = [_image(i) for i in range(8)]
    with torch.no_grad():
        pixels = torch.stack([vision.preprocess(im) for im in images])
        reference_pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        assert torch.allclose(pixels, reference_pixels, atol=1e-5)
        uint8 = torch.stack([vision.preprocess_uint8(im) for im in images])
        assert uint8.dtype == torch.uint8
        assert torch.allclose(vision.normalize(uint8), pixels, atol=1e-6)

        mine_img = vision(pixels)
        ref_img = full.get_image_features(pixel_values=reference_pixels)
        padding = "max_length" if family == "siglip" else True
        enc = tokenizer(CAPTIONS, padding=padding, truncation=True, max_length=16,
                        return_tensors="pt")
        ref_txt = full.get_text_features(**enc)
        mine_txt = text(text.tokenize(CAPTIONS))
    # transformers v5 returns an output object, v4 a tensor
    ref_img, ref_txt = (getattr(x, "pooler_output", x) for x in (ref_img, ref_txt))
    width = PROJ if family == "clip" else 32
    assert vision.dim == text.dim == width == mine_img.shape[1] == mine_txt.shape[1]
    assert torch.allclose(mine_img, ref_img, atol=1e-5)
    assert torch.allclose(mine_txt, ref_txt, atol=1e-5)

    def ranking(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sim = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
        return sim.argsort(dim=1, descending=True)

    assert torch.equal(ranking(mine_img, mine_txt), ranking(ref_img, ref_txt))
    assert torch.equal(ranking(mine_txt, mine_img), ranking(ref_txt, ref_img))
    with torch.no_grad():  # token features for [model.fusion]: the towers' hidden width
        tokens, mask = text.forward_tokens(text.tokenize(CAPTIONS[:2]))
        patches, _ = vision.forward_tokens(pixels[:2])
    assert tokens.shape[-1] == patches.shape[-1] == text.token_dim == vision.token_dim == 32
    assert mask.shape == tokens.shape[:2] and mask.dtype == torch.bool
    assert vision.initial_temperature() == pytest.approx(math.exp(-full.logit_scale.item()))
    expected_bias = full.logit_bias.item() if family == "siglip" else None
    assert text.initial_bias() == (pytest.approx(expected_bias) if expected_bias else None)


def _clip_recipe(folder: Path, out: Path, name: str, **sections) -> dict:
    towers = {"vision": {"name": "clip-vision", "model": str(folder)},
              "text": {"name": "clip-text", "model": str(folder)}}
    model = {"embed_dim": PROJ if folder.name == "clip" else 32, **towers,
             "adapter": {"name": "identity"}}
    data = tiny_recipe(out, name, **sections)
    data["model"] = model  # the TINY recipe's scratch towers replaced, not merged into
    return data


@pytest.mark.parametrize("given", [False, True])
def test_siglip_start_bias_and_a_given_temperature_wins(folders, tmp_path: Path,
                                                        given: bool) -> None:
    from mmfw.train.loop import Trainer

    loss = {"name": "siglip", **({"temperature": 0.2} if given else {})}
    data = _clip_recipe(folders["siglip"], tmp_path, f"siglip{given}", loss=loss,
                        data={"train_images": 8, "val_images": 4, "test_images": 4,
                              "image_size": PX}, sampler={"batch_size": 4})
    trainer = Trainer(mmfw.load_recipe(data), console=lambda s: None)
    try:
        options = trainer.recipe.loss.options
        assert options.bias == pytest.approx(-6.5)  # not given: SigLIP's learned logit_bias
        assert options.temperature == pytest.approx(0.2 if given else 1 / 50)
        (temperature,) = trainer.opt.temperatures
        assert temperature.value == pytest.approx(options.temperature, rel=1e-5)
        if not given:  # one SigLIP step: finite, and the towers and the temperature move
            before = [p.detach().clone() for p in trainer.model.vision.parameters()]
            step = trainer.run_step(next(iter(trainer.loader)))
            assert torch.isfinite(step.output.loss)
            assert temperature.value != pytest.approx(options.temperature, rel=1e-7)
            after = list(trainer.model.vision.parameters())
            assert any(not torch.equal(a, b) for a, b in zip(after, before))
    finally:
        trainer.release()


def test_one_pretrained_tower_is_not_a_pair_and_keeps_the_default(folders,
                                                                   tmp_path: Path) -> None:
    from mmfw.train.loop import Trainer

    data = tiny_recipe(tmp_path, "half", data={"train_images": 8, "val_images": 4,
                                               "test_images": 4, "image_size": PX},
                       sampler={"batch_size": 4})
    data["model"] = {"embed_dim": 32, "adapter": {"name": "linear"},
                     "vision": {"name": "clip-vision", "model": str(folders["clip"])},
                     "text": data["model"]["text"]}  # TINY's scratch-text: a new tower
    said: list[str] = []
    trainer = Trainer(mmfw.load_recipe(data), console=said.append)
    try:
        default = mmfw.load_recipe(data).loss.options.temperature
        assert trainer.recipe.loss.options.temperature == default
        assert any("loss.temperature keeps its default" in s and "text encoder none" in s
                   for s in said), said
    finally:
        trainer.release()


def test_temperature_is_read_from_a_sharded_checkpoint(folders, tmp_path: Path) -> None:
    full = tf.CLIPModel.from_pretrained(folders["clip"])
    full.save_pretrained(tmp_path, max_shard_size="40KB")
    tf.AutoImageProcessor.from_pretrained(folders["clip"]).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    vision = mmfw.create("encoder", "clip-vision", model=str(tmp_path))
    assert vision.initial_temperature() == pytest.approx(math.exp(-full.logit_scale.item()))
    assert vision.initial_bias() is None


def test_lora_on_a_clip_tower_trains_adapters_and_merges_back(folders) -> None:
    text = mmfw.create("encoder", "clip-text", model=str(folders["clip"]),
                       lora={"rank": 4, "alpha": 8.0}, grad_checkpointing=True)
    trainable = [n for n, p in text.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    with torch.no_grad():
        for n, p in text.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero: give the adapters something to merge
    tokens = text.tokenize(CAPTIONS[:3])
    text.eval()
    with torch.no_grad():
        adapted = text(tokens)
        text.merge_adapters()
        assert not any("lora_" in n for n, _ in text.named_parameters())
        assert torch.allclose(text(tokens), adapted, atol=1e-5)


def test_known_models_list_the_clip_rows() -> None:
    result = cli("list", "encoder", "--models")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "openai/clip-vit-base-patch32" in line]
    assert any("clip-vision" in r for r in rows) and any("clip-text" in r for r in rows)
    assert any("512" in r for r in rows)


def test_a_folder_that_is_not_clip_is_one_clear_error(folders, tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    tf.BertModel(tf.BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    data = _clip_recipe(folders["clip"], tmp_path, "notclip")
    data["model"]["vision"]["model"] = str(bert)
    path = tmp_path / "notclip.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    assert_user_error(cli("run", path), "clip-vision", "'bert' model, not CLIP or SigLIP",
                      "hf-vision")


# the two recipes as they ship -------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["finetune_clip", "flickr30k_lora"])
def test_the_recipes_validate(recipe: str) -> None:
    result = cli("check", RECIPES / f"{recipe}.toml")
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def flickr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Karpathy-format folder: dataset_flickr30k.json + flickr30k-images/ (8/2/4 images)."""
    root = tmp_path_factory.mktemp("flickr")
    (root / "flickr30k-images").mkdir()
    images = []
    for i, split in enumerate(["train"] * 8 + ["val"] * 2 + ["test"] * 4):
        name = f"{1000 + i}.jpg"
        _image(i, 24).save(root / "flickr30k-images" / name, quality=90)
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        texts = [f"a {colour} {shape} on a dark background", f"one {colour} {shape}"]
        images.append({"filename": name, "imgid": i, "split": split,
                       "sentences": [{"raw": t, "tokens": t.split(), "imgid": i,
                                      "sentid": i * 2 + c} for c, t in enumerate(texts)]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    return root


@pytest.fixture(scope="module")
def vit_bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny ViT and BERT folders for the hub names of flickr30k_lora.toml."""
    root = tmp_path_factory.mktemp("hub")
    tok = wordpiece_tokenizer(root, sorted({w for c in CAPTIONS for w in c.split()} | {"one"}))
    torch.manual_seed(2)
    tf.BertModel(tf.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=64)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, image_size=PX, patch_size=8)
                ).save_pretrained(root / "vit")
    tf.ViTImageProcessor(size={"height": PX, "width": PX}).save_pretrained(root / "vit")
    return {"vision": root / "vit", "text": root / "bert"}


@pytest.mark.parametrize("recipe", ["finetune_clip", "flickr30k_lora"])
def test_the_recipes_run_end_to_end_on_tiny_models(recipe: str, folders, vit_bert, flickr,
                                                   tmp_path: Path) -> None:
    """Each recipe as written (LoRA, checkpointing, EMA, GradCache; CLIP towers, identity
    adapters, CLIP's temperature), its hub names pointed at tiny local folders and its data
    at the tiny Karpathy folder, for two steps and the final evaluation."""
    towers = ({"vision": folders["clip"], "text": folders["clip"]} if recipe == "finetune_clip"
              else vit_bert)
    sets = [f"model.vision.model={towers['vision']}", f"model.text.model={towers['text']}",
            f"data.annotations={flickr / 'dataset_flickr30k.json'}",
            f"data.images={flickr / 'flickr30k-images'}", "data.num_workers=0",
            "run.max_steps=2", f"run.output_dir={tmp_path}", "run.progress=false",
            "sampler.batch_size=8", "backend.name=cpu", "backend.threads=1",
            "eval.batch_size=8", "schedule.warmup_steps=1", "diagnostics.map_method=pca"]
    if recipe == "finetune_clip":
        sets.append(f"model.embed_dim={PROJ}")
    else:
        sets.append("optim.accumulate=2")  # GradCache: 2 micro-batches of 4
    result = cli("run", RECIPES / f"{recipe}.toml", *[x for s in sets for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / recipe
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= set(METRIC_KEYS)
    resolved = mmfw.load_recipe(run_dir / "recipe.toml")
    if recipe == "finetune_clip":  # temperature not in the recipe: the CLIP's own, 1/50
        assert resolved.loss.options.temperature == pytest.approx(1 / 50)
        assert "loss.temperature starts at 0.02, from the pretrained pair" in result.output
        loaded = mmfw.load(run_dir)
        assert loaded.encode_texts(CAPTIONS[:2]).shape == (2, PROJ)
    else:
        assert resolved.loss.options.temperature == pytest.approx(0.07)
        assert resolved.callbacks["ema"].options.decay == pytest.approx(0.998)
        assert resolved.model.text.options.lora.rank == 16
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["type"] == "train") == 2
