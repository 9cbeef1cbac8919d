"""What may change between a run and its resumption: run length, how work is shared, and
where the run is reported (a tracker added on resume starts logging from there)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: recipe keys (or whole tables) that may change between a run and its resumption
RESUMABLE_CHANGES = ("run.epochs", "run.max_steps", "run.max_minutes", "run.progress",
                     "run.log_every", "run.keep_last", "run.checkpoint_every",
                     # how the work is shared never changes the checkpoint format
                     "distributed.strategy", "distributed.local_loss", "distributed.fsdp_units",
                     "distributed.reshard_after_forward", "distributed.timeout_minutes",
                     # observing the run never changes what it computes
                     "run.report_to", "run.profile", "report", "plots")


def dict_changes(a: dict[str, Any], b: dict[str, Any], ignore: Iterable[str] = (),
                 prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs, ``ignore`` (dotted keys or tables) left
    out."""
    skip = set(ignore)
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if key in skip:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(dict_changes(va, vb, skip, key + "."))
        elif va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def recipe_changes(old: Any, new: Any, ignore: Iterable[str] = RESUMABLE_CHANGES) -> list[str]:
    """What differs between two recipes beyond ``ignore`` (empty: the same run)."""
    keys = tuple(ignore)
    if old.digest(keys) == new.digest(keys):
        return []
    return dict_changes(old.to_dict(), new.to_dict(), keys) or ["(the resolved recipes differ)"]


__all__ = ["RESUMABLE_CHANGES", "dict_changes", "recipe_changes"]
