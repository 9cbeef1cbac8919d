"""Identity and linear adapters (the CLIP projection)."""

from __future__ import annotations

import attrs
from torch import Tensor, nn

from mmfw.options import option


@attrs.frozen
class LinearOptions:
    bias: bool = option(False, doc="add a bias (CLIP's projections have none)")
    orthogonal: bool = option(False, doc="orthogonal initialisation of the weight")


class Linear(nn.Module):
    Options = LinearOptions

    def __init__(self, options: LinearOptions | None = None, *, in_dim: int, out_dim: int):
        super().__init__()
        o = options or LinearOptions()
        self.proj = nn.Linear(in_dim, out_dim, bias=o.bias)
        if o.orthogonal:
            nn.init.orthogonal_(self.proj.weight)
        else:
            nn.init.normal_(self.proj.weight, std=in_dim**-0.5)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Identity(nn.Module):
    """No projection: for dimension-matched encoder pairs."""

    Options = None

    def __init__(self, options: None = None, *, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim != out_dim:
            raise ValueError(
                f"identity adapter needs equal widths, but the encoder gives {in_dim} and "
                f"model.embed_dim is {out_dim}: set model.embed_dim = {in_dim} or use "
                "model.adapter.name = 'linear'"
            )
        self.in_dim = self.out_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        return x
