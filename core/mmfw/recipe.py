"""The TOML recipe: sections validated into frozen attrs classes, plugin options included.

Every mistake is a :class:`~mmfw.errors.RecipeError` naming the recipe file, the key path, what
was expected and what was given. ``--set a.b=c`` overrides go through the same validation (see
:class:`~mmfw.options.Override` for how their values are read).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from .errors import PluginError, RecipeError
from .options import Override, build, close_matches, option
from .registry import make_options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_ge0, _ge1, _gt0 = attrs.validators.ge(0), attrs.validators.ge(1), attrs.validators.gt(0)


@attrs.frozen
class RunConfig:
    name: str = option("run", doc="run directory name under output_dir")
    seed: int = option(0, doc="seed for initialisation, sampling and augmentation")
    output_dir: str = option("runs", doc="parent folder of run directories")
    epochs: int = option(1, doc="passes over the training pairs", validator=_ge1)
    max_steps: int = option(0, doc="stop after this many optimizer steps (0: no limit)",
                            validator=_ge0)
    max_minutes: float = option(0.0, doc="wall-clock training budget; training ends cleanly "
                                "and the run still evaluates (0: no limit)", validator=_ge0)
    log_every: int = option(20, doc="optimizer steps between metrics.jsonl rows", validator=_ge1)
    progress: bool = option(True, doc="progress bar on a terminal (log lines otherwise)")


@attrs.frozen
class OptimConfig:
    lr: float = option(5e-4, doc="peak learning rate (AdamW)", validator=_gt0)
    weight_decay: float = option(0.1, doc="decoupled weight decay (not on biases, norm gains "
                                 "and scalars such as a temperature)", validator=_ge0)
    betas: tuple[float, float] = option((0.9, 0.98), doc="AdamW betas")
    eps: float = option(1e-6, doc="AdamW epsilon", validator=_gt0)
    grad_clip: float = option(0.0, doc="clip the global gradient norm (0: off)", validator=_ge0)


@attrs.frozen
class EvalConfig:
    split: str = option("test", doc="split of the final evaluation (metrics.json)")
    val_split: str = option("val", doc="split evaluated during training ('' to skip)")
    every_epochs: int = option(1, doc="epochs between evaluations on val_split", validator=_ge1)
    batch_size: int = option(256, doc="batch size for embedding", validator=_ge1)
    max_images: int = option(0, doc="evaluate on the first N images of a split (0: all)",
                             validator=_ge0)


@attrs.frozen
class DiagnosticsConfig:
    """Collapse diagnostics computed while training (see ``mmfw.diagnostics``)."""

    every: int = option(50, doc="optimizer steps between diagnostics (0: off)", validator=_ge0)


@attrs.frozen
class EnsembleConfig:
    """Train one model per seed and evaluate their averaged similarity (seed 000 §5)."""

    seeds: tuple[int, ...] = option((), doc="one run per seed (empty: a single run with "
                                    "run.seed)")


@attrs.frozen
class Plugin:
    """A plugin section: the component's name and its validated options."""

    kind: str
    name: str
    options: Any = None

    def values(self) -> dict[str, Any]:
        if self.options is None:
            return {}
        return attrs.asdict(self.options, value_serializer=_plain)


@attrs.frozen
class DataConfig:
    dataset: Plugin
    num_workers: int = option(0, doc="DataLoader worker processes", validator=_ge0)
    train_split: str = option("train", doc="split used for training")


@attrs.frozen
class SamplerConfig:
    plugin: Plugin
    batch_size: int = option(128, doc="pairs per optimizer step", validator=_ge1)
    drop_last: bool = option(True, doc="drop the last incomplete batch of an epoch")


@attrs.frozen
class ModelConfig:
    vision: Plugin
    text: Plugin
    adapter: Plugin
    embed_dim: int = option(256, doc="shared embedding width", validator=_ge1)


