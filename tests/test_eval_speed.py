"""The evaluation loader: ``embed_split`` reads images in DataLoader workers (``data.num_workers``),
hands them over as uint8 (``data.uint8``) and fills or reads ``data.cache``, and gives the
embeddings the one-by-one loop gave, bit for bit; an image that fails to load in a worker
follows ``data.on_bad`` like one that fails in the main process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.config.recipe import load_recipe
from mmfw.data.augment import encoder_input_size
from mmfw.data.datasource import BadData, CheckedSource
from mmfw.eval.retrieval import CHUNK, device_context, embed_split
from mmfw.model import build_model

TEST_IMAGES = 40  # batches of 36 from workers' chunks of CHUNK: one joined, one cut short
BATCH = 36
assert CHUNK < BATCH < TEST_IMAGES


@torch.no_grad()
def one_by_one(model: Any, split: Any, batch_size: int) -> tuple[torch.Tensor, ...]:
    """The loop ``embed_split`` ran before it had a loader: each image read and preprocessed
    in this process, one after the other (the reference the loader must match)."""
    model.eval()
    n = len(split)
    captions = [c for i in range(n) for c in split.captions(i)]
    owner = [i for i in range(n) for _ in split.captions(i)]
    with device_context("cpu")():  # embed_split's default: the cpu backend's kernels
        imgs = [model.encode_image(torch.stack([model.vision.preprocess(split[i].image)
                                                for i in range(s, min(s + batch_size, n))]
                                               )).float()
                for s in range(0, n, batch_size)]
        txts = [model.encode_text(model.text.tokenize(captions[s:s + batch_size])).float()
                for s in range(0, len(captions), batch_size)]
    return torch.cat(imgs), torch.cat(txts), torch.tensor(owner)


def image_bytes(i: int, fmt: str) -> bytes:
    """A small picture of its own size and colours (sizes vary, so every one is resized)."""
    g = torch.Generator().manual_seed(i)
    h, w = 14 + i % 9, 18 + (3 * i) % 11
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
    img = Image.fromarray(pixels.numpy())
    if i % 7 == 3:
        img = img.convert("L")  # a greyscale file: decoded to RGB like the others
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def name(i: int) -> str:
    return f"{i:04d}.{'jpg' if i % 2 else 'png'}"


def karpathy(root: Path, train: int, test: int) -> Path:
    """A Karpathy split file and its PNG and JPEG files (odd items JPEG)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(train + test):
        (root / "images" / name(i)).write_bytes(image_bytes(i, "JPEG" if i % 2 else "PNG"))
        rows.append({"filename": name(i), "imgid": i, "split": "train" if i < train else "test",
                     "sentences": [{"raw": f"picture {i} number {c} of {i % 5}"}
                                   for c in range(2)]})
    ann = root / "dataset_test.json"
    ann.write_text(json.dumps({"images": rows, "dataset": "test"}))
    return ann


def recipe_for(root: Path, ann: Path, **data: Any) -> dict[str, Any]:
    d = tiny_recipe(root / "runs", run={"max_steps": 2, "epochs": 1},
                    data={"dataset": "karpathy", "annotations": str(ann),
                          "images": str(ann.parent / "images"), **data},
                    sampler={"batch_size": 4}, eval={"val_split": "", "split": "test",
                                                     "batch_size": BATCH})
    for key in ("train_images", "val_images", "test_images", "image_size"):
        d["data"].pop(key)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Any]:
    """(folder, annotation file, a tiny model whose tokenizer knows the captions)."""
    root = tmp_path_factory.mktemp("evalspeed")
    ann = karpathy(root, 4, TEST_IMAGES)
    recipe = load_recipe(recipe_for(root, ann))
    model = build_model(recipe.model)
    rows = json.loads(ann.read_text())["images"]
    model.text.prepare([s["raw"] for r in rows for s in r["sentences"]])
    return root, ann, model.eval()


