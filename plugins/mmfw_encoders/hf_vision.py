"""``hf-vision``: Hugging Face vision encoders (ViT, DeiT, BEiT, DINOv2, ...) by hub name or
local folder, with the preprocessing values of their own image processor.

The processor's size, crop, resampling, mean and std are read once and applied with
torchvision ops (``images.Pipeline``): calling the processor per image would cost a Python
round trip per item in every DataLoader batch.

``kwargs.trust_remote_code = true`` is code, refused unless allowed (``mmfw --allow-code``);
see ``hf_text``.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from mmfw.spi import option

from . import hub
from .groups import transformer_groups
from .hf_text import (
    check_width,
    drop_pooler,
    enable_checkpointing,
    load_model,
    no_remote_code,
    remote_code,
)
from .images import Pipeline, PipelineImages
from .lora import LoraOptions, apply_lora, merge_lora

#: 'cls': the class token; 'mean': mean of the patch tokens (class/distillation/register
#: tokens excluded); 'pooler': the model's own pooled output (BEiT: mean + LayerNorm)
VisionPooling = Literal["cls", "mean", "pooler"]


@attrs.frozen
class HFVisionOptions:
    model: str = option(doc="hub name (google/vit-base-patch16-224) or a local folder written "
                        "by save_pretrained (model + image processor)")
    pretrained: bool = option(True, doc="load the weights (false: the architecture from its "
                              "config, randomly initialised)")
    pooling: VisionPooling = option("cls", doc="'cls' token, 'mean' of patch tokens, or the "
                                    "model's 'pooler' output")
    kwargs: dict[str, Any] = option(factory=dict, doc="extra keywords for from_pretrained "
                                    "(config overrides such as drop_path_rate, or revision); "
                                    "trust_remote_code = true needs mmfw --allow-code",
                                    validator=no_remote_code)
    grad_checkpointing: bool = option(False, doc="recompute each layer's activations in the "
                                      "backward pass instead of storing them (transformers' "
                                      "gradient checkpointing, non-reentrant): less memory, "
                                      "about one more forward of compute; same gradients")
    lora: LoraOptions | None = option(None, doc="[model.vision.lora]: LoRA adapters via "
                                      "peft, the rest of the tower frozen (table below)")


def _field(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def pipeline_of(processor: Any) -> Pipeline:
    """The preprocessing an image processor performs, as a ``Pipeline``."""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    height, width = _field(size, "height"), _field(size, "width")
    shortest = _field(size, "shortest_edge")
    if height and width:
        hw, by_shortest = (int(height), int(width)), False
    elif shortest:
        hw, by_shortest = (int(shortest), int(shortest)), True
    else:
        raise ValueError(f"image processor {type(processor).__name__} has no usable size "
                         f"({size!r})")
    crop_hw = None
    crop_pct = getattr(processor, "crop_pct", None)
    if by_shortest and crop_pct and hw[0] < 384:  # ConvNeXt's rule: resize up, crop back
        crop_hw = hw
        hw = (int(hw[0] / crop_pct),) * 2
    elif getattr(processor, "do_center_crop", False) and _field(crop, "height"):
        crop_hw = (int(_field(crop, "height")), int(_field(crop, "width")))
    if not getattr(processor, "do_resize", True):
        raise ValueError("the image processor does not resize: batches need one image size")
    return Pipeline(
        size=hw, shortest=by_shortest, crop=crop_hw,
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
        resample=int(getattr(processor, "resample", 3) or 3),
        rescale=float(processor.rescale_factor) if getattr(processor, "do_rescale", True)
        else 1.0,
        normalize=bool(getattr(processor, "do_normalize", True)),
    )


class HFVision(PipelineImages, nn.Module):
    Options = HFVisionOptions
    modality = "image"

    def __init__(self, options: HFVisionOptions) -> None:
        from transformers import AutoImageProcessor  # heavy: imported when a model is built

        super().__init__()
        o = self.options = options
        self.source = hub.resolve(o.model, "hf-vision")
        processor = hub.load(self.source, AutoImageProcessor.from_pretrained, "hf-vision",
                             "image processor", trust_remote_code=remote_code(o))
        self.pipeline = pipeline_of(processor)
        self.model = load_model(self.source, "hf-vision", o.pretrained, o.kwargs)
        if o.pooling == "pooler":
            if getattr(self.model, "pooler", None) is None:
                raise ValueError(f"'pooling' = 'pooler' but {type(self.model).__name__} has no "
                                 "pooler: use 'cls' or 'mean'")
        else:
            drop_pooler(self.model)
        self.prefix_tokens = 0
        self.dim = self._probe()
        check_width("hf-vision", self.model, self.dim)
        if o.grad_checkpointing:
            enable_checkpointing(self.model, "hf-vision")
        if o.lora is not None:
            apply_lora(self.model, o.lora, section="model.vision", groups=self.named_groups(),
                       prefix="model.")

    def _probe(self) -> int:
        """Run one image: count the non-patch tokens and read the real output width."""
        h, w = self.pipeline.output_size
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(pixel_values=torch.zeros(1, 3, h, w))
        finally:
            self.model.train(was_training)
        hidden = out.last_hidden_state
        if self.options.pooling == "pooler":
            return int(out.pooler_output.shape[-1])
        if hidden.ndim == 4:  # convolutional feature map [B, C, h, w]: no tokens
            if self.options.pooling == "cls":
                raise ValueError(f"{type(self.model).__name__} has no class token: use "
                                 "pooling = 'mean' or 'pooler'")
            return int(hidden.shape[1])
        patch = getattr(self.model.config, "patch_size", None)
        if isinstance(patch, (list, tuple)):
            patch = patch[0]
        if isinstance(patch, int) and patch > 0:
            self.prefix_tokens = max(0, hidden.shape[1] - (h // patch) * (w // patch))
        if self.options.pooling == "cls" and self.prefix_tokens == 0:
            raise ValueError(f"{type(self.model).__name__} has no class token: use pooling = "
                             "'mean' or 'pooler'")
        return int(hidden.shape[-1])

    def forward(self, pixels: Tensor) -> Tensor:
        out = self.model(pixel_values=pixels)
        if self.options.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if hidden.ndim == 4:
            return hidden.mean(dim=(2, 3))
        if self.options.pooling == "cls":
            return hidden[:, 0]
        return hidden[:, self.prefix_tokens:].mean(1)

    def forward_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """``last_hidden_state`` ``[B, L, hidden]`` (a conv map flattened to its positions)
        and an all-true mask."""
        hidden = self.model(pixel_values=pixels).last_hidden_state
        if hidden.ndim == 4:
            hidden = hidden.flatten(2).transpose(1, 2)
        return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)

    def named_groups(self) -> dict[str, list[str]]:
        return transformer_groups((n for n, _ in self.named_parameters()), root="model.")

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the weights: ``self.model`` is a plain transformers model
        again (no-op without adapters)."""
        merge_lora(self.model)
