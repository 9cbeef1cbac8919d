"""The built-in exporters, registered through the ``mmfw`` entry-point group like any other
plugin. Each format module adds its factory here."""

from __future__ import annotations

from mmfw.spi import Factories, hookimpl

from .hf import HFExporter
from .native import NativeExporter
from .onnx import OnnxExporter
from .open_clip_format import OpenClipExporter


@hookimpl
def mmfw_exporters() -> Factories:
    return {"mmfw": NativeExporter, "hf": HFExporter, "open_clip": OpenClipExporter,
            "onnx": OnnxExporter}
