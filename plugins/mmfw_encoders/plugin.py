"""Built-in encoders, registered through the ``mmfw`` entry point ``encoders``."""

from mmfw.hookspecs import hookimpl

from .scratch import ScratchText, ScratchVision


@hookimpl
def mmfw_encoders():
    return {"scratch-vision": ScratchVision, "scratch-text": ScratchText}
