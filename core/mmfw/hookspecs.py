"""Kept for plugins written for mmfw 0.1: these names now live in :mod:`mmfw.spi.hookspecs`."""

from .spi.hookspecs import *  # noqa: F403
from .spi.hookspecs import __all__  # noqa: F401