def view(root: Path, ann: Path, on_bad: str = "error", log: Path | None = None,
         say: Callable[[str], None] = lambda s: None, **data: Any) -> tuple[Any, Any]:
    """The test split as ``mmfw eval`` reads it (scanned, bad data by ``on_bad``)."""
    recipe = load_recipe(recipe_for(root, ann, on_bad=on_bad, **data))
    source = CheckedSource(mmfw.create("dataset", "karpathy",
                                       options=recipe.data.dataset.options),
                           recipe, BadData(on_bad, log, say, evaluating=True))
    return source, source.split("test")


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    assert [t.shape for t in got] == [t.shape for t in want]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_workers_uint8_and_cache_give_the_one_by_one_embeddings(files, tmp_path, capsys
                                                                ) -> None:
    root, ann, model = files
    raw = mmfw.create("dataset", "karpathy", annotations=str(ann),
                      images=str(ann.parent / "images")).split("test")
    want = one_by_one(model, raw, BATCH)
    assert want[0].shape[0] == TEST_IMAGES and not torch.equal(want[0][0], want[0][1])

    # the cache filled by two workers handing over uint8 pixels, then read back in-process
    source, split = view(root, ann, cache=str(tmp_path / "cache"))
    source.use_cache(encoder_input_size(model.vision.preprocess))
    assert split.cache.filled() == 0
    assert_same(embed_split(model, split, batch_size=BATCH, num_workers=2, uint8=True,
                            progress=True), want)
    assert split.cache.filled() == TEST_IMAGES  # workers wrote every row of the shared file
    assert_same(embed_split(model, split, batch_size=BATCH, uint8=True), want)
    # no cache, float pixels from the workers
    assert_same(embed_split(model, view(root, ann)[1], batch_size=BATCH, num_workers=2), want)
    assert capsys.readouterr().err == ""  # no bar off a terminal, even with progress


def test_synthetic_split_and_max_images(files) -> None:
    model = build_model(load_recipe(tiny_recipe("/unused")).model).eval()
    split = mmfw.create("dataset", "synthetic", train_images=1, val_images=0, test_images=70,
                        image_size=16).split("test")
    model.text.prepare([c for i in range(len(split)) for c in split.captions(i)])
    want = one_by_one(model, split, 64)
    assert_same(embed_split(model, split, batch_size=64, uint8=True), want)
    img, txt, owner = embed_split(model, split, batch_size=64, num_workers=3, max_images=33)
    assert torch.equal(img, one_by_one(model, _First(split, 33), 64)[0])
    assert torch.equal(owner, want[2][want[2] < 33]) and txt.shape[0] == owner.shape[0]


class _First:
    """The first ``n`` items of a split (for the reference of ``max_images``)."""

    def __init__(self, split: Any, n: int) -> None:
        self.split, self.n = split, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.split[i]

    def captions(self, i: int) -> Any:
        return self.split.captions(i)


