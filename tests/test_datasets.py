"""Real dataset formats (Karpathy JSON, CSV, JSONL, WebDataset shards), bad data, the cache."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mmfw
from helpers import tiny_recipe
from mmfw.config.recipe import load_recipe
from mmfw.contracts import DatasetSource, Item, Split
from mmfw.train.loop import Trainer

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (160, 60, 200),
           (240, 140, 30), (240, 240, 240), (90, 90, 90)]


def image_bytes(i: int, fmt: str = "JPEG", size: tuple[int, int] = (20, 14)) -> bytes:
    img = Image.new("RGB", size, COLOURS[i % len(COLOURS)])
    img.paste((255 - i * 20 % 255, 10, 10), (2, 2, 6 + i % 8, 8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, i: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(i, "PNG" if path.suffix == ".png" else "JPEG"))
    return path


def karpathy(root: Path, splits: list[str], *, captions: int = 3, filepath: str = "",
             entries: list[dict] | None = None) -> Path:
    """A Karpathy split file with one image per entry of ``splits`` (files written too)."""
    images = []
    for i, split in enumerate(splits):
        name = f"{i:04d}.jpg"
        write_image(root / "images" / filepath / name, i)
        entry = {"filename": name, "imgid": i, "split": split,
                 "sentences": [{"raw": f"picture {i} caption {c}", "tokens": []}
                               for c in range(captions)]}
        if filepath:
            entry["filepath"] = filepath
        images.append(entry)
    images += entries or []
    ann = root / "dataset_test.json"
    ann.write_text(json.dumps({"images": images, "dataset": "test"}))
    return ann


def kp(ann: Path, **options):
    return mmfw.create("dataset", "karpathy", annotations=str(ann),
                       images=str(ann.parent / "images"), **options)


# karpathy ---------------------------------------------------------------------------------


def test_karpathy_splits_and_all_captions(tmp_path: Path) -> None:
    ann = karpathy(tmp_path, ["train"] * 4 + ["val"] * 2 + ["test"] * 3 + ["restval"] * 2,
                   captions=5)
    d = kp(ann)
    assert isinstance(d, DatasetSource)
    sizes = {s: len(d.split(s)) for s in d.splits}
    assert sizes == {"train": 6, "val": 2, "test": 3}  # restval folded into train
    test = d.split("test")
    assert isinstance(test, Split)
    item = test[0]
    assert isinstance(item, Item)
    assert list(item.captions) == [f"picture 6 caption {c}" for c in range(5)]
    assert item.image.mode == "RGB" and item.image.size == (20, 14)
    ids = [d.split(s)[i].image_id for s in d.splits for i in range(len(d.split(s)))]
    assert sorted(ids) == list(range(11))


def test_karpathy_restval_can_stay_out(tmp_path: Path) -> None:
    ann = karpathy(tmp_path, ["train"] * 2 + ["restval"] * 3)
    assert len(kp(ann, restval_in_train=False).split("train")) == 2


def test_karpathy_filepath_and_default_image_root(tmp_path: Path) -> None:
    ann = karpathy(tmp_path, ["train", "test"], filepath="val2014")
    d = mmfw.create("dataset", "karpathy", annotations=str(ann), images=str(tmp_path / "images"))
    assert d.split("test").image_path(0) == tmp_path / "images" / "val2014" / "0001.jpg"
    assert d.split("test")[0].image.size == (20, 14)
    # images = "": relative to the annotation file's folder
    (tmp_path / "val2014").mkdir()
    write_image(tmp_path / "val2014" / "0001.jpg", 1)
    d2 = mmfw.create("dataset", "karpathy", annotations=str(ann))
    assert d2.split("test").image_path(0) == tmp_path / "val2014" / "0001.jpg"


def test_karpathy_missing_or_broken_annotations(tmp_path: Path) -> None:
    with pytest.raises(mmfw.DataError, match=r"annotation file.*not found"):
        mmfw.create("dataset", "karpathy", annotations=str(tmp_path / "nope.json")).split("train")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(mmfw.DataError, match="not valid JSON"):
        mmfw.create("dataset", "karpathy", annotations=str(bad)).split("train")
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(mmfw.DataError, match="images"):
        mmfw.create("dataset", "karpathy", annotations=str(bad)).split("train")


def test_karpathy_requires_annotations() -> None:
    with pytest.raises(mmfw.RecipeError, match="annotations"):
        mmfw.create("dataset", "karpathy")


# bad data, one case at a time -------------------------------------------------------------


def broken(tmp_path: Path, case: str) -> tuple[Path, str, str]:
    """A Karpathy folder of 4 train images with one bad thing: (annotations, where, why)."""
    entries = []
    ann = karpathy(tmp_path, ["train"] * 4)
    img = tmp_path / "images" / "0002.jpg"
    where, why = str(img), ""
    if case == "missing":
        img.unlink()
        why = "image file not found"
    elif case == "truncated":  # a download cut short: header intact, pixels missing
        noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0)).numpy()
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, format="JPEG", quality=95)
        img.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
        why = "cannot decode image"
    elif case == "undecodable":
        img.write_bytes(b"this is not an image at all" * 20)
        why = "cannot decode image"
    elif case == "empty file":
        img.write_bytes(b"")
        why = "image file is empty"
    elif case == "empty caption":
        entries = [{"filename": "0009.jpg", "split": "train", "imgid": 9,
                    "sentences": [{"raw": "fine"}, {"raw": "   "}]}]
        write_image(tmp_path / "images" / "0009.jpg", 9)
        where, why = "images[4] (0009.jpg) sentences[1]", "empty caption"
    elif case == "no image":
        entries = [{"filename": "", "split": "train", "sentences": [{"raw": "orphan"}]}]
        where, why = "images[4]", "row has no image"
    if entries:
        ann = karpathy(tmp_path, ["train"] * 4, entries=entries)
    return ann, where, why


CASES = ["missing", "truncated", "undecodable", "empty file", "empty caption", "no image"]


@pytest.mark.parametrize("case", CASES)
def test_each_bad_case_is_reported_with_its_place(tmp_path: Path, case: str) -> None:
    ann, where, why = broken(tmp_path, case)
    problems = kp(ann).split("train").problems()
    assert len(problems) == 1, problems
    assert where in problems[0].where and why in problems[0].reason


@pytest.mark.parametrize("case", ["missing", "truncated", "undecodable", "empty file"])
def test_loading_a_bad_image_raises_a_data_error_naming_it(tmp_path: Path, case: str) -> None:
    ann, where, _ = broken(tmp_path, case)
    split = kp(ann).split("train")
    with pytest.raises(mmfw.DataError, match=where):
        split[2]


def test_truncated_jpeg_with_intact_header_is_caught_by_the_quick_check(tmp_path) -> None:
    """verify() passes a JPEG cut short; the end-of-image check sends it to a full decode."""
    ann, where, _ = broken(tmp_path, "truncated")
    with Image.open(where) as img:
        img.verify()  # the header alone looks fine
    assert kp(ann).split("train").problems(full=False)


def run_recipe(tmp_path: Path, ann: Path, **data) -> dict:
    return tiny_recipe(
        tmp_path / "runs", run={"max_steps": 2},
        data={"dataset": "karpathy", "annotations": str(ann),
              "images": str(ann.parent / "images"), **data},
        sampler={"batch_size": 4}, eval={"val_split": "", "split": "train"})


def strip_synthetic(d: dict) -> dict:
    for key in ("train_images", "val_images", "test_images", "image_size"):
        d["data"].pop(key, None)
    return d


@pytest.mark.parametrize("case", CASES)
def test_default_policy_stops_before_training(tmp_path: Path, case: str) -> None:
    ann, where, why = broken(tmp_path, case)
    recipe = load_recipe(strip_synthetic(run_recipe(tmp_path, ann)))
    with pytest.raises(mmfw.DataError) as err:
        Trainer(recipe, console=lambda s: None)
    text = str(err.value)
    assert "1 problem(s)" in text and where in text and why in text
    assert 'data.on_bad = "skip"' in text


def test_error_lists_the_first_problems_and_counts_them(tmp_path: Path) -> None:
    ann = karpathy(tmp_path, ["train"] * 14)
    for i in range(14):
        (tmp_path / "images" / f"{i:04d}.jpg").unlink()
    recipe = load_recipe(strip_synthetic(run_recipe(tmp_path, ann)))
    with pytest.raises(mmfw.DataError) as err:
        Trainer(recipe, console=lambda s: None)
    text = str(err.value)
    assert "14 problem(s)" in text and "... and 4 more" in text
    assert text.count("image file not found") == 10


@pytest.mark.parametrize("case", CASES)
def test_skip_policy_logs_each_skip_and_trains(tmp_path: Path, case: str) -> None:
    ann, where, why = broken(tmp_path, case)
    said: list[str] = []
    recipe = load_recipe(strip_synthetic(run_recipe(tmp_path, ann, on_bad="skip")))
    trainer = Trainer(recipe, console=said.append)
    rows = [json.loads(x) for x in (trainer.run_dir / "skipped.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and where in rows[0]["where"] and why in rows[0]["reason"]
    assert rows[0]["split"] == "train" and rows[0]["when"] == "scan"
    assert any("skipped 1 bad item(s)" in s and "skipped.jsonl" in s for s in said)
    # a bad image leaves its item out; an empty caption only itself (image 9 keeps "fine")
    expected = {"empty caption": 5, "no image": 4}.get(case, 3)
    assert len(trainer.data.split) == expected
    assert trainer.fit() == "max_steps"


def test_decode_failure_while_training_follows_the_policy(tmp_path: Path) -> None:
    """A file that breaks after the scan: the run stops naming it, or skips it and logs it."""
    ann = karpathy(tmp_path, ["train"] * 4)
    for policy in ("error", "skip"):
        said: list[str] = []
        data = run_recipe(tmp_path, ann, on_bad=policy)
        data["run"]["name"] = policy
        data["sampler"]["batch_size"] = 12  # one batch: every image in it
        trainer = Trainer(load_recipe(strip_synthetic(data)), console=said.append)
        bad = tmp_path / "images" / "0001.jpg"
        keep = bad.read_bytes()
        bad.write_bytes(b"garbage" * 10)
        try:
            if policy == "error":
                with pytest.raises(mmfw.DataError, match=r"0001.jpg.*cannot decode"):
                    trainer.fit()
            else:
                assert trainer.fit() in ("max_steps", "epochs") and trainer.step == 2
                rows = [json.loads(x) for x in
                        (trainer.run_dir / "skipped.jsonl").read_text().splitlines()]
                # the diagnostics probe (built as training starts) may meet it first: an
                # "eval" row, also named; training itself skips it and logs a "train" row
                train = [r for r in rows if r["when"] == "train"]
                assert train and {r["when"] for r in rows} <= {"train", "eval"}
                assert "0001.jpg" in train[0]["where"]
                assert any("0001.jpg" in s and "while training" in s for s in said)
        finally:
            bad.write_bytes(keep)


def test_decode_failure_while_evaluating_with_skip(tmp_path: Path) -> None:
    ann = karpathy(tmp_path, ["train"] * 4 + ["test"] * 3)
    said: list[str] = []
    data = strip_synthetic(run_recipe(tmp_path, ann, on_bad="skip"))
    data["eval"]["split"] = "test"
    trainer = Trainer(load_recipe(data), console=said.append)
    (tmp_path / "images" / "0005.jpg").write_bytes(b"broken")
    metrics = trainer.ctx.evaluate("test")
    assert set(metrics) >= {"i2t_R@1", "rsum"}
    assert any("0005.jpg" in s and "blank image" in s for s in said)


def test_full_check_decodes_everything(tmp_path: Path, monkeypatch) -> None:
    from mmfw_data import images

    ann = karpathy(tmp_path, ["train"] * 3)
    calls = []
    real = images.decode
    monkeypatch.setattr(images, "decode", lambda *a: calls.append(a) or real(*a))
    kp(ann).split("train").problems(full=False)
    assert not calls  # intact JPEGs: header + end marker only
    kp(ann).split("train").problems(full=True)
    assert len(calls) == 3


# csv and jsonl ----------------------------------------------------------------------------


def test_csv_rows_grouped_per_image_with_split_and_group_columns(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.png", i)
    rows = ["path,text,part,cls", "img/0.png,a red one,train,a", "img/1.png,a green one,train,a",
            "img/0.png,red again,train,a", "img/2.png,blue,val,b", "img/3.png,yellow,test,b",
            'img/3.png,"yellow, still",test,b']
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    d = mmfw.create("dataset", "csv", annotations=str(tmp_path / "data.csv"),
                    image_column="path", caption_column="text", split_column="part",
                    group_column="cls")
    train = d.split("train")
    assert [list(train.captions(i)) for i in range(len(train))] == [
        ["a red one", "red again"], ["a green one"]]
    assert [len(d.split(s)) for s in ("train", "val", "test")] == [2, 1, 1]
    assert list(d.split("test").captions(0)) == ["yellow", "yellow, still"]
    assert train.group(0) == train.group(1) == "a"
    assert train[0].image.size == (20, 14)
    assert train.problems() == []
    ids = [d.split(s)[i].image_id for s in d.splits for i in range(len(d.split(s)))]
    assert len(set(ids)) == 4


def test_csv_one_file_per_split_and_caption_separator(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", 0)
    write_image(tmp_path / "b.jpg", 1)
    (tmp_path / "train.tsv").write_text("image\tcaption\na.jpg\tone|two|three\n")
    (tmp_path / "test.tsv").write_text("image\tcaption\nb.jpg\tfour\n")
    d = mmfw.create("dataset", "csv", train=str(tmp_path / "train.tsv"),
                    test=str(tmp_path / "test.tsv"), delimiter="\t", caption_separator="|")
    assert list(d.split("train").captions(0)) == ["one", "two", "three"]
    assert len(d.split("val")) == 0 and len(d.split("test")) == 1


def test_csv_bad_rows_reported_with_line_numbers(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", 0)
    (tmp_path / "d.csv").write_text("image,caption,split\na.jpg,ok,train\n,orphan caption,"
                                    "train\na.jpg,,train\nmissing.jpg,gone,train\n")
    split = mmfw.create("dataset", "csv", annotations=str(tmp_path / "d.csv")).split("train")
    got = {(p.where.rsplit("/", 1)[-1], p.reason.split(" (")[0]) for p in split.problems()}
    assert ("d.csv:3", "row has no image") in got
    assert ("d.csv:4", "empty caption for image 'a.jpg'") in got
    assert ("missing.jpg", "image file not found") in got
    assert len(split) == 2  # a.jpg with its good caption; missing.jpg until the policy acts


def test_csv_misnamed_column_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("img,caption,split\nx.jpg,a,train\n")
    d = mmfw.create("dataset", "csv", annotations=str(tmp_path / "d.csv"), image_column="image")
    with pytest.raises(mmfw.DataError, match=r"no column 'image'.*Did you mean 'img'"):
        d.split("train")


def test_table_options_are_validated() -> None:
    with pytest.raises(mmfw.RecipeError, match="required"):
        mmfw.create("dataset", "csv")
    with pytest.raises(mmfw.RecipeError, match="exclude each other"):
        mmfw.create("dataset", "jsonl", annotations="a.jsonl", train="b.jsonl")


def test_jsonl_caption_lists_groups_and_bad_lines(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / f"{i}.jpg", i)
    lines = [{"image": "0.jpg", "captions": ["first", "second"], "split": "train", "g": "x"},
             {"image": "1.jpg", "captions": "only one", "split": "train", "g": "x"},
             "{broken json", {"image": "2.jpg", "captions": [], "split": "test"},
             {"captions": ["no image"], "split": "train"}]
    (tmp_path / "d.jsonl").write_text("\n".join(
        x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    d = mmfw.create("dataset", "jsonl", annotations=str(tmp_path / "d.jsonl"),
                    caption_column="captions", group_column="g")
    train = d.split("train")
    assert [list(train.captions(i)) for i in range(len(train))] == [["first", "second"],
                                                                   ["only one"]]
    assert train.group(1) == "x"
    reasons = sorted(p.reason.split(" (")[0] for p in train.problems())
    assert reasons == ["not valid JSON", "row has no image"]
    assert [p.reason for p in d.split("test").problems()] == ["empty caption for image '2.jpg'"]
    assert len(d.split("test")) == 0


def test_jsonl_misnamed_key(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "x",
                                                  "split": "train"}) + "\n")
    d = mmfw.create("dataset", "jsonl", annotations=str(tmp_path / "d.jsonl"))
    with pytest.raises(mmfw.DataError, match="no column 'caption'"):
        d.split("train")


# webdataset -------------------------------------------------------------------------------


def write_shard(path: Path, start: int, n: int, *, bad: dict[int, str] | None = None) -> Path:
    """A shard of samples start..start+n-1: .jpg + .txt (even), .png + .json (odd)."""
    bad = bad or {}
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            key = f"s{i:05d}"
            files: dict[str, bytes] = {}
            if i % 2 == 0:
                files["jpg"] = image_bytes(i)
                files["txt"] = f"sample {i} first\nsample {i} second\n".encode()
            else:
                files["png"] = image_bytes(i, "PNG")
                files["json"] = json.dumps({"caption": [f"sample {i} a", f"sample {i} b"]}
                                           ).encode()
            if bad.get(i) == "no image":
                files.pop("jpg", None)
                files.pop("png", None)
            elif bad.get(i) == "empty caption":
                files["txt"] = b"  \n"
                files.pop("json", None)
            elif bad.get(i) == "corrupt":
                files["jpg" if i % 2 == 0 else "png"] = b"not an image"
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    for s in range(4):
        write_shard(d / f"train-{s:03d}.tar", s * 6, 6)
    write_shard(d / "test-000.tar", 100, 5)
    return d


def wds(shards: Path, **options):
    return mmfw.create("dataset", "webdataset",
                       train=str(shards / "train-{000..003}.tar"),
                       test=str(shards / "test-000.tar"), **options)


def test_webdataset_map_style_splits(shards: Path) -> None:
    d = wds(shards)
    assert d.splits == ("train", "test")
    test = d.split("test")
    assert len(test) == 5
    assert list(test.captions(0)) == ["sample 100 first", "sample 100 second"]
    assert list(test.captions(1)) == ["sample 101 a", "sample 101 b"]
    assert test[1].image.size == (20, 14)
    assert test.problems() == []
    assert len({test[i].image_id for i in range(5)}) == 5


def test_webdataset_stream_len_and_every_pair(shards: Path) -> None:
    d = wds(shards, shuffle_buffer=7)
    s = d.stream("train", batch_size=4, seed=0, drop_last=True)
    assert s.pairs == 48 and len(s) == 12
    batches = list(s)
    assert len(batches) == 12 and all(len(b) == 4 for b in batches)
    keys = [(r.item, r.caption) for b in batches for r in b]
    assert len(set(keys)) == 48  # even shards: each pair once
    assert all(isinstance(r.image, Image.Image) for b in batches for r in b)


def test_webdataset_stream_shards_split_across_ranks_and_workers(shards: Path) -> None:
    d = wds(shards)
    got = []
    for rank in range(2):
        s = d.stream("train", batch_size=2, seed=5, drop_last=True, rank=rank, world_size=2,
                     num_workers=2)
        got += [s.shards_for(3, w, 2) for w in range(2)]
        assert len(s) == 12  # 48 pairs / 2 ranks / batch 2
    assert all(len(x) == 1 for x in got)
    assert sorted(u for x in got for u in x) == sorted(
        str(shards / f"train-{i:03d}.tar") for i in range(4))
    with pytest.raises(mmfw.DataError, match="cannot feed"):
        d.stream("train", batch_size=2, seed=0, drop_last=True, world_size=2, num_workers=4)


def test_webdataset_stream_through_dataloader_workers_and_resume(shards: Path) -> None:
    d = wds(shards, shuffle_buffer=5)

    def run(position: int = 0) -> list[list[tuple[int, str]]]:
        s = d.stream("train", batch_size=3, seed=1, drop_last=True, num_workers=2)
        s.load_state_dict({"epoch": 2, "position": position})
        s.set_epoch(2)
        loader = DataLoader(s, batch_size=None, num_workers=2, collate_fn=lambda b: b)
        return [[(r.item, r.caption) for r in b] for b in loader]

    full = run()
    assert len(full) == 16
    flat = [p for b in full for p in b]
    assert len(set(flat)) == 48
    assert run(position=5) == full[5:]  # resumed mid-epoch: the same remaining batches


def test_webdataset_bad_samples_scanned_and_skipped(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    write_shard(d / "a.tar", 0, 4, bad={1: "no image", 2: "empty caption"})
    write_shard(d / "b.tar", 10, 4, bad={12: "corrupt"})
    ds = mmfw.create("dataset", "webdataset", train=str(d / "{a,b}.tar"))
    problems = ds.split("train").problems()
    got = sorted((p.where.rsplit("/", 1)[-1], p.reason.split(" (")[0]) for p in problems)
    assert got == [("a.tar: s00001", "sample has no image"), ("a.tar: s00002", "empty caption"),
                   ("b.tar: s00012", "cannot decode image")]
    s = ds.stream("train", batch_size=2, seed=0, drop_last=False)
    bad = [p.index for p in s.problems() if p.index is not None]
    s.without(bad)
    assert s.pairs == 2 * 5  # 8 samples, 3 bad
    rows = [r for b in s for r in b]
    assert all(r.problem is None for r in rows) and len(rows) == 10


def test_webdataset_remote_urls_stream_with_declared_length(shards: Path, monkeypatch) -> None:
    monkeypatch.setenv("MMFW_ALLOW_CODE", "1")  # a pipe: URL runs a command: allowed here
    url = f"pipe:cat {shards / 'train-000.tar'}"
    d = mmfw.create("dataset", "webdataset", train=url, test=str(shards / "test-000.tar"))
    with pytest.raises(mmfw.DataError, match="pairs_per_epoch"):
        d.stream("train", batch_size=2, seed=0, drop_last=True)
    d = mmfw.create("dataset", "webdataset", train=url, pairs_per_epoch=12)
    s = d.stream("train", batch_size=4, seed=0, drop_last=True)
    assert not s.scanned and s.problems() == []
    assert len(list(s)) == 3
    assert len(d.split("train")) == 6  # map-style: held in memory


def test_webdataset_indexed_mode_trains_with_any_sampler(shards: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "runs", run={"max_steps": 3},
                         data={"dataset": "webdataset", "mode": "indexed",
                               "train": str(shards / "train-{000..003}.tar"),
                               "test": str(shards / "test-000.tar")},
                         sampler={"name": "semantic-groups", "batch_size": 6},
                         eval={"val_split": ""})
    trainer = Trainer(load_recipe(strip_synthetic(recipe)), console=lambda s: None)
    assert len(trainer.data.pairs) == 48 and trainer.fit() == "max_steps"


def test_webdataset_streamed_training_in_the_engine(shards: Path, tmp_path: Path) -> None:
    said: list[str] = []
    recipe = tiny_recipe(tmp_path / "runs", run={"epochs": 2},
                         data={"dataset": "webdataset", "num_workers": 2,
                               "train": str(shards / "train-{000..003}.tar"),
                               "test": str(shards / "test-000.tar")},
                         sampler={"batch_size": 8}, eval={"val_split": ""})
    trainer = Trainer(load_recipe(strip_synthetic(recipe)), console=said.append)
    assert trainer.steps_per_epoch == 6
    assert trainer.fit() == "epochs" and trainer.step == 12
    assert "i2t_R@1" in trainer.ctx.evaluate("test")
    bad = tiny_recipe(tmp_path / "runs", name="b",
                      data={"dataset": "webdataset", "train": str(shards / "train-000.tar")},
                      sampler={"name": "balanced", "batch_size": 4})
    with pytest.raises(mmfw.RecipeError, match="needs a map-style"):
        Trainer(load_recipe(strip_synthetic(bad)), console=lambda s: None)


# the image cache --------------------------------------------------------------------------


def test_cache_fills_once_then_serves_without_decoding(tmp_path: Path, monkeypatch) -> None:
    from mmfw_data import images

    ann = karpathy(tmp_path, ["train"] * 6 + ["test"] * 2)
    cache = tmp_path / "cache"
    data = strip_synthetic(run_recipe(tmp_path, ann, cache=str(cache)))
    data["run"]["max_steps"] = 0
    data["run"]["epochs"] = 1
    data["eval"]["split"] = "test"
    trainer = Trainer(load_recipe(data), console=lambda s: None)
    trainer.fit()  # one epoch: every train image decoded once and cached
    files = sorted(p.name for p in cache.iterdir())
    assert len([f for f in files if f.endswith(".u8")]) == 2  # train and test
    train = trainer.data.source.prepared("train")
    assert train.cache is not None and train.cache.filled() == 6
    assert train.cache.size == (16, 16)  # the scratch-vision input size of the recipe
    item = train[0]
    assert item.image.dtype == torch.uint8 and tuple(item.image.shape) == (3, 16, 16)

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(images, "decode", no_decoding)
    for i in range(6):
        assert torch.equal(train[i].image, trainer.data.source.prepared("train")[i].image)
    # a new run with the same data finds the filled cache on disk
    data["run"]["name"] = "again"
    again = Trainer(load_recipe(data), console=lambda s: None)
    again.fit()


def test_cache_size_follows_the_encoder(tmp_path: Path) -> None:
    ann = karpathy(tmp_path, ["train"] * 4)
    data = strip_synthetic(run_recipe(tmp_path, ann, cache=str(tmp_path / "c")))
    data["model"]["vision"].update(image_size=32, patch_size=8)
    trainer = Trainer(load_recipe(data), console=lambda s: None)
    assert trainer.data.source.prepared("train").cache.size == (32, 32)
