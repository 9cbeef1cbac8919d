"""``open_clip``: a folder in open_clip's hub layout (``open_clip_config.json`` +
``open_clip_model.safetensors`` + the tokenizer), loadable offline with open_clip alone::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:FOLDER")
    tokenizer = open_clip.get_tokenizer("local-dir:FOLDER")

open_clip expresses a timm image tower (``TimmModel``: ``trunk`` pooled by timm's
``global_pool``, then ``head.proj``, a linear layer with or without bias, or nothing) and a
transformers text tower (``HFTextEncoder``: ``transformer``, a pooler — ``cls_pooler`` (the
model's pooler_output), ``cls_last_hidden_state_pooler`` or ``mean_pooler`` — then ``proj``,
a bias-free linear layer, or nothing when the widths match), see open_clip's
``timm_model.py``, ``hf_model.py`` and ``factory.py``. So a run maps exactly when the vision
tower is ``timm-vision`` (or ``scratch-vision``, a timm ViT too), the text tower ``hf-text``
with a BERT/RoBERTa/XLM-R model (the architectures open_clip's ``hf_configs.arch_dict`` knows
as encoders), and the adapter ``linear`` (no bias on the text side) or ``identity``.

Both towers are rebuilt from folders inside the export: ``vision/config.json`` (timm's
``local-dir:`` config with the architecture's arguments, so ``img_size``/``embed_dim``/... of a
non-default model come back) and ``text/`` (the transformers config and tokenizer). open_clip
names them by the absolute paths written into ``open_clip_config.json``: after moving the
folder, export again (or edit ``timm_model_name`` and ``hf_model_name`` there).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import mmfw

from .towers import MappedExporter, image_preprocessing, logit_scale, option, projection

#: mmfw text pooling -> open_clip's ``hf_pooler_type``
POOLERS = {"pooler": "cls_pooler", "cls": "cls_last_hidden_state_pooler",
           "mean": "mean_pooler"}
#: transformers model types open_clip's HFTextEncoder builds as encoder-only towers
TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


def timm_pool(trunk: nn.Module) -> str | None:
    """timm's ``global_pool`` name of a timm model (a ViT's string, a CNN's pool type)."""
    pool = getattr(trunk, "global_pool", None)
    if isinstance(pool, str):
        return pool
    kind = getattr(pool, "pool_type", None)
    return kind if isinstance(kind, str) else None


def mismatch(run: mmfw.LoadedRun) -> tuple[str, str] | None:
    """``(part, why)`` of the first part of the run this format cannot hold, else None."""
    m, rm = run.model, run.recipe.model
    if m.fusion is not None:
        return (f"the [model.fusion] head '{rm.fusion.name}'",
                "open_clip's CLIP models have no image-text matching head")
    vision = rm.vision.name
    trunk = getattr(m.vision, "model", None)
    if vision not in ("timm-vision", "scratch-vision") or trunk is None or \
            not hasattr(trunk, "pretrained_cfg"):
        return (f"the vision tower '{vision}'",
                "open_clip's image towers are its own ViT/ResNet or a timm model (TimmModel), "
                "which only timm-vision and scratch-vision are")
    if vision == "scratch-vision" and option(run, "vision", "norm_eps") != 1e-6:
        return ("the vision tower's norm_eps",
                "timm's saved model arguments cannot hold a LayerNorm with another epsilon")
    if timm_pool(trunk) is None:
        return (f"the vision tower '{vision}'", "its timm model has no named global_pool")
    text = rm.text.name
    if text != "hf-text":
        return (f"the text tower '{text}'",
                "open_clip's text towers are its own CLIP transformer or a transformers "
                "model (HFTextEncoder), which only hf-text is")
    model_type = getattr(m.text.model.config, "model_type", "")
    if model_type not in TEXT_MODEL_TYPES:
        return (f"the text model type '{model_type}'",
                "open_clip's HFTextEncoder builds encoder towers for "
                + ", ".join(TEXT_MODEL_TYPES) + " only (hf_configs.arch_dict)")
    pad, config_pad = m.text.tokenizer.pad_token_id, m.text.model.config.pad_token_id
    specials = {m.text.tokenizer.cls_token_id, m.text.tokenizer.sep_token_id,
                m.text.tokenizer.eos_token_id, m.text.tokenizer.bos_token_id} - {None}
    if pad != config_pad or pad in specials:
        return ("the text tokenizer's padding token",
                "open_clip's HFTextEncoder masks every token equal to config.pad_token_id "
                f"({config_pad}), but the tokenizer pads with id {pad}"
                + (", which is also one of its special tokens" if pad in specials else ""))
    for side, adapter in (("vision", m.vision_adapter), ("text", m.text_adapter)):
        proj = projection(adapter)
        if proj is None:
            return (f"the {side} adapter '{rm.adapter.name}'",
                    "open_clip's towers end in one linear projection or none (linear or "
                    "identity adapters)")
        if side == "text" and proj[1] is not None:
            return (f"the bias of the text adapter '{rm.adapter.name}'",
                    "HFTextEncoder's proj is nn.Linear(bias=False): train with "
                    "model.adapter.bias = false")
    return None


