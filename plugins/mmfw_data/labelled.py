"""``labelled``: images with a class label, for zero-shot classification (``[eval.zeroshot]``).

Three layouts, told apart by ``path`` (or named by ``format``):

- an image-folder tree ``path/<class>/<image>`` (torchvision's ``ImageFolder``): classes are
  the sub-folder names, sorted, and a label is the position of its folder;
- a table (``.csv``, ``.tsv``, ``.jsonl``) with an image column and a label column: integer
  labels are class indices (name them with ``eval.zeroshot.classnames``), other labels are
  class names, sorted into classes;
- CLIP_benchmark's webdataset layout (``clip_benchmark.webdataset_builder``): a folder holding
  ``<split>/nshards.txt`` and ``<split>/0.tar``..., ``classnames.txt`` and
  ``zeroshot_classification_templates.txt``, samples ``<key>.webp|png|jpg`` + ``<key>.cls``;
  or shard files given directly (``'data/{0..3}.tar'``), with those text files beside them.

Every layout has the split ``test`` (a CLIP_benchmark folder: its split folders). Images are
decoded when an item is fetched; unreadable ones are named by ``problems()`` and
``__getitem__`` so ``data.on_bad`` applies to them as to any split.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

import attrs

from mmfw.spi import DataError, Item, Problem, option

from . import images
from .filesplit import SCAN_THREADS, require_file, resolve, stable_id

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: a CLIP_benchmark sample's image extensions, first found wins (its own reader's order)
SHARD_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


@attrs.frozen
class LabelledOptions:
    path: str = option(doc="an image-folder tree, a .csv/.tsv/.jsonl table, a CLIP_benchmark "
                       "webdataset folder, or shard files ('x/{0..3}.tar')")
    format: Literal["auto", "folder", "csv", "jsonl", "webdataset"] = option(
        "auto", doc="the layout of path (auto: a table by its suffix, shards by .tar, a "
        "folder with <split>/nshards.txt as CLIP_benchmark's, any other folder as a tree)")
    images: str = option("", doc="folder a table's image paths are relative to ('': the "
                         "table's folder)")
    image_column: str = option("image", doc="table column (key) holding the image path")
    label_column: str = option("label", doc="table column (key) holding the label: a class "
                               "index or a class name")
    delimiter: str = option("", doc="CSV delimiter ('': ',' for .csv, a tab for .tsv)")


class Entry(NamedTuple):
    """One labelled image: a file, or a member of a shard (``(offset, size)`` when the shard
    is uncompressed, else its bytes)."""

    where: str
    label: int
    path: Path | None = None
    shard: Path | None = None
    member: tuple[int, int] | None = None
    data: bytes | None = None


class LabelledImages:
    """Map-style split of labelled images (an ``mmfw.spi.contracts.LabelledSplit``)."""

    def __init__(self, entries: Sequence[Entry], classnames: Sequence[str],
                 problems: Sequence[Problem] = (), templates: Sequence[str] | None = None
                 ) -> None:
        self.entries, self.classnames = list(entries), tuple(classnames)
        self.templates = tuple(templates) if templates else None
        self._problems = list(problems)

    def __len__(self) -> int:
        return len(self.entries)

    def label(self, index: int) -> int:
        return self.entries[index].label

    def captions(self, index: int) -> Sequence[str]:
        label = self.entries[index].label
        return (self.classnames[label],) if label < len(self.classnames) else ()

    def _bytes(self, e: Entry) -> Path | bytes:
        if e.path is not None:
            return e.path
        if e.data is not None:
            return e.data
        assert e.shard is not None and e.member is not None
        offset, size = e.member
        try:
            with open(e.shard, "rb") as f:
                f.seek(offset)
                return f.read(size)
        except OSError as err:
            raise DataError(f"{e.where}: cannot read shard ({err.strerror or err})") from None

    def __getitem__(self, index: int) -> Item:
        e = self.entries[index]
        return Item(images.decode(self._bytes(e), e.where), self.captions(index),
                    stable_id(e.where))

    def problems(self, full: bool = False) -> list[Problem]:
        """Rows that made no entry, then every image checked (``images.check``)."""

        def one(i: int) -> Problem | None:
            e = self.entries[i]
            try:
                why = images.check(self._bytes(e), e.where, full=full)
            except DataError as err:
                why = str(err).removeprefix(f"{e.where}: ")
            return None if why is None else Problem(e.where, why, i)

        with ThreadPoolExecutor(SCAN_THREADS) as pool:
            found = [p for p in pool.map(one, range(len(self.entries))) if p is not None]
        return [*self._problems, *found]


# ------------------------------------------------------------------------------------------
# the layouts


def read_folder(root: Path) -> LabelledImages:
    """``root/<class>/<image>``: classes sorted by folder name (ImageFolder's convention)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders in it (expected <class>/<image> files)")
    entries, problems = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file()
                       and not p.name.startswith("."))
        for p in files:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                entries.append(Entry(str(p), label, path=p))
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
            problems.append(Problem(str(root / name), "class folder has no image"))
    return LabelledImages(entries, classes, problems)


