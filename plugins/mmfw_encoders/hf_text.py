"""``hf-text``: any Hugging Face encoder-only text model (BERT, MiniLM, MobileBERT, ALBERT,
RoBERTa, DeBERTa-v2/v3, DistilBERT, ...) with its own tokenizer.

The model is loaded by ``AutoModel.from_pretrained`` (or built from ``AutoConfig`` with random
weights when ``pretrained = false``), its tokenizer by ``AutoTokenizer``. ``dim`` is the width
of a real forward pass at construction, so a model's name can never lie about it.

``kwargs.trust_remote_code = true`` runs Python from the model's repository: it is code, refused
when the options are validated unless code is allowed (``mmfw --allow-code``, see
``mmfw.spi.trust``). Without it transformers is told ``trust_remote_code=False``, so it never
asks on the terminal either.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from mmfw.spi import option, require_code

from . import hub
from .groups import transformer_groups
from .lora import LoraOptions, apply_lora, merge_lora

#: pooled features: the first token, the mean of real tokens, or the model's own pooler
#: (BERT's dense+tanh over [CLS], trained for next-sentence prediction)
TextPooling = Literal["mean", "cls", "pooler"]


def remote_code(options: Any) -> bool:
    """Whether ``options.kwargs`` asks transformers to run the repository's own code."""
    return bool(options.kwargs.get("trust_remote_code"))


def no_remote_code(instance: Any, _: attrs.Attribute, kwargs: dict[str, Any]) -> None:
    """Validator of ``kwargs``: ``trust_remote_code`` only where code is allowed."""
    if kwargs.get("trust_remote_code"):  # transformers takes any true value
        require_code(f"trust_remote_code for model {instance.model!r}",
                     key="kwargs.trust_remote_code",  # the recipe loader adds model.<section>
                     given=kwargs["trust_remote_code"])


@attrs.frozen
class HFTextOptions:
    model: str = option(doc="hub name (bert-base-uncased) or a local folder written by "
                        "save_pretrained")
    pretrained: bool = option(True, doc="load the weights (false: the architecture from its "
                              "config, randomly initialised)")
    pooling: TextPooling = option("mean", doc="'mean' of real tokens, 'cls' (first token) or "
                                  "the model's 'pooler' output")
    max_length: int = option(64, doc="tokens per caption after truncation (special tokens "
                             "included)", validator=attrs.validators.ge(2))
    kwargs: dict[str, Any] = option(factory=dict, doc="extra keywords for from_pretrained: "
                                    "config overrides (hidden_dropout_prob = 0.0) or loading "
                                    "options (revision, attn_implementation); "
                                    "trust_remote_code = true needs mmfw --allow-code",
                                    validator=no_remote_code)
    grad_checkpointing: bool = option(False, doc="recompute each layer's activations in the "
                                      "backward pass instead of storing them (transformers' "
                                      "gradient checkpointing, non-reentrant): less memory, "
                                      "about one more forward of compute; same gradients")
    lora: LoraOptions | None = option(None, doc="[model.text.lora]: LoRA adapters via peft, "
                                      "the rest of the tower frozen (table below)")


def clean_text(text: object) -> str:
    """A caption as a str the Rust tokenizers accept (lone surrogates replaced)."""
    s = text if isinstance(text, str) else str(text)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s


def load_model(source: hub.Source, encoder: str, pretrained: bool, kwargs: dict[str, Any]
               ) -> nn.Module:
    """``AutoModel`` from a resolved source: weights, or its config with random weights.

    Weights load as float32 unless ``kwargs`` asks otherwise: transformers v5 would keep a
    checkpoint's half precision, and training wants float32 masters (autocast does the rest).
    """
    trust = kwargs.get("trust_remote_code")
    if trust:  # validated with the options already; again before transformers sees it
        section = {"hf-text": "text", "hf-vision": "vision"}.get(encoder, encoder)
        require_code(f"trust_remote_code for model {source.model!r}",
                     key=f"model.{section}.kwargs.trust_remote_code", given=trust)
    from transformers import AutoConfig, AutoModel  # heavy: imported when a model is built

    kwargs = {**kwargs, "trust_remote_code": bool(trust)}
    if pretrained:
        kwargs = {"dtype": torch.float32, **kwargs}
        return hub.load(source, AutoModel.from_pretrained, encoder, "model", **kwargs)
    config = hub.load(source, AutoConfig.from_pretrained, encoder, "config", **kwargs)
    return AutoModel.from_config(config, trust_remote_code=bool(trust))


