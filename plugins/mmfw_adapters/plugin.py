"""Built-in adapters, registered through the ``mmfw`` entry point ``adapters``."""

from mmfw.hookspecs import hookimpl

from .linear import Identity, Linear


@hookimpl
def mmfw_adapters():
    return {"identity": Identity, "linear": Linear}
