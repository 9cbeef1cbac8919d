"""Kept for plugins written for mmfw 0.1: these names now live in :mod:`mmfw.spi.temperature`."""

from .spi.temperature import *  # noqa: F403
from .spi.temperature import __all__  # noqa: F401
