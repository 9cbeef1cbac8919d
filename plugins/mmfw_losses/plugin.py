"""Built-in losses, registered through the ``mmfw`` entry point ``losses``."""

from mmfw.hookspecs import hookimpl

from .infonce import InfoNCE


@hookimpl
def mmfw_losses():
    return {"infonce": InfoNCE}