@attrs.frozen
class Recipe:
    run: RunConfig
    backend: Plugin
    data: DataConfig
    sampler: SamplerConfig
    model: ModelConfig
    loss: Plugin
    optim: OptimConfig
    schedule: Plugin
    eval: EvalConfig
    diagnostics: DiagnosticsConfig = attrs.field(factory=DiagnosticsConfig)
    ensemble: EnsembleConfig = attrs.field(factory=EnsembleConfig)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (every default filled in), as written to the run dir."""
        return {
            "run": attrs.asdict(self.run, value_serializer=_plain),
            "backend": _section(self.backend),
            "data": _section(self.data.dataset, "dataset", _core(self.data, "dataset")),
            "sampler": _section(self.sampler.plugin, "name", _core(self.sampler, "plugin")),
            "model": {
                "embed_dim": self.model.embed_dim,
                "vision": _section(self.model.vision),
                "text": _section(self.model.text),
                "adapter": _section(self.model.adapter),
            },
            "loss": _section(self.loss),
            "optim": attrs.asdict(self.optim, value_serializer=_plain),
            "schedule": _section(self.schedule),
            "eval": attrs.asdict(self.eval, value_serializer=_plain),
            "diagnostics": attrs.asdict(self.diagnostics, value_serializer=_plain),
            "ensemble": attrs.asdict(self.ensemble, value_serializer=_plain),
        }

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def digest(self, ignore: Iterable[str] = ()) -> str:
        """Hash of the resolved recipe without the given ``section.key`` paths."""
        d = copy.deepcopy(self.to_dict())
        for path in ignore:
            *head, last = path.split(".")
            node = d
            for part in head:
                node = node.get(part, {})
            node.pop(last, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _plain(_inst: Any, _field: Any, value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _core(cfg: Any, skip: str) -> dict[str, Any]:
    return {k: v for k, v in attrs.asdict(cfg, recurse=False).items() if k != skip}


def _section(p: Plugin, key: str = "name", extra: Mapping[str, Any] | None = None) -> dict:
    return {key: p.name, **(extra or {}), **p.values()}


# ------------------------------------------------------------------------------------------
# loading

TOP_LEVEL = ("run", "backend", "data", "sampler", "model", "loss", "optim", "schedule", "eval",
             "diagnostics", "ensemble")

#: section path -> (plugin kind, key naming the plugin, default plugin or None if required)
PLUGIN_SECTIONS: dict[str, tuple[str, str, str | None]] = {
    "backend": ("backend", "name", "auto"),
    "data": ("dataset", "dataset", None),
    "sampler": ("sampler", "name", "random"),
    "model.vision": ("encoder", "name", None),
    "model.text": ("encoder", "name", None),
    "model.adapter": ("adapter", "name", "linear"),
    "loss": ("loss", "name", "infonce"),
    "schedule": ("scheduler", "name", "warmup-cosine"),
}


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Override]]:
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(
                "an override must look like section.key=value",
                key="--set",
                expected="e.g. --set loss.temperature=0.05",
                given=item,
            )
        out.append((key, Override(value.strip())))
    return out


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise RecipeError("cannot set a key inside a value that is not a table",
                                  key=".".join(parts[: i + 1]), given=nxt)
            node = nxt
        node[parts[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}" + (" (it is a directory)"
                          if p.is_dir() else ""), expected="a path to a .toml recipe",
                          given=str(path))
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"not valid TOML: {err}", file=str(p)) from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"not UTF-8 text: {err}", file=str(p)) from None


def load_recipe(path: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe (a TOML path or an already-parsed dict)."""
    if isinstance(path, Mapping):
        file, data = None, dict(path)
    else:
        file, data = str(path), read_toml(path)
    try:
        data = apply_overrides(data, overrides)
        return from_dict(data, file)
    except RecipeError as err:
        raise err.within(file=file) from None


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise RecipeError("must be a table", key=key, expected=f"[{key}] section", given=value)
    return dict(value)


