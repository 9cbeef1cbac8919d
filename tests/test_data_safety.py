"""Data safety: the image cache made by several processes at once and on a full disk, which
rank writes skipped.jsonl, its rows on resume, and bad data when evaluating a run."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.config.recipe import load_recipe
from mmfw.data.datasource import BadData, Prepared, TrainingData
from mmfw.data.imagecache import ImageCache
from mmfw.spi.contracts import Item, Problem

# the image cache made by two processes at once --------------------------------------------

ROUNDS = 25  # fresh caches both processes make at the same moment (the race is per cache)
N, SIDE = 8, 16


class TinySplit:
    """A synthetic split of N random images, the same in every process (made without the
    plugin registry, which is slow to load in a fresh process)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Item:
        g = torch.Generator().manual_seed(1000 + i)
        image = torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8, generator=g)
        return Item(image, self.captions(i), 100 + i)

    def captions(self, i: int) -> list[str]:
        return [f"image {i}"]


def _race(folder: str, which: int, barrier, queue) -> None:
    """One process: make ROUNDS caches in step with the other, then fill half of the last one
    through ``Prepared`` and read every row back."""
    try:
        split = TinySplit()
        cache = None
        for r in range(ROUNDS):
            barrier.wait(timeout=60)
            cache = ImageCache(folder, f"synthetic-train-{r}", N, (SIDE, SIDE))
        prepared = Prepared(split)
        prepared.cache = cache
        for i in range(which, N, 2):  # each process decodes and caches its half
            prepared[i]
        barrier.wait(timeout=60)
        rows = []
        for i in range(N):
            hit = cache.get(i)
            assert hit is not None, f"row {i} not filled as seen by process {which}"
            rows.append(hashlib.sha256(hit[0].numpy().tobytes()).hexdigest())
        queue.put((which, "ok", rows))
    except BaseException as err:  # reported to the test, which names it
        barrier.abort()
        queue.put((which, "error", repr(err)))


