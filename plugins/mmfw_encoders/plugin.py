"""Built-in encoders, registered through the ``mmfw`` entry point ``encoders``.

Besides the encoders, the plugin serves the known-model table (true widths) and the size
presets through the ``mmfw_models`` / ``mmfw_presets`` hooks.
"""

from mmfw.spi import hookimpl

from .clip import ClipText, ClipVision
from .hf_text import HFText
from .hf_vision import HFVision
from .known_models import MODELS, PRESETS
from .scratch import ScratchText, ScratchVision
from .timm_vision import TimmVision


@hookimpl
def mmfw_encoders():
    return {"scratch-vision": ScratchVision, "scratch-text": ScratchText, "hf-text": HFText,
            "hf-vision": HFVision, "timm-vision": TimmVision, "clip-vision": ClipVision,
            "clip-text": ClipText}


@hookimpl
def mmfw_models():
    return [dict(row) for row in MODELS]


@hookimpl
def mmfw_presets():
    return {name: dict(preset) for name, preset in PRESETS.items()}
