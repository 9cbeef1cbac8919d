"""mmfw: train image-text dual encoders from pretrained unimodal encoders, with plugins.

Public API: :func:`create`, :func:`available`, :func:`load_recipe`, :func:`train`,
:func:`evaluate`, :func:`load_run`, and :data:`hookimpl` for plugin authors.
"""

from .contracts import LossOutput
from .engine import RunResult, train
from .errors import DataError, MmfwError, PluginError, RecipeError, ResumeError
from .hookspecs import hookimpl
from .recipe import Recipe, load_recipe
from .registry import available, create, register
from .runs import LoadedRun, evaluate, load_run

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "LoadedRun",
    "LossOutput",
    "MmfwError",
    "PluginError",
    "Recipe",
    "RecipeError",
    "ResumeError",
    "RunResult",
    "available",
    "create",
    "evaluate",
    "hookimpl",
    "load_recipe",
    "load_run",
    "register",
    "train",
]
