"""The trackers and the profiler, registered through the ``mmfw`` entry-point group like any
other plugin. Registering imports none of the tracking libraries: a tracker imports its
library when a run that lists it in ``run.report_to`` starts."""

from __future__ import annotations

from mmfw.spi import Factories, hookimpl

from .mlflow_tracker import mlflow_tracker
from .profiler import profiler
from .tensorboard_tracker import tensorboard_tracker
from .wandb_tracker import wandb_tracker


@hookimpl
def mmfw_callbacks() -> Factories:
    return {
        "tensorboard": tensorboard_tracker,
        "mlflow": mlflow_tracker,
        "wandb": wandb_tracker,
        "profiler": profiler,
    }
