"""The run directory as one object: where each file lives, how a run claims its directory,
and its logs.

``<run.output_dir>/<run.name>/`` holds ``recipe.toml`` (the resolved recipe),
``metrics.jsonl``, ``metrics.json``, ``warnings.jsonl``, ``skipped.jsonl``, ``checkpoints/``,
``plots/``, ``assets/`` and two files of mmfw's own: ``.mmfw`` (the marker: mmfw made this
directory, so ``--overwrite`` may empty it) and ``.lock`` (held by the process writing it).

Safety rules (each one a past data loss): ``run.name`` is one plain path component, so a run
directory is always inside ``output_dir``; ``--overwrite`` empties only a directory carrying
the marker; one process at a time writes a run directory (an OS lock, ``fcntl.flock``,
released by the kernel when the holder dies, so a stale lock is simply taken over).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..spi.errors import MmfwError, RecipeError
from . import checkpoint as ckpt
from .checkpoint import atomic_text
from .jsonl import append_jsonl, read_jsonl, rewrite_jsonl

RECIPE_FILE = "recipe.toml"
METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
WARNINGS_JSONL = "warnings.jsonl"
SKIPPED_JSONL = "skipped.jsonl"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
ENSEMBLE_FILE = "ensemble.json"
MARKER = ".mmfw"
LOCK = ".lock"

try:  # POSIX; elsewhere runs are not locked (said once, when a lock is taken)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class RunDirError(MmfwError):
    """A run directory cannot be used as asked (in use, not mmfw's, missing files)."""


def check_name(name: str, key: str = "run.name") -> str:
    """``name`` as one plain path component, or a RecipeError saying why not."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or name != name.strip() or name.startswith("~"))
    if bad:
        raise RecipeError("must be one plain folder name: the run directory is "
                          "<run.output_dir>/<run.name>, always inside output_dir",
                          key=key, expected="a non-empty name without '/', '\\', '..' or "
                          "leading '~' (e.g. \"quickstart-2\")", given=name)
    return name


class RunDir:
    """One run (or ensemble) directory: ``RunDir(output_dir, name)``."""

    def __init__(self, output_dir: str | Path, name: str) -> None:
        self.name = check_name(name)
        self.parent = Path(output_dir).expanduser()
        self.path = self.parent / self.name
        self._lock: IO[str] | None = None

    @classmethod
    def of(cls, recipe: Any) -> RunDir:
        return cls(recipe.run.output_dir, recipe.run.name)

    @classmethod
    def existing(cls, path: str | Path) -> RunDir:
        """The run directory at ``path`` (evaluation, reports): it must hold a recipe."""
        p = Path(path).expanduser()
        d = cls(p.parent, p.name) if p.name not in ("", ".", "..") else cls(
            p.resolve().parent, p.resolve().name)
        if not d.path.is_dir():
            raise RunDirError(f"{p} is not a directory")
        return d

    # layout -------------------------------------------------------------------------------
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_JSON

    def checkpoint_steps(self) -> list[int]:
        """The steps of the checkpoints on disk (complete ones: their ``.json`` exists)."""
        return ckpt.list_steps(self.checkpoints)

    def best_checkpoint(self) -> int | None:
        """The step of the checkpoint marked best (by val rsum), if it is still on disk."""
        return ckpt.best(self.checkpoints)

    def mark_best(self, step: int, metrics: dict[str, Any]) -> None:
        ckpt.mark_best(self.checkpoints, step, metrics)

    def is_ensemble(self) -> bool:
        return (self.path / ENSEMBLE_FILE).is_file()

    def has_marker(self) -> bool:
        return (self.path / MARKER).is_file()

    def in_use(self) -> bool:
        """Whether the directory has anything but mmfw's lock file in it."""
        return self.path.is_dir() and any(p.name != LOCK for p in self.path.iterdir())

    # claiming -----------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the directory's lock for this process (until :meth:`unlock` or exit).

        A second writer stops here with the holder's pid and host; a lock left by a dead
        process is free (the kernel released it) and is taken over.
        """
        if self._lock is not None or fcntl is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"run directory {self.path} is in use by {holder}: one run at "
                              "a time writes a run directory. Wait for it, stop it, or use "
                              "another run.name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} "
                f"(since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def clear(self) -> None:
        """Empty a directory mmfw made (``--overwrite``), keeping the lock this process
        holds; a directory without mmfw's marker is refused, never deleted."""
        if not self.path.is_dir():
            return
        if not self.has_marker():
            raise RunDirError(
                f"{self.path} was not made by mmfw (it has no {MARKER} marker), so "
                "--overwrite will not delete it. Remove it yourself, or choose another "
                "run.name / run.output_dir")
        for p in self.path.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def claim(self, *, resume: bool, overwrite: bool, kind: str = "run") -> None:
        """Lock the directory and check it for a new, overwritten or resumed run."""
        if resume and not self.recipe_file.is_file():  # checked before the lock makes it
            raise RunDirError(f"nothing to resume in {self.path}: no {RECIPE_FILE} "
                              "(run without --resume to start it)")
        self.lock()
        if resume:
            return
        if self.in_use():
            if not overwrite:
                raise RunDirError(f"run directory {self.path} already exists. Use --resume "
                                  "to continue it, --overwrite to start it again, or --set "
                                  "run.name=<new name>")
            self.clear()
        atomic_text(self.path / MARKER, json.dumps({"kind": kind, "created": time.time()}))

    def write_recipe(self, text: str) -> None:
        atomic_text(self.recipe_file, text)

    # logs ---------------------------------------------------------------------------------
    def append(self, row: dict[str, Any], name: str = METRICS_JSONL) -> None:
        try:
            append_jsonl(self.path / name, [row])
        except OSError as err:  # a full disk: say where, not a traceback
            raise RunDirError(f"cannot append to {self.path / name}: {err} (is the disk "
                              "full?)") from None

    def rows(self, name: str = METRICS_JSONL, warn: Callable[[str], None] | None = None
             ) -> list[dict[str, Any]]:
        return read_jsonl(self.path / name, warn)

    def truncate(self, step: int, warn: Callable[[str], None] | None = None,
                 names: tuple[str, ...] = (METRICS_JSONL, WARNINGS_JSONL)) -> None:
        """Drop the rows a killed run logged after checkpoint ``step`` (and a torn line), and
        a final evaluation's: it came after its checkpoint, and the resumed run makes its own."""
        for name in names:
            path = self.path / name
            if path.is_file():
                rewrite_jsonl(path, [r for r in read_jsonl(path, warn)
                                     if r.get("step", 0) <= step and not r.get("final")])

    def write_metrics(self, metrics: dict[str, float]) -> None:
        try:
            atomic_text(self.metrics_file, json.dumps(metrics, indent=2))
        except OSError as err:
            raise RunDirError(f"cannot write {self.metrics_file}: {err} (is the disk full?); "
                              f"the metrics were {json.dumps(metrics)}") from None

    def read_metrics(self) -> dict[str, float]:
        try:
            return json.loads(self.metrics_file.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.path} has no {METRICS_JSON} (the run has not finished "
                              "its final evaluation)") from None
        except ValueError as err:
            raise RunDirError(f"{self.metrics_file} is not valid JSON ({err})") from None


__all__ = ["CHECKPOINTS", "ENSEMBLE_FILE", "LOCK", "MARKER", "METRICS_JSON", "METRICS_JSONL",
           "PLOTS", "RECIPE_FILE", "SKIPPED_JSONL", "WARNINGS_JSONL", "RunDir", "RunDirError",
           "check_name"]
