"""The run's callbacks: which ones run, built from the recipe, and the calls of each event.

Built-in and third-party callbacks come through the same registry (kind ``callback``). The
ones whose factory says ``default = True`` run in every run; the others when
``run.callbacks`` names them. Each event's implementations are looked up once, so firing an
event nobody implements costs one empty loop, and one that three callbacks implement three
method calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..config.recipe import Recipe
from ..registry import create
from ..spi.capabilities import Stateful, TensorStateful, check
from ..spi.errors import PluginError
from ..spi.hookspecs import EVENTS, Callback


def _parameters(fn: Callable[..., Any]) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_event(name: str, cb: object, method: Callable[..., Any]) -> None:
    """An event method must take the spec's arguments, by position: say which it lacks."""
    spec = _parameters(getattr(Callback, name))[1:]  # without self
    try:
        params = _parameters(method)
        varargs = any(p.kind == p.VAR_POSITIONAL
                      for p in inspect.signature(method).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    if len(params) != len(spec) and not (varargs and len(params) <= len(spec)):
        raise PluginError(f"callback {type(cb).__name__}.{name}({', '.join(params)}) does not "
                          f"match the event {name}({', '.join(spec)}) of mmfw.spi.hookspecs")


class Callbacks:
    """The callback objects of one run and their event methods, by event."""

    def __init__(self, items: dict[str, object]) -> None:
        self._index(items)

    def _index(self, items: dict[str, object]) -> None:
        self.items = dict(sorted(items.items(), key=lambda kv: (getattr(kv[1], "order", 0),
                                                                kv[0])))
        self.calls: dict[str, list[Callable[..., Any]]] = {}
        for event in EVENTS:
            calls = []
            for cb in self.items.values():
                method = getattr(cb, event, None)
                if method is None or getattr(type(cb), event, None) is getattr(Callback, event):
                    continue  # not implemented (or Callback's no-op)
                _check_event(event, cb, method)
                calls.append(method)
            self.calls[event] = calls
        for name, cb in self.items.items():
            check(cb, f"callback '{name}'", (Stateful, TensorStateful))
        evaluated = [n for n, cb in self.items.items() if self._eval_weights(cb)]
        if len(evaluated) > 1:
            raise PluginError(f"callbacks {', '.join(evaluated)} each say eval_weights = True: "
                              "one set of weights can be the one a run is evaluated with")

    @staticmethod
    def _eval_weights(cb: object) -> bool:
        return isinstance(cb, TensorStateful) and bool(getattr(cb, "eval_weights", False))

    @classmethod
    def build(cls, recipe: Recipe) -> Callbacks:
        # the recipe resolved and validated which callbacks run (defaults, run.callbacks,
        # run.report_to) when it was loaded
        return cls({name: create("callback", name, options=recipe.callback_options(name))
                    for name in recipe.callbacks})

    def add(self, name: str, callback: object) -> None:
        """Take part in a run already built (a notebook, a benchmark's instrumentation)."""
        self._index({**self.items, name: callback})

    def remove(self, name: str) -> None:
        self._index({k: v for k, v in self.items.items() if k != name})

    def fire(self, event: str, *args: Any) -> None:
        for call in self.calls[event]:
            call(*args)

    def provides(self) -> set[str]:
        """The loss-context keys the callbacks of this run provide."""
        out: set[str] = set()
        for cb in self.items.values():
            fn = getattr(cb, "provides_context", None)
            out.update(fn() if callable(fn) else ())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: cb.state_dict() for name, cb in self.items.items()
                if isinstance(cb, Stateful)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, cb in self.items.items():
            if isinstance(cb, Stateful) and name in state:
                cb.load_state_dict(state[name])

    def tensor_state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Each tensor-stateful callback's tensors, by callback name."""
        return {name: cb.tensor_state_dict() for name, cb in self.items.items()
                if isinstance(cb, TensorStateful)}

    def load_tensor_state_dict(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        for name, cb in self.items.items():
            if isinstance(cb, TensorStateful) and name in tensors:
                cb.load_tensor_state_dict(tensors[name])

    def eval_weights(self) -> str | None:
        """The callback whose tensors are the weights the run is evaluated with (EMA)."""
        return next((n for n, cb in self.items.items() if self._eval_weights(cb)), None)
