"""Kept for plugins written for mmfw 0.1: these names now live in :mod:`mmfw.spi.options`."""

from .spi.options import *  # noqa: F403
from .spi.options import __all__  # noqa: F401
