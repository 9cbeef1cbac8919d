"""The module the entry point names: mmfw calls its hooks to find this package's components."""

from mmfw.spi import hookimpl

from .gru import GRUText
from .resnet import CNNVision


@hookimpl
def mmfw_encoders() -> dict:
    return {"cnn-vision": CNNVision, "gru-text": GRUText}
