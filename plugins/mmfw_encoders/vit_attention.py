"""timm's ViT attention with :func:`~mmfw_encoders.attention.packed_qkv_attention` where it
applies (``scratch-vision``'s ``attention_impl = "mmfw"``).

A subclass of ``timm.models.vision_transformer.Attention`` that adds no state: the blocks of a
``timm.create_model`` ViT take it as their attention's class, with the same parameters and
names, so state dicts, checkpoints and exports are unchanged.
It runs timm's own forward for anything the packed kernel does not cover: an attention mask,
causal attention, gating, query/key or output norms, dropout on the weights, bf16, CUDA.
"""

from __future__ import annotations

from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from .attention import own_kernel, packed_qkv_attention


class PackedQKVAttention(Attention):
    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        plain = (attn_mask is None and not is_causal and getattr(self, "gate", None) is None
                 and all(isinstance(getattr(self, n, None), nn.Identity | None)
                         for n in ("q_norm", "k_norm", "norm")))
        p = self.attn_drop.p if self.training else 0.0
        if not (plain and own_kernel(x, p)):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(self.proj(packed_qkv_attention(self.qkv(x), self.num_heads,
                                                             None)))
