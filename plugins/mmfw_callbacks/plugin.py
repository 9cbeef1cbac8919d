"""The built-in callbacks, registered through the ``mmfw`` entry-point group like any other
plugin: metrics log, console, diagnostics and the collapse detector, validation, early
stopping, the final evaluation, plots, the distillation teacher, the EMA of the weights and
the locked text tower."""

from __future__ import annotations

from mmfw.spi import Factories, hookimpl

from .diagnostics import diagnostics_callback
from .ema import ema
from .evaluation import early_stopping, final_evaluation, validation
from .locked_text import lock_text
from .log import console, metrics_log
from .plots import plots
from .teacher import teacher_callback


@hookimpl
def mmfw_callbacks() -> Factories:
    return {
        "metrics-log": metrics_log,
        "console": console,
        "diagnostics": diagnostics_callback,
        "validation": validation,
        "early-stopping": early_stopping,
        "final-evaluation": final_evaluation,
        "plots": plots,
        "teacher": teacher_callback,
        "ema": ema,
        "lock-text": lock_text,
    }
