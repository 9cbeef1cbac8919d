"""Identity and linear adapters (the CLIP projection), and the initialisation every
linear-layer adapter shares."""

from __future__ import annotations

import attrs
from torch import Tensor, nn

from mmfw.spi import option


def init_linear(layer: nn.Linear, *, orthogonal: bool, gain: float) -> None:
    """Orthogonal weights (seed 001 §4.2.2: diverse directions from the first step, scaled by
    ``gain``) or a normal with std ``gain / sqrt(in_features)`` (CLIP's projection); zero bias.
    """
    if orthogonal:
        nn.init.orthogonal_(layer.weight, gain=gain)
    else:
        nn.init.normal_(layer.weight, std=gain * layer.in_features**-0.5)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


_gain = attrs.validators.gt(0)


@attrs.frozen
class LinearOptions:
    bias: bool = option(False, doc="add a bias (CLIP's projections have none)")
    orthogonal: bool = option(False, doc="orthogonal initialisation of the weight")
    gain: float = option(1.0, doc="scale of the initial weight (orthogonal gain, or the std "
                         "multiplier of the normal init)", validator=_gain)


class Linear(nn.Module):
    Options = LinearOptions

    def __init__(self, options: LinearOptions | None = None, *, in_dim: int, out_dim: int):
        super().__init__()
        o = options or LinearOptions()
        self.proj = nn.Linear(in_dim, out_dim, bias=o.bias)
        init_linear(self.proj, orthogonal=o.orthogonal, gain=o.gain)
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
