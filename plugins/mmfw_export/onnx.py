"""``onnx``: one ONNX graph per tower, its adapter included, for onnxruntime or any ONNX
runtime, plus the preprocessing and the tokenizer files to feed them:

- ``vision.onnx``: ``pixel_values`` float32 ``[batch, 3, H, W]`` (already resized and
  normalised, see ``preprocessing.json``) -> ``embedding`` ``[batch, D]``;
- ``text.onnx``: ``input_ids`` and ``attention_mask`` int64 ``[batch, sequence]`` ->
  ``embedding`` ``[batch, D]``;
- ``preprocessing.json``: image size, resizing, mean/std; the tokenizer folder, max_length,
  the embedding width and the logit scale;
- ``tokenizer/``: the text tower's tokenizer (transformers' ``save_pretrained`` files, or a
  ``tokenizers`` ``tokenizer.json``).

Embeddings are raw, as mmfw's: L2-normalise both before cosine similarity. Batch and sequence
lengths are dynamic axes. Graphs are written by ``torch.onnx.export`` with the TorchScript
exporter (``dynamo=False``): it traces the towers as they run, needs nothing from the network,
and handles every tower mmfw ships (scratch, transformers, timm).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

import mmfw

from .towers import MappedExporter, image_preprocessing, logit_scale, option

#: ONNX opset of the graphs (onnxruntime >= 1.14 runs it)
OPSET = 17
PREPROCESSING_FILE = "preprocessing.json"


class VisionGraph(nn.Module):
    """An image tower and its adapter as one module of one tensor input."""

    def __init__(self, encoder: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.encoder, self.adapter = encoder, adapter

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.adapter(self.encoder(pixel_values))


class TextGraph(nn.Module):
    """A text tower and its adapter, taking the tokenizer's two tensors as inputs."""

    def __init__(self, encoder: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.encoder, self.adapter = encoder, adapter

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.adapter(self.encoder({"input_ids": input_ids,
                                          "attention_mask": attention_mask}))


def mismatch(run: mmfw.LoadedRun) -> tuple[str, str] | None:
    """``(part, why)`` of the first part of the run this format cannot hold, else None."""
    m, rm = run.model, run.recipe.model
    if m.fusion is not None:
        return (f"the [model.fusion] head '{rm.fusion.name}'",
                "the graphs hold one tower each; the matching head scores pairs from both "
                "towers' token features")
    tokenizer = getattr(m.text, "tokenizer", None)
    if not (callable(getattr(tokenizer, "save_pretrained", None))
            or callable(getattr(tokenizer, "save", None))):
        return (f"the text tower '{rm.text.name}'",
                "it has no tokenizer that can be saved beside the graph")
    try:
        image_preprocessing(m.vision)
    except mmfw.MmfwError as err:
        return (f"the vision tower '{rm.vision.name}'", str(err))
    return None


def save_tokenizer(tokenizer: object, folder: Path, max_length: int) -> str:
    """Write the tokenizer's files into ``folder``; returns how to load them."""
    folder.mkdir(parents=True, exist_ok=True)
    if callable(getattr(tokenizer, "save_pretrained", None)):  # transformers
        tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(folder)
        return "transformers.AutoTokenizer.from_pretrained"
    tokenizer.save(str(folder / "tokenizer.json"))  # tokenizers.Tokenizer (scratch-text)
    return "tokenizers.Tokenizer.from_file (tokenizer.json)"


def export_graph(module: nn.Module, inputs: tuple[Tensor, ...], names: list[str],
                 axes: dict[str, dict[int, str]], path: Path) -> None:
    try:
        with warnings.catch_warnings():
            # the tracer warns at every shape check it freezes; dynamic axes keep batch and
            # sequence free, and the tests check two of each against PyTorch
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*advanced indexing.*")
            # dynamo=False is chosen (see the module docstring), its deprecation notice known
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="The feature will be removed",
                                    category=DeprecationWarning)
            torch.onnx.export(module, inputs, str(path), input_names=names,
                              output_names=["embedding"], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
    except Exception as err:  # torch raises many kinds for an operator it cannot write
        raise mmfw.MmfwError(f"torch.onnx could not export {path.stem} tower "
                             f"{type(module.encoder).__name__}: {err}") from err


class OnnxExporter(MappedExporter):
    """``mmfw export RUN --format onnx``."""

    name = "onnx"
    mismatch = staticmethod(mismatch)

    def export(self, run: mmfw.LoadedRun, output: Path) -> Path:
        self.check(run)
        m = run.model
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        pre = image_preprocessing(m.vision)
        vision = VisionGraph(m.vision, m.vision_adapter).eval()
        text = TextGraph(m.text, m.text_adapter).eval()
        pixels = torch.zeros(2, 3, *pre["size"])
        tokens = m.text.tokenize(["a small red circle left of a blue square", "a star"])
        ids, mask = tokens["input_ids"].long(), tokens["attention_mask"].long()
        with torch.no_grad():
            export_graph(vision, (pixels,), ["pixel_values"],
                         {"pixel_values": {0: "batch"}, "embedding": {0: "batch"}},
                         output / "vision.onnx")
            export_graph(text, (ids, mask), ["input_ids", "attention_mask"],
                         {"input_ids": {0: "batch", 1: "sequence"},
                          "attention_mask": {0: "batch", 1: "sequence"},
                          "embedding": {0: "batch"}}, output / "text.onnx")
        max_length = int(option(run, "text", "max_length", 0) or 0)
        loader = save_tokenizer(copy.deepcopy(m.text.tokenizer), output / "tokenizer",
                                max_length)
        scale, source = logit_scale(run)
        info = {
            "format": "onnx", "opset": OPSET, "embed_dim": m.embed_dim,
            "image": {"graph": "vision.onnx", "input": "pixel_values", **pre},
            "text": {"graph": "text.onnx", "inputs": ["input_ids", "attention_mask"],
                     "tokenizer": "tokenizer", "load_with": loader, "max_length": max_length,
                     "padding": "any (attention_mask 0 on padding)"},
            "logit_scale": scale, "logit_scale_source": source,
            "similarity": "cosine: L2-normalise both embeddings",
        }
        (output / PREPROCESSING_FILE).write_text(json.dumps(info, indent=2) + "\n",
                                                 encoding="utf-8")
        return output
