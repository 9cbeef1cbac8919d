"""``timm-vision``: any ``timm.create_model`` image model as an encoder (classifier removed).

Weights come from timm's own source (the Hugging Face hub) when ``pretrained = true``, or from a
local file through ``checkpoint``, which timm loads with its usual filters (position-embedding
resize, classifier removal) via ``pretrained_cfg_overlay=dict(file=...)``. The eval transform
is timm's: ``resolve_data_config`` + ``create_transform``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import Compose, Normalize
from torchvision.transforms.functional import pil_to_tensor

from mmfw.spi import PluginError, close_matches, option

from . import hub
from .groups import timm_groups
from .images import normalise, rgb_tensor
from .lora import LoraOptions, apply_lora, merge_lora

#: timm's ``global_pool`` for each pooling name ('default': the architecture's own)
_GLOBAL_POOL = {"cls": "token", "mean": "avg"}
#: create_model keywords this encoder sets itself
_RESERVED = ("pretrained", "num_classes", "pretrained_cfg_overlay", "global_pool")


@attrs.frozen
class TimmVisionOptions:
    model: str = option(doc="a timm.create_model name, optionally with its pretrained tag "
                        "(vit_small_patch16_224.augreg_in21k_ft_in1k)")
    pretrained: bool = option(True, doc="load pretrained weights (from 'checkpoint' if set, "
                              "else timm downloads them); false: random initialisation")
    checkpoint: str = option("", doc="local weights file (.safetensors, .pth, .bin) loaded "
                             "through timm's pretrained_cfg_overlay=dict(file=...)")
    pooling: Literal["default", "cls", "mean"] = option(
        "default", doc="'cls' token, 'mean' of patch tokens, or the architecture's 'default'")
    kwargs: dict[str, Any] = option(factory=dict, doc="extra keywords for timm.create_model, "
                                    "e.g. img_size = 96, drop_path_rate = 0.1")
    image_size: int = option(0, doc="input resolution in pixels (square) for the data "
                             "pipeline; 0: the model's own (its pretrained_cfg, or a ViT's "
                             "img_size). A CNN takes any size; a ViT needs kwargs.img_size too")
    crop_pct: float = option(0.0, doc="timm's eval centre-crop fraction (resize to "
                             "image_size / crop_pct, crop image_size); 1.0 crops nothing "
                             "from a square image; 0: the model's own")
    grad_checkpointing: bool = option(False, doc="recompute each block's activations in the "
                                      "backward pass instead of storing them (timm's "
                                      "set_grad_checkpointing, non-reentrant): less memory, "
                                      "about one more forward of compute; same gradients")
    lora: LoraOptions | None = option(None, doc="[model.vision.lora]: LoRA adapters via "
                                      "peft, the rest of the tower frozen (table below)")

    def __attrs_post_init__(self) -> None:
        if self.checkpoint and not self.pretrained:
            raise ValueError("'checkpoint' is set but 'pretrained' is false: set pretrained = "
                             "true to load the file, or drop the checkpoint")
        if self.image_size < 0 or not 0.0 <= self.crop_pct <= 1.0:
            raise ValueError(f"image_size must be >= 0 (given {self.image_size}) and crop_pct "
                             f"in [0, 1] (given {self.crop_pct}); 0 means the model's own")
        taken = [k for k in _RESERVED if k in self.kwargs]
        if taken:
            raise ValueError(f"'kwargs' sets {', '.join(taken)}, which timm-vision sets itself "
                             "(use the options pretrained, checkpoint and pooling)")


class _Records(logging.Handler):
    """Collects what timm's builder logs while loading weights (it reports missing keys)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def create(o: TimmVisionOptions) -> nn.Module:
    """``timm.create_model`` with errors that say what was tried."""
    import timm  # here, not at import: loading the plugin registry stays light

    if ":" not in o.model and not timm.is_model(o.model.split(".")[0]):
        near = close_matches(o.model, timm.list_models())
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise PluginError(f"timm-vision: timm has no model {o.model!r}.{hint} "
                          "(`python -c \"import timm; print(timm.list_models('vit*'))\"`)")
    kwargs: dict[str, Any] = dict(o.kwargs, num_classes=0, pretrained=o.pretrained)
    if o.pooling != "default":
        kwargs["global_pool"] = _GLOBAL_POOL[o.pooling]
    if o.checkpoint:
        path = Path(o.checkpoint).expanduser()
        if not path.is_file():
            raise PluginError(f"timm-vision: checkpoint file {o.checkpoint!r} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    elif o.pretrained and hub.offline():
        raise _offline_error(o.model, "the Hugging Face hub is switched off (HF_HUB_OFFLINE)")
    log = logging.getLogger("timm.models._builder")
    records, level = _Records(), log.level
    log.addHandler(records)
    log.setLevel(logging.INFO)
    try:
        model = timm.create_model(o.model, **kwargs)
    except TypeError as err:
        raise PluginError(f"timm-vision: timm.create_model({o.model!r}) does not take one of "
                          f"the 'kwargs' {sorted(o.kwargs)}: {err}") from None
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())[:400]
        if o.checkpoint:
            raise PluginError(f"timm-vision: cannot load checkpoint {o.checkpoint!r} into "
                              f"{o.model!r}: {detail}") from None
        if o.pretrained and (isinstance(err, OSError) or "connect" in detail.lower()):
            raise _offline_error(o.model, detail) from None
        raise PluginError(f"timm-vision: cannot build {o.model!r}: {detail}") from None
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    if o.checkpoint:
        _check_loaded(o.checkpoint, model, records.messages)
    return model