def test_two_processes_make_the_same_cache_at_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    folder = str(tmp_path / "cache")
    procs = [ctx.Process(target=_race, args=(folder, w, barrier, queue)) for w in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = dict((w, (status, got)) for w, status, got in
                       (queue.get(timeout=90) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for w in (0, 1):
        assert results[w][0] == "ok", f"process {w}: {results[w][1]}"
    want = [hashlib.sha256(it.image.numpy().tobytes()).hexdigest()
            for it in (TinySplit()[i] for i in range(N))]
    assert results[0][1] == results[1][1] == want  # one set of files, every row from both
    names = os.listdir(folder)
    assert not [n for n in names if n.endswith(".tmp")], names
    assert sorted(n for n in names if n.endswith(".u8")) == sorted(
        f"synthetic-train-{r}.u8" for r in range(ROUNDS))


def test_cache_is_preallocated_and_reopened(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path, "k", 64, (32, 32))
    st = os.stat(cache.pixels_path)
    assert st.st_size == cache.nbytes
    assert st.st_blocks * 512 >= cache.nbytes  # disk reserved now, not when a page is written
    assert cache.marker_path.is_file()
    again = ImageCache(tmp_path, "k", 64, (32, 32))
    assert again.filled() == 0


def test_disk_full_when_making_the_cache_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_write(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    monkeypatch.setattr(os, "write", full_write)
    folder = tmp_path / "cache"
    with pytest.raises(mmfw.DataError) as err:
        ImageCache(folder, "k", 16, (32, 32))
    text = str(err.value)
    assert "\n" not in text and str(folder) in text and "disk is full" in text
    assert "data.cache" in text
    assert not list(folder.iterdir())  # no temp file, no half cache left behind


def test_a_damaged_cache_is_named_not_used(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path, "k", 4, (8, 8))
    with open(cache.pixels_path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(mmfw.DataError, match=r"k\.u8 is 10 bytes.*delete k\.\*"):
        ImageCache(tmp_path, "k", 4, (8, 8))


# skipped.jsonl: written by rank 0 only ----------------------------------------------------


def png(path: Path, i: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (20, 14), ((40 * i) % 256, 200 - 20 * i, 30 + 25 * i))
    img.paste((250, 10, 10), (2, 2, 6 + i, 8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def karpathy(root: Path, splits: list[str]) -> Path:
    images = []
    for i, split in enumerate(splits):
        png(root / "images" / f"{i:04d}.png", i)
        images.append({"filename": f"{i:04d}.png", "imgid": i, "split": split,
                       "sentences": [{"raw": f"picture {i} caption {c}"} for c in range(2)]})
    ann = root / "dataset_test.json"
    ann.write_text(json.dumps({"images": images, "dataset": "test"}))
    return ann


def recipe_dict(tmp_path: Path, ann: Path, **data) -> dict:
    d = tiny_recipe(tmp_path / "runs", run={"max_steps": 2, "epochs": 1},
                    data={"dataset": "karpathy", "annotations": str(ann),
                          "images": str(ann.parent / "images"), **data},
                    sampler={"batch_size": 2}, eval={"val_split": "", "split": "test"})
    for key in ("train_images", "val_images", "test_images", "image_size"):
        d["data"].pop(key)
    return d


def test_bad_data_of_a_non_main_rank_skips_but_writes_nothing(tmp_path: Path) -> None:
    problem = Problem("img/3.png", "cannot decode image", 3)
    rank1 = BadData("skip", tmp_path, lambda s: None, main=False)
    assert rank1.scan("train", [problem]) == [3]
    rank1.training("train", [problem])
    rank1.evaluation("train", problem)
    assert not (tmp_path / "skipped.jsonl").exists()


def test_training_data_of_rank_1_writes_no_skipped_jsonl(tmp_path: Path) -> None:
    ann = karpathy(tmp_path, ["train"] * 4 + ["test"] * 2)
    (tmp_path / "images" / "0001.png").write_bytes(b"not a png" * 10)
    recipe = load_recipe(recipe_dict(tmp_path, ann, on_bad="skip"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rank1 = TrainingData(recipe, run_dir, lambda s: None, rank=1, world_size=2)
    assert len(rank1.split) == 3  # the bad image is still left out
    assert not (run_dir / "skipped.jsonl").exists()
    rank0 = TrainingData(recipe, run_dir, lambda s: None, rank=0, world_size=2)
    assert len(rank0.split) == 3
    rows = [json.loads(x) for x in (run_dir / "skipped.jsonl").read_text().splitlines()]
    assert [r["when"] for r in rows] == ["scan"] and "0001.png" in rows[0]["where"]


# skipped.jsonl on resume ------------------------------------------------------------------


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_train_rows_carry_their_step_and_resume_drops_the_later_ones(tmp_path: Path) -> None:
    log = tmp_path / "skipped.jsonl"
    scan = Problem("a.png", "cannot decode image", 0)
    step = [0]
    first = BadData("skip", tmp_path, lambda s: None)
    first.step = lambda: step[0]
    first.scan("train", [scan])
    for at, name in ((0, "b.png"), (2, "c.png"), (5, "d.png")):  # read for steps 1, 3, 6
        step[0] = at
        first.training("train", [Problem(name, "cannot decode image", 1)])
    first.evaluation("test", Problem("e.png", "cannot decode image", 0))
    assert [r.get("step") for r in rows_of(log)] == [None, 1, 3, 6, None]
    # killed after the checkpoint of step 4; the resumed run scans again, then truncates
    resumed = BadData("skip", tmp_path, lambda s: None)
    resumed.scan("train", [scan])
    resumed.truncate(4)
    rows = rows_of(log)
    assert [(r["when"], r["where"]) for r in rows] == [
        ("train", "b.png"), ("train", "c.png"), ("eval", "e.png"), ("scan", "a.png")]
    # step 6 runs again and is logged once
    resumed.step = lambda: 5
    resumed.training("train", [Problem("d.png", "cannot decode image", 1)])
    assert [r["where"] for r in rows_of(log)].count("d.png") == 1


def test_truncate_drops_stale_scan_rows_and_tolerates_a_torn_line(tmp_path: Path) -> None:
    log = tmp_path / "skipped.jsonl"
    log.write_text(json.dumps({"when": "scan", "where": "old.png"}) + "\n"
                   + json.dumps({"when": "train", "where": "x.png", "step": 2}) + "\n"
                   + json.dumps({"when": "train", "where": "y.png"}) + "\n"
                   + '{"when": "train", "whe')
    said: list[str] = []
    resumed = BadData("skip", tmp_path, said.append)
    resumed.truncate(1)  # this run's scan found nothing: the old scan rows are stale
    assert [r["where"] for r in rows_of(log)] == ["y.png"]  # no step: kept
    assert any("torn last line" in s for s in said)
    rank1 = BadData("skip", tmp_path, said.append, main=False)
    rank1.truncate(0)
    assert [r["where"] for r in rows_of(log)] == ["y.png"]


# bad data when evaluating a run -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A run trained 2 steps on PNG files; returns (run directory, the test image to break)."""
    root = tmp_path_factory.mktemp("evalrun")
    ann = karpathy(root, ["train"] * 4 + ["test"] * 3)
    result = mmfw.train(load_recipe(recipe_dict(root, ann)), console=lambda s: None)
    assert result.steps == 2
    return result.run_dir, root / "images" / "0005.png"


def test_evaluating_bad_data_follows_on_bad(trained: tuple[Path, Path]) -> None:
    run_dir, image = trained
    keep = image.read_bytes()
    image.write_bytes(b"this is not an image at all" * 20)
    log = run_dir / "skipped.jsonl"
    log.unlink(missing_ok=True)
    try:
        with pytest.raises(mmfw.DataError) as err:
            mmfw.evaluate(run_dir)
        text = str(err.value)
        assert str(image) in text and "cannot decode image" in text
        assert "found before evaluating" in text and "--data on_bad=skip" in text
        assert not log.exists()

        said: list[str] = []
        metrics = mmfw.evaluate(run_dir, data=["on_bad=skip"], console=said.append)
        assert set(metrics) >= {"i2t_R@1", "rsum"}
        assert any("skipped 1 bad item(s) of the 'test' split" in s and str(image) in s
                   for s in said), said
        rows = rows_of(log)
        assert len(rows) == 1 and rows[0]["when"] == "eval" and rows[0]["split"] == "test"
        assert str(image) in rows[0]["where"]

        out = assert_user_error(cli("eval", run_dir), str(image), "cannot decode image")
        assert "bad data in the 'test' split" in out
    finally:
        image.write_bytes(keep)
