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
from typing import Any, Literal

import attrs
import tomli_w

from ..registry import available, get_factory, make_options, options_class, presets
from ..spi.errors import PluginError, RecipeError
from ..spi.options import Override, build, close_matches, option
from .augment import AugmentConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_ge0, _ge1, _gt0 = attrs.validators.ge(0), attrs.validators.ge(1), attrs.validators.gt(0)


@attrs.frozen
class ProfileConfig:
    """In-run profiling (torch.profiler): ``steps`` optimizer steps from step ``start`` are
    profiled, and ``profile/`` in the run directory gets their Chrome trace and a table of
    the top operators (``steps = 0``: off)."""

    start: int = option(10, doc="first profiled optimizer step, counted from 1 (the first "
                        "steps are warm-up: allocator, caches)", validator=_ge1)
    steps: int = option(0, doc="optimizer steps profiled (0: off; 3 to 10 are plenty)",
                        validator=_ge0)


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
    checkpoint_every: int = option(0, doc="optimizer steps between checkpoints, besides each "
                                   "epoch's end (0: epoch ends only)", validator=_ge0)
    keep_last: int = option(2, doc="checkpoints kept (the newest; the best by val rsum is "
                            "kept as well)", validator=_ge1)
    callbacks: tuple[str, ...] = option((), doc="callback plugins to run besides the built-in "
                                        "ones (`mmfw list callback`); options in "
                                        "[callbacks.<name>]")
    report_to: tuple[str, ...] = option((), doc="experiment trackers that get every "
                                        "metrics.jsonl row, the recipe, final metrics and "
                                        "plots: \"tensorboard\", \"mlflow\", \"wandb\" "
                                        "(extras mmfw[<name>]); options in [report.<name>]")
    profile: ProfileConfig = option(ProfileConfig(), doc="[run.profile]: torch.profiler "
                                    "trace and top-ops table of a few steps, e.g. {start = "
                                    "10, steps = 5} (see below)")


@attrs.frozen
class OptimConfig:
    lr: float = option(5e-4, doc="peak learning rate (AdamW)", validator=_gt0)
    weight_decay: float = option(0.1, doc="decoupled weight decay (not on biases, norm gains "
                                 "and scalars such as a temperature)", validator=_ge0)
    betas: tuple[float, float] = option((0.9, 0.98), doc="AdamW betas")
    eps: float = option(1e-6, doc="AdamW epsilon", validator=_gt0)
    grad_clip: float = option(0.0, doc="clip the global gradient norm (0: off)", validator=_ge0)
    accumulate: int = option(1, doc="micro-batches per optimizer step (the batch is "
                             "sampler.batch_size, embedded in this many pieces)",
                             validator=_ge1)
    accumulate_mode: Literal["gradcache", "naive"] = option(
        "gradcache", doc="gradcache: the loss sees the whole batch (exact gradient); naive: "
        "one loss per micro-batch (fewer negatives; the seeds' way)")
    freeze: tuple[str, ...] = option((), doc="parameter / group name patterns never trained "
                                     "(e.g. [\"vision\"])")
    lr_mult: dict[str, float] = option(attrs.Factory(dict), doc="group pattern -> LR "
                                       "multiplier, first match wins (e.g. {vision = 0.1})")
    layer_decay: float = option(1.0, doc="layer-wise LR decay: an encoder group k blocks "
                                "below the top trains at lr * layer_decay^k (1: off)",
                                validator=[_gt0, attrs.validators.le(1)])
    modality_balance: float = option(0.0, doc="scale the vision and text towers' gradients "
                                     "toward modality_ratio (0: off, 1: fully)",
                                     validator=[_ge0, attrs.validators.le(1)])
    modality_ratio: float = option(1.0, doc="target |grad vision| / |grad text| of "
                                   "modality_balance", validator=_gt0)
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", doc="a step whose loss or gradients are NaN/inf: stop the run before the "
        "update (no NaN checkpoint), or skip the step and count it (optim/nonfinite_steps)")


def _templates(_inst: Any, _attr: Any, value: str | tuple[str, ...]) -> None:
    if isinstance(value, tuple):
        if not value:
            raise ValueError("templates must not be an empty list")
        bad = [t for t in value if "{c}" not in t]
        if bad:
            raise ValueError(f"templates: every template needs {{c}} (the class name); "
                             f"{bad[0]!r} has none")
    elif not value:
        raise ValueError("templates must be 'auto', 'clip', 'clip-7', 'simple', a file or a "
                         "list")


