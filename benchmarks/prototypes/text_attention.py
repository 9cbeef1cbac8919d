"""Prototype: ``scratch-text``'s layers run with timm's attention layout (benchmarks only).

``nn.TransformerEncoderLayer`` in training goes through ``F.multi_head_attention_forward``,
which transposes batch-first input to sequence-first, splits the packed in-projection with a
``contiguous()`` copy into a ``[3, L, B, W]`` buffer (and, backwards, zero-fills and copies it
back), and expands the key-padding mask to a float bias. This forward uses the *same*
parameters (so state dicts and checkpoints are unchanged) the way timm's ViT attention does:
one in-projection, a reshape/permute view, ``F.scaled_dot_product_attention`` with a boolean
``[B, 1, 1, L]`` mask, and the out-projection.

``patch(text_encoder)`` swaps the forward of one ``ScratchText`` instance; the plugin itself is
not touched.
"""

from __future__ import annotations

import types

import torch.nn.functional as F
from torch import Tensor, nn


def layer_forward(layer: nn.TransformerEncoderLayer, x: Tensor, keep: Tensor) -> Tensor:
    """One pre-norm encoder layer; ``keep`` is bool ``[B, 1, 1, L]`` (True: attend)."""
    attn = layer.self_attn
    b, n, w = x.shape
    h = attn.num_heads
    y = layer.norm1(x)
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, h, w // h).permute(2, 0, 3, 1, 4).unbind(0)
    p = attn.dropout if layer.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
    y = attn.out_proj(y.transpose(1, 2).reshape(b, n, w))
    x = x + layer.dropout1(y)
    y = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(x)))))
    return x + layer.dropout2(y)


def forward(self: nn.Module, tokens: dict[str, Tensor]) -> Tensor:
    """``ScratchText.forward`` with ``layer_forward`` for its layers (same output)."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
    x = self.embed(ids) + self.pos[: ids.shape[1]]
    keep = mask[:, None, None, :]
    for layer in self.layers.layers:
        x = layer_forward(layer, x, keep)
    x = self.norm(x)
    if self.options.pooling == "cls":
        return x[:, 0]
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def patch(text_encoder: nn.Module) -> nn.Module:
    """Use the prototype forward on this instance (norm_first layers only, as scratch-text)."""
    for layer in text_encoder.layers.layers:
        if not layer.norm_first:
            raise ValueError("the prototype implements pre-norm (norm_first) layers only")
    text_encoder.forward = types.MethodType(forward, text_encoder)
    return text_encoder
