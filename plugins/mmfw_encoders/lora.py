"""LoRA adapters on an encoder tower (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), injected by ``peft`` and folded back by :func:`merge_lora`.

A recipe asks for them with a ``lora`` table in the encoder's section::

    [model.text.lora]        # hf-text, hf-vision, timm-vision, clip-text, clip-vision
    rank = 8                 # r of W + (alpha / r) * B @ A
    alpha = 16.0
    dropout = 0.05           # on the adapter's input (peft's lora_dropout)
    target_modules = []      # empty: the architecture's attention projections (below)
    trainable = ["head"]     # base parameters that train as well (names or groups)

The adapters are injected *in place* (``peft.inject_adapter_in_model``): the tower stays a
plain transformers / timm / torch module whose targeted ``nn.Linear`` layers become peft
``lora.Linear`` ones (``<name>.base_layer`` + ``<name>.lora_A/B.default``). Its forward, its
config, its gradient checkpointing and its parameter groups (``named_groups``) are unchanged,
and the adapters are ordinary parameters of the module's ``state_dict``: checkpoints and
``--resume`` carry them like any weight. ``merge_lora`` adds ``(alpha / r) B A`` into each
base weight and puts the base layer back, so an exported model needs no peft.

Everything of the tower but the adapters is frozen (``requires_grad = False``) except the
parameters ``trainable`` names. The training loop only ever trains parameters that require
grad when it starts (``mmfw.train.params.ParamTable``), so the recipe's ``optim.freeze`` and a
stage scheduler's ``frozen`` patterns then act on the adapters and those parameters:
``frozen = ["text"]`` in a first stage freezes the text adapters too, and unfreezing ``text``
later trains them (never the frozen base weights).

The reusable entry points, for encoders in other modules: :class:`LoraOptions` (the ``lora``
field's type), :func:`apply_lora` (module + options -> module with adapters, base frozen),
:func:`merge_lora` (module with adapters -> plain module), :func:`default_targets`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping

import attrs
from torch import nn

from mmfw.spi import RecipeError, option

#: the default ``target_modules`` by architecture: the query and value projections of
#: attention, as in the LoRA paper (§7.1) and peft's own defaults; the first set whose
#: names are all present (as module names' last component) is used
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),            # BERT, RoBERTa, ALBERT, MobileBERT, MiniLM, HF ViT/DeiT/BEiT
    ("q_proj", "v_proj"),          # CLIP (transformers and open_clip-style), many decoders
    ("query_proj", "value_proj"),  # DeBERTa-v2/v3
    ("q_lin", "v_lin"),            # DistilBERT
    ("qkv",),                      # timm ViT, DeiT, EVA, scratch-vision (fused q, k, v)
    ("in_proj",),                  # nn.MultiheadAttention-style fused projections
)

#: layer types peft's LoRA can wrap (peft.tuners.lora.model.LoraModel._create_new_module)
_WRAPPABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _rank(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"'{attribute.name}' must be > 0 (the adapter rank), got {value}")


def _dropout(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"'{attribute.name}' must be in [0, 1), got {value}")


@attrs.frozen
class LoraOptions:
    """LoRA adapters on this tower (peft; Hu et al. 2021): ``W x + (alpha / rank) B A x`` on
    each targeted layer, ``B`` zero-initialised so training starts from the pretrained model.
    The rest of the tower is frozen except ``trainable``; ``optim.freeze`` and stage
    ``frozen`` patterns apply on top. Merged into the weights by ``mmfw export``."""

    rank: int = option(8, doc="adapter rank r (> 0)", validator=_rank)
    alpha: float = option(16.0, doc="scale numerator: the update is (alpha / rank) B A",
                          validator=attrs.validators.gt(0))
    dropout: float = option(0.0, doc="dropout on the adapter input (0 <= p < 1)",
                            validator=_dropout)
    target_modules: tuple[str, ...] = option(
        (), doc="module names (or dotted suffixes) that get adapters; empty: the attention "
        "query/value projections of the architecture (BERT-like and HF ViT "
        "[\"query\", \"value\"], timm ViT [\"qkv\"], CLIP [\"q_proj\", \"v_proj\"])")
    trainable: tuple[str, ...] = option(
        (), doc="tower parameter or group names (fnmatch or dotted prefix, e.g. \"head\", "
        "\"model.pooler\", \"*LayerNorm*\") that train besides the adapters")


def _leaf_names(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name}


def _targets_present(names: Iterable[str], target: str) -> list[str]:
    """Module names peft would match with ``target`` (equal, or ending in ``.target``)."""
    return [n for n in names if n == target or n.endswith("." + target)]


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The architecture's default ``target_modules``: the first of :data:`DEFAULT_TARGETS`
    whose names all name wrappable layers of ``model``; ``()`` when none does."""
    layers = {n.rsplit(".", 1)[-1] for n, m in _leaf_names(model).items()
              if isinstance(m, _WRAPPABLE)}
    for names in DEFAULT_TARGETS:
        if all(n in layers for n in names):
            return names
    return ()


