"""Plugin manager and registry: find components by kind and name, build them with options.

Plugins are discovered once, from the ``mmfw`` entry-point group. ``register`` adds a module or
object at run time (tests, notebooks) through the same hooks.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Mapping
from typing import Any

import attrs
import pluggy

from .spi import hookspecs
from .spi.errors import PluginError, RecipeError
from .spi.options import build, close_matches

ENTRY_POINT_GROUP = "mmfw"

#: kind -> hook name, read from the hookspecs' declarations (the kinds are public API)
KINDS: dict[str, str] = {k.name: k.hook for k in hookspecs.KINDS.values()}

#: keywords the core passes to factories of each kind, besides the options (from the specs)
CONTEXT: dict[str, tuple[str, ...]] = {k.name: k.context for k in hookspecs.KINDS.values()}


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    _refuse_shadowed_entry_points()
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    _check_hook_names(pm)
    return pm


def _refuse_shadowed_entry_points() -> None:
    """pluggy silently keeps the first of two entry points with one name: say so instead."""
    from importlib.metadata import distributions

    seen: dict[str, tuple[str, str]] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            dist_name = dist.metadata["Name"] or "?"
            if ep.name in seen and seen[ep.name] != (ep.value, dist_name):
                other_value, other_dist = seen[ep.name]
                if other_value != ep.value:
                    raise PluginError(
                        f"two '{ENTRY_POINT_GROUP}' entry points are named '{ep.name}': "
                        f"{other_value} (distribution {other_dist}) and {ep.value} "
                        f"(distribution {dist_name}); one would be ignored. Rename one of them "
                        f"in its pyproject.toml [project.entry-points.{ENTRY_POINT_GROUP}]."
                    )
            seen[ep.name] = (ep.value, dist_name)


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """A misspelt hook (``mmfw_loss``) would never be called: refuse it with the right names."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        names = ", ".join(KINDS.values())
        raise PluginError(f"{err} Hooks mmfw knows: {names}, "
                          "plus the optional ones in mmfw.spi.hookspecs.") from None


def register(plugin: object, name: str | None = None) -> None:
    """Register a plugin module or object (as an entry point would) and refresh the tables."""
    pm = plugin_manager()
    pm.register(plugin, name=name)
    try:
        _check_hook_names(pm)
    except PluginError:
        pm.unregister(plugin)
        raise
    _tables.cache_clear()


def unregister(plugin: object) -> None:
    plugin_manager().unregister(plugin)
    _tables.cache_clear()


def _plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin) or "?"
    module = getattr(plugin, "__name__", type(plugin).__name__)
    for dist_plugin, dist in pm.list_plugin_distinfo():
        if dist_plugin is plugin:
            return f"'{name}' ({module}, from distribution {dist.project_name})"
    return f"'{name}' ({module})"


@functools.cache
def _tables() -> dict[str, dict[str, tuple[Any, str]]]:
    pm = plugin_manager()
    tables: dict[str, dict[str, tuple[Any, str]]] = {}
    for kind, hook_name in KINDS.items():
        table: dict[str, tuple[Any, str]] = {}
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            label = _plugin_label(pm, impl.plugin)
            factories = impl.function() or {}
            if not isinstance(factories, Mapping):
                raise PluginError(f"plugin {label}: {hook_name}() must return a dict of factories")
            for comp_name, fac in factories.items():
                if comp_name in table:
                    raise PluginError(
                        f"{kind} '{comp_name}' is registered twice: by plugin {table[comp_name][1]}"
                        f" and by plugin {label}. Uninstall one or rename the component."
                    )
                table[comp_name] = (fac, label)
        tables[kind] = table
    return tables


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        near = close_matches(kind, list(KINDS))
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise PluginError(f"unknown kind '{kind}'.{hint} Kinds: {', '.join(KINDS)}")


def available(kind: str | None = None, filter: str | None = None) -> Any:
    """Installed component names: a sorted list for one kind, or ``{kind: [...]}`` for all.

    ``filter`` is a shell wildcard (``available("loss", "*contrast*")``), as in timm.
    """
    if kind is None:
        return {k: available(k, filter) for k in KINDS}
    _check_kind(kind)
    names = sorted(_tables()[kind])
    return [n for n in names if fnmatch.fnmatch(n, filter)] if filter else names


