"""The module the entry point names: mmfw calls its hooks to find this package's components."""

import mmfw

from .dcl import DCL


@mmfw.hookimpl
def mmfw_losses() -> dict:
    return {"dcl": DCL}
