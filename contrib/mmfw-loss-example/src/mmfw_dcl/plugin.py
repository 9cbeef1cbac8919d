"""The module the entry point names: mmfw calls its hooks to find this package's components."""

from mmfw.spi import hookimpl

from .dcl import DCL


@hookimpl
def mmfw_losses() -> dict:
    return {"dcl": DCL}