def _plugin(section: str, values: dict[str, Any], core: tuple[str, ...] = ()) -> tuple[
        Plugin, dict[str, Any]]:
    """Split a plugin section into (validated Plugin, core keys)."""
    kind, name_key, default = PLUGIN_SECTIONS[section]
    values = dict(values)
    name = values.pop(name_key, default)
    if name is None:
        raise RecipeError(f"missing the {kind} to use", key=f"{section}.{name_key}",
                          expected=f"the name of an installed {kind} (see `mmfw list {kind}`)")
    name = str(name)
    core_values = {k: values.pop(k) for k in core if k in values}
    try:
        options = make_options(kind, name, values)
    except PluginError as err:
        raise RecipeError(str(err), key=f"{section}.{name_key}", given=name) from None
    except RecipeError as err:
        raise err.within(prefix=section) from None
    return Plugin(kind, name, options), core_values


def _section_build(cls: type, section: str, values: Mapping[str, Any],
                   fixed: Mapping[str, Any] | None = None) -> Any:
    try:
        return build(cls, values, fixed)
    except RecipeError as err:
        raise err.within(prefix=section) from None


def from_dict(data: Mapping[str, Any], file: str | None = None) -> Recipe:
    """Validate a parsed recipe. ``file`` only labels errors."""
    for key in data:
        if key not in TOP_LEVEL:
            near = close_matches(key, TOP_LEVEL)
            hint = f" Did you mean [{near[0]}]?" if near else ""
            raise RecipeError(f"unknown section.{hint}", key=key,
                              expected="one of " + ", ".join(f"[{s}]" for s in TOP_LEVEL),
                              given=data[key] if not isinstance(data[key], Mapping) else
                              f"[{key}] table")
    model = _table(data, "model")
    model_core = {k: v for k, v in model.items() if k not in ("vision", "text", "adapter")}
    for sub in ("vision", "text", "adapter"):
        if sub in model and not isinstance(model[sub], Mapping):
            raise RecipeError("must be a table", key=f"model.{sub}",
                              expected=f"[model.{sub}] section", given=model[sub])
    if "vision" not in model or "text" not in model:
        missing = "vision" if "vision" not in model else "text"
        raise RecipeError(f"missing section [model.{missing}]", key=f"model.{missing}",
                          expected=f"[model.{missing}] with name = an installed encoder "
                          "(see `mmfw list encoder`)")
    if "data" not in data:
        raise RecipeError("missing section [data]", key="data",
                          expected='[data] with dataset = an installed dataset, e.g. "synthetic"')

    dataset, data_core = _plugin("data", _table(data, "data"), ("num_workers", "train_split"))
    sampler, sampler_core = _plugin("sampler", _table(data, "sampler"),
                                    ("batch_size", "drop_last"))
    vision, _ = _plugin("model.vision", dict(model["vision"]))
    text, _ = _plugin("model.text", dict(model["text"]))
    adapter, _ = _plugin("model.adapter", dict(model.get("adapter", {})))
    return Recipe(
        run=_section_build(RunConfig, "run", _table(data, "run")),
        backend=_plugin("backend", _table(data, "backend"))[0],
        data=_section_build(DataConfig, "data", data_core, {"dataset": dataset}),
        sampler=_section_build(SamplerConfig, "sampler", sampler_core, {"plugin": sampler}),
        model=_section_build(ModelConfig, "model", model_core,
                             {"vision": vision, "text": text, "adapter": adapter}),
        loss=_plugin("loss", _table(data, "loss"))[0],
        optim=_section_build(OptimConfig, "optim", _table(data, "optim")),
        schedule=_plugin("schedule", _table(data, "schedule"))[0],
        eval=_section_build(EvalConfig, "eval", _table(data, "eval")),
        diagnostics=_section_build(DiagnosticsConfig, "diagnostics", _table(data, "diagnostics")),
        ensemble=_section_build(EnsembleConfig, "ensemble", _table(data, "ensemble")),
        path=file,
    )