@attrs.frozen
class ZeroShotConfig:
    """Zero-shot classification of labelled images after training (CLIP's protocol, as
    CLIP_benchmark computes it): each class is the normalised mean of its normalised prompt
    embeddings; ``zeroshot/top1``, ``zeroshot/top5`` and ``zeroshot/mean_per_class`` (percent)
    go into metrics.json. Off while ``dataset`` and ``split`` are both empty."""

    dataset: str = option("", doc="dataset plugin holding the labelled images, e.g. "
                          "\"labelled\" (an image-folder tree, a CSV/JSONL file or "
                          "CLIP_benchmark shards); '': the run's [data] dataset")
    options: dict[str, Any] = option(attrs.Factory(dict), doc="that dataset's options, e.g. "
                                     "{path = \"imagenet/val\"} (with dataset = '': none)")
    split: str = option("", doc="its labelled split, e.g. \"zeroshot\" of the synthetic "
                        "set ('': \"test\" when dataset is set, else zero-shot is off)")
    classnames: str | tuple[str, ...] = option(
        "", doc="class names by label index, replacing the dataset's: a file (one a line) or "
        "a list ('': the dataset's: folder names, label values, classnames.txt)")
    templates: str | tuple[str, ...] = option(
        "auto", doc="prompt templates with {c} for the class name: \"clip\" (the 80 ImageNet "
        "templates of Radford et al. 2021), \"clip-7\" (their 7-template subset), "
        "\"simple\" (\"a photo of a {c}.\"), a file (one a line) or a list; \"auto\": the "
        "dataset's own templates, else \"clip\"", validator=_templates)

    @property
    def enabled(self) -> bool:
        return bool(self.dataset or self.split)


@attrs.frozen
class EvalConfig:
    split: str = option("test", doc="split of the final evaluation (metrics.json)")
    val_split: str = option("val", doc="split evaluated during training ('' to skip)")
    every_epochs: int = option(1, doc="epochs between evaluations on val_split", validator=_ge1)
    batch_size: int = option(256, doc="batch size for embedding", validator=_ge1)
    max_images: int = option(0, doc="evaluate on the first N images of a split (0: all)",
                             validator=_ge0)
    patience: int = option(0, doc="early stopping: end training after this many evaluations "
                           "without a better val rsum (0: off)", validator=_ge0)
    min_delta: float = option(0.0, doc="an rsum gain below this is no improvement",
                              validator=_ge0)
    restore_best: bool = option(False, doc="final evaluation and load_run use the best "
                                "checkpoint by val rsum, not the last")
    rerank_top_k: int = option(0, doc="re-score each query's top k by the [model.fusion] "
                               "matching head and reorder them by it (0: off)",
                               validator=_ge0)
    protocol: Literal["karpathy", "coco-5k", "coco-1k-5fold"] = option(
        "karpathy", doc="Recall@K protocol: karpathy (the whole split); coco-5k (the 5k "
        "images of COCO's Karpathy test split, exactly 5 x fold_size); coco-1k-5fold (the "
        "5k numbers as the main keys plus coco1k/<key>: the mean over 5 consecutive folds "
        "of fold_size images, as VSE++ and ALBEF report COCO 1k)")
    fold_size: int = option(1000, doc="images per fold of coco-1k-5fold (1000 for COCO)",
                            validator=_ge1)
    zeroshot: ZeroShotConfig = option(ZeroShotConfig(), doc="[eval.zeroshot]: zero-shot "
                                      "classification after training (see below)")


@attrs.frozen
class EnsembleConfig:
    """Train one model per seed and evaluate their averaged similarity (seed 000 §5)."""

    seeds: tuple[int, ...] = option((), doc="one run per seed (empty: a single run with "
                                    "run.seed)")


