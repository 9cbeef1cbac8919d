"""A small ResNet image encoder (He et al. 2016), built from torch.nn and trained from scratch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from mmfw.spi import option

#: ImageNet channel statistics, the usual normalisation of ResNets
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _positive_ints(instance: Any, attribute: Any, value: tuple[int, ...]) -> None:
    if not value or any(w < 1 for w in value):
        raise ValueError(f"'{attribute.name}' must be a non-empty list of positive integers, "
                         f"got {list(value)}")


@attrs.frozen
class CNNVisionOptions:
    image_size: int = option(64, doc="input side in pixels (shorter side resized, then cropped)",
                             validator=attrs.validators.ge(8))
    widths: tuple[int, ...] = option((32, 64, 128, 256), doc="channels of each stage; the last "
                                     "is the output dim", validator=_positive_ints)
    blocks: int = option(2, doc="basic blocks per stage (2 blocks in 4 stages: ResNet-18)",
                         validator=attrs.validators.ge(1))
    stem: Literal["small", "imagenet"] = option("small", doc='"small": one 3x3 conv (CIFAR '
                                                'ResNet); "imagenet": 7x7/2 conv + max-pool')
    norm: Literal["batch", "group"] = option("batch", doc="BatchNorm (the paper's) or "
                                             "GroupNorm (independent of the batch)")


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    if kind == "batch":
        return nn.BatchNorm2d
    return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut, projected by a 1x1 conv when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]
                 ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class CNNVision(nn.Module):
    """ResNet with basic blocks: a stem, ``len(widths)`` stages (each after the first halves the
    resolution), global average pooling. Output ``[B, widths[-1]]``.
    """

    Options = CNNVisionOptions
    modality = "image"

    def __init__(self, options: CNNVisionOptions | None = None) -> None:
        super().__init__()
        o = self.options = options or CNNVisionOptions()
        norm, w0 = norm_layer(o.norm), o.widths[0]
        if o.stem == "small":
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False), norm(w0), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 7, 2, 3, bias=False), norm(w0), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        stages, cin = [], w0
        for k, width in enumerate(o.widths):
            blocks = [BasicBlock(cin if b == 0 else width, width, 2 if b == 0 and k else 1, norm)
                      for b in range(o.blocks)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.dim = int(self.stages[-1][-1].conv2.out_channels)  # read from the built model
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # each block starts as the identity (Goyal et al. 2017)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.norm2.weight)

    def preprocess(self, image: Image.Image | Tensor) -> Tensor:
        """PIL image or uint8 ``[C, H, W]`` tensor to a normalised float ``[3, S, S]``."""
        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(image.convert("RGB"))
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image [3, H, W], got shape {tuple(image.shape)}")
        size = self.options.image_size
        image = TF.center_crop(TF.resize(image.expand(3, -1, -1), [size], antialias=True), [size])
        return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), list(MEAN), list(STD))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.stem(pixels)
        for stage in self.stages:
            x = stage(x)
        return x.mean((2, 3))

    def named_groups(self) -> dict[str, list[str]]:
        """Parameter names from input to output: the stem, then one group per stage."""
        groups = {"embeddings": [f"stem.{n}" for n, _ in self.stem.named_parameters()]}
        for k, stage in enumerate(self.stages):
            groups[f"layers.{k}"] = [f"stages.{k}.{n}" for n, _ in stage.named_parameters()]
        return groups
