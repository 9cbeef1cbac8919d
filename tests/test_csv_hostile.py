"""CSV / JSONL files as people really write them: unquoted delimiters, short rows, files that
are not UTF-8, and delimiters the csv module cannot use. Each must be reported, never lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import mmfw
from helpers import tiny_recipe
from mmfw.train.loop import Trainer

TOO_MANY = "row has 4 fields, header has 3 (an unquoted delimiter in a caption? quote the field)"


def png(path: Path, i: int = 0) -> Path:
    """A tiny real image, so the image scan finds nothing and only row problems remain."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (40 * i % 256, 90, 160)).save(path, format="PNG")
    return path


def table(tmp_path: Path, text: str | bytes, name: str = "d.csv", images: int = 2) -> Path:
    for i in range(images):
        png(tmp_path / f"{i}.png", i)
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def found(split) -> list[tuple[str, str]]:
    """``(file:line, reason)`` of every problem, the file without its folder."""
    return [(p.where.rsplit("/", 1)[-1], p.reason) for p in split.problems()]


def all_captions(dataset) -> list[str]:
    return [c for s in dataset.splits for i in range(len(dataset.split(s)))
            for c in dataset.split(s).captions(i)]


# more or fewer fields than the header --------------------------------------------------------


def test_unquoted_delimiter_is_a_problem_not_a_cut_caption(tmp_path: Path) -> None:
    # per-split file: nothing after the caption, so the old reader cut it without a word
    path = table(tmp_path, "image,caption\n0.png,a red square, seen from above\n"
                           '1.png,"a blue disc, seen from the side"\n', name="train.csv")
    d = mmfw.create("dataset", "csv", train=str(path))
    train = d.split("train")
    assert found(train) == [("train.csv:2", "row has 3 fields, header has 2 (an unquoted "
                             "delimiter in a caption? quote the field)")]
    assert all_captions(d) == ["a blue disc, seen from the side"]  # no "a red square"


def test_unquoted_delimiter_with_a_split_column(tmp_path: Path) -> None:
    # the cut moves "train" out of the split column: the row was "unknown split" before
    path = table(tmp_path, "image,caption,split\n0.png,a red square, seen from above,train\n"
                           "1.png,fine,train\n")
    train = mmfw.create("dataset", "csv", annotations=str(path)).split("train")
    assert found(train) == [("d.csv:2", TOO_MANY)]
    assert [list(train.captions(i)) for i in range(len(train))] == [["fine"]]


def test_unquoted_tab_in_a_tsv(tmp_path: Path) -> None:
    path = table(tmp_path, "image\tcaption\tsplit\n0.png\tred\tsquare\ttrain\n1.png\tok\ttrain\n",
                 name="d.tsv")
    train = mmfw.create("dataset", "csv", annotations=str(path), delimiter="\t").split("train")
    assert found(train) == [("d.tsv:2", TOO_MANY)]
    assert len(train) == 1


def test_short_rows_are_problems(tmp_path: Path) -> None:
    # a row without its group key, and a caption broken by an unquoted line break, were
    # silently read as "no group" and as a caption "a red" plus a row with image "square"
    path = table(tmp_path, "image,caption,group\n0.png,no group here\n0.png,a red\nsquare,x\n"
                           "1.png,fine,g\n", name="train.csv")
    d = mmfw.create("dataset", "csv", train=str(path), group_column="group")
    short = ("row has 2 fields, header has 3 (a missing field, or a line break in an unquoted "
             "caption? quote the field)")
    assert found(d.split("train")) == [("train.csv:2", short), ("train.csv:3", short),
                                       ("train.csv:4", short)]
    assert all_captions(d) == ["fine"]


def test_a_quoted_line_break_is_still_one_row(tmp_path: Path) -> None:
    path = table(tmp_path, 'image,caption\n0.png,"two\nlines, one caption"\n\n1.png,ok\n',
                 name="train.csv")
    d = mmfw.create("dataset", "csv", train=str(path))
    assert found(d.split("train")) == []
    assert all_captions(d) == ["two\nlines, one caption", "ok"]


def csv_recipe(tmp_path: Path, path: Path, **data) -> mmfw.Recipe:
    raw = tiny_recipe(tmp_path / "runs", run={"max_steps": 1},
                      data={"dataset": "csv", "annotations": str(path), **data},
                      sampler={"batch_size": 4}, eval={"val_split": "", "split": "train"})
    for key in ("train_images", "val_images", "test_images", "image_size"):
        raw["data"].pop(key)
    return mmfw.load_recipe(raw)


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_wide_rows_go_through_data_on_bad(tmp_path: Path, on_bad: str) -> None:
    rows = [f"{i}.png,picture {i},train" for i in range(6)] + ["0.png,red, square,train"]
    path = table(tmp_path, "image,caption,split\n" + "\n".join(rows) + "\n", images=6)
    recipe = csv_recipe(tmp_path, path, on_bad=on_bad)
    # the scan that applies data.on_bad runs when the Trainer is made: no need to train
    if on_bad == "error":
        with pytest.raises(mmfw.DataError) as err:
            Trainer(recipe, console=lambda s: None)
        assert "1 problem(s)" in str(err.value) and f"d.csv:8: {TOO_MANY}" in str(err.value)
        return
    said: list[str] = []
    trainer = Trainer(recipe, console=said.append)
    rows = [json.loads(x) for x in (trainer.run_dir / "skipped.jsonl").read_text().splitlines()]
    assert [(r["where"].rsplit("/", 1)[-1], r["reason"]) for r in rows] == [("d.csv:8", TOO_MANY)]
    assert any("skipped 1 bad item(s)" in s for s in said)
    assert len(trainer.data.split) == 6  # 0.png keeps its good caption


