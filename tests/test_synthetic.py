"""The synthetic dataset and the random batch sampler."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmfw
from mmfw.contracts import DatasetSource, Item, Sampler, Split

RELATION_WORDS = ("left of", "right of", "above", "below", "left to right",
                  "on the left", "on the right", "on the top", "on the bottom", "at the top")


def synthetic(**options):
    defaults = {"train_images": 24, "val_images": 6, "test_images": 10, "image_size": 16}
    return mmfw.create("dataset", "synthetic", **{**defaults, **options})


@pytest.fixture(scope="module")
def medium():
    return synthetic(train_images=60, captions_per_image=4, difficulty="medium")


# the dataset ------------------------------------------------------------------------------


def test_contracts(medium) -> None:
    assert isinstance(medium, DatasetSource)
    assert set(medium.splits) == {"train", "val", "test"}
    split = medium.split("train")
    assert isinstance(split, Split)
    item = split[0]
    assert isinstance(item, Item)
    assert list(item.captions) == list(split.captions(0))


def test_deterministic_from_its_seed() -> None:
    a, b = synthetic(seed=3), synthetic(seed=3)
    for name in ("train", "val", "test"):
        sa, sb = a.split(name), b.split(name)
        assert torch.equal(sa.images, sb.images)
        assert [sa.captions(i) for i in range(len(sa))] == [sb.captions(i)
                                                            for i in range(len(sb))]


def test_different_seeds_differ() -> None:
    a, b = synthetic(seed=0).split("train"), synthetic(seed=1).split("train")
    assert not torch.equal(a.images, b.images)
    assert [a.captions(i) for i in range(len(a))] != [b.captions(i) for i in range(len(b))]


def test_splits_differ_from_each_other() -> None:
    d = synthetic(train_images=10, val_images=10, test_images=10)
    images = [d.split(n).images for n in ("train", "val", "test")]
    for x, y in itertools.combinations(images, 2):
        assert not torch.equal(x, y)


@pytest.mark.parametrize(("train", "val", "test"), [(7, 0, 3), (1, 2, 5)])
def test_split_sizes(train: int, val: int, test: int) -> None:
    d = synthetic(train_images=train, val_images=val, test_images=test)
    assert [len(d.split(n)) for n in ("train", "val", "test")] == [train, val, test]


def test_unknown_split() -> None:
    with pytest.raises(KeyError):
        synthetic().split("dev")


def test_image_ids_are_unique_across_splits() -> None:
    d = synthetic()
    ids = [d.split(n)[i].image_id for n in d.splits for i in range(len(d.split(n)))]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_every_image_has_its_captions(k: int) -> None:
    split = synthetic(captions_per_image=k).split("train")
    for i in range(len(split)):
        captions = split.captions(i)
        assert len(captions) == k
        assert all(isinstance(c, str) and c.strip() for c in captions)


def test_captions_name_every_shape_colour_and_kind(medium) -> None:
    split = medium.split("train")
    for i, shapes in enumerate(split.scenes):
        for caption in split.captions(i):
            for shape in shapes:
                assert shape.colour in caption, (caption, shape)
                assert shape.kind in caption, (caption, shape)


def test_multi_shape_captions_mention_relations(medium) -> None:
    split = medium.split("train")
    multi = [i for i, shapes in enumerate(split.scenes) if len(shapes) > 1]
    assert multi, "medium difficulty should draw some multi-shape scenes"
    for i in multi:
        for caption in split.captions(i):
            assert any(w in caption for w in RELATION_WORDS), caption
    # and the classic relation words are used across the split
    text = " ".join(c for i in multi for c in split.captions(i))
    for word in ("left of", "right of", "above", "below"):
        assert word in text


def test_captions_vary_in_wording(medium) -> None:
    split = medium.split("train")
    for i in range(len(split)):
        captions = split.captions(i)
        assert len(set(captions)) == len(captions)  # 4 captions, 7 templates: all distinct


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_difficulty_sets_the_number_of_shapes(difficulty: str) -> None:
    low, high = {"easy": (1, 2), "medium": (1, 3), "hard": (2, 4)}[difficulty]
    split = synthetic(train_images=30, difficulty=difficulty).split("train")
    counts = {len(s) for s in split.scenes}
    assert min(counts) >= low
    assert max(counts) <= high


@pytest.mark.parametrize("size", [16, 24])
def test_images_are_uint8_chw(size: int) -> None:
    split = synthetic(image_size=size).split("val")
    for i in range(len(split)):
        image = split[i].image
        assert image.dtype == torch.uint8
        assert tuple(image.shape) == (3, size, size)
        assert image.max() > image.min()  # something was drawn


def test_options_are_validated() -> None:
    with pytest.raises(mmfw.RecipeError):
        synthetic(captions_per_image=0)
    with pytest.raises(mmfw.RecipeError):
        synthetic(image_size=8)


# the random sampler -----------------------------------------------------------------------


def sampler(n: int, batch_size: int, seed: int = 0, drop_last: bool = False, ids=None):
    match_ids = list(range(n)) if ids is None else ids
    return mmfw.create("sampler", "random", match_ids=match_ids, batch_size=batch_size,
                       seed=seed, drop_last=drop_last)


def epoch(s, e: int) -> list[list[int]]:
    s.set_epoch(e)
    return [list(b) for b in s]


sizes = st.tuples(st.integers(1, 60), st.integers(1, 20))


def test_sampler_contract() -> None:
    s = sampler(10, 3, ids=[7, 7, 8, 8, 9, 9, 10, 10, 11, 11])
    assert isinstance(s, Sampler)
    assert s.match_ids == [7, 7, 8, 8, 9, 9, 10, 10, 11, 11]


@settings(max_examples=40)
@given(sizes, st.integers(0, 10_000), st.integers(0, 5))
def test_every_pair_once_per_epoch(size, seed, e) -> None:
    n, b = size
    s = sampler(n, b, seed)
    batches = epoch(s, e)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(n))
    assert len(batches) == len(s) == -(-n // b)
    assert all(len(batch) == b for batch in batches[:-1])
    assert 1 <= len(batches[-1]) <= b


@settings(max_examples=40)
@given(sizes, st.integers(0, 10_000))
def test_drop_last_gives_only_full_batches(size, seed) -> None:
    n, b = size
    s = sampler(n, b, seed, drop_last=True)
    batches = epoch(s, 0)
    assert len(batches) == len(s) == n // b
    assert all(len(batch) == b for batch in batches)
    flat = [i for batch in batches for i in batch]
    assert len(set(flat)) == len(flat)


@settings(max_examples=30)
@given(sizes, st.integers(0, 10_000), st.integers(0, 5))
def test_deterministic_for_a_seed(size, seed, e) -> None:
    n, b = size
    assert epoch(sampler(n, b, seed), e) == epoch(sampler(n, b, seed), e)


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_order_differs_across_epochs_and_seeds(seed: int) -> None:
    n, b = 40, 8
    s = sampler(n, b, seed)
    orders = [epoch(s, e) for e in range(3)]
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert epoch(sampler(n, b, seed + 1), 0) != orders[0]


def test_iterating_again_moves_to_the_next_epoch() -> None:
    s = sampler(30, 4, seed=5)
    first, second = list(s), list(s)
    assert first != second
    assert second == epoch(sampler(30, 4, seed=5), 1)


@settings(max_examples=50)
@given(sizes, st.integers(0, 10_000), st.integers(0, 3), st.booleans(), st.data())
def test_resume_mid_epoch_continues_with_the_remaining_batches(size, seed, e, drop_last,
                                                               data) -> None:
    n, b = size
    full = epoch(sampler(n, b, seed, drop_last), e)
    consumed = data.draw(st.integers(0, len(full)), label="consumed")
    s = sampler(n, b, seed, drop_last)
    s.set_epoch(e)
    it = iter(s)
    taken = [list(next(it)) for _ in range(consumed)]
    state = s.state_dict()

    resumed = sampler(n, b, seed, drop_last)
    resumed.load_state_dict(state)
    resumed.set_epoch(e)  # what the engine does at the top of every epoch
    rest = [list(batch) for batch in resumed]
    assert taken + rest == full
    # and the epoch after that is the one an uninterrupted sampler would give
    assert epoch(resumed, e + 1) == epoch(sampler(n, b, seed, drop_last), e + 1)


def test_resume_state_survives_json() -> None:
    import json

    s = sampler(20, 3, seed=2)
    s.set_epoch(4)
    it = iter(s)
    first = [next(it), next(it)]
    state = json.loads(json.dumps(s.state_dict()))
    resumed = sampler(20, 3, seed=2)
    resumed.load_state_dict(state)
    assert first + list(resumed) == epoch(sampler(20, 3, seed=2), 4)


def test_bad_batch_size() -> None:
    with pytest.raises((ValueError, mmfw.PluginError), match="batch_size"):
        sampler(10, 0)