def _suggest(target: str, modules: Mapping[str, nn.Module]) -> str:
    """Close matches of ``target`` among the wrappable layers' names (last components)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                     if isinstance(m, _WRAPPABLE)})
    near = difflib.get_close_matches(target.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.4)
    if near:
        return "close matches: " + ", ".join(repr(n) for n in near)
    return "layers it has: " + ", ".join(repr(n) for n in leaves[:12]) + \
        (" ..." if len(leaves) > 12 else "")


def resolve_targets(model: nn.Module, options: LoraOptions, section: str) -> tuple[str, ...]:
    """``options.target_modules`` checked against ``model``'s module names, or the default.

    A target naming no module, or only modules peft cannot wrap, is a one-line
    :class:`RecipeError` at ``<section>.lora.target_modules`` with the close matches.
    """
    key = f"{section}.lora.target_modules"
    modules = _leaf_names(model)
    kind = type(model).__name__
    if not options.target_modules:
        found = default_targets(model)
        if not found:
            raise RecipeError(f"no default LoRA targets for {kind}: set target_modules; "
                              f"{_suggest('query', modules)}", key=key)
        return found
    for target in options.target_modules:
        hits = _targets_present(modules, target)
        if not hits:
            raise RecipeError(f"{kind} has no module {target!r}; {_suggest(target, modules)}",
                              key=key)
        if not any(isinstance(modules[h], _WRAPPABLE) for h in hits):
            types = sorted({type(modules[h]).__name__ for h in hits})
            raise RecipeError(f"{target!r} names {', '.join(types)} in {kind}, which LoRA "
                              f"cannot wrap (it needs Linear, Conv or Embedding layers); "
                              f"{_suggest(target, modules)}", key=key)
    return options.target_modules


def _matches(pattern: str, name: str) -> bool:
    """fnmatch, or ``pattern`` equals ``name`` or is a dotted prefix of it (the rule of the
    recipe's freeze patterns)."""
    return name == pattern or name.startswith(pattern + ".") or \
        fnmatch.fnmatchcase(name, pattern)


def _base_name(name: str) -> str:
    """A parameter's name without peft's ``base_layer`` level: what it was called before."""
    return name.replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (``lora_A`` / ``lora_B`` / magnitude)."""
    return any(f".{part}." in f".{name}." for part in ("lora_A", "lora_B", "lora_embedding_A",
                                                        "lora_embedding_B",
                                                        "lora_magnitude_vector"))


def apply_lora(model: nn.Module, options: LoraOptions, *, section: str,
               groups: Mapping[str, Iterable[str]] | None = None, prefix: str = ""
               ) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else but
    ``options.trainable``; returns ``model``.

    ``section`` is the recipe section of the tower (``model.text``), for errors. ``groups`` are
    the encoder's ``named_groups()`` (group -> parameter names, each starting with ``prefix``,
    the attribute that holds ``model`` in the encoder), so ``trainable`` may name groups.
    """
    from peft import LoraConfig, inject_adapter_in_model  # heavy: only when LoRA is asked for

    targets = resolve_targets(model, options, section)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(targets), bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # peft refuses a layer it cannot wrap
        raise RecipeError(f"peft cannot add LoRA to {type(model).__name__}: "
                          f"{' '.join(str(err).split())[:300]}",
                          key=f"{section}.lora.target_modules") from None
    group_of = {}
    for group, names in (groups or {}).items():
        for n in names:
            group_of[_base_name(n[len(prefix):] if n.startswith(prefix) else n)] = group
    used: set[str] = set()
    for name, param in model.named_parameters():
        if is_adapter(name):
            param.requires_grad_(True)
            continue
        base = _base_name(name)
        names = [base, prefix + base, group_of.get(base, "")]
        hit = [p for p in options.trainable if any(n and _matches(p, n) for n in names)]
        used.update(hit)
        param.requires_grad_(bool(hit))
    unused = [p for p in options.trainable if p not in used]
    if unused:
        known = sorted({*group_of.values(), *(prefix + _base_name(n)
                                              for n, _ in model.named_parameters()
                                              if not is_adapter(n))})
        near = difflib.get_close_matches(unused[0], known, n=3, cutoff=0.5)
        hint = f"; close matches: {', '.join(repr(n) for n in near)}" if near else \
            f"; groups: {', '.join(sorted(set(group_of.values())))}" if group_of else ""
        raise RecipeError(f"pattern {unused[0]!r} matches no parameter of the tower{hint}",
                          key=f"{section}.lora.trainable")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``model`` into its base layer and put the base layer back
    (peft's ``merge_and_unload`` for an in-place injection); returns ``model``, now free of
    peft modules. A model without adapters is returned unchanged."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft installed: no adapters to merge either
        return model
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # set by the injection on HF models
        if attr in vars(model):
            delattr(model, attr)
    return model

