"""Kept for plugins written for mmfw 0.1: these names now live in :mod:`mmfw.spi.pairing`."""

from .spi.pairing import *  # noqa: F403
from .spi.pairing import __all__  # noqa: F401
