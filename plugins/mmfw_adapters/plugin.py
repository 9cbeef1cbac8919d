"""Built-in adapters, registered through the ``mmfw`` entry point ``adapters``, and the
``pca-fit`` callback that fits the ``pca`` adapter before training."""

from mmfw.spi import hookimpl

from .batchnorm import BNProjection
from .cross_attention import CrossAttention
from .linear import Identity, Linear
from .mlp import MLP
from .pca import PCA, pca_fit_callback


@hookimpl
def mmfw_adapters():
    return {"identity": Identity, "linear": Linear, "mlp": MLP, "bn-projection": BNProjection,
            "cross-attention": CrossAttention, "pca": PCA}


@hookimpl
def mmfw_callbacks():
    return {"pca-fit": pca_fit_callback}