def model_config(run: mmfw.LoadedRun, vision_dir: Path, text_dir: Path) -> dict[str, Any]:
    """open_clip's ``model_cfg`` for the run (a CustomTextCLIP: timm image, HF text tower)."""
    m, rm = run.model, run.recipe.model
    identity = rm.adapter.name == "identity"
    _, vision_bias = projection(m.vision_adapter)
    size = image_preprocessing(m.vision)["size"]
    return {
        "embed_dim": m.embed_dim,
        "custom_text": True,
        "vision_cfg": {
            "image_size": size,
            "timm_model_name": f"local-dir:{vision_dir}",
            "timm_model_pretrained": False,
            "timm_pool": timm_pool(m.vision.model),
            "timm_proj": "none" if identity else "linear",
            "timm_proj_bias": vision_bias is not None,
        },
        "text_cfg": {
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_model_pretrained": False,
            "hf_proj_type": None if identity else "linear",
            "hf_pooler_type": POOLERS[option(run, "text", "pooling")],
            "context_length": int(option(run, "text", "max_length")),
            "vocab_size": int(m.text.model.config.vocab_size),
        },
    }


def state_dict(run: mmfw.LoadedRun, scale: float) -> dict[str, torch.Tensor]:
    """The run's weights under open_clip's names (``visual.trunk``/``visual.head.proj``,
    ``text.transformer``/``text.proj``, ``logit_scale``)."""
    m = run.model
    state = {f"visual.trunk.{k}": v for k, v in m.vision.model.state_dict().items()}
    state.update({f"text.transformer.{k}": v for k, v in m.text.model.state_dict().items()})
    if run.recipe.model.adapter.name != "identity":
        for prefix, adapter in (("visual.head.proj", m.vision_adapter),
                                ("text.proj", m.text_adapter)):
            weight, bias = projection(adapter)
            state[f"{prefix}.weight"] = weight
            if bias is not None:
                state[f"{prefix}.bias"] = bias
    state["logit_scale"] = torch.tensor(scale)
    return state


class OpenClipExporter(MappedExporter):
    """``mmfw export RUN --format open_clip``."""

    name = "open_clip"
    mismatch = staticmethod(mismatch)

    def export(self, run: mmfw.LoadedRun, output: Path) -> Path:
        from open_clip import CustomTextCLIP

        self.check(run)
        m = run.model
        output = Path(output).resolve()
        vision_dir, text_dir = output / "vision", output / "text"
        vision_dir.mkdir(parents=True, exist_ok=True)
        text_dir.mkdir(parents=True, exist_ok=True)
        write_timm_config(m.vision.model, vision_dir)
        m.text.model.config.save_pretrained(text_dir)
        tokenizer = copy.deepcopy(m.text.tokenizer)
        tokenizer.model_max_length = int(option(run, "text", "max_length"))
        for folder in (text_dir, output):  # get_tokenizer("local-dir:") reads the top folder
            tokenizer.save_pretrained(folder)
        cfg = model_config(run, vision_dir, text_dir)
        pre = image_preprocessing(m.vision)
        preprocess = {"size": pre["size"], "mode": "RGB", "mean": pre["mean"],
                      "std": pre["std"], "interpolation": pre["resample"],
                      "resize_mode": "shortest", "fill_color": 0}
        scale, _ = logit_scale(run)
        # open_clip's own model takes the weights strictly: a name that does not map fails
        # here, not when a user loads the folder
        model = CustomTextCLIP(**{k: v for k, v in copy.deepcopy(cfg).items()
                                  if k != "custom_text"})  # a factory key, not an argument
        model.load_state_dict(state_dict(run, scale), strict=True)
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(output / WEIGHTS_FILE))
        (output / CONFIG_FILE).write_text(json.dumps(
            {"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2) + "\n",
            encoding="utf-8")
        return output


def write_timm_config(trunk: nn.Module, folder: Path) -> None:
    """timm's ``config.json`` of a model: its architecture and the arguments it was built
    with (timm records them), so ``timm.create_model("local-dir:folder")`` rebuilds it."""
    from timm.models._hub import save_config_for_hf  # timm's writer of that file

    save_config_for_hf(trunk, str(folder / "config.json"))
