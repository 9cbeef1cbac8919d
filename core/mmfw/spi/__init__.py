"""The one surface plugins import: ``from mmfw.spi import ...``.

- the contract: :mod:`~mmfw.spi.hookspecs` (component hooks, lifecycle events,
  :class:`Callback`, :data:`hookimpl`) and :mod:`~mmfw.spi.context` (:class:`RunContext`);
- what components promise each other: :mod:`~mmfw.spi.contracts` and the optional
  :mod:`~mmfw.spi.capabilities`;
- options and errors: :func:`option` (attrs fields with a doc), :class:`RecipeError`, ...;
- loss helpers: :mod:`~mmfw.spi.pairing` (the id pairing rule as masks),
  :class:`Temperature`, :mod:`~mmfw.spi.contrastive` (soft-target cross-entropy, the
  excluded logit, the temperature options);
- :class:`FeatureTable`: a locked tower's outputs by input (``[model.lock_text]``).

Built-in plugins import only this package and the public ``mmfw`` API, like any other.
"""

from . import capabilities, contracts, contrastive, hookspecs, options, pairing, trust
from .capabilities import Stateful
from .context import RunContext, StepEnd
from .contracts import (
    Backend,
    DatasetSource,
    Encoder,
    Item,
    Loss,
    LossOutput,
    Modality,
    Problem,
    Row,
    Sampler,
    Scheduler,
    Split,
    StagePlan,
    asset_dir,
    has_assets,
)
from .contrastive import (
    EXCLUDED,
    learn_temperature_option,
    max_scale_option,
    soft_cross_entropy,
    temperature_option,
)
from .errors import DataError, MmfwError, PluginError, RecipeError, ResumeError
from .features import FeatureTable
from .hookspecs import EVENTS, Callback, Factories, hookimpl
from .options import Override, build, close_matches, describe, option
from .pairing import anchor_share, match_ids, pair_indices, positives
from .temperature import Temperature
from .trust import ALLOW_ENV, code_allowed, require_code

__all__ = [
    "ALLOW_ENV",
    "EVENTS",
    "EXCLUDED",
    "Backend",
    "Callback",
    "DataError",
    "DatasetSource",
    "Encoder",
    "Factories",
    "FeatureTable",
    "Item",
    "Loss",
    "LossOutput",
    "MmfwError",
    "Modality",
    "Override",
    "PluginError",
    "Problem",
    "RecipeError",
    "ResumeError",
    "Row",
    "RunContext",
    "Sampler",
    "Scheduler",
    "Split",
    "StagePlan",
    "Stateful",
    "StepEnd",
    "Temperature",
    "anchor_share",
    "asset_dir",
    "build",
    "capabilities",
    "close_matches",
    "code_allowed",
    "contracts",
    "contrastive",
    "describe",
    "has_assets",
    "hookimpl",
    "hookspecs",
    "learn_temperature_option",
    "match_ids",
    "max_scale_option",
    "option",
    "options",
    "pair_indices",
    "pairing",
    "positives",
    "require_code",
    "soft_cross_entropy",
    "temperature_option",
    "trust",
]
