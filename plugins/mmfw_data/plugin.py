"""Built-in datasets and samplers, registered through the ``mmfw`` entry point ``data``."""

from mmfw.hookspecs import hookimpl

from .samplers import RandomSampler
from .synthetic import SyntheticDataset


@hookimpl
def mmfw_datasets():
    return {"synthetic": SyntheticDataset}


@hookimpl
def mmfw_samplers():
    return {"random": RandomSampler}