def enable_checkpointing(model: nn.Module, encoder: str) -> None:
    """transformers' gradient checkpointing (``gradient_checkpointing_enable``, in
    transformers 5 ``activation_checkpointing_enable``), non-reentrant
    (``torch.utils.checkpoint`` with ``use_reentrant=False``): it needs no input that
    requires grad, so it works with frozen embeddings and LoRA, and it restores the RNG
    state when it recomputes a layer (same dropout masks; GradCache's re-forward replays its
    own saved state around it)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{encoder}: {type(model).__name__} does not support gradient "
                         "checkpointing in transformers: set grad_checkpointing = false")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):  # transformers >= 5.x names it so; the old name warns, goes in v6
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", False):  # an encoder keeps no cache; saves a warning
        model.config.use_cache = False


def drop_pooler(model: nn.Module) -> None:
    """Remove a pooler whose output is not used: its parameters would get no gradient."""
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None


def check_width(encoder: str, model: nn.Module, real: int) -> None:
    declared = getattr(model.config, "hidden_size", None)
    if isinstance(declared, int) and declared != real:
        warnings.warn(f"{encoder}: config.hidden_size is {declared} but the pooled output is "
                      f"{real} wide; dim = {real}", stacklevel=3)


class HFText(nn.Module):
    Options = HFTextOptions
    modality = "text"

    def __init__(self, options: HFTextOptions) -> None:
        from transformers import AutoTokenizer

        super().__init__()
        o = self.options = options
        self.source = hub.resolve(o.model, "hf-text")
        self.tokenizer = hub.load(self.source, AutoTokenizer.from_pretrained, "hf-text",
                                  "tokenizer", trust_remote_code=remote_code(o))
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {o.model!r} has no padding token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000 and o.max_length > limit:
            raise ValueError(f"'max_length' ({o.max_length}) exceeds what {o.model!r} takes "
                             f"({limit} tokens)")
        self.model = load_model(self.source, "hf-text", o.pretrained, o.kwargs)
        if o.pooling == "pooler":
            if getattr(self.model, "pooler", None) is None:
                raise ValueError(f"'pooling' = 'pooler' but {type(self.model).__name__} has no "
                                 "pooler: use 'mean' or 'cls'")
        else:
            drop_pooler(self.model)
        params = inspect.signature(self.model.forward).parameters
        self.input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids")
                                 if n in params)
        self.dim = self._probe()
        check_width("hf-text", self.model, self.dim)
        if o.grad_checkpointing:
            enable_checkpointing(self.model, "hf-text")
        if o.lora is not None:
            apply_lora(self.model, o.lora, section="model.text", groups=self.named_groups(),
                       prefix="model.")

    def _probe(self) -> int:
        """Width of a real forward pass over a caption of ``max_length`` tokens."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self(self.tokenize(["a " * self.options.max_length, ""]))
        except (IndexError, RuntimeError) as err:
            positions = getattr(self.model.config, "max_position_embeddings", "?")
            raise ValueError(f"{self.options.model!r} fails on a caption of 'max_length' = "
                             f"{self.options.max_length} tokens (max_position_embeddings = "
                             f"{positions}): {err}") from err
        finally:
            self.model.train(was_training)
        return int(out.shape[-1])

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer([clean_text(t) for t in texts], padding=True, truncation=True,
                             max_length=self.options.max_length, return_tensors="pt")
        return {k: enc[k] for k in self.input_names if k in enc}

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        out = self.model(**tokens)
        pooling = self.options.pooling
        if pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward_tokens(self, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``last_hidden_state`` ``[B, L, hidden]`` and the attention mask as bool."""
        hidden = self.model(**tokens).last_hidden_state
        return hidden, tokens["attention_mask"].bool()

    def named_groups(self) -> dict[str, list[str]]:
        return transformer_groups((n for n, _ in self.named_parameters()), root="model.")

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the weights: ``self.model`` is a plain transformers model
        again (no-op without adapters)."""
        merge_lora(self.model)