def _table_rows(path: Path, o: LabelledOptions, fmt: str) -> list[tuple[str, object, str]]:
    """``(image, label, where)`` of every row of a CSV/TSV/JSONL table."""
    rows: list[tuple[str, object, str]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(("", None, f"{path}:{n}: not valid JSON ({err})"))
                continue
            if not isinstance(obj, dict):
                rows.append(("", None, f"{path}:{n}: not an object"))
                continue
            rows.append((str(obj.get(o.image_column) or ""), obj.get(o.label_column),
                         f"{path}:{n}"))
        return rows
    delimiter = o.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    missing = [c for c in (o.image_column, o.label_column) if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (it has "
                        f"{', '.join(reader.fieldnames or []) or 'no header'}); set "
                        "image_column / label_column")
    for n, row in enumerate(reader, 2):
        label = (row.get(o.label_column) or "").strip()
        rows.append(((row.get(o.image_column) or "").strip(), label or None, f"{path}:{n}"))
    return rows


def _as_index(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def read_table(path: Path, o: LabelledOptions, fmt: str) -> LabelledImages:
    """A table of (image, label) rows; integer labels are indices, others class names."""
    require_file(path, "labelled image table (path)")
    root = Path(o.images).expanduser() if o.images else path.parent
    rows, problems = [], []
    for image, label, where in _table_rows(path, o, fmt):
        if label is None and not image:
            problems.append(Problem(where, where.partition(": ")[2] or "empty row"))
        elif not image:
            problems.append(Problem(where, f"row has no image ({o.image_column!r})"))
        elif label is None or (isinstance(label, str) and not label.strip()):
            problems.append(Problem(where, f"row has no label ({o.label_column!r})"))
        else:
            rows.append((image, label, where))
    indices = [_as_index(label) for _, label, _ in rows]
    if rows and all(i is not None for i in indices):
        classnames: tuple[str, ...] = ()  # bare indices: eval.zeroshot.classnames names them
        labels = [int(i) for i in indices]  # type: ignore[arg-type]
    else:
        classnames = tuple(sorted({str(label).strip() for _, label, _ in rows}))
        lookup = {c: k for k, c in enumerate(classnames)}
        labels = [lookup[str(label).strip()] for _, label, _ in rows]
    entries = [Entry(f"{where} ({image})", label, path=resolve(root, image))
               for (image, _, where), label in zip(rows, labels)]
    return LabelledImages(entries, classnames, problems)


def _lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


def index_labelled_shard(path: Path) -> tuple[list[Entry], list[Problem]]:
    """The ``<key>.<image>`` + ``<key>.cls`` samples of a tar shard (webdataset's grouping:
    a key is a member's name up to the first dot of its base name)."""
    keep_offsets = not _compressed(path)
    samples: dict[str, dict[str, object]] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                head, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key, ext = (f"{head}/{stem}" if head else stem), ext.lower()
                sample = samples.setdefault(key, {})
                if ext == "cls":
                    f = tf.extractfile(m)
                    sample["cls"] = f.read() if f else b""
                elif ext in SHARD_IMAGE_KEYS:
                    if keep_offsets:
                        sample[ext] = (m.offset_data, m.size)
                    else:
                        f = tf.extractfile(m)
                        sample[ext] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable tar shard ({err})") from None
    entries, problems = [], []
    for key, sample in samples.items():
        where = f"{path}: {key}"
        ext = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        raw = sample.get("cls")
        try:
            label = int(bytes(raw).decode("utf-8").strip()) if raw is not None else None
        except (UnicodeDecodeError, ValueError):
            label = None
        if ext is None:
            problems.append(Problem(where, "sample has no image (.webp, .png, .jpg)"))
        elif label is None or label < 0:
            problems.append(Problem(where, "sample has no class index (.cls)"))
        else:
            got = sample[ext]
            member = got if isinstance(got, tuple) else None
            data = got if isinstance(got, bytes) else None
            entries.append(Entry(where, label, shard=path, member=member, data=data))
    return entries, problems


def read_shards(shards: Sequence[Path], meta: Path) -> LabelledImages:
    """CLIP_benchmark classification shards; names and templates from ``meta``'s text files."""
    entries, problems = [], []
    for shard in shards:
        if not shard.is_file():
            raise DataError(f"shard not found: {shard}")
        e, p = index_labelled_shard(shard)
        entries += e
        problems += p
    classnames = _lines(meta / CLASSNAMES_FILE) or ()
    return LabelledImages(entries, classnames, problems, _lines(meta / TEMPLATES_FILE))


def clip_benchmark_splits(root: Path) -> tuple[str, ...]:
    """The splits of a CLIP_benchmark webdataset folder: sub-folders with ``nshards.txt``."""
    return tuple(sorted(d.name for d in root.iterdir() if (d / "nshards.txt").is_file()))


def clip_benchmark_shards(root: Path, split: str) -> list[Path]:
    """``root/<split>/0.tar`` ... as ``nshards.txt`` counts them (CLIP_benchmark's layout)."""
    count = root / split / "nshards.txt"
    try:
        n = int(count.read_text().strip())
    except (OSError, ValueError) as err:
        raise DataError(f"{count}: not a shard count ({err})") from None
    return [root / split / f"{i}.tar" for i in range(n)]


def expand_braces(spec: str) -> list[str]:
    """Shard lists in webdataset's brace notation (``'a/{0..3}.tar'``; ``::`` joins lists)."""
    import webdataset

    return [u for u in webdataset.shardlists.expand_urls(spec) if u]


class LabelledDataset:
    """Factory product of ``labelled``: read on first use."""

    Options = LabelledOptions

    def __init__(self, options: LabelledOptions) -> None:
        self.options = options
        p = Path(options.path).expanduser()
        self.format = options.format if options.format != "auto" else self._detect(p)
        self.path = p
        if self.format == "webdataset" and p.is_dir():
            self.splits = clip_benchmark_splits(p)
            if not self.splits:
                raise DataError(f"{p}: no <split>/nshards.txt in it (CLIP_benchmark's "
                                "webdataset layout)")
        else:
            self.splits = ("test",)
        self._made: dict[str, LabelledImages] = {}

    @staticmethod
    def _detect(p: Path) -> str:
        suffix = p.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix == ".jsonl":
            return "jsonl"
        if p.is_dir():
            return "webdataset" if clip_benchmark_splits(p) else "folder"
        if ".tar" in p.name or "{" in str(p):
            return "webdataset"
        if not p.exists():
            raise DataError(f"labelled images not found: {p} (path)")
        raise DataError(f"{p}: not a folder, a .csv/.tsv/.jsonl table or .tar shards; set "
                        "format")

    def split(self, name: str) -> LabelledImages:
        if name not in self.splits:
            raise KeyError(f"labelled has splits {self.splits}, not '{name}'")
        if name not in self._made:
            self._made[name] = self._read(name)
        return self._made[name]

    def _read(self, name: str) -> LabelledImages:
        p, o = self.path, self.options
        if self.format == "folder":
            if not p.is_dir():
                raise DataError(f"image folder not found: {p} (path)")
            return read_folder(p)
        if self.format in ("csv", "jsonl"):
            return read_table(p, o, self.format)
        if p.is_dir():
            return read_shards(clip_benchmark_shards(p, name), p)
        shards = [Path(u.removeprefix("file:")).expanduser() for u in expand_braces(o.path)]
        if not shards:
            raise DataError(f"no shards in path = {o.path!r}")
        meta = shards[0].parent
        if _lines(meta / CLASSNAMES_FILE) is None and _lines(meta.parent / CLASSNAMES_FILE):
            meta = meta.parent  # <root>/<split>/0.tar: the text files sit in <root>
        return read_shards(shards, meta)
