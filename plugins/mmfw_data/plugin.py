"""Built-in datasets and samplers, registered through the ``mmfw`` entry point ``data``."""

from mmfw.spi import hookimpl

from .karpathy import KarpathyDataset
from .labelled import LabelledDataset
from .samplers import BalancedSampler, CurriculumSampler, RandomSampler, SemanticGroupsSampler
from .shards import WebDataset
from .synthetic import SyntheticDataset
from .tabular import CsvDataset, JsonlDataset


@hookimpl
def mmfw_datasets():
    return {
        "synthetic": SyntheticDataset,
        "karpathy": KarpathyDataset,
        "csv": CsvDataset,
        "jsonl": JsonlDataset,
        "webdataset": WebDataset,
        "labelled": LabelledDataset,
    }


@hookimpl
def mmfw_samplers():
    return {
        "random": RandomSampler,
        "semantic-groups": SemanticGroupsSampler,
        "balanced": BalancedSampler,
        "curriculum": CurriculumSampler,
    }
