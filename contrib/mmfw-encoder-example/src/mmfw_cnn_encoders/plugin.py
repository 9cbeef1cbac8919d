"""The module the entry point names: mmfw calls its hooks to find this package's components."""

import mmfw

from .gru import GRUText
from .resnet import CNNVision


@mmfw.hookimpl
def mmfw_encoders() -> dict:
    return {"cnn-vision": CNNVision, "gru-text": GRUText}
