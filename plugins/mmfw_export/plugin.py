"""The built-in exporters, registered through the ``mmfw`` entry-point group like any other
plugin. Each format module adds its factory here."""

from __future__ import annotations

from mmfw.spi import Factories, hookimpl


@hookimpl
def mmfw_exporters() -> Factories:
    return {}