@attrs.frozen
class DistributedConfig:
    """How a torchrun job shares the work (ignored on one process; see docs/scaling-out.md)."""

    strategy: Literal["ddp", "fsdp"] = option(
        "ddp", doc="ddp: every rank holds the whole model, gradients all-reduced; fsdp: "
        "parameters, gradients and optimizer state sharded across ranks (FSDP2 "
        "fully_shard), for encoders too large to replicate")
    local_loss: bool = option(False, doc="each rank computes the loss of its own rows against "
                              "the gathered global batch (open_clip's local_loss): O(n*N) "
                              "instead of O(N^2) per rank, the same gradients")
    fsdp_units: tuple[str, ...] = option(("vision.layers.*", "text.layers.*"),
                                         doc="parameter groups (`mmfw list encoder` groups, "
                                         "patterns) sharded as their own FSDP unit; the rest "
                                         "of the model is one unit")
    reshard_after_forward: bool = option(True, doc="fsdp: free each unit's gathered "
                                         "parameters after its forward (less memory, one more "
                                         "all-gather in backward)")
    timeout_minutes: float = option(30.0, doc="collective operations wait this long before "
                                    "the job fails", validator=_gt0)


@attrs.frozen
class Plugin:
    """A plugin section: the component's name and its validated options."""

    kind: str
    name: str
    options: Any = None
    #: the recipe table it came from (callbacks: ``"diagnostics"``, ``"callbacks.x"``)
    section: str = ""
    #: the option names the recipe (or ``--set``) gave; the others hold their defaults, which
    #: the run may fill from its parts (a CLIP's temperature: ``SuggestsTemperature``)
    given: frozenset[str] = attrs.field(factory=frozenset, eq=False)

    def values(self) -> dict[str, Any]:
        if self.options is None:
            return {}
        # TOML has no null: an option left at None (an encoder's absent [lora] table) is
        # written as an absent key, which reads back as None
        return {k: v for k, v in attrs.asdict(self.options, value_serializer=_plain).items()
                if v is not None}


@attrs.frozen
class DataConfig:
    dataset: Plugin
    num_workers: int = option(0, doc="DataLoader worker processes", validator=_ge0)
    train_split: str = option("train", doc="split used for training")
    on_bad: Literal["error", "skip"] = option(
        "error", doc="bad data (missing, truncated or undecodable image, empty caption, row "
        "without image): stop before training with a list, or skip each and log it to "
        "skipped.jsonl in the run directory")
    check: Literal["quick", "full"] = option(
        "quick", doc="scan before training: each image exists and its header reads (quick), "
        "or every image decodes (full)")
    cache: str = option("", doc="folder for a memory-mapped cache of decoded images at the "
                        "vision encoder's input size, so later epochs and runs do not decode "
                        "again ('': off; for datasets that fit on disk)")
    augment: AugmentConfig = option(AugmentConfig(), doc="[data.augment]: training-time "
                                    "augmentation (see below)")
    uint8: bool = option(True, doc="the loader hands out images as uint8 and the vision "
                         "encoder's normalize() runs on the device: a quarter of the bytes "
                         "between worker processes and to the GPU (encoders without "
                         "preprocess_uint8/normalize hand out float32)")


@attrs.frozen
class SamplerConfig:
    plugin: Plugin
    batch_size: int = option(128, doc="pairs per optimizer step", validator=_ge1)
    drop_last: bool = option(True, doc="drop the last incomplete batch of an epoch")


@attrs.frozen
class ScheduleConfig:
    plugin: Plugin
    fit_budget: bool = option(
        True, doc="with run.max_minutes: the schedule (LR, stages) advances by the share of "
        "the budget spent, re-estimated from the measured step time, so it reaches its end "
        "(the LR its floor) when the budget runs out, and training stops early enough for "
        "the final evaluation to fit inside it; false: the schedule counts steps of "
        "run.epochs and a budget cuts it where it is. No effect without run.max_minutes")

    @property
    def name(self) -> str:
        return self.plugin.name

    @property
    def options(self) -> Any:
        return self.plugin.options


@attrs.frozen
class ModelConfig:
    vision: Plugin
    text: Plugin
    adapter: Plugin
    embed_dim: int = option(256, doc="shared embedding width", validator=_ge1)
    preset: str = option("", doc="size preset (`mmfw list encoder --models`): fills the "
                         "[model.vision] / [model.text] sections the recipe leaves out, "
                         "embed_dim, and an identity adapter when the widths match")
    #: optional [model.fusion]: cross-modal matching head (an adapter such as cross-attention)
    fusion: Plugin | None = None


