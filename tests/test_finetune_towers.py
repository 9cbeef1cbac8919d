"""Fine-tuning the towers: gradient checkpointing (same gradients, composes with GradCache) and
LoRA through peft (trainable counts, merge, errors, freezing, checkpoints and --resume).

Tiny random models (width 32, 1-2 layers) are written with ``save_pretrained`` / built by timm
and loaded back through the encoders' own loading path, as a hub name would be.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import mmfw
from helpers import assert_user_error, cli, tiny_recipe, wordpiece_tokenizer
from mmfw.errors import RecipeError
from mmfw.train.params import ParamTable
from mmfw_encoders.lora import default_targets

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

WORDS = ["a", "small", "red", "circle", "left", "of", "blue", "square", "green", "star",
         "above", "yellow", "triangle"]
TIMM_TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
#: dropout everywhere, so the checkpointed recomputation must replay the same masks
HF_DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT (with a WordPiece tokenizer) and a tiny HF ViT (with its processor)."""
    root = tmp_path_factory.mktemp("towers")
    tok = wordpiece_tokenizer(root, WORDS)
    torch.manual_seed(0)
    bert = tf.AutoModel.from_config(tf.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    vit = tf.AutoModel.from_config(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=8))
    vit.save_pretrained(root / "vit")
    tf.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")
    return {"bert": root / "bert", "vit": root / "vit"}


def _options(name: str, folders: dict[str, Path]) -> dict[str, Any]:
    """Options of a tiny ``name`` encoder, with dropout on where the encoder has it."""
    if name == "hf-text":
        return {"model": str(folders["bert"]), "kwargs": HF_DROPOUT}
    if name == "hf-vision":
        return {"model": str(folders["vit"]), "kwargs": HF_DROPOUT}
    if name == "timm-vision":
        return {"model": "vit_tiny_patch16_224", "pretrained": False,
                "kwargs": {**TIMM_TINY, "proj_drop_rate": 0.1, "attn_drop_rate": 0.1,
                           "drop_path_rate": 0.1}}
    if name == "scratch-text":
        return {"width": 32, "depth": 2, "heads": 2, "vocab_size": 64, "dropout": 0.1}
    return {"image_size": 16, "patch_size": 8, "width": 32, "depth": 2, "heads": 2}


def _inputs(enc: torch.nn.Module) -> Any:
    if enc.modality == "image":
        torch.manual_seed(1)
        return torch.randn(3, 3, *getattr(enc, "image_size", (16, 16)))
    texts = ["a small red circle", "blue square left of a green star", "a star"]
    if getattr(enc, "tokenizer", "") is None:  # scratch-text: train its WordPiece first
        enc.prepare(texts)
    return enc.tokenize(texts)


