"""``bn-projection``: the seeds' Linear + BatchNorm1d projection (seed 001 §4.2.2), which
standardises every embedding dimension over the batch so none can go flat."""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from mmfw.spi import option

from .linear import init_linear


@attrs.frozen
class BNProjectionOptions:
    bias: bool = option(False, doc="bias in the linear layer (BatchNorm's shift makes it "
                        "redundant)")
    affine: bool = option(True, doc="learnable BatchNorm scale and shift")
    momentum: float = option(0.1, doc="BatchNorm running-statistics momentum",
                             validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    orthogonal: bool = option(True, doc="orthogonal initialisation of the weight (the seeds')")
    gain: float = option(1.0, doc="scale of the initial weight (the seeds used 1.4 for "
                         "vision, 1.2 for text)", validator=attrs.validators.gt(0))


class BNProjection(nn.Module):
    Options = BNProjectionOptions

    def __init__(self, options: BNProjectionOptions | None = None, *, in_dim: int,
                 out_dim: int):
        super().__init__()
        o = options or BNProjectionOptions()
        self.proj = nn.Linear(in_dim, out_dim, bias=o.bias)
        init_linear(self.proj, orthogonal=o.orthogonal, gain=o.gain)
        self.norm = nn.BatchNorm1d(out_dim, affine=o.affine, momentum=o.momentum)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if self.training and x.shape[0] == 1:  # one row has no batch statistics: use the
            n = self.norm                      # running ones rather than fail
            return F.batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, False,
                                0.0, n.eps)
        return self.norm(x)