@attrs.frozen
class Recipe:
    run: RunConfig
    backend: Plugin
    data: DataConfig
    sampler: SamplerConfig
    model: ModelConfig
    loss: Plugin
    optim: OptimConfig
    schedule: ScheduleConfig
    eval: EvalConfig
    ensemble: EnsembleConfig = attrs.field(factory=EnsembleConfig)
    distributed: DistributedConfig = attrs.field(factory=DistributedConfig)
    #: the run's callbacks and their validated options (``[diagnostics]``, ``[distill]``,
    #: ``[callbacks.<name>]``, ...: each callback says which table configures it)
    callbacks: dict[str, Plugin] = attrs.field(factory=dict)
    path: str | None = None

    def __getattr__(self, name: str) -> Any:
        """``recipe.diagnostics``: the options of the callback configured by ``[name]``."""
        if name.startswith("__"):
            raise AttributeError(name)
        for plugin in object.__getattribute__(self, "callbacks").values():
            if getattr(plugin, "section", None) == name:
                return plugin.options
        raise AttributeError(f"the recipe has no section [{name}]")

    def callback_options(self, name: str) -> Any:
        """The options a run's callback ``name`` is built with (for a callback configured by
        a core table such as ``[eval]``, that table as the core validated it)."""
        p = self.callbacks[name]
        return getattr(self, p.section) if p.section in TOP_LEVEL else p.options

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (every default filled in), as written to the run dir."""
        out = {
            "run": attrs.asdict(self.run, value_serializer=_plain),
            "backend": _section(self.backend),
            "data": _section(self.data.dataset, "dataset", _core(self.data, "dataset")),
            "sampler": _section(self.sampler.plugin, "name", _core(self.sampler, "plugin")),
            "model": {
                "embed_dim": self.model.embed_dim,
                "preset": self.model.preset,
                "vision": _section(self.model.vision),
                "text": _section(self.model.text),
                "adapter": _section(self.model.adapter),
                **({"fusion": _section(self.model.fusion)} if self.model.fusion else {}),
            },
            "loss": _section(self.loss),
            "optim": attrs.asdict(self.optim, value_serializer=_plain),
            "schedule": _section(self.schedule.plugin, "name", _core(self.schedule, "plugin")),
            "eval": attrs.asdict(self.eval, value_serializer=_plain),
            "ensemble": attrs.asdict(self.ensemble, value_serializer=_plain),
            "distributed": attrs.asdict(self.distributed, value_serializer=_plain),
        }
        for head, table in self._callback_tables().items():  # [optim.ema] joins [optim]
            out[head] = {**out[head], **table} if head in out else table
        return out

    def _callback_tables(self) -> dict[str, Any]:
        """Each callback's own table: ``[section]`` or ``[callbacks.<name>]`` (tables of the
        core, such as ``[eval]``, are written with the core's sections)."""
        out: dict[str, Any] = {}
        for p in self.callbacks.values():
            if p.section in TOP_LEVEL:
                continue
            values = p.values()
            head, _, sub = p.section.partition(".")
            if head in CALLBACK_TABLES and sub:  # [callbacks.<name>], [report.<name>]
                if values or head != "callbacks":
                    out.setdefault(head, {})[sub] = values
            elif sub and head in TOP_LEVEL:  # a sub-table of a core table: [optim.ema]
                out.setdefault(head, {})[sub] = values
            else:
                out[p.section] = values
        return out

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
    return {k: attrs.asdict(v, value_serializer=_plain) if attrs.has(type(v)) else v
            for k, v in attrs.asdict(cfg, recurse=False).items() if k != skip}


def _section(p: Plugin, key: str = "name", extra: Mapping[str, Any] | None = None) -> dict:
    return {key: p.name, **(extra or {}), **p.values()}


# ------------------------------------------------------------------------------------------
# loading

#: the core's sections; callbacks add their own (``[diagnostics]``, ``[distill]``, ...)
TOP_LEVEL = ("run", "backend", "data", "sampler", "model", "loss", "optim", "schedule", "eval",
             "ensemble", "distributed", "callbacks", "report")

#: tables holding one sub-table per callback: ``[callbacks.<name>]``, ``[report.<tracker>]``
#: (a tracker is a callback whose section is ``report.<name>``; ``run.report_to`` lists them)
CALLBACK_TABLES = {"callbacks": "run.callbacks", "report": "run.report_to"}

