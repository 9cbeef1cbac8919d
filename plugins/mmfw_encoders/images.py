"""Turning images into normalised float tensors, shared by the image encoders."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import attrs
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
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


def normalise(image: Tensor, mean: Sequence[float], std: Sequence[float],
              rescale: float = 1 / 255) -> Tensor:
    """``(image * rescale - mean) / std`` in float32 (uint8 is rescaled, float taken as it is),
    for one ``[3, H, W]`` image or a ``[B, 3, H, W]`` batch, on the image's device."""
    x = image.float()
    if image.dtype == torch.uint8:
        x = x.div_(255.0) if rescale == 1 / 255 else x.mul_(rescale)
    m, s = _stats(tuple(mean), tuple(std), x.device, x.dtype)
    return x.sub_(m).div_(s)


@functools.lru_cache(maxsize=64)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
           dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean and std as ``[C, 1, 1]`` tensors on ``device``, made once: a training step on a
    GPU then copies nothing to it for normalising."""
    return (torch.tensor(mean, dtype=dtype, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=dtype, device=device).view(-1, 1, 1))


def rgb_tensor(image: Image.Image | Tensor) -> Tensor:
    """PIL image (any mode: L, RGBA, P, ...) or ``[C, H, W]`` tensor to a ``[3, H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image [3, H, W], got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        return image.expand(3, -1, -1)
    return image[:3]


#: PIL resampling codes (as stored in image-processor configs) -> torchvision modes
_INTERPOLATION = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR,
                  3: InterpolationMode.BICUBIC}


@attrs.frozen
class Pipeline:
    """Resize, centre-crop, rescale and normalise: the values of an image processor, applied
    with torchvision ops on tensors (no per-image processor call, no PIL round trip).

    ``size`` is an exact ``(height, width)``, or ``shortest`` resizes the shorter side to
    ``size[0]`` keeping the aspect ratio; ``crop`` is the centre crop taken after resizing.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shortest: bool = False
    crop: tuple[int, int] | None = None
    resample: int = 3
    rescale: float = 1 / 255
    normalize: bool = True

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop or self.size

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        return self.finish(self.geometry(image))

    def finish(self, x: Tensor) -> Tensor:
        """Rescale and normalise ``geometry``'s output (one image or a batch, any device)."""
        if not self.normalize:
            return x.float() * self.rescale if x.dtype == torch.uint8 else x.float()
        return normalise(x, self.mean, self.std, self.rescale)

    def geometry(self, image: Image.Image | Tensor) -> Tensor:
        """Resize and crop: a uint8 ``[3, H, W]`` tensor from a PIL image or a uint8 tensor."""
        x = rgb_tensor(image)
        mode = _INTERPOLATION.get(int(self.resample), InterpolationMode.BICUBIC)
        if self.shortest:
            h, w = x.shape[-2:]
            s = self.size[0]
            hw = [s, max(1, round(w * s / h))] if h <= w else [max(1, round(h * s / w)), s]
        else:
            hw = list(self.size)
        if list(x.shape[-2:]) != hw:
            x = TF.resize(x, hw, interpolation=mode, antialias=True)
        if self.crop is not None and tuple(x.shape[-2:]) != self.crop:
            x = TF.center_crop(x, list(self.crop))
        return x


class PipelineImages:
    """The image side of an encoder whose ``pipeline`` is a :class:`Pipeline` (an image
    processor's values): ``preprocess``, and its uint8 split, ``preprocess_uint8`` in the
    loader and ``normalize`` on the device (the ``Uint8Vision`` capability)."""

    pipeline: Pipeline

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pipeline.output_size

    def preprocess(self, image: Image.Image | Tensor) -> Tensor:
        return self.pipeline(image)

    def preprocess_uint8(self, image: Image.Image | Tensor) -> Tensor:
        return self.pipeline.geometry(image)

    def normalize(self, pixels: Tensor) -> Tensor:
        return self.pipeline.finish(pixels)

