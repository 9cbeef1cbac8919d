"""mmfw: train image-text dual encoders from pretrained unimodal encoders, with plugins.

Public API: :func:`create`, :func:`available`, :func:`load_recipe`, :func:`train`,
:func:`evaluate`, :func:`load_run`, :func:`load` (embed with a trained model); plugin
authors import :mod:`mmfw.spi`.
"""

from .config.recipe import Recipe, load_recipe
from .inference import Collection, Model, load
from .registry import available, create, make_options, register
from .run.dispatch import train
from .run.loaded import LoadedRun, ensemble_members, evaluate, load_run
from .run.result import RunResult
from .spi.contracts import LossOutput
from .spi.errors import DataError, MmfwError, PluginError, RecipeError, ResumeError
from .spi.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Collection",
    "DataError",
    "LoadedRun",
    "LossOutput",
    "MmfwError",
    "Model",
    "PluginError",
    "Recipe",
    "RecipeError",
    "ResumeError",
    "RunResult",
    "available",
    "create",
    "ensemble_members",
    "evaluate",
    "hookimpl",
    "load",
    "load_recipe",
    "load_run",
    "make_options",
    "register",
    "train",
]
