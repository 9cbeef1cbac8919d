"""Built-in schedulers, registered through the ``mmfw`` entry point ``schedulers``."""

from mmfw.hookspecs import hookimpl

from .lr import Constant, WarmupCosine


@hookimpl
def mmfw_schedulers():
    return {"constant": Constant, "warmup-cosine": WarmupCosine}
