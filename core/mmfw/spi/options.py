"""Plugin options: plain dicts from a recipe turned into frozen attrs classes, with clear errors.

A plugin declares its options as an attrs class and exposes it as ``Options`` on its factory.
Values are type-checked against the field annotations (``int`` is accepted where ``float`` is
expected, nothing else is guessed) and then the field validators run. Every failure becomes a
:class:`~mmfw.errors.RecipeError` naming the key, what was expected and what was given.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import attrs

from .errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Override", "build", "close_matches", "describe", "option", "type_name"]


def option(default: Any = attrs.NOTHING, *, doc: str = "", validator: Any = None, **kw: Any):
    """An attrs field with a one-line ``doc`` shown by ``mmfw list --options`` and the docs."""
    metadata = dict(kw.pop("metadata", {}), doc=doc)
    return attrs.field(default=default, validator=validator, metadata=metadata, **kw)


def close_matches(word: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


def type_name(tp: Any) -> str:
    """A short human name for an annotation: 'float', 'one of "cls", "mean"', 'list of int'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("nothing" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {type_name(inner[0])}" if inner else "list"
    if origin in (dict, Mapping) or tp is dict:
        return "table"
    if attrs.has(tp):
        return f"table ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


class Override(str):
    """A value given on the command line (``--set key=value``).

    It is read as a TOML literal where the key's type asks for one (``0.05``, ``true``,
    ``[1, 2]``) and as a plain string otherwise, so ``--set run.name=try2`` needs no quotes.
    """

    def parsed(self) -> Any:
        try:
            return tomllib.loads(f"v = {self}")["v"]
        except tomllib.TOMLDecodeError:
            return str(self)


def _coerce(value: Any, tp: Any) -> Any:
    if isinstance(value, Override):
        try:
            return _coerce(value.parsed(), tp)
        except _Mismatch:
            return _coerce(str(value), tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(a is value for a in args)):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and inner and Ellipsis not in args:
            if len(inner) != len(value):
                raise _Mismatch
            return tuple(_coerce(v, a) for v, a in zip(value, inner))
        return tuple(_coerce(v, inner[0]) if inner else v for v in value)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt) for k, v in value.items()}
    if attrs.has(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return build(tp, value)
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def build(cls: type, values: Mapping[str, Any] | None, fixed: Mapping[str, Any] | None = None
          ) -> Any:
    """Make ``cls`` from ``values``; any problem is a RecipeError keyed by the field name.

    ``fixed`` holds fields already built elsewhere (a section's plugin): passed through as is.
    """
    values = dict(values or {})
    fixed = dict(fixed or {})
    fields = {f.name: f for f in attrs.fields(cls) if f.name not in fixed}
    for key in values:
        if key not in fields:
            near = close_matches(key, list(fields))
            hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise RecipeError(
                f"unknown option for {cls.__name__}.{hint}",
                key=key,
                expected="one of " + ", ".join(sorted(fields)) if fields else "no options",
                given=values[key],
            )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        tp = hints.get(key, Any)
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise RecipeError("wrong type", key=key, expected=type_name(tp), given=value) from None
        except RecipeError as err:  # nested attrs table
            raise err.within(prefix=key) from None
    missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in kwargs]
    if missing:
        raise RecipeError(
            "required option missing",
            key=missing[0],
            expected=type_name(hints.get(missing[0], Any)),
        )
    try:
        return cls(**fixed, **kwargs)
    except (ValueError, TypeError) as err:
        key = _field_in_message(str(err), fields) or (next(iter(values), None))
        raise RecipeError(
            str(err),
            key=key,
            given=kwargs.get(key) if key else None,
        ) from None


def _field_in_message(message: str, fields: Mapping[str, Any]) -> str | None:
    for name in sorted(fields, key=len, reverse=True):
        if f"'{name}'" in message or message.startswith(name):
            return name
    return None


def describe(cls: type | None) -> list[dict[str, str]]:
    """Rows of (name, type, default, doc) for docs and ``mmfw list --options``."""
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    rows = []
    for f in attrs.fields(cls):
        if f.default is attrs.NOTHING:
            default = "(required)"
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            default = repr(f.default.factory())
        else:
            default = repr(f.default)
        rows.append(
            {
                "name": f.name,
                "type": type_name(hints.get(f.name, Any)),
                "default": default,
                "doc": f.metadata.get("doc", ""),
            }
        )
    return rows
