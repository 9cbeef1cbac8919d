"""JSON-lines logs that survive a kill mid-append.

A process killed (or a disk filled) while appending leaves a *torn* last line: part of a row,
no newline. Readers drop such a line with one warning, since the row it was writing is the
one being lost anyway; any other line that is not a JSON object is an error naming
``file:line``, because that is damage, not an interrupted write.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..spi.errors import MmfwError
from .checkpoint import atomic_text


class LogError(MmfwError):
    """A JSON-lines log has a bad line that is not a torn last line."""


def read_jsonl(path: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The rows of ``path`` (none when it does not exist); a torn last line is dropped with a
    warning through ``warn``."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = all(not rest.strip() for rest in lines[number:])
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            if last:
                if warn is not None:
                    warn(f"{path}:{number}: dropped a torn last line (a write was cut off, "
                         f"e.g. by a kill or a full disk): {line[:60]!r}")
                break
            raise LogError(f"{path}:{number}: not a JSON row ({err}): {line[:80]!r}") from None
        rows.append(row)
    return rows


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append ``rows``, one line each, in one write (a kill tears at most the last line)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not text:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def rewrite_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` by ``rows`` atomically (a temp file renamed over it)."""
    atomic_text(path, "".join(json.dumps(r) + "\n" for r in rows))


__all__ = ["LogError", "append_jsonl", "read_jsonl", "rewrite_jsonl"]
