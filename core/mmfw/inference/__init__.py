"""Using a trained model: ``mmfw.load`` (embed images and texts, score, search), saved
collections of embeddings, and the model card written with every export."""

from .collection import Collection
from .model import Hit, Model, load

__all__ = ["Collection", "Hit", "Model", "load"]