def enable_checkpointing(model: nn.Module, encoder: str) -> None:
    """timm's ``set_grad_checkpointing``: its blocks run under ``torch.utils.checkpoint``,
    non-reentrant unless ``TIMM_REENTRANT_CKPT`` says otherwise (``timm.layers.config``);
    the RNG state is restored when a block is recomputed (same dropout / drop-path masks)."""
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError, AttributeError) as err:
        raise ValueError(f"{encoder}: {type(model).__name__} does not support gradient "
                         f"checkpointing in timm ({err or 'no set_grad_checkpointing'}): set "
                         "grad_checkpointing = false") from None


def _offline_error(model: str, detail: str) -> PluginError:
    return PluginError(
        f"timm-vision: cannot download pretrained weights for {model!r} (timm fetches them "
        f"from the Hugging Face hub): {detail}.\n  Tried: the local Hugging Face cache, then "
        "the hub. If this machine is offline, pass a local weights file: checkpoint = "
        "\"/path/to/weights.safetensors\" (save_file(timm.create_model(name, pretrained=True)"
        ".state_dict(), path) on a machine with network), or pretrained = false for random "
        "weights."
    )


def _check_loaded(checkpoint: str, model: nn.Module, messages: list[str]) -> None:
    """timm loads a file non-strictly once the classifier is dropped: say what it missed."""
    missing = next((m for m in messages if m.startswith("Missing keys")), None)
    if missing is None:
        return
    names = missing[missing.index("(") + 1: missing.index(")")].split(", ")
    total = sum(1 for _ in model.state_dict())
    if len(names) >= total:
        raise PluginError(f"timm-vision: checkpoint {checkpoint!r} holds none of the weights "
                          f"of {type(model).__name__} (is it for another architecture?)")
    warnings.warn(f"timm-vision: checkpoint {checkpoint!r} lacks {len(names)} of {total} "
                  f"weights, left randomly initialised: {', '.join(names[:5])}"
                  + (" ..." if len(names) > 5 else ""), stacklevel=3)


