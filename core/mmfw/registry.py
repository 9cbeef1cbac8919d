"""Plugin manager and registry: find components by kind and name, build them with options.

Plugins are discovered once, from the ``mmfw`` entry-point group. ``register`` adds a module or
object at run time (tests, notebooks) through the same hooks.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Mapping
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, RecipeError
from .options import build, close_matches

ENTRY_POINT_GROUP = "mmfw"

#: kind -> hook name. The kinds are public API.
KINDS: dict[str, str] = {
    "encoder": "mmfw_encoders",
    "adapter": "mmfw_adapters",
    "loss": "mmfw_losses",
    "sampler": "mmfw_samplers",
    "backend": "mmfw_backends",
    "scheduler": "mmfw_schedulers",
    "dataset": "mmfw_datasets",
}

#: Keywords the engine passes to factories of each kind, besides the options.
CONTEXT: dict[str, tuple[str, ...]] = {
    "encoder": (),
    "adapter": ("in_dim", "out_dim"),
    "loss": (),
    "sampler": ("match_ids", "batch_size", "seed", "drop_last"),
    "backend": (),
    "scheduler": ("total_steps",),
    "dataset": (),
}


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def register(plugin: object, name: str | None = None) -> None:
    """Register a plugin module or object (as an entry point would) and refresh the tables."""
    plugin_manager().register(plugin, name=name)
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
