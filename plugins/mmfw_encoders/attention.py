"""``nn.TransformerEncoderLayer``'s forward with timm's attention layout (same parameters).

In training ``nn.TransformerEncoderLayer`` goes through ``F.multi_head_attention_forward``,
which transposes batch-first input to sequence-first, splits the packed in-projection with a
``contiguous()`` copy into a ``[3, L, B, W]`` buffer (and, backwards, zero-fills and copies it
back), and expands the key-padding mask to a float bias: 1.12-1.13x slower training steps on
CPU for ``scratch-text`` (benchmarks/README.md). ``encoder_layer_forward`` uses the layer's own
parameters (state dicts and checkpoints are unchanged) the way timm's ViT attention does: one
in-projection, a reshape/permute view, ``F.scaled_dot_product_attention`` with a boolean
``[B, 1, 1, L]`` mask, the out-projection, then the layer's MLP, norms and dropouts in
``nn.TransformerEncoderLayer.forward``'s order.

Packed (``Packed``): the per-token work (norms, projections, MLP: most of a small text
transformer's multiply-adds) runs on the real tokens only, gathered from the padded batch;
only the attention itself runs on the padded ``[B, L]`` layout, padding masked as keys. The
real tokens' outputs are those of the padded computation (padding never reaches them), so
this is exact, and a batch of short captions padded to a long context costs what its tokens
cost (BERT "unpadding", as NVIDIA's and MosaicBERT's trainers do).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


def check_layer(layer: nn.TransformerEncoderLayer) -> None:
    """Raise ``ValueError`` for layer configurations ``encoder_layer_forward`` does not cover."""
    attn = layer.self_attn
    if not (attn.batch_first and attn._qkv_same_embed_dim and attn.in_proj_weight is not None
            and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn):
        raise ValueError("encoder_layer_forward needs a batch-first layer with a packed "
                         "in-projection and no bias_k/bias_v/add_zero_attn")


def attention(attn: nn.MultiheadAttention, x: Tensor, keep: Tensor) -> Tensor:
    """Self-attention of ``x`` ``[B, L, W]`` with ``attn``'s parameters; ``keep`` is bool
    ``[B, 1, 1, L]`` (True: attend to that key). Dropout on the weights only in training."""
    b, n, w = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, h, w // h).permute(2, 0, 3, 1, 4).unbind(0)
    p = attn.dropout if attn.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
    return attn.out_proj(y.transpose(1, 2).reshape(b, n, w))


class Packed(NamedTuple):
    """Where the real tokens of a padded ``[B, L]`` batch sit: ``rows`` index the flattened
    ``B * L`` positions (the mask's true ones, in order), ``keep`` is the ``[B, 1, 1, L]``
    key mask."""

    rows: Tensor
    keep: Tensor
    batch: int
    length: int

    @classmethod
    def of(cls, mask: Tensor) -> Packed:
        return cls(mask.reshape(-1).nonzero().squeeze(1), mask[:, None, None, :], *mask.shape)

    def pack(self, x: Tensor) -> Tensor:
        """``[B, L, ...]`` -> ``[N, ...]``: the real tokens' rows."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.rows)

    def unpack(self, x: Tensor) -> Tensor:
        """``[N, ...]`` -> ``[B, L, ...]``, zeros at the padding."""
        full = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.rows, x)
        return full.view(self.batch, self.length, *x.shape[1:])


def packed_attention(attn: nn.MultiheadAttention, x: Tensor, packed: Packed) -> Tensor:
    """:func:`attention` of packed tokens ``x`` ``[N, W]``: the projections run on the real
    tokens only; the attention itself on the padded layout, padding masked as keys."""
    qkv = packed.unpack(F.linear(x, attn.in_proj_weight, attn.in_proj_bias))
    b, n, w3 = qkv.shape
    h, w = attn.num_heads, w3 // 3
    q, k, v = qkv.view(b, n, 3, h, w // h).permute(2, 0, 3, 1, 4).unbind(0)
    p = attn.dropout if attn.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.keep, dropout_p=p)
    return attn.out_proj(packed.pack(y.transpose(1, 2)).reshape(-1, w))


def encoder_layer_forward(layer: nn.TransformerEncoderLayer, x: Tensor,
                          keep: Tensor | Packed) -> Tensor:
    """``layer(x, src_key_padding_mask=~keep)`` for batch-first ``x`` ``[B, L, W]``; ``keep``
    is bool ``[B, 1, 1, L]``. Pre-norm (``norm_first``) and post-norm layers alike. With
    ``keep`` a :class:`Packed`, ``x`` is the real tokens ``[N, W]`` (norms and MLP are
    per token, so they run on those alone)."""

    def sa(y: Tensor) -> Tensor:
        if isinstance(keep, Packed):
            return layer.dropout1(packed_attention(layer.self_attn, y, keep))
        return layer.dropout1(attention(layer.self_attn, y, keep))

    def ff(y: Tensor) -> Tensor:
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(y)))))

    if layer.norm_first:
        x = x + sa(layer.norm1(x))
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + sa(x))
    return layer.norm2(x + ff(x))


class EncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (same parameters) that takes ``keep=`` and then runs
    ``encoder_layer_forward``. Being called as a module matters: hooks on the layer run
    (FSDP gathers a sharded layer's parameters in one)."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False, *,
                keep: Tensor | Packed | None = None) -> Tensor:
        if keep is None:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        return encoder_layer_forward(self, src, keep)


def encoder_forward(encoder: nn.TransformerEncoder, x: Tensor, keep: Tensor | Packed, *,
                    checkpoint: bool = False) -> Tensor:
    """``encoder(x, src_key_padding_mask=~keep[:, 0, 0])`` through ``encoder_layer_forward``
    (``x`` packed ``[N, W]`` when ``keep`` is a :class:`Packed`).

    ``checkpoint``: each layer runs under ``torch.utils.checkpoint`` (non-reentrant, RNG state
    saved and restored, so the recomputed dropout masks are the first pass's): its
    activations are recomputed in the backward pass instead of stored.
    """
    for layer in encoder.layers:
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(_run_layer, layer, x, keep,
                                                  use_reentrant=False)
        else:
            x = _run_layer(layer, x, keep)
    return encoder.norm(x) if encoder.norm is not None else x


def _run_layer(layer: nn.TransformerEncoderLayer, x: Tensor, keep: Tensor | Packed) -> Tensor:
    if isinstance(layer, EncoderLayer):
        return layer(x, keep=keep)
    return encoder_layer_forward(layer, x, keep)
