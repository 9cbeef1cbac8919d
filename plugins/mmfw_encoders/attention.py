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

:func:`packed_qkv_attention` is the attention of the scratch towers on the CPU in fp32 when
the backend asks for the math kernel (``backend.sdpa = "math"``): the operations of SDPA's math
kernel (``bmm``, ``softmax``, ``bmm``) on the in-projection's ``[B, L, 3, H, D]`` output, with
the backward pass written out, so the ``q``/``k``/``v`` views are made contiguous once
instead of one by one, their gradients are written into one buffer instead of stacked, and
no fully-masked-row check runs (1.2-1.4x faster attention at the quickstart's shapes,
benchmarks/README.md). Anything else (dropout on the weights, a causal or ``[L, L]`` mask,
bf16, CUDA, torch's own kernel choice) goes through ``F.scaled_dot_product_attention``.
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


class _PackedQKV(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d) + bias) v`` per head from ``qkv`` ``[B, L, 3 W]`` (the packed
    in-projection's output, ``W = H d``) to ``[B, L, W]``; ``bias`` ``[B, 1, 1, L]`` is 0 or
    the dtype's lowest value per key, or None; ``alive`` ``[B, 1, 1, 1]`` is 0 for a row with
    no key to attend to (its weights are zeroed, as SDPA's math kernel does), or None.
    Backward (``P`` the weights, ``dO`` the output's gradient):
    ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dP * P))``, ``dQ = dS K / sqrt(d)``,
    ``dK = dS^T Q / sqrt(d)``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, qkv: Tensor, heads: int,
                bias: Tensor | None, alive: Tensor | None) -> Tensor:
        b, n, w3 = qkv.shape
        d = w3 // (3 * heads)
        # one copy to [3, B*H, L, d]: each head's q, k, v contiguous for bmm
        x = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).reshape(3, b * heads, n, d)
        q, k, v = x.unbind(0)
        scale = d**-0.5
        if bias is None:
            s = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
        else:
            rows = bias.expand(b, heads, 1, n).reshape(b * heads, 1, n)
            s = torch.baddbmm(rows, q, k.transpose(1, 2), alpha=scale)
        p = torch.softmax(s, dim=-1)
        if alive is not None:
            p.mul_(alive.expand(b, heads, 1, 1).reshape(b * heads, 1, 1))
        ctx.save_for_backward(x, p)
        ctx.heads = heads
        return torch.bmm(p, v).view(b, heads, n, d).transpose(1, 2).reshape(b, n, heads * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor
                 ) -> tuple[Tensor, None, None, None]:
        x, p = ctx.saved_tensors
        q, k, v = x.unbind(0)
        bh, n, d = q.shape
        heads = ctx.heads
        b = bh // heads
        go = grad.reshape(b, n, heads, d).transpose(1, 2).reshape(bh, n, d)
        g = torch.empty_like(x)  # dQ, dK, dV side by side: no stack afterwards
        torch.bmm(p.transpose(1, 2), go, out=g[2])
        dp = torch.bmm(go, v.transpose(1, 2))
        ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p).mul_(d**-0.5)
        torch.bmm(ds, k, out=g[0])
        torch.bmm(ds.transpose(1, 2), q, out=g[1])
        return g.view(3, b, heads, n, d).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * heads * d), \
            None, None, None


def packed_qkv_attention(qkv: Tensor, heads: int, keep: Tensor | None) -> Tensor:
    """Multi-head attention from the in-projection's output ``qkv`` ``[B, L, 3 W]`` to
    ``[B, L, W]`` (heads concatenated, before the out-projection), by :class:`_PackedQKV`;
    ``keep`` bool ``[B, 1, 1, L]`` (True: attend to that key) or None.
    Equal to ``F.scaled_dot_product_attention`` on the ``[B, H, L, d]`` views (tests)."""
    if keep is None:
        return _PackedQKV.apply(qkv, heads, None, None)
    # the lowest finite value, not -inf: a row with no key stays finite, then is zeroed
    bias = torch.zeros(keep.shape, dtype=qkv.dtype, device=qkv.device).masked_fill_(
        ~keep, torch.finfo(qkv.dtype).min)
    return _PackedQKV.apply(qkv, heads, bias, keep.any(-1, keepdim=True).to(qkv.dtype))


