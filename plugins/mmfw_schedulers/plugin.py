"""Built-in schedulers, registered through the ``mmfw`` entry point ``schedulers``."""

from mmfw.spi import hookimpl

from .lr import Constant, OneCycle, WarmupCosine
from .stages import ProgressiveUnfreeze, ThreeStage


@hookimpl
def mmfw_schedulers():
    return {
        "constant": Constant,
        "warmup-cosine": WarmupCosine,
        "onecycle": OneCycle,
        "three-stage": ThreeStage,
        "progressive-unfreeze": ProgressiveUnfreeze,
    }
