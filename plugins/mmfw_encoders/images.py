"""Turning images into normalised float tensors, shared by the image encoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


def to_tensor(image: Image.Image | Tensor, size: int | tuple[int, int] | None) -> Tensor:
    """PIL image or uint8 ``[3, H, W]`` tensor to uint8 ``[3, size, size]`` (RGB, resized)."""
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("RGB"))
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [3, H, W], got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(image.shape[-2:]) != hw:
            image = TF.resize(image, list(hw), antialias=True)
    return image


def normalise(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    x = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(m).div_(s)
