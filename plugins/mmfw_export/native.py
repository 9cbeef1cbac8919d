"""``mmfw``: the native export format, a folder ``mmfw.load`` opens with nothing else.

The folder holds the dual encoder's weights (``model.safetensors``), the manifest
(``mmfw-export.json``: the ``[model]`` table to rebuild from, the backend, run name, step and
embedding width), the run's resolved recipe and ``metrics.json`` (provenance), the encoders'
own files in ``assets/`` as in a run directory, and, for towers loaded from a Hugging Face
folder or hub name, ``towers/<modality>/``: the model's config and its tokenizer or image
processor (``save_pretrained``). Those towers are rebuilt architecture-only from that config
(``pretrained = false``) and take their weights from ``model.safetensors``, so neither the
original folder nor the hub cache is needed (transformers: ``AutoModel.from_config``).
timm towers are rebuilt by name from timm's registry (``pretrained = false``); a name that
needs files (``hf-hub:``, ``local-dir:``) gets its config written by ``timm.models.save_for_hf``
and is loaded back as ``local-dir:``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import mmfw
from mmfw.spi.contracts import EXPORT_MANIFEST, EXPORT_RECIPE, EXPORT_WEIGHTS

#: stands for the export folder in the manifest's ``paths`` (mmfw.load fills it in)
FOLDER = "{folder}"
#: from_pretrained keywords that say where files come from: meaningless for the saved copy
LOADING_KWARGS = ("revision", "subfolder", "cache_dir", "token", "force_download",
                  "local_files_only", "proxies")
HF_TOWERS = ("hf-text", "hf-vision")
TIMM_TOWERS = ("timm-vision",)
SECTIONS = {"image": "vision", "text": "text"}


def _towers(run: mmfw.LoadedRun) -> list[tuple[str, Any, Any]]:
    """``(section, recipe plugin, encoder)`` for the vision and text towers."""
    m, model = run.recipe.model, run.model
    return [("vision", m.vision, model.vision), ("text", m.text, model.text)]


def _local_paths(values: dict[str, Any]) -> list[str]:
    """String options that name an existing file or folder on this machine."""
    out = []
    for key, value in values.items():
        if isinstance(value, str) and value and ("/" in value or "\\" in value) \
                and Path(value).expanduser().exists():
            out.append(key)
    return out


class NativeExporter:
    """The ``mmfw`` format (see the module docs). It takes no options."""

    def __init__(self, options: None = None) -> None:
        self.options = options

    def refuse(self, run: mmfw.LoadedRun) -> str | None:
        for section, plugin, _ in _towers(run):
            values = plugin.values()
            if plugin.name in HF_TOWERS and values.get("kwargs", {}).get("trust_remote_code"):
                return (f"model.{section} ({plugin.name}) runs its repository's own code "
                        "(trust_remote_code), which the mmfw format does not carry: export "
                        "with --format onnx, or copy the model's repository with the export")
            if plugin.name not in HF_TOWERS + TIMM_TOWERS and (keys := _local_paths(values)):
                return (f"model.{section} ({plugin.name}) reads files outside the run "
                        f"({', '.join(f'{k} = {values[k]!r}' for k in keys)}) that the mmfw "
                        "format cannot carry: export with --format onnx")
        return None

    def export(self, run: mmfw.LoadedRun, output: Path) -> Path:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        model_table = run.recipe.to_dict()["model"]
        paths: dict[str, str] = {}
        for section, plugin, encoder in _towers(run):
            table, where = _portable(section, plugin.name, dict(model_table[section]), encoder,
                                     out)
            model_table[section] = table
            paths.update(where)
        # clone: tensors that share storage (tied weights) cannot be saved by save_file
        state = {k: v.detach().to("cpu", copy=True).contiguous()
                 for k, v in run.model.state_dict().items()}
        save_file(state, str(out / EXPORT_WEIGHTS), metadata={"format": "mmfw"})
        run.model.save_assets(out)
        (out / EXPORT_RECIPE).write_text(
            "# the run's resolved recipe, for the record: the model is rebuilt from "
            f"{EXPORT_MANIFEST}\n" + run.recipe.to_toml(), encoding="utf-8")
        metrics = Path(run.run_dir) / "metrics.json"
        if metrics.is_file():
            shutil.copyfile(metrics, out / "metrics.json")
        manifest = {
            "format": "mmfw", "version": 1, "mmfw": mmfw.__version__, "run": run.recipe.run.name,
            "step": run.step, "embed_dim": run.model.embed_dim, "torch": torch.__version__,
            "backend": {"name": run.recipe.backend.name, **run.recipe.backend.values()},
            "model": model_table, "paths": paths,
        }
        (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return out


def _portable(section: str, name: str, table: dict[str, Any], encoder: Any, out: Path
              ) -> tuple[dict[str, Any], dict[str, str]]:
    """The tower's ``[model.<section>]`` table rebuilt from files inside ``out`` only, and
    the keys of it that name those files."""
    modality = "image" if section == "vision" else "text"
    if callable(getattr(encoder, "merge_adapters", None)):
        table.pop("lora", None)  # merged into the weights: rebuilt as a plain tower
    if name in HF_TOWERS:
        folder = out / "towers" / modality
        folder.mkdir(parents=True, exist_ok=True)
        encoder.model.config.save_pretrained(folder)
        if modality == "text":
            encoder.tokenizer.save_pretrained(folder)
        else:  # the encoder keeps the processor's values, not the processor: read it again
            from transformers import AutoImageProcessor

            src = encoder.source
            AutoImageProcessor.from_pretrained(
                src.location, local_files_only=src.local_only).save_pretrained(folder)
        table["model"] = f"{FOLDER}/towers/{modality}"
        table["pretrained"] = False
        table["kwargs"] = {k: v for k, v in table.get("kwargs", {}).items()
                           if k not in LOADING_KWARGS}
        return table, {f"{section}.model": table["model"]}
    if name in TIMM_TOWERS:
        table["pretrained"], table["checkpoint"] = False, ""
        if ":" in str(table.get("model", "")):  # hf-hub: / local-dir: need a config file
            from timm.models import save_for_hf

            folder = out / "towers" / modality
            save_for_hf(encoder.model, str(folder))
            table["model"] = f"local-dir:{FOLDER}/towers/{modality}"
            return table, {f"{section}.model": table["model"]}
    return table, {}


__all__ = ["NativeExporter"]