#: section path -> (plugin kind, key naming the plugin, default plugin or None if required)
PLUGIN_SECTIONS: dict[str, tuple[str, str, str | None]] = {
    "backend": ("backend", "name", "auto"),
    "data": ("dataset", "dataset", None),
    "sampler": ("sampler", "name", "random"),
    "model.vision": ("encoder", "name", None),
    "model.text": ("encoder", "name", None),
    "model.adapter": ("adapter", "name", "linear"),
    "model.fusion": ("adapter", "name", None),
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
        table = value.parsed() if value.startswith("{") else None
        # an inline table replaces the whole table (another plugin's options with its name),
        # where a dotted key only changes one option of it
        node[parts[-1]] = table if isinstance(table, dict) else value
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


def _core_keys(config: type) -> tuple[str, ...]:
    """The keys of a plugin section that belong to the core's config class, not the plugin."""
    return tuple(f.name for f in attrs.fields(config) if f.name not in ("dataset", "plugin"))


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
        if core:  # a key neither the section's nor the plugin's: say both lists
            _check_shared_section(section, kind, name, values, core)
        options = make_options(kind, name, values)
    except PluginError as err:
        raise RecipeError(str(err), key=f"{section}.{name_key}", given=name) from None
    except RecipeError as err:
        raise err.within(prefix=section) from None
    return Plugin(kind, name, options, given=frozenset(values)), core_values


def _check_shared_section(section: str, kind: str, name: str, values: Mapping[str, Any],
                          core: tuple[str, ...]) -> None:
    """A section shared by the core and a plugin (``[data]``, ``[sampler]``): an unknown key
    is checked against both, so ``data.uint9`` suggests ``uint8`` as well as the dataset's."""
    cls = options_class(kind, name)
    own = {f.name for f in attrs.fields(cls)} if cls is not None else set()
    for key in values:
        if key not in own:
            near = close_matches(key, [*core, *own])
            hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            mine = ", ".join(sorted(own)) if own else "none"
            raise RecipeError(f"unknown key.{hint}", key=key,
                              expected=f"one of [{section}]'s own keys ({', '.join(core)}) or "
                              f"{kind} '{name}''s options ({mine})", given=values[key])


def apply_preset(model: dict[str, Any]) -> dict[str, Any]:
    """Fill a ``[model]`` table from ``model.preset`` (a dimension-matched encoder pair).

    A section the recipe leaves out comes from the preset; one that names the same encoder (or
    no encoder) is the preset's with the recipe's keys on top; one naming another encoder
    replaces it. ``embed_dim`` defaults to the preset's width, and when both encoders are the
    preset's and ``embed_dim`` equals their width, a recipe without ``[model.adapter]`` gets
    the preset's ``adapter`` (the built-in presets: ``identity``, no projection between matched
    widths).
    """
    name = model.get("preset", "")
    if isinstance(name, Override):
        name = str(name)
    if not name:
        return model
    if not isinstance(name, str):
        raise RecipeError("wrong type", key="model.preset", expected="str", given=name)
    table = presets()
    if name not in table:
        near = close_matches(name, list(table))
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise RecipeError(f"unknown preset.{hint}", key="model.preset",
                          expected="one of " + ", ".join(repr(n) for n in sorted(table))
                          + " (see `mmfw list encoder --models`)", given=name)
    preset = table[name]
    out = dict(model)
    from_preset = 0
    for sub, base in (("vision", preset.vision), ("text", preset.text)):
        given = out.get(sub)
        if given is None:
            out[sub], from_preset = dict(base), from_preset + 1
        elif isinstance(given, Mapping) and str(given.get("name", base["name"])) == base["name"]:
            out[sub], from_preset = {**base, **given}, from_preset + 1
    embed_dim = out.setdefault("embed_dim", preset.width)
    if isinstance(embed_dim, Override):
        embed_dim = embed_dim.parsed()
    if "adapter" not in out and from_preset == 2 and embed_dim == preset.width \
            and preset.adapter is not None:
        out["adapter"] = dict(preset.adapter)
    return out


def _section_build(cls: type, section: str, values: Mapping[str, Any],
                   fixed: Mapping[str, Any] | None = None) -> Any:
    try:
        return build(cls, values, fixed)
    except RecipeError as err:
        raise err.within(prefix=section) from None


def from_dict(data: Mapping[str, Any], file: str | None = None) -> Recipe:
    """Validate a parsed recipe. ``file`` only labels errors."""
    data, claimed = _split_claimed(data)
    sections = (*TOP_LEVEL, *callback_sections())
    for key in data:
        if key not in sections:
            near = close_matches(key, sections)
            hint = f" Did you mean [{near[0]}]?" if near else ""
            raise RecipeError(f"unknown section.{hint}", key=key,
                              expected="one of " + ", ".join(f"[{s}]" for s in sections),
                              given=data[key] if not isinstance(data[key], Mapping) else
                              f"[{key}] table")
    model = apply_preset(_table(data, "model"))
    model_core = {k: v for k, v in model.items()
                  if k not in ("vision", "text", "adapter", "fusion")}
    for sub in ("vision", "text", "adapter", "fusion"):
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

    dataset, data_core = _plugin("data", _table(data, "data"), _core_keys(DataConfig))
    sampler, sampler_core = _plugin("sampler", _table(data, "sampler"), _core_keys(SamplerConfig))
    schedule, schedule_core = _plugin("schedule", _table(data, "schedule"),
                                      _core_keys(ScheduleConfig))
    vision, _ = _plugin("model.vision", dict(model["vision"]))
    text, _ = _plugin("model.text", dict(model["text"]))
    adapter, _ = _plugin("model.adapter", dict(model.get("adapter", {})))
    fusion = _plugin("model.fusion", dict(model["fusion"]))[0] if "fusion" in model else None
    run = _section_build(RunConfig, "run", _table(data, "run"))
    return Recipe(
        run=run,
        backend=_plugin("backend", _table(data, "backend"))[0],
        data=_section_build(DataConfig, "data", data_core, {"dataset": dataset}),
        sampler=_section_build(SamplerConfig, "sampler", sampler_core, {"plugin": sampler}),
        model=_section_build(ModelConfig, "model", model_core,
                             {"vision": vision, "text": text, "adapter": adapter,
                              "fusion": fusion}),
        loss=_plugin("loss", _table(data, "loss"))[0],
        optim=_section_build(OptimConfig, "optim", _table(data, "optim")),
        schedule=_section_build(ScheduleConfig, "schedule", schedule_core, {"plugin": schedule}),
        eval=_zeroshot_checked(_section_build(EvalConfig, "eval", _table(data, "eval"))),
        ensemble=_section_build(EnsembleConfig, "ensemble", _table(data, "ensemble")),
        distributed=_section_build(DistributedConfig, "distributed",
                                   _table(data, "distributed")),
        callbacks=_callbacks(data, run, claimed),
        path=file,
    )


def model_config(model: Mapping[str, Any], file: str | None = None) -> ModelConfig:
    """Validate a ``[model]`` table on its own: an exported model is rebuilt from it with no
    dataset, optimiser or callbacks to check (``file`` labels errors)."""
    try:
        table = apply_preset(dict(model))
        for sub in ("vision", "text"):
            if not isinstance(table.get(sub), Mapping):
                raise RecipeError(f"missing section [model.{sub}]", key=f"model.{sub}")
        core = {k: v for k, v in table.items() if k not in ("vision", "text", "adapter",
                                                            "fusion")}
        parts = {sub: _plugin(f"model.{sub}", dict(table[sub]))[0] for sub in ("vision", "text")}
        parts["adapter"] = _plugin("model.adapter", dict(table.get("adapter", {})))[0]
        parts["fusion"] = (_plugin("model.fusion", dict(table["fusion"]))[0]
                           if "fusion" in table else None)
        return _section_build(ModelConfig, "model", core, parts)
    except RecipeError as err:
        raise err.within(file=file) from None


def _zeroshot_checked(config: EvalConfig) -> EvalConfig:
    """``[eval.zeroshot]``'s dataset and its options validated like a ``[data]`` section."""
    zs = config.zeroshot
    if zs.dataset:
        try:
            make_options("dataset", zs.dataset, zs.options)
        except PluginError as err:
            raise RecipeError(str(err), key="eval.zeroshot.dataset", given=zs.dataset) from None
        except RecipeError as err:
            raise err.within(prefix="eval.zeroshot.options") from None
    elif zs.options:
        raise RecipeError("options need a dataset", key="eval.zeroshot.options",
                          expected="eval.zeroshot.dataset = a dataset plugin (the run's own "
                          "dataset takes its options from [data])", given=zs.options)
    return config


# ------------------------------------------------------------------------------------------
# callback sections


def _section_of(name: str) -> str:
    return str(getattr(get_factory("callback", name), "section", "") or f"callbacks.{name}")


def claimed_tables() -> dict[str, str]:
    """Sub-tables of core tables that callbacks claim as their section: ``{"optim.ema":
    "ema"}`` (the core validates its table without them)."""
    out = {}
    for name in available("callback"):
        section = _section_of(name)
        head, _, sub = section.partition(".")
        if sub and head in TOP_LEVEL and head not in CALLBACK_TABLES:
            out[section] = name
    return out


def _split_claimed(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` without the callbacks' sub-tables of core tables, and those tables by path."""
    out, claimed = dict(data), {}
    for section in claimed_tables():
        head, _, sub = section.partition(".")
        table = out.get(head)
        if isinstance(table, Mapping) and sub in table:
            table = dict(table)
            claimed[section] = table.pop(sub)
            out[head] = table
            if not isinstance(claimed[section], Mapping):
                raise RecipeError("must be a table", key=section, expected=f"[{section}] "
                                  "section", given=claimed[section])
    return out, claimed


def callback_sections() -> list[str]:
    """The top-level tables callbacks claim (``diagnostics``, ``distill``, ...)."""
    return sorted({s for n in available("callback") if "." not in (s := _section_of(n))
                   and s not in TOP_LEVEL})


def _why_unavailable(name: str) -> str | None:
    """Why callback ``name`` cannot run here (its factory's ``why_unavailable()``: a missing
    optional package, said with the extra that installs it), or None."""
    why = getattr(get_factory("callback", name), "why_unavailable", None)
    return why() if callable(why) else None


def _listed(run: RunConfig) -> dict[str, tuple[str, ...]]:
    """The callbacks a recipe asks for, by the table holding their options."""
    return {"callbacks": run.callbacks, "report": run.report_to}


def _check_listed(head: str, names: tuple[str, ...]) -> None:
    key, installed = CALLBACK_TABLES[head], available("callback")
    trackers = [n for n in installed if _section_of(n) == f"report.{n}"]
    choices = trackers if head == "report" else installed
    what = "tracker" if head == "report" else "callback"
    for i, name in enumerate(names):
        if name not in choices:
            near = close_matches(name, choices)
            hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise RecipeError(f"unknown {what}.{hint}", key=f"{key}[{i}]",
                              expected="one of " + (", ".join(choices) or "(none installed)"),
                              given=name)
        why = _why_unavailable(name)
        if why:
            raise RecipeError(why, key=f"{key}[{i}]")


def _callbacks(data: Mapping[str, Any], run: RunConfig,
               claimed: Mapping[str, Any]) -> dict[str, Plugin]:
    """Every callback of the run (the default ones, those whose table the recipe has and that
    say ``when_configured``, ``run.callbacks`` and the trackers of ``run.report_to``), its
    options validated from the table it names (``claimed``: the sub-tables of core tables)."""
    default = [n for n in available("callback")
               if getattr(get_factory("callback", n), "default", False)
               or (getattr(get_factory("callback", n), "when_configured", False)
                   and (_section_of(n) in claimed or _section_of(n) in data))]
    listed = _listed(run)
    for head, given in listed.items():
        _check_listed(head, given)
    names = list(dict.fromkeys([*default, *listed["callbacks"], *listed["report"]]))
    tables = {head: _table(data, head) for head in CALLBACK_TABLES}
    for head, table in tables.items():
        for key in table:
            if key not in names or (head == "report" and _section_of(key) != f"report.{key}"):
                candidates = [n for n in names if _section_of(n) == f"{head}.{n}"]
                near = close_matches(key, candidates)
                hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
                raise RecipeError(f"options for a {'tracker' if head == 'report' else 'callback'}"
                                  f" the run does not use.{hint} List it in "
                                  f"{CALLBACK_TABLES[head]}", key=f"{head}.{key}",
                                  expected="one of " + ", ".join(listed[head] or ["(none)"]),
                                  given=f"[{head}.{key}] table")
    out: dict[str, Plugin] = {}
    for name in names:
        section = _section_of(name)
        if section in TOP_LEVEL:  # a core table ([eval]): validated with the core's class
            out[name] = Plugin("callback", name, None, section)
            continue
        head, _, sub = section.partition(".")
        if head in tables and sub:  # [callbacks.<name>], [report.<name>]
            try:
                table = _table(tables[head], sub)
            except RecipeError as err:
                raise err.within(prefix=head) from None
        elif sub and head in TOP_LEVEL:  # a sub-table of a core table ([optim.ema])
            table = dict(claimed.get(section, {}))
        else:
            table = _table(data, section)
        try:
            options = make_options("callback", name, table)
        except RecipeError as err:
            raise err.within(prefix=section) from None
        out[name] = Plugin("callback", name, options, section)
    return out
