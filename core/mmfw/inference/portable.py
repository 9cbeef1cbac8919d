"""Opening an ``mmfw``-format export: a folder that rebuilds the model with nothing else.

The folder's manifest (:data:`mmfw.spi.contracts.EXPORT_MANIFEST`) holds the ``[model]`` table
the model is rebuilt from, with the option values that name files inside the folder listed in
``paths`` (``{folder}`` stands for wherever the folder now is), so an export can be moved,
copied or downloaded and still open. Its weights are one safetensors file of the dual
encoder's state dict; tokenizers and processors sit in ``assets/`` as in a run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config.recipe import ModelConfig, model_config
from ..model import DualEncoder, build_model
from ..spi.contracts import EXPORT_MANIFEST, EXPORT_RECIPE, EXPORT_WEIGHTS, asset_dir
from ..spi.errors import MmfwError

#: stands for the export folder's absolute path in the manifest's ``paths`` values
FOLDER = "{folder}"


@attrs.frozen
class Export:
    """An opened export: its folder, manifest and rebuilt model (on the CPU, eval mode)."""

    folder: Path
    manifest: dict[str, Any]
    config: ModelConfig
    model: DualEncoder


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / EXPORT_MANIFEST
    if not path.is_file():
        raise MmfwError(f"{folder} is not an mmfw export: {path} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise MmfwError(f"{path} is not valid JSON ({err}): the export is damaged") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        raise MmfwError(f"{path} has no [model] table ('model'): the export is damaged")
    return manifest


def model_table(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``[model]`` table with its ``paths`` pointing into ``folder``."""
    table = json.loads(json.dumps(manifest["model"]))  # a deep copy of plain JSON
    for key, value in dict(manifest.get("paths", {})).items():
        *head, last = key.split(".")
        node = table
        for part in head:
            node = node.setdefault(part, {})
        node[last] = str(value).replace(FOLDER, str(folder.resolve()))
        target = folder / str(value).split(FOLDER + "/", 1)[-1]
        if FOLDER in str(value) and not target.exists():
            raise MmfwError(f"the export {folder} is incomplete: {target} is missing "
                            f"(model.{key} points at it)")
    return table


def open_export(path: str | Path) -> Export:
    """Rebuild the model of an export folder; a missing or damaged file is named."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MmfwError(f"{folder} is not a directory")
    manifest = read_manifest(folder)
    for name in (EXPORT_RECIPE, EXPORT_WEIGHTS):
        if not (folder / name).is_file():
            raise MmfwError(f"the export {folder} is incomplete: {folder / name} is missing")
    config = model_config(model_table(folder, manifest), str(folder / EXPORT_MANIFEST))
    model = build_model(config)
    load_assets(model, folder)
    weights = folder / EXPORT_WEIGHTS
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError, ValueError) as err:
        raise MmfwError(f"{weights} is not a readable safetensors file ({err})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = (f"lacks {len(missing)} weights ({', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''})" if missing else
                f"has {len(unexpected)} weights the model does not ({', '.join(unexpected[:3])})")
        raise MmfwError(f"{weights} {what}: it was not written for the model {folder} "
                        f"describes")
    return Export(folder, manifest, config, model.eval())


def load_assets(model: DualEncoder, folder: Path) -> None:
    """The encoders' own files (tokenizers) from ``folder/assets``, a missing one named."""
    for enc in (model.vision, model.text):
        if not callable(getattr(enc, "load_assets", None)):
            continue
        directory = asset_dir(folder, enc.modality)
        try:  # an encoder names the file it misses (a MmfwError passes through as it is)
            enc.load_assets(directory)
        except (OSError, ValueError) as err:
            raise MmfwError(f"{folder} is incomplete: the {enc.modality} encoder cannot load "
                            f"its files (tokenizer, processor) from {directory}: {err}"
                            ) from None


__all__ = ["FOLDER", "Export", "is_export", "load_assets", "model_table", "open_export",
           "read_manifest"]
