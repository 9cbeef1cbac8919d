"""``mlp``: a deeper projection head (seed 001 §6: "3+ layers with non-linearities and
normalisation" to resist collapse), SimCLR/CLIP-style."""

from __future__ import annotations

import itertools
from typing import Literal

import attrs
from torch import Tensor, nn

from mmfw.spi import option

from .linear import init_linear

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@attrs.frozen
class MLPOptions:
    layers: int = option(2, doc="linear layers (1: a single projection)",
                         validator=attrs.validators.ge(1))
    hidden: int = option(0, doc="hidden width (0: the encoder's width)",
                         validator=attrs.validators.ge(0))
    activation: Literal["gelu", "relu", "silu"] = option("gelu", doc="between layers")
    dropout: float = option(0.0, doc="dropout after each hidden activation",
                            validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    layer_norm: bool = option(False, doc="LayerNorm after each hidden linear layer")
    bias: bool = option(True, doc="biases in the linear layers")
    orthogonal: bool = option(False, doc="orthogonal initialisation of every linear layer")
    gain: float = option(1.0, doc="scale of the initial weights", validator=attrs.validators.gt(0))


class MLP(nn.Module):
    """``in_dim -> hidden -> ... -> out_dim``: Linear [LayerNorm] activation [Dropout] per
    hidden layer, a plain Linear last (no activation on the embedding)."""

    Options = MLPOptions

    def __init__(self, options: MLPOptions | None = None, *, in_dim: int, out_dim: int):
        super().__init__()
        o = options or MLPOptions()
        hidden = o.hidden or in_dim
        widths = [in_dim] + [hidden] * (o.layers - 1) + [out_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layer = nn.Linear(a, b, bias=o.bias)
            init_linear(layer, orthogonal=o.orthogonal, gain=o.gain)
            blocks.append(layer)
            if i < o.layers - 1:
                if o.layer_norm:
                    blocks.append(nn.LayerNorm(b))
                blocks.append(ACTIVATIONS[o.activation]())
                if o.dropout:
                    blocks.append(nn.Dropout(o.dropout))
        self.net = nn.Sequential(*blocks)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