def head_views(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``q``, ``k``, ``v`` ``[B, H, L, d]`` as views of the in-projection's output ``qkv``
    ``[B, L, 3 H d]``. Split on the ``3`` axis before the heads are moved (``unbind(2)``, then
    ``transpose``), not after as ``permute(2, 0, 3, 1, 4).unbind(0)`` does: the views are
    the same, but backwards the three gradients are stacked straight into ``qkv``'s
    ``[B, L, 3, H, d]`` layout in one pass, where the other order stacks them in
    ``[3, B, H, L, d]`` and then copies that to ``qkv``'s layout (one pass fewer over the
    gradients; ``benchmarks/attention_layout.py`` times the two orders)."""
    b, n, w3 = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, w3 // (3 * heads)).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def own_kernel(x: Tensor, dropout: float, keep: Tensor | None = None) -> bool:
    """Whether :func:`packed_qkv_attention` computes this attention: fp32 on the CPU, no
    dropout on the weights, no mask or a ``[B, 1, 1, L]`` key mask, and the backend asked
    for the math kernel (torch's flash kernel switched off by ``sdpa_kernel``)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and dropout == 0.0
            and not torch.is_autocast_enabled("cpu")
            and (keep is None or (keep.dim() == 4 and keep.shape[1] == keep.shape[2] == 1))
            and torch.backends.cuda.math_sdp_enabled()
            and not torch.backends.cuda.flash_sdp_enabled())


def attention(attn: nn.MultiheadAttention, x: Tensor, keep: Tensor, *,
              own: bool = True) -> Tensor:
    """Self-attention of ``x`` ``[B, L, W]`` with ``attn``'s parameters; ``keep`` is bool
    ``[B, 1, 1, L]`` (True: attend to that key). Dropout on the weights only in training.
    ``own``: :func:`packed_qkv_attention` where :func:`own_kernel` allows it."""
    b, n, w = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    p = attn.dropout if attn.training else 0.0
    if own and own_kernel(qkv, p, keep):
        return attn.out_proj(packed_qkv_attention(qkv, h, keep))
    y = F.scaled_dot_product_attention(*head_views(qkv, h), attn_mask=keep, dropout_p=p)
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


def packed_attention(attn: nn.MultiheadAttention, x: Tensor, packed: Packed, *,
                     own: bool = True) -> Tensor:
    """:func:`attention` of packed tokens ``x`` ``[N, W]``: the projections run on the real
    tokens only; the attention itself on the padded layout, padding masked as keys."""
    qkv = packed.unpack(F.linear(x, attn.in_proj_weight, attn.in_proj_bias))
    h, w = attn.num_heads, qkv.shape[-1] // 3
    p = attn.dropout if attn.training else 0.0
    if own and own_kernel(qkv, p, packed.keep):
        return attn.out_proj(packed.pack(packed_qkv_attention(qkv, h, packed.keep)))
    y = F.scaled_dot_product_attention(*head_views(qkv, h), attn_mask=packed.keep,
                                       dropout_p=p)
    return attn.out_proj(packed.pack(y.transpose(1, 2)).reshape(-1, w))


def encoder_layer_forward(layer: nn.TransformerEncoderLayer, x: Tensor,
                          keep: Tensor | Packed) -> Tensor:
    """``layer(x, src_key_padding_mask=~keep)`` for batch-first ``x`` ``[B, L, W]``; ``keep``
    is bool ``[B, 1, 1, L]``. Pre-norm (``norm_first``) and post-norm layers alike. With
    ``keep`` a :class:`Packed`, ``x`` is the real tokens ``[N, W]`` (norms and MLP are
    per token, so they run on those alone)."""

    own = getattr(layer, "attention_impl", "sdpa") == "mmfw"

    def sa(y: Tensor) -> Tensor:
        if isinstance(keep, Packed):
            return layer.dropout1(packed_attention(layer.self_attn, y, keep, own=own))
        return layer.dropout1(attention(layer.self_attn, y, keep, own=own))

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
    (FSDP gathers a sharded layer's parameters in one). ``attention_impl``: ``"mmfw"`` lets
    :func:`packed_qkv_attention` compute the attention where :func:`own_kernel` allows it."""

    attention_impl = "sdpa"

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