def data_config(model: nn.Module, image_size: int = 0, crop_pct: float = 0.0
                ) -> dict[str, Any]:
    """timm's data config; the input size follows the model when built at another size, and
    ``image_size`` / ``crop_pct`` (when set) go in as timm's own ``input_size`` / ``crop_pct``
    arguments of ``resolve_data_config``."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if image_size:
        args["input_size"] = (3, image_size, image_size)
    if crop_pct:
        args["crop_pct"] = crop_pct
    cfg = resolve_data_config(args, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img_size, (tuple, list)) and tuple(img_size) != tuple(cfg["input_size"][1:]):
        if image_size:  # a ViT's position embeddings are built for img_size: say so, not crash
            raise PluginError(f"timm-vision: image_size = {image_size} but the model is built "
                              f"for {tuple(img_size)} px: set kwargs.img_size = {image_size} "
                              "too")
        cfg["input_size"] = (3, *(int(s) for s in img_size))
    return cfg


def split_transform(transform: Any) -> tuple[Any, Any]:
    """timm's eval transform ``Compose([geometry..., (Maybe)ToTensor, Normalize])`` as its
    geometry (a ``Compose`` of the resize/crop steps) and the Normalize's ``(mean, std)``;
    ``(None, None)`` for another layout."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-1], Normalize) and \
            type(steps[-2]).__name__ in ("ToTensor", "MaybeToTensor"):
        norm = steps[-1]
        stats = (tuple(float(v) for v in torch.as_tensor(norm.mean)),
                 tuple(float(v) for v in torch.as_tensor(norm.std)))
        return Compose(steps[:-2]), stats
    return None, None


class TimmVision(nn.Module):
    Options = TimmVisionOptions
    modality = "image"

    def __init__(self, options: TimmVisionOptions) -> None:
        super().__init__()
        o = self.options = options
        self.model = create(o)
        self.data_config = data_config(self.model, o.image_size, o.crop_pct)
        from timm.data import create_transform

        self.transform = create_transform(**self.data_config, is_training=False)
        self._geometry, self._norm = split_transform(self.transform)
        self.dim = self._probe()
        self.token_dim = int(self.model.num_features)  # width of forward_tokens
        if o.grad_checkpointing:
            enable_checkpointing(self.model, "timm-vision")
        if o.lora is not None:
            apply_lora(self.model, o.lora, section="model.vision", groups=self.named_groups(),
                       prefix="model.")

    def _probe(self) -> int:
        """Real output width (``num_features``, or ``head_hidden_size`` where a head adds
        layers, as in MobileNetV3), read from a forward pass."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(torch.zeros(1, *self.data_config["input_size"]))
        finally:
            self.model.train(was_training)
        width = int(out.shape[-1])
        if out.ndim != 2:
            raise ValueError(f"{self.options.model!r} returns {tuple(out.shape)}, not pooled "
                             "features [B, dim]")
        return width

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.data_config["input_size"][1:])

    def preprocess(self, image: Image.Image | Tensor) -> Tensor:
        if isinstance(image, Image.Image):
            return self.transform(image.convert("RGB"))
        x = rgb_tensor(image)  # timm's torchvision transforms also take float tensors in [0, 1]
        return self.transform(x.float().div_(255.0) if x.dtype == torch.uint8 else x.float())

    def preprocess_uint8(self, image: Image.Image | Tensor) -> Tensor:
        """timm's resize and crop, kept in uint8. A PIL image gives ``preprocess``'s pixels; a
        uint8 tensor of another size is resized in uint8, which clips the bicubic overshoot
        that ``preprocess`` (resizing in float) keeps. Cached images are at the input size
        already: nothing is resized."""
        if self._geometry is None:
            raise NotImplementedError("this timm transform has no resize/normalise split")
        if isinstance(image, Image.Image):
            return pil_to_tensor(self._geometry(image.convert("RGB")))
        return self._geometry(rgb_tensor(image))

    def normalize(self, pixels: Tensor) -> Tensor:
        if self._norm is None:
            raise NotImplementedError("this timm transform has no resize/normalise split")
        return normalise(pixels, *self._norm)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(pixels)

    def forward_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """``forward_features`` as tokens ``[B, L, C]`` (a CNN's ``[B, C, h, w]`` map is
        flattened to its ``h*w`` positions) and an all-true mask. ``C`` is the feature width,
        which may differ from ``dim`` where the head adds layers."""
        x = self.model.forward_features(pixels)
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def named_groups(self) -> dict[str, list[str]]:
        return timm_groups(self.model, prefix="model.")

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the weights: ``self.model`` is a plain timm model again
        (no-op without adapters)."""
        merge_lora(self.model)