def _grads(enc: torch.nn.Module, inputs: Any) -> dict[str, torch.Tensor]:
    enc.train()
    enc.zero_grad()
    torch.manual_seed(7)  # the same dropout masks in both runs
    out = enc(inputs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


ENCODERS = ("hf-text", "hf-vision", "timm-vision", "scratch-text", "scratch-vision")


@pytest.mark.parametrize("name", ENCODERS)
def test_grad_checkpointing_gives_identical_gradients(name, folders) -> None:
    """Bit-identical (torch.equal): non-reentrant checkpointing recomputes the same ops in
    the same order on CPU, under the RNG state it saved (dropout, drop-path)."""
    options = _options(name, folders)
    plain = mmfw.create("encoder", name, **options)
    ckpt = mmfw.create("encoder", name, **options, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    inputs = _inputs(plain)
    if name == "scratch-text":
        ckpt.tokenizer = plain.tokenizer
    want, got = _grads(plain, inputs), _grads(ckpt, inputs)
    assert want.keys() == got.keys() and len(want) > 0
    for n in want:
        assert torch.equal(want[n], got[n]), n
    # and it is really on: the forward keeps far fewer tensors for the backward
    assert _saved_bytes(ckpt, inputs) < 0.4 * _saved_bytes(plain, inputs)


def _saved_bytes(enc: torch.nn.Module, inputs: Any) -> int:
    """Bytes of the tensors autograd saves for the backward in one training forward (what
    checkpointing's own hooks keep inside a checkpointed block is not seen from outside)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    enc.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(inputs)
    return total


def test_grad_checkpointing_is_switched_on_in_the_libraries(folders) -> None:
    hf = mmfw.create("encoder", "hf-text", **_options("hf-text", folders),
                     grad_checkpointing=True)
    assert _hf_checkpointing(hf.model)
    timm_enc = mmfw.create("encoder", "timm-vision", **_options("timm-vision", folders),
                           grad_checkpointing=True)
    assert timm_enc.model.grad_checkpointing
    assert not _hf_checkpointing(mmfw.create("encoder", "hf-text",
                                             **_options("hf-text", folders)).model)


def _hf_checkpointing(model: torch.nn.Module) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)  # transformers 5
    return bool(model.is_activation_checkpointing if flag is not None
                else model.is_gradient_checkpointing)


# ------------------------------------------------------------------------------------------
# LoRA

LORA_CASES = {  # encoder -> (default targets, LoRA-wrapped layers: (in, out) each)
    "hf-text": ({("query", "value")}, [(32, 32)] * 4),
    # transformers 5 renamed ViT's projections (query -> q_proj): found from the names present
    "hf-vision": ({("query", "value"), ("q_proj", "v_proj")}, [(32, 32)] * 4),
    "timm-vision": ({("qkv",)}, [(32, 96)]),
}


def _base(name: str, folders: dict[str, Path]) -> torch.nn.Module:
    """The tower's model built the way the encoder builds it, without mmfw."""
    return mmfw.create("encoder", name, **_options(name, folders)).model


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft's call
@pytest.mark.parametrize("name", sorted(LORA_CASES))
def test_lora_trainable_parameters_are_peft_s_and_the_formula(name, folders) -> None:
    names, layers = LORA_CASES[name]
    targets = default_targets(_base(name, folders))
    assert targets in names
    rank = 4
    enc = mmfw.create("encoder", name, **_options(name, folders),
                      lora={"rank": rank, "alpha": 8.0})
    trainable = {n: p.numel() for n, p in enc.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    formula = sum(rank * (i + o) for i, o in layers)  # A: r x in, B: out x r
    peft_model = get_peft_model(_base(name, folders),
                                LoraConfig(r=rank, lora_alpha=8.0, target_modules=list(targets)))
    assert sum(trainable.values()) == formula == peft_model.get_nb_trainable_parameters()[0]
    # every parameter still belongs to one of the encoder's groups (freezing, layer decay)
    grouped = [n for names in enc.named_groups().values() for n in names]
    assert sorted(grouped) == sorted(n for n, _ in enc.named_parameters())


@pytest.mark.parametrize("name", sorted(LORA_CASES))
def test_merged_adapters_give_the_same_outputs_without_peft(name, folders) -> None:
    enc = mmfw.create("encoder", name, **_options(name, folders),
                      lora={"rank": 4, "alpha": 8.0, "dropout": 0.1})
    with torch.no_grad():  # B starts at zero: give the adapters something to merge
        for n, p in enc.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.5)
    enc.eval()
    inputs = _inputs(enc)
    with torch.no_grad():
        before = enc(inputs)
    base_keys = set(_base(name, folders).state_dict())
    enc.merge_adapters()
    assert not any(isinstance(m, BaseTunerLayer) for m in enc.modules())
    assert set(enc.model.state_dict()) == base_keys  # a plain transformers / timm model again
    with torch.no_grad():
        after = enc(inputs)
    assert (before - after).abs().max() <= 1e-5
    without = mmfw.create("encoder", name, **_options(name, folders)).eval()
    with torch.no_grad():
        assert (without(inputs) - after).abs().max() > 1e-3, "the adapters changed the model"


def test_lora_merged_text_tower_saves_and_loads_as_plain_transformers(folders, tmp_path):
    enc = mmfw.create("encoder", "hf-text", model=str(folders["bert"]), lora={"rank": 2})
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.5)
    enc.eval()
    tokens = _inputs(enc)
    with torch.no_grad():
        want = enc(tokens)
    enc.merge_adapters()
    enc.model.save_pretrained(tmp_path / "merged")
    enc.tokenizer.save_pretrained(tmp_path / "merged")
    again = mmfw.create("encoder", "hf-text", model=str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert (again(tokens) - want).abs().max() <= 1e-5


def test_lora_mistakes_are_one_line_recipe_errors(folders) -> None:
    with pytest.raises(RecipeError) as err:
        mmfw.create("encoder", "hf-text", model=str(folders["bert"]),
                    lora={"target_modules": ["qeury"]})
    text = str(err.value)
    assert "\n" not in text and "'model.text.lora.target_modules'" in text
    assert "'query'" in text and "'qeury'" in text
    with pytest.raises(RecipeError) as err:
        mmfw.create("encoder", "timm-vision", **_options("timm-vision", folders),
                    lora={"target_modules": ["attn"]})  # a module LoRA cannot wrap
    assert "'model.vision.lora.target_modules'" in str(err.value)
    assert "'qkv'" in str(err.value)
    with pytest.raises(RecipeError) as err:
        mmfw.create("encoder", "timm-vision", **_options("timm-vision", folders),
                    lora={"trainable": ["haed"]})
    assert "'model.vision.lora.trainable'" in str(err.value) and "'head'" in str(err.value)
    for lora, key, fragment in (({"rank": 0}, "rank", "> 0"),
                                ({"dropout": 1.0}, "dropout", "[0, 1)"),
                                ({"rnak": 4}, "rnak", "'rank'")):
        data = tiny_recipe("runs")
        data["model"]["text"] = {"name": "hf-text", "model": "bert", "lora": lora}
        with pytest.raises(RecipeError) as err:
            mmfw.load_recipe(data)
        assert f"'model.text.lora.{key}'" in str(err.value) and fragment in str(err.value)


def test_lora_tables_in_recipes(folders, write_recipe, tmp_path) -> None:
    """A resolved recipe writes [model.<tower>.lora] when set and nothing when not (TOML has
    no null) and reads back the same; a target that does not exist stops `mmfw run` with
    one clear error."""
    data = tiny_recipe(tmp_path / "runs")
    data["model"]["text"] = {"name": "hf-text", "model": str(folders["bert"]),
                             "grad_checkpointing": True}
    plain = mmfw.load_recipe(data)
    assert plain.model.text.options.lora is None
    assert "lora" not in tomllib.loads(plain.to_toml())["model"]["text"]
    data["model"]["text"]["lora"] = {"rank": 4, "target_modules": ["query"]}
    recipe = mmfw.load_recipe(data)
    again = mmfw.load_recipe(tomllib.loads(recipe.to_toml()))
    assert again.model.text.options == recipe.model.text.options
    assert again.model.text.options.lora.target_modules == ("query",)
    data["model"]["text"]["lora"]["target_modules"] = ["querry"]
    out = assert_user_error(cli("run", write_recipe(data)), "model.text.lora.target_modules",
                            "'query'")
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 1


def test_lora_composes_with_freeze_patterns(folders) -> None:
    """The tower's base is frozen by the encoder (``trainable`` excepted); the recipe's
    freeze / stage patterns then act on the adapters and those parameters."""
    enc = mmfw.create("encoder", "timm-vision", **_options("timm-vision", folders),
                      lora={"rank": 2, "trainable": ["head", "*.qkv.bias"]})
    model = torch.nn.ModuleDict({"vision": enc})
    table = ParamTable(model, {})
    names = {p.name for p in table}
    assert names == {"vision.model.blocks.0.attn.qkv.lora_A.default.weight",
                     "vision.model.blocks.0.attn.qkv.lora_B.default.weight",
                     "vision.model.blocks.0.attn.qkv.base_layer.bias",
                     "vision.model.norm.weight", "vision.model.norm.bias"}
    assert table.freeze(["vision"]) == [] and len(table.frozen()) == len(names)
    table.freeze([])  # a later stage unfreezes the tower: the adapters train, the base not
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == \
        {n.removeprefix("vision.") for n in names}


# ------------------------------------------------------------------------------------------
# training runs: GradCache + checkpointing + LoRA, checkpoints and --resume

def _recipe(tmp_path: Path, folders: dict[str, Path], name: str, ckpt: bool, steps: int,
            dropout: float) -> Path:
    """hf-vision with LoRA (rank 2, the final norm trainable) + scratch-text, GradCache in two
    chunks, 4 optimizer steps at most."""
    hf_dropout = {k: dropout for k in HF_DROPOUT}
    data = tiny_recipe(
        tmp_path / "runs", name=name,
        run={"epochs": 2, "max_steps": steps, "log_every": 1},
        data={"train_images": 32, "test_images": 16, "val_images": 16},
        optim={"accumulate": 2},
        eval={"val_split": ""},
        schedule={"name": "constant", "warmup_steps": 0},
        model={"text": {"dropout": dropout, "depth": 2, "grad_checkpointing": ckpt}})
    data["model"]["vision"] = {"name": "hf-vision", "model": str(folders["vit"]),
                               "kwargs": hf_dropout, "grad_checkpointing": ckpt,
                               "lora": {"rank": 2, "dropout": dropout, "trainable": ["head"]}}
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(f for f in (run_dir / "checkpoints").glob("step-*.safetensors")
                   if not f.name.endswith(".train.safetensors"))  # weights, not optimizer
    return load_file(str(files[-1]))


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_gradcache_run_with_checkpointing_and_lora(folders, tmp_path) -> None:
    """optim.accumulate = 2 (GradCache re-forwards each chunk under its saved RNG state),
    dropout 0.1 in both towers and the adapters: the run with checkpointing on both towers
    ends with exactly the weights of the run without it. The adapters are in the checkpoint
    and trained; the frozen base weights did not move."""
    runs = tmp_path / "runs"
    for name, ckpt in (("plain", False), ("ckpt", True)):
        result = cli("run", _recipe(tmp_path, folders, name, ckpt, 4, dropout=0.1))
        assert result.exit_code == 0, result.output
    want = _last_weights(runs / "plain")
    _assert_same(_last_weights(runs / "ckpt"), want)
    lora_b = [k for k in want if ".lora_B." in k]
    assert lora_b and all(want[k].abs().sum() > 0 for k in lora_b), "the adapters trained"
    start = tf.AutoModel.from_pretrained(folders["vit"]).state_dict()
    base = [k for k in want if ".base_layer." in k]
    assert base
    for k in base:
        assert torch.equal(want[k], start[k.split(".model.", 1)[1].replace(
            ".base_layer.", ".")]), f"{k}: the base weights stay frozen"


def test_lora_run_resumes_exactly(folders, tmp_path) -> None:
    """Stop at step 2 (mid-epoch), --resume to step 4: the weights (adapters included) of the
    run that went to 4 at once, dropout on in the towers and the adapters (the training
    loader has its own generator: a new iterator draws no number from the global RNG that
    the dropout masks come from)."""
    runs = tmp_path / "runs"
    for name, steps in (("unbroken", 4), ("resumed", 2)):
        result = cli("run", _recipe(tmp_path, folders, name, True, steps, dropout=0.1))
        assert result.exit_code == 0, result.output
    result = cli("run", tmp_path / "resumed.toml", "--resume", "--set", "run.max_steps=4")
    assert result.exit_code == 0, result.output
    assert "at step 2" in result.output
    want = _last_weights(runs / "unbroken")
    assert any(".lora_A." in k for k in want)
    _assert_same(_last_weights(runs / "resumed"), want)
