"""``csv`` and ``jsonl``: your own image-caption tables.

A row names an image file and gives one caption, or (JSONL: a list; CSV: a string cut by
``caption_separator``) several. Rows naming the same image become one item with all their
captions, so its captions are positives of each other. Splits come either from a column of one
file (``annotations`` + ``split_column``) or from one file per split (``train``, ``val``,
``test``). ``group_column`` gives images a group key for the ``semantic-groups`` sampler.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from mmfw.spi import DataError, Problem, close_matches, option

from .filesplit import FileSplit, group_rows, require_file

SPLITS = ("train", "val", "test")

#: what the files must be; a BOM is allowed (``utf-8-sig``: Excel writes one)
ENCODING = "utf-8"

Row = tuple[str, list[str], str, "str | None", str]  # image, captions, where, group, split


@attrs.frozen
class TableOptions:
    annotations: str = option("", doc="one file with every split, told apart by split_column")
    train: str = option("", doc="file of the train split (instead of annotations)")
    val: str = option("", doc="file of the val split (instead of annotations)")
    test: str = option("", doc="file of the test split (instead of annotations)")
    images: str = option("", doc="folder image paths are relative to ('': each file's folder)")
    image_column: str = option("image", doc="column (key) holding the image path")
    caption_column: str = option("caption", doc="column (key) holding the caption, or a list "
                                 "of captions (JSONL)")
    caption_separator: str = option("", doc="cut a caption string into several captions at "
                                    "this separator, e.g. '|' ('': one caption per string)")
    split_column: str = option("split", doc="column (key) naming the split (train, val, test) "
                               "of a row; used with annotations")
    group_column: str = option("", doc="column (key) with a group key: images sharing it are "
                               "positives for the semantic-groups sampler ('': none)")

    def __attrs_post_init__(self) -> None:
        per_split = [s for s in SPLITS if getattr(self, s)]
        if self.annotations and per_split:
            raise ValueError(f"'annotations' and per-split files ({', '.join(per_split)}) "
                             "exclude each other: give one file with a split column, or one "
                             "file per split")
        if not self.annotations and not per_split:
            raise ValueError("'annotations' is required: one file with a split column, or "
                             "train / val / test files")


def _one_character(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    """The csv module needs one character that can split a line: '' passed ``max_len(1)`` and
    then crashed the reader, a line break or the quote character would mis-split every row."""
    name = attribute.name
    if len(value) != 1:
        # TOML's '\t' (single quotes) and --set data.delimiter=\t give a backslash and a t
        hint = (" (for a tab write \"\\t\" in double quotes: delimiter = \"\\t\", or "
                "--set 'data.delimiter=\"\\t\"')" if value == "\\t" else "")
        raise ValueError(f"'{name}' must be exactly one character, e.g. ',' ';' '|' or a tab "
                         f"(this one has {len(value)}){hint}")
    if value in "\r\n":
        raise ValueError(f"'{name}' cannot be a line break: rows are lines")
    if value == '"':
        raise ValueError(f"'{name}' cannot be the quote character '\"' (it quotes fields "
                         "that hold the delimiter)")


@attrs.frozen
class CsvOptions(TableOptions):
    delimiter: str = option(",", doc="field delimiter ('\\t' for TSV)",
                            validator=_one_character)


@attrs.frozen
class JsonlOptions(TableOptions):
    pass


class TableDataset:
    """Common reading logic; subclasses say how rows come out of a file."""

    splits = SPLITS
    Options: type = TableOptions
    kind = "table"

    def __init__(self, options: TableOptions) -> None:
        self.options = options
        self._splits: dict[str, FileSplit] | None = None

    def split(self, name: str) -> FileSplit:
        if name not in SPLITS:
            raise KeyError(f"{self.kind} has splits {SPLITS}, not '{name}'")
        if self._splits is None:
            self._splits = self._read()
        return self._splits[name]

    def _read(self) -> dict[str, FileSplit]:
        o = self.options
        files = ([(Path(o.annotations).expanduser(), None)] if o.annotations else
                 [(Path(getattr(o, s)).expanduser(), s) for s in SPLITS if getattr(o, s)])
        rows: dict[str, list] = {s: [] for s in SPLITS}
        problems: dict[str, list[Problem]] = {s: [] for s in SPLITS}
        roots: dict[str, Path] = {}
        for path, fixed in files:
            key = "annotations" if fixed is None else fixed
            require_file(path, f"{self.kind} file (data.{key})")
            root = Path(o.images).expanduser() if o.images else path.parent
            if not root.is_dir():
                raise DataError(f"image folder not found: {root} (data.images)")
            try:
                for image, captions, where, group, split in self._rows(path, fixed, problems):
                    roots[split] = root
                    if split not in SPLITS:
                        problems["train"].append(Problem(where, f"unknown split {split!r} "
                                                         "(expected train, val or test)"))
                        continue
                    for caption in captions or [""]:
                        rows[split].append((image, caption, where, group))
            except UnicodeDecodeError as err:
                # the decoder's offset is within its read chunk, so the place is found again
                raise DataError(not_utf8(path, self.kind, err)) from None
        return {s: FileSplit(group_rows(rows[s], roots.get(s, Path(".")), problems[s]),
                             problems[s]) for s in SPLITS}

    def _rows(self, path: Path, fixed: str | None, problems: dict[str, list[Problem]]
              ) -> Iterator[Row]:
        raise NotImplementedError

    # turning one parsed row (a dict) into a Row ----------------------------------------------
    def _row(self, record: dict[str, Any], where: str, fixed: str | None) -> Row:
        o = self.options
        image = record.get(o.image_column)
        image = "" if image is None else str(image)
        raw = record.get(o.caption_column)
        if isinstance(raw, list):
            captions = [str(c) if c is not None else "" for c in raw]
        else:
            captions = [] if raw is None else [str(raw)]
        if o.caption_separator:
            captions = [part for c in captions for part in c.split(o.caption_separator)]
        group = record.get(o.group_column) if o.group_column else None
        group = None if group is None or str(group) == "" else str(group)
        split = fixed or str(record.get(o.split_column) or "").strip()
        return image, captions, where, group, split

    def _require_columns(self, path: Path, columns: list[str]) -> None:
        o = self.options
        need = [("image_column", o.image_column), ("caption_column", o.caption_column)]
        if o.annotations:
            need.append(("split_column", o.split_column))
        if o.group_column:
            need.append(("group_column", o.group_column))
        for key, column in need:
            if column not in columns:
                near = close_matches(column, columns)
                hint = f" Did you mean {near[0]!r} (set data.{key})?" if near else ""
                raise DataError(f"{path}: no column {column!r} (data.{key}).{hint} Columns: "
                                + ", ".join(repr(c) for c in columns))


class CsvDataset(TableDataset):
    """Factory product of ``csv`` (a header row names the columns)."""

    Options = CsvOptions
    kind = "csv"

    def _rows(self, path: Path, fixed: str | None, problems: dict[str, list[Problem]]
              ) -> Iterator[Row]:
        with open(path, newline="", encoding="utf-8-sig") as f:
            # csv.reader, not DictReader: DictReader keeps quiet about a row of another width
            # (extra fields go under the key None, missing ones become None), so an unquoted
            # delimiter cut a caption short and nothing said so
            reader = csv.reader(f, delimiter=self.options.delimiter)
            try:
                header = next(reader, [])
                self._require_columns(path, header)
                for fields in reader:
                    if not fields:  # a blank line, skipped as DictReader did
                        continue
                    where = f"{path}:{reader.line_num}"
                    if len(fields) != len(header):
                        problems[fixed or "train"].append(
                            Problem(where, field_count(len(fields), len(header))))
                        continue
                    yield self._row(dict(zip(header, fields)), where, fixed)
            except csv.Error as err:
                raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None


class JsonlDataset(TableDataset):
    """Factory product of ``jsonl`` (one JSON object per line)."""

    Options = JsonlOptions
    kind = "jsonl"

    def _rows(self, path: Path, fixed: str | None, problems: dict[str, list[Problem]]
              ) -> Iterator[Row]:
        seen: set[str] = set()
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    problems[fixed or "train"].append(Problem(where, f"not valid JSON ({err})"))
                    continue
                if not isinstance(record, dict):
                    problems[fixed or "train"].append(Problem(where, "not a JSON object"))
                    continue
                seen.update(record)
                yield self._row(record, where, fixed)
        # a key no row has is a misnamed column, not a thousand bad rows
        self._require_columns(path, sorted(seen))


def field_count(n: int, width: int) -> str:
    """Why a CSV row of ``n`` fields under a header of ``width`` is not read."""
    if n > width:
        return (f"row has {n} fields, header has {width} (an unquoted delimiter in a caption? "
                "quote the field)")
    return (f"row has {n} field{'s' if n != 1 else ''}, header has {width} (a missing field, "
            "or a line break in an unquoted caption? quote the field)")


def not_utf8(path: Path, kind: str, err: UnicodeDecodeError) -> str:
    """The message for a file that is not UTF-8: which file, where, and what to do.

    Only called on the error path, so reading the file again to place the bad byte is cheap
    enough; the stream's ``err.start`` counts from the start of the decoder's last chunk.
    """
    data = path.read_bytes()
    try:
        data.decode(ENCODING)
    except UnicodeDecodeError as whole:
        line = data.count(b"\n", 0, whole.start) + 1
        place = f"byte 0x{data[whole.start]:02x} at byte offset {whole.start} (line {line})"
    else:  # pragma: no cover - the stream saw a bad byte the whole file does not have
        place = err.reason
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Excel's "Unicode text" export
        fix = "it starts with a UTF-16 byte-order mark: `iconv -f utf-16 -t utf-8`"
    else:
        fix = "e.g. from Latin-1 / Windows-1252: `iconv -f cp1252 -t utf-8`"
    return (f"{path}: not {ENCODING} text: {place}. {kind} files are read as {ENCODING} "
            f"(a BOM is fine); re-save the file as UTF-8 ({fix})")
