"""Built-in adapters, registered through the ``mmfw`` entry point ``adapters``."""

from mmfw.spi import hookimpl

from .batchnorm import BNProjection
from .cross_attention import CrossAttention
from .linear import Identity, Linear
from .mlp import MLP


@hookimpl
def mmfw_adapters():
    return {"identity": Identity, "linear": Linear, "mlp": MLP, "bn-projection": BNProjection,
            "cross-attention": CrossAttention}
