"""Cross-attention fusion with an image–text matching (ITM) head (ALBEF / BLIP style).

The dual encoder ranks a whole split with one matrix product; this module scores a *pair* by
letting the caption's tokens attend to the image's tokens, which sees word–region agreement a
pooled embedding cannot. It is too slow to score every pair, so it is trained with the ``itm``
loss on in-batch hard negatives and used at evaluation to re-rank the dual encoder's top-k
(``eval.rerank_top_k``).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from mmfw.spi import option

from .linear import init_linear

_ge1 = attrs.validators.ge(1)


@attrs.frozen
class CrossAttentionOptions:
    layers: int = option(2, doc="fusion blocks (self-attention over the caption, "
                         "cross-attention to the image tokens, MLP)", validator=_ge1)
    heads: int = option(4, doc="attention heads (must divide the fusion width)", validator=_ge1)
    width: int = option(0, doc="fusion width both modalities are projected to "
                        "(0: model.embed_dim)", validator=attrs.validators.ge(0))
    mlp_ratio: float = option(2.0, doc="MLP hidden width / fusion width",
                              validator=attrs.validators.gt(0))
    dropout: float = option(0.0, doc="dropout inside the fusion blocks",
                            validator=[attrs.validators.ge(0), attrs.validators.lt(1)])


class CrossAttention(nn.Module):
    r"""Text tokens cross-attend to image tokens; a learned ``[ITM]`` token reads the match.

    Both modalities' token features are projected to the fusion width :math:`d`. The sequence
    ``[ITM] + caption tokens`` goes through ``layers`` pre-norm decoder blocks (self-attention
    with the caption's padding mask, cross-attention to the image tokens, MLP); the ``[ITM]``
    token's final state gives one logit: :math:`s(v, t) = w^\top \mathrm{LN}(h_{ITM}) + b`,
    :math:`\sigma(s)` the probability that the pair matches. A dedicated token, rather than the
    text encoder's first token, works the same for encoders that pool by mean and have no
    class token.

    Context: ``in_dim`` is the text token width, ``other_dim`` the image token width,
    ``out_dim`` the fusion width unless ``width`` is set.
    """

    Options = CrossAttentionOptions

    def __init__(self, options: CrossAttentionOptions | None = None, *, in_dim: int,
                 out_dim: int, other_dim: int | None = None) -> None:
        super().__init__()
        o = self.options = options or CrossAttentionOptions()
        width = o.width or out_dim
        if width % o.heads:
            raise ValueError(f"the fusion width ({width}) must be divisible by 'heads' "
                             f"({o.heads}): set 'width' or 'heads'")
        self.in_dim, self.other_dim, self.out_dim = in_dim, other_dim or in_dim, width
        self.text_proj = nn.Linear(in_dim, width)
        self.image_proj = nn.Linear(self.other_dim, width)
        for layer in (self.text_proj, self.image_proj):
            init_linear(layer, orthogonal=False, gain=1.0)
        self.itm_token = nn.Parameter(torch.randn(width) * 0.02)
        block = nn.TransformerDecoderLayer(width, o.heads, int(width * o.mlp_ratio),
                                           dropout=o.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(block, o.layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, image_tokens: Tensor, image_mask: Tensor, text_tokens: Tensor,
                text_mask: Tensor) -> Tensor:
        """Match logits ``[P]`` of ``P`` pairs: image tokens ``[P, Li, other_dim]`` with mask
        ``[P, Li]``, text tokens ``[P, Lt, in_dim]`` with mask ``[P, Lt]`` (true = real)."""
        p = text_tokens.shape[0]
        t = self.text_proj(text_tokens)
        v = self.image_proj(image_tokens.to(t.dtype))
        x = torch.cat([self.itm_token.to(t.dtype).expand(p, 1, -1), t], dim=1)
        keep = torch.cat([text_mask.new_ones(p, 1), text_mask.bool()], dim=1)
        x = self.blocks(x, v, tgt_key_padding_mask=~keep,
                        memory_key_padding_mask=~image_mask.bool())
        return self.head(self.norm(x[:, 0])).squeeze(-1)