def get_factory(kind: str, name: str) -> Any:
    """The factory registered as ``name``; an unknown name lists close matches and all names."""
    _check_kind(kind)
    table = _tables()[kind]
    if name not in table:
        near = close_matches(name, list(table))
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        installed = ", ".join(sorted(table)) or "none"
        plural = f"{kind}es" if kind.endswith("s") else f"{kind}s"  # "losses", not "losss"
        raise PluginError(f"unknown {kind} '{name}'.{hint} Installed {plural}: {installed}")
    return table[name][0]


def provider(kind: str, name: str) -> str:
    """Which plugin registered a component (for ``mmfw list``)."""
    get_factory(kind, name)
    return _tables()[kind][name][1]


def options_class(kind: str, name: str) -> type | None:
    return getattr(get_factory(kind, name), "Options", None)


def make_options(kind: str, name: str, values: Mapping[str, Any] | None) -> Any:
    """Validate a recipe section (without its ``name``) into the plugin's Options instance."""
    cls = options_class(kind, name)
    if cls is None:
        if values:
            key = next(iter(values))
            raise RecipeError(f"{kind} '{name}' takes no options", key=key, given=values[key])
        return None
    return build(cls, values)


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Build a component: ``create("loss", "infonce", temperature=0.05)``.

    Keywords are the plugin's options, plus for some kinds the context the engine would pass
    (``in_dim``/``out_dim`` for adapters, ``total_steps`` for schedulers, ...). An already-built
    options instance may be passed as ``options=``.
    """
    factory = get_factory(kind, name)
    context = {k: kwargs.pop(k) for k in CONTEXT[kind] if k in kwargs}
    options = kwargs.pop("options", None)
    if options is None:
        options = make_options(kind, name, kwargs)
    elif kwargs:
        raise TypeError("create(): pass options either as options= or as keywords, not both")
    try:
        return factory(options, **context)
    except ValueError as err:  # a component refusing its configuration is the user's to fix
        raise PluginError(f"cannot build {kind} '{name}': {err}") from err


# ------------------------------------------------------------------------------------------
# catalogues: known models and size presets (hooks ``mmfw_models`` / ``mmfw_presets``)


@attrs.frozen
class KnownModel:
    """A pretrained model an encoder plugin knows, with its true output width."""

    name: str
    encoder: str
    modality: str
    width: int
    input_size: int
    note: str = ""
    plugin: str = ""


@attrs.frozen
class Preset:
    """A dimension-matched (vision, text) pair: both encoders are ``width`` wide."""

    name: str
    width: int
    vision: dict[str, Any]
    text: dict[str, Any]
    note: str = ""
    plugin: str = ""
    #: the ``[model.adapter]`` a recipe using both encoders at their width gets (None: the
    #: recipe's default)
    adapter: dict[str, Any] | None = None


def _hook_results(hook_name: str) -> list[tuple[Any, str]]:
    pm = plugin_manager()
    return [(impl.function(), _plugin_label(pm, impl.plugin))
            for impl in getattr(pm.hook, hook_name).get_hookimpls()]


def known_models(modality: str | None = None) -> list[KnownModel]:
    """Rows of every plugin's ``mmfw_models()``, sorted by modality, encoder and name."""
    rows: list[KnownModel] = []
    for result, label in _hook_results("mmfw_models"):
        for row in result or []:
            try:
                values = {k: row[k] for k in ("name", "encoder", "modality", "width",
                                              "input_size")}
                rows.append(KnownModel(**values, note=str(row.get("note", "")), plugin=label))
            except (KeyError, TypeError) as err:
                raise PluginError(f"plugin {label}: mmfw_models() row {row!r} lacks {err}: rows "
                                  "need name, encoder, modality, width, input_size") from None
    if modality is not None:
        rows = [r for r in rows if r.modality == modality]
    return sorted(rows, key=lambda r: (r.modality, r.encoder, r.name))


def presets() -> dict[str, Preset]:
    """Every plugin's ``mmfw_presets()``; a name given twice is an error."""
    table: dict[str, Preset] = {}
    for result, label in _hook_results("mmfw_presets"):
        for name, p in (result or {}).items():
            if name in table:
                raise PluginError(f"preset '{name}' is registered twice: by plugin "
                                  f"{table[name].plugin} and by plugin {label}")
            try:
                table[name] = Preset(name, int(p["width"]), dict(p["vision"]), dict(p["text"]),
                                     str(p.get("note", "")), label,
                                     dict(p["adapter"]) if p.get("adapter") else None)
            except (KeyError, TypeError, ValueError) as err:
                raise PluginError(f"plugin {label}: preset '{name}' needs width, vision and "
                                  f"text ({err})") from None
    return table