# files that are not UTF-8 --------------------------------------------------------------------


def test_latin1_csv_names_file_encoding_and_place(tmp_path: Path) -> None:
    # far past the first read chunk, so the offset must be counted in the whole file
    good = "".join(f"0.png,caption number {i}\n" for i in range(2000)).encode()
    data = b"image,caption\n" + good + "1.png,caf\xe9 au lait\n".encode("latin-1")
    path = table(tmp_path, data, name="train.csv")
    d = mmfw.create("dataset", "csv", train=str(path))
    with pytest.raises(mmfw.DataError) as err:
        d.split("train")
    offset = data.index(b"\xe9")
    assert str(err.value) == (
        f"{path}: not utf-8 text: byte 0xe9 at byte offset {offset} (line 2002). csv files are "
        "read as utf-8 (a BOM is fine); re-save the file as UTF-8 (e.g. from Latin-1 / "
        "Windows-1252: `iconv -f cp1252 -t utf-8`)")


def test_utf16_csv_says_so(tmp_path: Path) -> None:
    path = table(tmp_path, "image,caption\n0.png,x\n".encode("utf-16"), name="train.csv")
    with pytest.raises(mmfw.DataError, match=r"train\.csv: not utf-8 text: byte 0xff at byte "
                       r"offset 0 \(line 1\).*UTF-16 byte-order mark"):
        mmfw.create("dataset", "csv", train=str(path)).split("train")


def test_a_utf8_bom_is_fine(tmp_path: Path) -> None:
    path = table(tmp_path, "\ufeffimage,caption\n0.png,caf\u00e9\n", name="train.csv")
    assert all_captions(mmfw.create("dataset", "csv", train=str(path))) == ["caf\u00e9"]


def test_latin1_jsonl_names_file_encoding_and_place(tmp_path: Path) -> None:
    lines = [json.dumps({"image": "0.png", "caption": "fine", "split": "train"}).encode(),
             b'{"image": "1.png", "caption": "na\xefve", "split": "train"}']
    path = table(tmp_path, b"\n".join(lines) + b"\n", name="d.jsonl")
    d = mmfw.create("dataset", "jsonl", annotations=str(path))
    with pytest.raises(mmfw.DataError) as err:
        d.split("train")
    offset = len(lines[0]) + 1 + lines[1].index(b"\xef")
    assert str(err.value).startswith(f"{path}: not utf-8 text: byte 0xef at byte offset "
                                     f"{offset} (line 2). jsonl files are read as utf-8")


# data.delimiter ------------------------------------------------------------------------------


@pytest.mark.parametrize(("delimiter", "why"), [
    ("", "must be exactly one character, e.g. ',' ';' '|' or a tab (this one has 0)"),
    (",,", "must be exactly one character, e.g. ',' ';' '|' or a tab (this one has 2)"),
    ("\n", "cannot be a line break: rows are lines"),
    ("\r", "cannot be a line break: rows are lines"),
    ('"', "cannot be the quote character '\"' (it quotes fields that hold the delimiter)"),
])
def test_unusable_delimiters_are_recipe_errors(delimiter: str, why: str) -> None:
    with pytest.raises(mmfw.RecipeError) as err:
        mmfw.create("dataset", "csv", annotations="a.csv", delimiter=delimiter)
    assert err.value.key == "delimiter"
    assert err.value.reason == f"'delimiter' {why}"


def test_backslash_t_gets_a_hint_and_a_real_tab_still_works(tmp_path: Path) -> None:
    with pytest.raises(mmfw.RecipeError, match=r"this one has 2\) \(for a tab write \"\\t\" in "
                       r"double quotes"):
        mmfw.create("dataset", "csv", annotations="a.csv", delimiter="\\t")
    path = table(tmp_path, "image\tcaption\n0.png\ta, b\n", name="train.tsv")
    d = mmfw.create("dataset", "csv", train=str(path), delimiter="\t")
    assert all_captions(d) == ["a, b"]


def test_empty_delimiter_in_a_recipe_names_the_key(tmp_path: Path) -> None:
    path = table(tmp_path, "image,caption,split\n0.png,x,train\n")
    with pytest.raises(mmfw.RecipeError) as err:
        csv_recipe(tmp_path, path, delimiter="")
    assert err.value.key == "data.delimiter"
    assert str(err.value).startswith("key 'data.delimiter': 'delimiter' must be exactly one "
                                     "character")
    assert "given:    ''" in str(err.value)
