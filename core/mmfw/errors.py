"""Kept for plugins written for mmfw 0.1: these names now live in :mod:`mmfw.spi.errors`."""

from .spi.errors import *  # noqa: F403
from .spi.errors import __all__  # noqa: F401
