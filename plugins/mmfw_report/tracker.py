"""What the three trackers share: which rows become which scalars, the recipe as flat
hyperparameters, the run's files, and the life of one tracker run (opened at run start,
continued on ``--resume``, closed after the plots).

A tracker is a callback whose factory's ``section`` is ``report.<name>``: ``run.report_to``
lists it, ``[report.<name>]`` holds its options, and its factory's ``why_unavailable()`` says,
at recipe load, that its library is missing and which extra installs it. Only rank 0 talks to
a tracker. The tracker run's id is the callback's state (``state_dict``), so it is in every
checkpoint and a resumed run continues the same tracker run.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmfw.spi import Callback, RunContext

#: row keys that are not metrics (``step`` is the x axis of every tracker)
NOT_METRICS = frozenset({"type", "step", "split", "final"})


def needs(module: str, extra: str, tracker: str) -> Callable[[], str | None]:
    """A factory's ``why_unavailable``: None when ``module`` is importable (found without
    importing it), else the one-line reason naming the extra that installs it."""

    def why_unavailable() -> str | None:
        if importlib.util.find_spec(module) is None:
            return (f"the {tracker} tracker needs the {module} package, which is not installed:"
                    f" pip install \"mmfw[{extra}]\"")
        return None

    return why_unavailable


def scalars(row: dict[str, Any], sep: str = "/") -> dict[str, float]:
    """The numbers of a metrics.jsonl row as tracker tags: ``train/<key>`` for train rows
    (``train/loss``, ``train/loss/infonce``, ``train/time/data_s``), ``eval/<split>/<metric>``
    for evaluations (the final one included), ``<type>/<key>`` for any other row
    (``diagnostics/probe/eff_rank``). Warnings carry text, not numbers: none here. ``sep``
    replaces the ``/`` inside a row's key (MLflow's file store cannot hold both
    ``train/loss`` and ``train/loss/infonce``: it has ``train/loss.infonce``)."""
    kind = str(row.get("type", "row"))
    if kind == "warning":
        return {}
    prefix = f"eval/{row.get('split', '')}/" if kind == "eval" else f"{kind}/"
    out = {}
    for key, value in row.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key == "epoch" and kind != "train":
            continue  # the train rows chart the epoch once
        out[prefix + (key.replace("/", sep) if sep != "/" else key)] = float(value)
    return out


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved recipe as ``{"model.vision.width": 128, ...}`` (lists as their text)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def run_files(ctx: RunContext) -> Iterator[tuple[Path, str]]:
    """The run's files a tracker stores at the end, as ``(path, folder in the tracker)``:
    recipe.toml, metrics.json, warnings.jsonl, plots/*.png, profile/*."""
    d = Path(ctx.run_dir)
    for name in ("recipe.toml", "metrics.json", "warnings.jsonl"):
        if (d / name).is_file():
            yield d / name, ""
    for folder in ("plots", "profile"):
        for path in sorted((d / folder).glob("*")):
            if path.is_file():
                yield path, folder


def plots(ctx: RunContext) -> list[Path]:
    return sorted(Path(ctx.run_dir, "plots").glob("*.png"))


def finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


class Tracker(Callback):
    """One tracker run for one mmfw run, on rank 0. Subclasses implement :meth:`open`,
    :meth:`log`, :meth:`close` (and :meth:`flush`)."""

    #: after the metrics log (-100), the final evaluation (10) and the plots (20)
    order = 30
    #: what replaces ``/`` inside a row's key (see :func:`scalars`)
    key_sep = "/"

    def __init__(self, options: Any) -> None:
        self.options = options
        self.run_id: str | None = None  # the tracker's run; in every checkpoint
        self.active = False
        self.final: tuple[str, dict[str, float]] | None = None

    # checkpointed state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or None

    # what a backend does -------------------------------------------------------------------
    def open(self, ctx: RunContext, resumed: bool) -> None:
        """Start (or, with ``self.run_id`` set by a restore, continue) the tracker run, with
        the recipe as its hyperparameters; set ``self.run_id``."""
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float], row: dict[str, Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was logged durable (a checkpoint was just written)."""

    def close(self, ctx: RunContext | None, status: str) -> None:
        """Store the run's files (``ctx`` given: the run ended) and end the tracker run."""
        raise NotImplementedError

    # events ---------------------------------------------------------------------------------
    def on_run_start(self, ctx: RunContext) -> None:
        if not ctx.is_main:
            return
        self.open(ctx, resumed=self.run_id is not None)
        self.active = True
        atexit.register(self._abandoned)

    def on_log_row(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if self.active:
            self.log(int(row.get("step", ctx.step)), scalars(row, self.key_sep), row)

    def on_eval_end(self, ctx: RunContext, split: str, metrics: dict[str, float],
                    final: bool) -> None:
        if final:
            self.final = (split, dict(metrics))

    def on_checkpoint_save(self, ctx: RunContext, step: int) -> None:
        if self.active:
            self.flush()

    def on_run_end(self, ctx: RunContext, stopped_by: str) -> None:
        if self.active:
            self.active = False
            atexit.unregister(self._abandoned)
            self.close(ctx, "FINISHED")

    def _abandoned(self) -> None:
        """At interpreter exit, a run that never reached ``on_run_end`` (an error, SIGTERM):
        close the tracker run as killed; ``--resume`` continues it."""
        if self.active:
            self.active = False
            self.close(None, "KILLED")
