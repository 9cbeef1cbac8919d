"""Named parameter groups (``Encoder.named_groups``): embeddings, layers.0..N-1, head.

Freezing patterns, layer-wise LR decay and progressive unfreezing are written against these
groups, so they must cover every parameter exactly once and run from input to output. Two
ways to find them: from transformer parameter names (Hugging Face models, torch's
``TransformerEncoder``) and from timm's own ``group_matcher`` (timm models).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

from torch import nn

#: a numbered block inside a stack: BERT ``encoder.layer.3.``, ViT (transformers v5)
#: ``layers.3.``, timm ``blocks.3.``, ALBERT's shared ``albert_layer_groups.0.``
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|block|blocks|albert_layer_groups)\.(\d+)\.")


def ordered(embeddings: list[str], layers: dict[int, list[str]], head: list[str]
            ) -> dict[str, list[str]]:
    """Groups in input-to-output order; layer indices renumbered 0..N-1, empty groups dropped."""
    groups: dict[str, list[str]] = {}
    if embeddings:
        groups["embeddings"] = embeddings
    for i, key in enumerate(sorted(layers)):
        groups[f"layers.{i}"] = layers[key]
    if head:
        groups["head"] = head
    return groups


def transformer_groups(names: Iterable[str], root: str = "") -> dict[str, list[str]]:
    """Group parameter names of a transformer by their numbered block.

    Outside the blocks, a name is ``embeddings`` when it mentions an embedding (word, position,
    patch, class token, relative positions) or sits beside the blocks in a container below
    ``root`` (DeBERTa's ``encoder.LayerNorm`` of relative embeddings, ALBERT's
    ``encoder.embedding_hidden_mapping_in``): those feed every block. Everything else (final
    norm, pooler) is ``head``.
    """
    names = list(names)
    containers = {n[: m.start()] for n in names if (m := _LAYER.search(n))}
    containers.discard(root.rstrip("."))
    embeddings: list[str] = []
    layers: dict[int, list[str]] = defaultdict(list)
    head: list[str] = []
    for name in names:
        m = _LAYER.search(name)
        if m:
            layers[int(m.group(1))].append(name)
        elif "embed" in name or "cls_token" in name or any(
                c and name.startswith(c + ".") for c in containers):
            embeddings.append(name)
        else:
            head.append(name)
    return ordered(embeddings, layers, head)


def timm_groups(model: nn.Module, prefix: str = "") -> dict[str, list[str]]:
    """Groups of a timm model from its ``group_matcher(coarse=True)`` (the regexes timm's own
    layer-decay uses): ``stem`` is embeddings, each block (or stage) index a layer, and what
    timm merges into the last block (the final norm) or leaves unmatched (``fc_norm``,
    ``head``) is the head. Names get ``prefix`` (the attribute holding the model)."""
    names = [n for n, _ in model.named_parameters()]
    matcher = getattr(model, "group_matcher", None)
    spec = matcher(coarse=True) if callable(matcher) else None
    if not isinstance(spec, dict):
        return transformer_groups(prefix + n for n in names)
    stem = spec.get("stem")
    blocks = spec.get("blocks") or []
    if isinstance(blocks, str):
        blocks = [(blocks, None)]
    stem_re = re.compile(stem) if stem else None
    block_res = [(re.compile(rx), suffix) for rx, suffix in blocks]
    embeddings: list[str] = []
    layers: dict[tuple[int, ...], list[str]] = defaultdict(list)
    head: list[str] = []
    for name in names:
        full = prefix + name
        if stem_re is not None and stem_re.match(name):
            embeddings.append(full)
            continue
        for rx, suffix in block_res:
            m = rx.match(name)
            if m is None:
                continue
            if suffix is not None and tuple(suffix) == (99999,):  # timm's MATCH_PREV_GROUP
                head.append(full)
            else:
                key = tuple(int(g) for g in m.groups() if g is not None) + tuple(suffix or ())
                layers[key].append(full)
            break
        else:
            head.append(full)
    index = {key: i for i, key in enumerate(sorted(layers))}
    return ordered(embeddings, {index[k]: v for k, v in layers.items()}, head)
