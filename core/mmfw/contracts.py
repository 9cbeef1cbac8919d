"""Kept for plugins written for mmfw 0.1: these names now live in :mod:`mmfw.spi.contracts`."""

from .spi.contracts import *  # noqa: F403
from .spi.contracts import __all__  # noqa: F401
