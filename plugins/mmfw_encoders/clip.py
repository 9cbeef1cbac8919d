"""``clip-vision`` / ``clip-text``: the two towers of a pretrained CLIP (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision") or SigLIP (Zhai et
al. 2023, "Sigmoid Loss for Language Image Pre-Training") checkpoint, for fine-tuning.

``model`` is a transformers ``CLIPModel`` / ``SiglipModel`` folder or hub name (e.g.
``openai/clip-vit-base-patch32``, ``google/siglip-base-patch16-224``); the family is read from
the config's ``model_type``. Each encoder loads only its own tower with transformers' tower
classes (``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection``,
``SiglipVisionModel`` / ``SiglipTextModel``), whose parameter names match the full model's, so
the other tower's weights are never materialised. The output is exactly the full model's
``get_image_features`` / ``get_text_features``: CLIP's pooled output through
``visual_projection`` / ``text_projection``; SigLIP's pooled output (its attention-pooling
head, or the text head over the last token), which SigLIP uses as the embedding with no
projection. ``dim`` is that width, read from the loaded modules.

The pair was trained with a learned temperature (``logit_scale``; SigLIP also a
``logit_bias``), which both encoders read from the checkpoint and offer through the
``SuggestsTemperature`` capability: a loss whose temperature the recipe leaves unset starts
where the pretrained model ended, instead of at a from-scratch 0.07 (about 0.01 for OpenAI's
CLIPs, whose scale sits at its clamp of 100).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from mmfw.spi import PluginError, option, require_code

from . import hub
from .groups import ordered, transformer_groups
from .hf_text import clean_text, enable_checkpointing, no_remote_code
from .hf_vision import pipeline_of
from .images import PipelineImages
from .lora import LoraOptions, apply_lora, merge_lora

Tower = Literal["vision", "text"]

#: config ``model_type`` -> family, for full models and for checkpoints of one tower
FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "clip_text_model": "clip",
            "siglip": "siglip", "siglip_vision_model": "siglip",
            "siglip_text_model": "siglip"}

#: from_pretrained keywords that choose how to load, not what to build
LOADING_KEYS = frozenset({"revision", "attn_implementation", "cache_dir", "token", "subfolder",
                          "dtype", "trust_remote_code"})


@attrs.frozen
class ClipVisionOptions:
    model: str = option(doc="a CLIPModel or SiglipModel: hub name (openai/clip-vit-base-patch32, "
                        "google/siglip-base-patch16-224) or a local folder written by "
                        "save_pretrained (model + image processor)")
    pretrained: bool = option(True, doc="load the weights (false: the architecture from its "
                              "config, randomly initialised, and no temperature suggested)")
    kwargs: dict[str, Any] = option(factory=dict, doc="revision, attn_implementation, or "
                                    "overrides of the tower's config (attention_dropout = 0.1)",
                                    validator=no_remote_code)
    grad_checkpointing: bool = option(False, doc="recompute each layer's activations in the "
                                      "backward pass instead of storing them (transformers' "
                                      "gradient checkpointing, non-reentrant)")
    lora: LoraOptions | None = option(None, doc="[model.vision.lora]: LoRA adapters via peft "
                                      "(default targets q_proj, v_proj), the rest of the "
                                      "tower frozen")


@attrs.frozen
class ClipTextOptions:
    model: str = option(doc="a CLIPModel or SiglipModel: hub name or local folder (model + "
                        "tokenizer)")
    pretrained: bool = option(True, doc="load the weights (false: the architecture from its "
                              "config, randomly initialised, and no temperature suggested)")
    max_length: int = option(0, doc="tokens per caption (special tokens included); 0: the "
                             "model's max_position_embeddings (CLIP 77, SigLIP 64). SigLIP "
                             "captions are always padded to it", validator=attrs.validators.ge(0))
    kwargs: dict[str, Any] = option(factory=dict, doc="revision, attn_implementation, or "
                                    "overrides of the tower's config", validator=no_remote_code)
    grad_checkpointing: bool = option(False, doc="recompute each layer's activations in the "
                                      "backward pass instead of storing them (transformers' "
                                      "gradient checkpointing, non-reentrant)")
    lora: LoraOptions | None = option(None, doc="[model.text.lora]: LoRA adapters via peft "
                                      "(default targets q_proj, v_proj), the rest of the "
                                      "tower frozen")


TowerOptions = ClipVisionOptions | ClipTextOptions


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading one tower from a full checkpoint leaves the other tower's weights unused, which
    transformers reports as a long table of unexpected keys; missing keys are checked here
    instead (:func:`load_tower`), so the report is silenced while loading."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def _tower_config(config: Any, tower: Tower, encoder: str, model: str) -> tuple[str, Any]:
    """(family, the tower's own config) of a full model's or a single tower's config."""
    kind = getattr(config, "model_type", "")
    family = FAMILIES.get(kind)
    if family is None:
        raise PluginError(f"{encoder}: {model!r} is a {kind or 'model without model_type'!r} "
                          "model, not CLIP or SigLIP (model_type 'clip' or 'siglip'); other "
                          f"models load with hf-{tower}")
    if kind in ("clip", "siglip"):
        sub = getattr(config, f"{tower}_config")
        if family == "clip":  # the projection width sits on the full model's config
            sub.projection_dim = config.projection_dim
        return family, sub
    if not kind.endswith(f"_{tower}_model"):
        raise PluginError(f"{encoder}: {model!r} holds only a {kind!r}, not the {tower} tower")
    return family, config


def tower_class(family: str, tower: Tower) -> type[nn.Module]:
    import transformers as tf

    return {("clip", "vision"): tf.CLIPVisionModelWithProjection,
            ("clip", "text"): tf.CLIPTextModelWithProjection,
            ("siglip", "vision"): tf.SiglipVisionModel,
            ("siglip", "text"): tf.SiglipTextModel}[family, tower]


def load_tower(source: hub.Source, encoder: str, tower: Tower, pretrained: bool,
               kwargs: dict[str, Any]) -> tuple[str, nn.Module]:
    """(family, the tower in float32) of a resolved CLIP/SigLIP source."""
    from transformers import AutoConfig

    trust = kwargs.get("trust_remote_code")
    if trust:  # validated with the options already; again before transformers sees it
        require_code(f"trust_remote_code for model {source.model!r}",
                     key=f"model.{tower}.kwargs.trust_remote_code", given=trust)
    loading = {k: v for k, v in kwargs.items() if k in LOADING_KEYS}
    loading["trust_remote_code"] = bool(trust)
    config = hub.load(source, AutoConfig.from_pretrained, encoder, "config",
                      **{k: v for k, v in loading.items() if k not in ("dtype",
                                                                       "attn_implementation")})
    family, sub = _tower_config(config, tower, encoder, source.model)
    for key, value in kwargs.items():
        if key in LOADING_KEYS:
            continue
        if not hasattr(sub, key):
            raise PluginError(f"{encoder}: kwargs.{key} is neither a loading option "
                              f"({', '.join(sorted(LOADING_KEYS))}) nor a field of "
                              f"{type(sub).__name__}")
        setattr(sub, key, value)
    cls = tower_class(family, tower)
    if not pretrained:
        return family, cls(sub)
    loading.pop("trust_remote_code")

    def from_pretrained(location: str, **kw: Any) -> tuple[nn.Module, dict[str, Any]]:
        try:
            with _quiet_transformers():
                return cls.from_pretrained(location, config=sub, output_loading_info=True, **kw)
        except RuntimeError as err:  # size mismatches: a checkpoint of another architecture
            raise ValueError(str(err)) from None

    model, info = hub.load(source, from_pretrained, encoder, "model",
                           **{"dtype": torch.float32, **loading})
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise PluginError(f"{encoder}: {source.describe()} lacks {len(missing)} weight(s) of the "
                          f"{family} {tower} tower ({', '.join(missing[:4])}"
                          f"{', ...' if len(missing) > 4 else ''}): is it a {family} checkpoint?")
    return family, model


def checkpoint_scalars(source: hub.Source, names: Sequence[str] = ("logit_scale", "logit_bias")
                       ) -> dict[str, float]:
    """The full model's scalar parameters ``names`` read straight from its weights file
    (safetensors, sharded or not, else ``pytorch_model.bin``): neither tower holds them."""
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        return cached_file(source.location, filename, local_files_only=source.local_only,
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    found: dict[str, float] = {}
    try:
        index = fetch("model.safetensors.index.json")
        if index:
            weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
            files = {n: weight_map[n] for n in names if n in weight_map}
        else:
            files = {n: "model.safetensors" for n in names}
        from safetensors import safe_open

        for filename in dict.fromkeys(files.values()):
            path = fetch(filename)
            if path is None:
                continue
            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
                found.update({n: float(f.get_tensor(n).reshape(-1)[0]) for n in names
                              if files.get(n) == filename and n in keys})
        if not found and not index and fetch("model.safetensors") is None:
            path = fetch("pytorch_model.bin")
            if path is not None:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                found = {n: float(state[n].reshape(-1)[0]) for n in names if n in state}
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # RuntimeError: torch.load
        warnings.warn(f"cannot read logit_scale of {source.describe()} ({err}); the loss keeps "
                      "its own starting temperature", stacklevel=2)
    return found


class ClipTower(nn.Module):
    """What both towers share: loading, the suggested temperature, parameter groups."""

    tower: Tower

    def __init__(self, options: TowerOptions, encoder: str) -> None:
        super().__init__()
        self.options = options
        self.source = hub.resolve(options.model, encoder)
        self.family, self.model = load_tower(self.source, encoder, self.tower,
                                             options.pretrained, options.kwargs)
        self._scalars = checkpoint_scalars(self.source) if options.pretrained else {}
        #: width of the token features (forward_tokens), before the projection
        self.token_dim = int(self.model.config.hidden_size)
        if options.grad_checkpointing:
            enable_checkpointing(self.model, encoder)
        if options.lora is not None:
            apply_lora(self.model, options.lora, section=f"model.{self.tower}",
                       groups=self.named_groups(), prefix="model.")

    def initial_temperature(self) -> float | None:
        """``1 / exp(logit_scale)``: the temperature the pretrained pair ended with."""
        scale = self._scalars.get("logit_scale")
        return None if scale is None else math.exp(-scale)

    def initial_bias(self) -> float | None:
        """SigLIP's learned ``logit_bias`` (CLIP has none)."""
        return self._scalars.get("logit_bias")

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the weights (no-op without adapters)."""
        merge_lora(self.model)

    def named_groups(self) -> dict[str, list[str]]:
        groups = transformer_groups((n for n, _ in self.named_parameters()), root="model.")
        # CLIP's pre_layrnorm normalises the patch embeddings before the first block
        head = groups.pop("head", [])
        pre = [n for n in head if ".pre_layrnorm." in n]
        embeddings = groups.pop("embeddings", []) + pre
        layers = {int(k.split(".")[1]): v for k, v in groups.items()}
        return ordered(embeddings, layers, [n for n in head if n not in pre])


class ClipVision(PipelineImages, ClipTower):
    """The image tower: ``forward(pixels)`` is the full model's ``get_image_features``."""

    Options = ClipVisionOptions
    modality = "image"
    tower: Tower = "vision"

    def __init__(self, options: ClipVisionOptions) -> None:
        from transformers import AutoImageProcessor

        super().__init__(options, "clip-vision")
        processor = hub.load(self.source, AutoImageProcessor.from_pretrained, "clip-vision",
                             "image processor")
        self.pipeline = pipeline_of(processor)
        if self.family == "clip":
            self.dim = int(self.model.visual_projection.out_features)
        else:
            inner = getattr(self.model, "vision_model", self.model)  # transformers v4 nests it
            if not getattr(inner, "use_head", True):
                raise PluginError(f"clip-vision: {options.model!r} has no attention-pooling "
                                  "head (vision_use_head = false), so no image embedding")
            self.dim = int(self.model.config.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        out = self.model(pixel_values=pixels)
        return out.image_embeds if self.family == "clip" else out.pooler_output

    def forward_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """``last_hidden_state`` ``[B, L, token_dim]`` (class token and patches) and an
        all-true mask, for ``[model.fusion]``."""
        hidden = self.model(pixel_values=pixels).last_hidden_state
        return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)


class ClipText(ClipTower):
    """The text tower: ``forward(tokenize(texts))`` is the full model's
    ``get_text_features``."""

    Options = ClipTextOptions
    modality = "text"
    tower: Tower = "text"

    def __init__(self, options: ClipTextOptions) -> None:
        from transformers import AutoTokenizer

        super().__init__(options, "clip-text")
        self.tokenizer = hub.load(self.source, AutoTokenizer.from_pretrained, "clip-text",
                                  "tokenizer")
        if self.tokenizer.pad_token is None:  # OpenAI's CLIP pads with its end-of-text token
            if self.tokenizer.eos_token is None:
                raise PluginError(f"clip-text: the tokenizer of {options.model!r} has no "
                                  "padding or end-of-text token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        positions = int(self.model.config.max_position_embeddings)
        self.max_length = options.max_length or positions
        if self.max_length > positions:
            raise PluginError(f"clip-text: 'max_length' ({self.max_length}) exceeds the "
                              f"{positions} positions of {options.model!r}")
        if self.family == "clip":
            self.dim = int(self.model.text_projection.out_features)
        else:
            inner = getattr(self.model, "text_model", self.model)  # transformers v4 nests it
            self.dim = int(inner.head.out_features)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        texts = [clean_text(t) for t in texts]
        if self.family == "siglip":
            # SigLIP was trained on captions padded to 64 tokens with no attention mask and
            # embeds a caption by its LAST position: padding to the longest caption of a
            # batch would move that position and change the embedding with the batch
            enc = self.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            return {"input_ids": enc["input_ids"]}
        # CLIP's causal attention and end-of-text pooling make right padding harmless
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        out = self.model(**tokens)
        return out.text_embeds if self.family == "clip" else out.pooler_output

    def forward_tokens(self, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``last_hidden_state`` ``[B, L, token_dim]`` and its mask, for ``[model.fusion]``
        (SigLIP attends to its padding, so every position is a token there)."""
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens.get("attention_mask")
        if mask is None:
            return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return hidden, mask.bool()