@contextlib.contextmanager
def broken(images: Path, *items: int) -> Any:
    """Items' files made bad on disk: odd ones truncated JPEGs, even ones zero-byte PNGs."""
    keep = {i: (images / name(i)).read_bytes() for i in items}
    try:
        for i in items:
            data = keep[i]
            (images / name(i)).write_bytes(data[:len(data) // 2] if i % 2 else b"")
        yield [str(images / name(i)) for i in items]
    finally:
        for i, data in keep.items():
            (images / name(i)).write_bytes(data)


def test_an_image_failing_in_a_worker_follows_on_bad(files, tmp_path) -> None:
    """Files that break after the scan (which would have caught them) fail inside a worker:
    ``error`` raises the policy's DataError naming the file, ``skip`` logs it and a blank
    stands in, exactly as when the main process reads them."""
    root, ann, model = files
    images = ann.parent / "images"
    first, second = 4 + 9, 4 + 34  # a JPEG in the first chunk, a PNG in the second
    said: list[str] = []
    log = tmp_path / "run"
    log.mkdir()
    # both views scanned while the files were good
    split, skipping = view(root, ann)[1], view(root, ann, "skip", log, said.append)[1]
    with broken(images, first, second) as paths:
        with pytest.raises(mmfw.DataError) as err:
            embed_split(model, split, batch_size=BATCH, num_workers=2, uint8=True)
        text = str(err.value)
        assert text.startswith("bad data while evaluating the 'test' split: " + paths[0])
        assert "Traceback" not in text and "worker" not in text
        # a split of another kind: its own DataError, raised here, not the worker's exception
        raw = mmfw.create("dataset", "karpathy", annotations=str(ann),
                          images=str(images)).split("test")
        with pytest.raises(mmfw.DataError) as err:
            embed_split(model, raw, batch_size=BATCH, num_workers=2)
        assert str(err.value).startswith(paths[0] + ": cannot decode image")
        assert "Traceback" not in str(err.value)

        got = embed_split(model, skipping, batch_size=BATCH, num_workers=2, uint8=True)
        assert len(said) == 2 and all(p in s and "a blank image stands in" in s
                                      for p, s in zip(paths, said)), said
        rows = [json.loads(line) for line in (log / "skipped.jsonl").read_text().splitlines()]
        assert [r["where"] for r in rows] == paths and {r["when"] for r in rows} == {"eval"}
        assert_same(got, one_by_one(model, skipping, BATCH))  # blanks, in this process


@pytest.fixture(scope="module")
def run_dir(files) -> Path:
    root, ann, _ = files
    d = recipe_for(root, ann, num_workers=0)
    d["run"]["max_steps"] = 1
    d["diagnostics"] = {"map_points": 0}  # no embedding plots: evaluation is what is tested
    result = mmfw.train(load_recipe(d), console=lambda s: None)
    return result.run_dir


def test_evaluating_a_run_with_workers_and_bad_files(files, run_dir) -> None:
    """`mmfw eval` with two workers and the cache: the same metrics as in-process; a truncated
    JPEG and an empty PNG are named (error) or left out (skip), never a traceback."""
    root, ann, _ = files
    plain = mmfw.evaluate(run_dir, data=["num_workers=0"])
    assert json.loads((run_dir / "metrics.json").read_text()) == plain
    cache = f"cache={root / 'evalcache'}"
    assert mmfw.evaluate(run_dir, data=["num_workers=2", cache]) == plain
    assert mmfw.evaluate(run_dir, data=["num_workers=2", cache]) == plain  # from the cache
    assert any((root / "evalcache").glob("*.filled"))
    with broken(ann.parent / "images", 4 + 5, 4 + 12) as paths:
        out = assert_user_error(cli("eval", run_dir, "--data", "num_workers=2"), *paths)
        assert "cannot decode image" in out and "image file is empty" in out
        said: list[str] = []
        metrics = mmfw.evaluate(run_dir, data=["num_workers=2", "on_bad=skip"],
                                console=said.append)
        assert set(metrics) == set(plain)
        assert any("skipped 2 bad item(s)" in s and all(p in s for p in paths) for s in said)


class DiesInAWorker:
    """A split whose images kill the worker process reading them (as the kernel's OOM killer
    would); read in the main process it is an ordinary split."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Any:
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.split[i]

    def captions(self, i: int) -> Any:
        return self.split.captions(i)


def test_a_worker_that_dies_is_one_clear_error(files) -> None:
    _, ann, model = files
    raw = mmfw.create("dataset", "karpathy", annotations=str(ann),
                      images=str(ann.parent / "images")).split("test")
    with pytest.raises(mmfw.MmfwError, match=r"evaluation loader worker died .*"
                       r"data\.num_workers.*num_workers=0"):
        embed_split(model, DiesInAWorker(raw), batch_size=BATCH, num_workers=2)
