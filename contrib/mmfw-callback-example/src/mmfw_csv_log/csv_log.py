"""``csv-log``: every train row of a run in a CSV file, every evaluation in a second one.

``metrics.jsonl`` holds everything a run logs, one JSON object a line; a spreadsheet or a plot
script often wants a table instead. This callback appends each ``train`` row (the columns of
``columns``) to ``<run_dir>/<file>`` and each ``eval`` row (step, epoch, split, final, then
every metric) to ``<run_dir>/<eval_file>``, on rank 0, as the rows are logged.

On ``--resume`` the files must read as those of the unbroken run: a killed run may have
written rows after its last checkpoint, and the resumed run logs those steps again. So the
callback is stateful: its ``state_dict()`` (saved in every checkpoint) is the number of rows
in each file, and ``on_checkpoint_restore`` cuts each file back to that many rows.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import attrs

from mmfw.spi import Callback, RunContext, option

#: the train-row keys written by default (``sim/gap``: positive minus negative similarity)
DEFAULT_COLUMNS = ("step", "epoch", "loss", "lr", "samples_per_s", "sim/gap")
#: the first columns of the evaluation file; the metrics follow, in the order of the first row
EVAL_COLUMNS = ("step", "epoch", "split", "final")


def _file_name(instance: Any, attribute: Any, value: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise ValueError(f"'{attribute.name}' must be a plain file name (the file is written "
                         f"in the run directory), got {value!r}")


def _columns(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    if not value or len(set(value)) != len(value):
        raise ValueError(f"'{attribute.name}' must be a non-empty list of distinct row keys, "
                         f"got {list(value)}")


@attrs.frozen
class CSVLogOptions:
    """``[callbacks.csv-log]``: which rows go where."""

    file: str = option("metrics.csv", doc="CSV file of the train rows, in the run directory",
                       validator=_file_name)
    columns: tuple[str, ...] = option(DEFAULT_COLUMNS, doc="train-row keys written, in this "
                                      "order (a key a row lacks: an empty cell)",
                                      validator=_columns)
    eval_file: str = option("eval.csv", doc="CSV file of the evaluation rows (step, epoch, "
                            "split, final, then every metric), in the run directory",
                            validator=_file_name)


def append_row(path: Path, header: list[str], values: list[Any]) -> None:
    """Append one row to ``path`` (the header first, into a new or empty file). The file is
    closed after each row, so a killed run leaves only whole rows behind."""
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if f.tell() == 0:
            writer.writerow(header)
        writer.writerow(values)


def truncate_rows(path: Path, rows: int) -> int:
    """Keep the header and the first ``rows`` rows of ``path``; returns the rows kept (fewer
    when the file has fewer). A file cut to no rows is removed, so its header is written
    again with the next row."""
    if not path.is_file():
        return 0
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    kept = records[1:rows + 1]
    if not kept:
        path.unlink()
        return 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([records[0], *kept])
    return len(kept)


class CSVLog(Callback):
    """Writes train and eval rows as CSV (rank 0); checkpoints how many rows each file holds."""

    order = 50  # after metrics-log (-100): a row is in metrics.jsonl before it is in the CSV

    def __init__(self, options: CSVLogOptions) -> None:
        self.options = options
        self.rows = {"train": 0, "eval": 0}  # rows written to each file so far
        self.eval_columns: list[str] = []  # fixed by the first eval row

    def state_dict(self) -> dict[str, Any]:
        return {"rows": dict(self.rows), "eval_columns": list(self.eval_columns)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.update(state.get("rows", {}))
        self.eval_columns = list(state.get("eval_columns", []))

    def _paths(self, ctx: RunContext) -> dict[str, Path]:
        return {"train": ctx.run_dir / self.options.file,
                "eval": ctx.run_dir / self.options.eval_file}

    def on_checkpoint_restore(self, ctx: RunContext, step: int) -> None:
        """Drop the rows written after checkpoint ``step``: the resumed run logs them again."""
        if not ctx.is_main:
            return
        for kind, path in self._paths(ctx).items():
            self.rows[kind] = truncate_rows(path, self.rows[kind])
        if not self.rows["eval"]:
            self.eval_columns = []

    def on_log_row(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if not ctx.is_main:
            return
        kind = row.get("type")
        if kind == "train":
            columns = list(self.options.columns)
        elif kind == "eval":
            row = {**row, "final": int(bool(row.get("final")))}
            if not self.eval_columns:
                self.eval_columns = [*EVAL_COLUMNS, *(k for k in row if k != "type"
                                                      and k not in EVAL_COLUMNS)]
            columns = self.eval_columns
        else:
            return  # diagnostics, warnings, ...: metrics.jsonl has them
        append_row(self._paths(ctx)[kind], columns, [row.get(c, "") for c in columns])
        self.rows[kind] += 1


def csv_log(options: CSVLogOptions) -> CSVLog:
    """The ``csv-log`` callback: the run's train and eval rows as CSV files."""
    return CSVLog(options)


csv_log.Options = CSVLogOptions  # type: ignore[attr-defined]
csv_log.default = False  # type: ignore[attr-defined]  # runs when run.callbacks lists it
