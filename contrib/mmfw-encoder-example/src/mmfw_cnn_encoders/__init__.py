"""mmfw-encoder-example: a small ResNet image encoder and a GRU text encoder for mmfw."""

from .gru import GRUText, GRUTextOptions
from .resnet import CNNVision, CNNVisionOptions

__all__ = ["CNNVision", "CNNVisionOptions", "GRUText", "GRUTextOptions"]
