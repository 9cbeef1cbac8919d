"""What the hf, open_clip and onnx exporters read from a run: which plugin built each tower and
adapter, the adapters as plain projections, the learned temperature, the preprocessing.

A format maps a run exactly or refuses it; a refusal names the part that does not map and the
formats that would take the run (:func:`refusal`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

import mmfw

#: open_clip's and CLIP's initial logit scale, log(1 / 0.07) (Radford et al. 2021), written
#: when the run's loss has no temperature
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)


def names(run: mmfw.LoadedRun) -> tuple[str, str, str]:
    """The encoder plugins of the vision and text towers and the adapter plugin."""
    m = run.recipe.model
    return m.vision.name, m.text.name, m.adapter.name


def option(run: mmfw.LoadedRun, section: str, key: str, default: Any = None) -> Any:
    """An option of ``[model.<section>]`` as the run resolved it."""
    plugin = getattr(run.recipe.model, section)
    return getattr(plugin.options, key, default) if plugin.options is not None else default


def projection(adapter: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight [out, in], bias or None)`` of a ``linear`` adapter, an identity matrix for an
    ``identity`` one, None for an adapter that is no single linear map."""
    proj = getattr(adapter, "proj", None)
    if isinstance(proj, nn.Linear) and len(list(adapter.children())) == 1:
        bias = None if proj.bias is None else proj.bias.detach().clone()
        return proj.weight.detach().clone(), bias
    if type(adapter).__name__ == "Identity" and adapter.in_dim == adapter.out_dim:
        return torch.eye(adapter.out_dim), None
    return None


def checkpoint_file(run: mmfw.LoadedRun) -> Path:
    """The weights file of the checkpoint the run was loaded from (the run directory's layout:
    ``checkpoints/step-<8 digits>.safetensors``, model tensors under ``model.``, the losses'
    under ``loss.``)."""
    return Path(run.run_dir) / "checkpoints" / f"step-{run.step:08d}.safetensors"


def logit_scale(run: mmfw.LoadedRun) -> tuple[float, str]:
    """``log(1 / tau)`` of the run's loss and where it came from.

    The losses store CLIP's ``logit_scale`` as ``<...>temperature.log_scale`` (learned or
    fixed, ``mmfw.spi.Temperature``); with several (a mixture), the first term's. A loss with
    no temperature gives CLIP's initial value, which only scales logits, never embeddings.
    """
    path = checkpoint_file(run)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            stored = f.keys()  # a safe_open handle is no mapping: its names come from keys()
            keys = sorted(k for k in stored if k.startswith("loss.") and k.endswith("log_scale"))
            if keys:
                return float(f.get_tensor(keys[0])), f"the loss's temperature ({keys[0][5:]})"
    return DEFAULT_LOGIT_SCALE, "no temperature in the run's loss: CLIP's initial log(1/0.07)"


def image_preprocessing(vision: nn.Module) -> dict[str, Any]:
    """Input size, normalisation and resizing of an image tower, as JSON-able values."""
    pipeline = getattr(vision, "pipeline", None)
    if pipeline is not None:  # hf-vision: the values of its image processor
        return {"size": list(pipeline.output_size), "mean": list(pipeline.mean),
                "std": list(pipeline.std), "resize": list(pipeline.size),
                "resize_shortest_edge": bool(pipeline.shortest),
                "center_crop": list(pipeline.crop) if pipeline.crop else None,
                "rescale": float(pipeline.rescale), "normalize": bool(pipeline.normalize),
                "resample": {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(
                    int(pipeline.resample), "bicubic")}
    data = getattr(vision, "data_config", None)
    if isinstance(data, dict):  # timm-vision: timm's eval transform
        size = [int(s) for s in data["input_size"][1:]]
        crop_pct = float(data.get("crop_pct", 1.0))
        return {"size": size, "mean": [float(v) for v in data["mean"]],
                "std": [float(v) for v in data["std"]],
                "resize": [math.floor(s / crop_pct) for s in size],  # timm's scale_size
                "resize_shortest_edge": True, "center_crop": size,
                "rescale": 1 / 255, "normalize": True,
                "resample": str(data.get("interpolation", "bicubic"))}
    side = int(getattr(getattr(vision, "options", None), "image_size", 0) or 0)
    mean, std = getattr(vision, "mean", None), getattr(vision, "std", None)
    if side and mean is not None and std is not None:  # scratch-vision: a plain resize
        return {"size": [side, side], "mean": list(mean), "std": list(std),
                "resize": [side, side], "resize_shortest_edge": False, "center_crop": None,
                "rescale": 1 / 255, "normalize": True, "resample": "bilinear"}
    raise mmfw.MmfwError(f"cannot read the preprocessing of image encoder "
                         f"{type(vision).__name__} (no pipeline, timm data_config or "
                         "image_size/mean/std)")


class MappedExporter:
    """A format that holds a run only where it maps exactly. A subclass names the format
    (``name``) and says what does not map (``mismatch(run)``: ``(part, why)`` or None);
    refusing, and checking before writing, are the same for every such format."""

    Options = None
    name = ""
    mismatch: Callable[[mmfw.LoadedRun], tuple[str, str] | None]

    def __init__(self, options: None = None) -> None:
        pass

    def refuse(self, run: mmfw.LoadedRun) -> str | None:
        found = self.mismatch(run)
        return None if found is None else refusal(self.name, *found, run)

    def check(self, run: mmfw.LoadedRun) -> None:
        """Raise the refusal, for ``export`` called without ``refuse`` first."""
        reason = self.refuse(run)
        if reason is not None:
            raise mmfw.MmfwError(reason)


def refusal(fmt: str, part: str, why: str, run: mmfw.LoadedRun) -> str:
    """One sentence: ``part`` does not map to ``fmt`` because ``why``, and the formats that
    take the run (the native ``mmfw`` format takes every run)."""
    # imported here: each format module imports this one for its helpers
    from . import hf, onnx, open_clip_format

    checks = {"hf": hf.mismatch, "open_clip": open_clip_format.mismatch, "onnx": onnx.mismatch}
    takers = ["mmfw"] + [name for name, check in checks.items()
                         if name != fmt and check(run) is None]
    return f"{part} does not map to {fmt} ({why}); export it with --format " + " or ".join(
        takers)
