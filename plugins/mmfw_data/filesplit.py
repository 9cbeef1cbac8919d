"""A split over image files on disk: what the Karpathy, CSV and JSONL datasets produce.

Annotations are read once, in the main process; an item's image is decoded with Pillow only
when the item is fetched (in DataLoader workers). Bad annotation rows never become items: they
are kept as :class:`~mmfw.spi.contracts.Problem` records, reported with the image scan by
``problems()`` so the engine's ``data.on_bad`` policy sees everything in one list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from mmfw.spi import DataError, Item, Problem

from . import images

#: threads that stat and verify image files before training (I/O bound: files on any disk)
SCAN_THREADS = 8


class Record(NamedTuple):
    """One image and its captions, with where its annotation came from (for messages)."""

    image: Path
    captions: tuple[str, ...]
    image_id: int
    where: str
    group: str | None = None


def stable_id(key: str) -> int:
    """A 56-bit id from a string (a relative path): the same in every run and process."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:7], "big")


def resolve(root: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else root / p


class FileSplit:
    """Map-style split of :class:`Record`; ``__getitem__`` decodes the image."""

    def __init__(self, records: Sequence[Record], problems: Sequence[Problem] = ()) -> None:
        self.records = list(records)
        self._problems = list(problems)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Item:
        r = self.records[index]
        return Item(images.decode(r.image, str(r.image)), r.captions, r.image_id)

    def captions(self, index: int) -> Sequence[str]:
        return self.records[index].captions

    def group(self, index: int) -> str | None:
        return self.records[index].group

    def image_path(self, index: int) -> Path:
        return self.records[index].image

    def problems(self, full: bool = False) -> list[Problem]:
        """Annotation problems, then every image file checked (see ``images.check``)."""

        def one(i: int) -> Problem | None:
            path = self.records[i].image
            why = images.check(path, str(path), full=full)
            return None if why is None else Problem(str(path), why, i)

        with ThreadPoolExecutor(SCAN_THREADS) as pool:
            found = [p for p in pool.map(one, range(len(self.records))) if p is not None]
        return [*self._problems, *found]


def group_rows(rows: Sequence[tuple[str, str, str, str | None]], root: Path,
               problems: list[Problem]) -> list[Record]:
    """Rows ``(image, caption, where, group)`` -> one record per image, captions in row order.

    A row without an image or with an empty caption is a problem (and contributes nothing); an
    image whose rows give two different group keys keeps the first and reports the other.
    """
    by_image: dict[str, list] = {}
    for image, caption, where, group in rows:
        if not image.strip():
            problems.append(Problem(where, "row has no image"))
            continue
        if not caption.strip():
            problems.append(Problem(where, f"empty caption for image {image!r}"))
            continue
        entry = by_image.setdefault(image, [[], where, group])
        entry[0].append(caption.strip())
        if group != entry[2]:
            problems.append(Problem(where, f"image {image!r} has group {group!r} here but "
                                    f"{entry[2]!r} at {entry[1]}"))
    return [Record(resolve(root, image), tuple(caps), stable_id(image), where, group)
            for image, (caps, where, group) in by_image.items()]


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise DataError(f"{what} not found: {path}{hint}")
    return path
