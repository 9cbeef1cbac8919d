"""The batch samplers: what each promises per epoch, ids, determinism, resume, rank shards."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mmfw
from mmfw.contracts import Sampler

NAMES = ("random", "semantic-groups", "balanced", "curriculum")

#: captions per image: a dataset shape (image i owns c_i consecutive pairs)
shapes = st.lists(st.integers(1, 7), min_size=1, max_size=25)


def ids_of(counts: list[int]) -> list[int]:
    return [i for i, c in enumerate(counts) for _ in range(c)]


def texts_of(ids: list[int]) -> list[str]:
    return [" ".join(["word"] * (1 + (k * 7) % 23)) for k in range(len(ids))]


def make(name: str, ids: list[int], batch_size: int, *, seed: int = 0, drop_last: bool = False,
         rank: int = 0, world_size: int = 1, groups=None, **options):
    return mmfw.create("sampler", name, match_ids=ids, batch_size=batch_size, seed=seed,
                       drop_last=drop_last, texts=texts_of(ids), groups=groups, rank=rank,
                       world_size=world_size, **options)


def epoch(s, e: int) -> list[list[int]]:
    s.set_epoch(e)
    return [list(b) for b in s]


@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str) -> None:
    ids = ids_of([3, 2, 5, 1])
    s = make(name, ids, 4)
    assert isinstance(s, Sampler)
    assert len(s.match_ids) == len(ids)
    assert s.state_dict() == {"epoch": 0, "position": 0}
    assert len(epoch(s, 0)) == len(s)


@pytest.mark.parametrize("name", NAMES)
def test_context_is_checked(name: str) -> None:
    with pytest.raises(mmfw.PluginError, match="rank"):
        make(name, ids_of([2, 2]), 2, rank=2, world_size=2)
    with pytest.raises(mmfw.PluginError, match="batch_size"):
        make(name, ids_of([2, 2]), 0)


# every pair once per epoch (random, semantic-groups) -------------------------------------


@settings(max_examples=40)
@given(shapes, st.integers(1, 12), st.integers(1, 4), st.integers(0, 999), st.integers(0, 4))
def test_semantic_groups_every_pair_once(counts, b, k, seed, e) -> None:
    ids = ids_of(counts)
    k = min(k, b)
    s = make("semantic-groups", ids, b, seed=seed, k=k)
    batches = epoch(s, e)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(ids)))
    assert len(batches) == len(s) == -(-len(ids) // b)
    assert all(len(batch) == b for batch in batches[:-1])
    assert s.match_ids == ids  # by image: the dataset's ids, unchanged


@settings(max_examples=40)
@given(st.integers(1, 12), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
       st.integers(0, 999))
def test_semantic_groups_keep_groups_whole(n_images, per_image, k, groups_per_batch, seed):
    """When every image's captions split into whole groups of k and k divides the batch,
    every batch holds each of its ids a multiple of k times: no group is ever cut."""
    counts = [per_image * k] * n_images
    ids = ids_of(counts)
    b = groups_per_batch * k
    for batch in epoch(make("semantic-groups", ids, b, seed=seed, k=k), 0):
        for count in Counter(ids[i] for i in batch).values():
            assert count % k == 0


@settings(max_examples=40)
@given(shapes, st.integers(2, 12), st.integers(0, 999))
def test_semantic_groups_give_positives(counts, b, seed) -> None:
    """Groups are cut only at batch ends where nothing fits: at most one cut per batch, and
    every pair of an image with >= k captions has a positive partner except cut ones."""
    ids = ids_of(counts)
    k = 2
    batches = epoch(make("semantic-groups", ids, b, seed=seed, k=k), 0)
    lonely = 0
    for batch in batches:
        seen = Counter(ids[i] for i in batch)
        lonely += sum(1 for i in batch if seen[ids[i]] == 1 and counts[ids[i]] >= k)
    # an image with c captions forms c // k whole groups and one remainder; only remainders
    # (odd c) and cut groups leave a pair alone
    remainders = sum(1 for c in counts if c >= k and c % k)
    assert lonely <= remainders + 2 * len(batches)


def test_semantic_groups_by_group_merge_ids() -> None:
    ids = ids_of([2, 2, 2, 2])
    groups = ["cat", "cat", "cat", "cat", None, None, "dog", "dog"]
    s = make("semantic-groups", ids, 4, groups=groups, by="group")
    m = s.match_ids
    assert m[0] == m[1] == m[2] == m[3]  # images 0 and 1 share a key: one id
    assert m[4] == m[5] != m[0]  # no key: the image's own id
    assert m[6] == m[7] not in (m[0], m[4])
    flat = sorted(i for batch in epoch(s, 0) for i in batch)
    assert flat == list(range(8))


def test_semantic_groups_by_group_needs_groups() -> None:
    with pytest.raises(mmfw.PluginError, match="group"):
        make("semantic-groups", ids_of([2, 2]), 2, by="group")


# balanced ---------------------------------------------------------------------------------


@settings(max_examples=40)
@given(shapes, st.integers(1, 4), st.integers(4, 12), st.integers(0, 999), st.integers(0, 5))
def test_balanced_every_image_once_with_p_captions(counts, p, b, seed, e) -> None:
    ids = ids_of(counts)
    s = make("balanced", ids, b, seed=seed, positives=p)
    flat = [i for batch in epoch(s, e) for i in batch]
    assert len(flat) == len(set(flat))  # no pair twice
    per_image = Counter(ids[i] for i in flat)
    assert per_image == {img: min(p, c) for img, c in enumerate(counts)}
    assert len(flat) == sum(min(p, c) for c in counts)


def test_balanced_rotates_captions_across_epochs() -> None:
    counts = [5, 5, 3]
    ids = ids_of(counts)
    s = make("balanced", ids, 6, positives=2)
    seen: set[int] = set()
    for e in range(3):  # ceil(5 / 2) epochs show every caption
        seen.update(i for batch in epoch(s, e) for i in batch)
    assert seen == set(range(len(ids)))


def test_balanced_batches_hold_positives_together() -> None:
    ids = ids_of([4] * 12)
    for batch in epoch(make("balanced", ids, 6, positives=2), 0):
        assert all(c == 2 for c in Counter(ids[i] for i in batch).values())


# curriculum -------------------------------------------------------------------------------


def test_curriculum_difficulty_follows_the_seed() -> None:
    texts = ["a dog", " ".join(["w"] * 10), " ".join(["w"] * 40)]
    s = mmfw.create("sampler", "curriculum", match_ids=[0, 1, 2], batch_size=1, seed=0,
                    drop_last=False, texts=texts)
    assert s.difficulty.tolist() == pytest.approx([0.3 + 0.7 * 2 / 20, 0.3 + 0.7 * 10 / 20, 1.0])


def test_curriculum_weights_change_each_epoch_until_all_are_equal() -> None:
    ids = list(range(60))
    texts = [" ".join(["w"] * (1 + k % 30)) for k in ids]
    s = mmfw.create("sampler", "curriculum", match_ids=ids, batch_size=10, seed=0,
                    drop_last=False, texts=texts, ramp_epochs=4, hard_weight=0.1)
    full = [int((s.weights(e) == 1).sum()) for e in range(6)]
    assert full == sorted(full) and full[0] < full[2] < full[4]
    assert full[4] == full[5] == 60  # past the ramp: every caption at full weight


def test_curriculum_draws_easy_captions_more_early_on() -> None:
    ids = list(range(200))
    texts = ["short one" if k % 2 else " ".join(["long"] * 25) for k in ids]
    s = mmfw.create("sampler", "curriculum", match_ids=ids, batch_size=20, seed=3,
                    drop_last=False, texts=texts, hard_weight=0.2, ramp_epochs=10)
    drawn = [i for batch in epoch(s, 0) for i in batch]
    assert len(drawn) == 200
    easy = sum(1 for i in drawn if i % 2)
    assert easy > 0.7 * len(drawn)  # weights 1 vs 0.2: about 83% easy
    late = [i for batch in epoch(s, 10) for i in batch]
    assert 0.35 * 200 < sum(1 for i in late if i % 2) < 0.65 * 200


def test_curriculum_rarity() -> None:
    texts = ["a dog runs"] * 5 + ["zebra quokka axolotl"]
    s = mmfw.create("sampler", "curriculum", match_ids=list(range(6)), batch_size=2, seed=0,
                    drop_last=False, texts=texts, difficulty="rarity")
    assert s.difficulty[5] == pytest.approx(1.0)
    assert s.difficulty[0] == pytest.approx(0.3)


def test_curriculum_needs_texts() -> None:
    with pytest.raises(mmfw.PluginError, match="captions"):
        mmfw.create("sampler", "curriculum", match_ids=[0, 1], batch_size=1)


# shared promises --------------------------------------------------------------------------


@settings(max_examples=25)
@given(st.sampled_from(NAMES), shapes, st.integers(2, 9), st.integers(0, 999),
       st.integers(0, 4))
def test_deterministic_and_epochs_differ(name, counts, b, seed, e) -> None:
    ids = ids_of(counts)
    a = epoch(make(name, ids, b, seed=seed), e)
    assert a == epoch(make(name, ids, b, seed=seed), e)


@pytest.mark.parametrize("name", NAMES)
def test_order_changes_with_epoch_and_seed(name: str) -> None:
    ids = ids_of([3] * 20)
    s = make(name, ids, 6, seed=1)
    assert epoch(s, 0) != epoch(s, 1)
    assert epoch(make(name, ids, 6, seed=2), 0) != epoch(s, 0)


@settings(max_examples=40)
@given(st.sampled_from(NAMES), shapes, st.integers(2, 9), st.integers(0, 999),
       st.integers(0, 3), st.booleans(), st.integers(1, 3), st.data())
def test_resume_mid_epoch(name, counts, b, seed, e, drop_last, world, data) -> None:
    ids = ids_of(counts)
    rank = data.draw(st.integers(0, world - 1), label="rank")
    kw = dict(seed=seed, drop_last=drop_last, rank=rank, world_size=world)
    full = epoch(make(name, ids, b, **kw), e)
    consumed = data.draw(st.integers(0, len(full)), label="consumed")
    s = make(name, ids, b, **kw)
    s.set_epoch(e)
    it = iter(s)
    taken = [list(next(it)) for _ in range(consumed)]
    state = json.loads(json.dumps(s.state_dict()))  # it goes through a JSON checkpoint
    resumed = make(name, ids, b, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(e)  # what the engine does at the top of every epoch
    assert taken + [list(x) for x in resumed] == full
    assert epoch(resumed, e + 1) == epoch(make(name, ids, b, **kw), e + 1)


@settings(max_examples=40)
@given(st.sampled_from(NAMES), shapes, st.integers(2, 6), st.integers(2, 4), st.booleans(),
       st.integers(0, 999))
def test_rank_shards_are_disjoint_and_cover_the_plan(name, counts, b, world, drop_last, seed):
    ids = ids_of(counts)
    kw = dict(seed=seed, drop_last=drop_last)
    plan = epoch(make(name, ids, b, **kw), 0)
    shards = [epoch(make(name, ids, b, rank=r, world_size=world, **kw), 0)
              for r in range(world)]
    assert len({len(sh) for sh in shards}) == 1  # every rank steps equally often
    assert all(len(sh) == len(make(name, ids, b, rank=0, world_size=world, **kw))
               for sh in shards)
    # batch j of rank r is plan batch j * world + r: disjoint, in order
    positions = [j * world + r for r in range(world) for j in range(len(shards[r]))]
    got = [shards[r][j] for r in range(world) for j in range(len(shards[r]))]
    assert got == [plan[p % len(plan)] for p in positions] if plan else got == []
    unique = {p for p in positions if p < len(plan)}
    if drop_last:
        assert len(unique) == len(positions)  # disjoint
        assert len(plan) - len(unique) < world  # at most world - 1 tail batches left out
    else:
        assert unique == set(range(len(plan)))  # every batch of the plan somewhere


@pytest.mark.parametrize("name", NAMES)
def test_samplers_train_end_to_end_in_the_engine(name: str, tmp_path) -> None:
    """The engine hands every sampler its context and trains a step with it."""
    from helpers import tiny_recipe
    from mmfw.config.recipe import load_recipe
    from mmfw.train.loop import Trainer

    recipe = load_recipe(tiny_recipe(tmp_path, name=name, run={"max_steps": 2},
                                     data={"train_images": 16, "val_images": 0,
                                           "test_images": 8},
                                     sampler={"name": name, "batch_size": 8},
                                     eval={"val_split": ""}))
    trainer = Trainer(recipe, console=lambda s: None)
    assert trainer.fit() == "max_steps"
    assert trainer.step == 2
