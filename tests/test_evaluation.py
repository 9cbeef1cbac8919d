"""Recall@K by the Karpathy convention, against a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfw.eval.retrieval import METRIC_KEYS, recall_at_k

KEYS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


def reference_recall(images: list[list[float]], texts: list[list[float]],
                     owner: list[int]) -> dict[str, float]:
    """Plain loops and full sorts: no top-k, no batching, no torch."""
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        hits = 0
        for i, img in enumerate(images):
            ranked = sorted(range(len(texts)), key=lambda j, img=img: -_cosine(img, texts[j]))
            if any(owner[j] == i for j in ranked[:k]):
                hits += 1
        out[f"i2t_R@{k}"] = 100.0 * hits / len(images)
    for k in (1, 5, 10):
        hits = 0
        for j, txt in enumerate(texts):
            ranked = sorted(range(len(images)), key=lambda i, txt=txt: -_cosine(images[i], txt))
            if owner[j] in ranked[:k]:
                hits += 1
        out[f"t2i_R@{k}"] = 100.0 * hits / len(texts)
    out["rsum"] = sum(out[key] for key in KEYS[:6])
    return out


@st.composite
def retrieval_problems(draw):
    n = draw(st.integers(1, 40))
    captions = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    dim = draw(st.integers(2, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    m = sum(captions)
    images = torch.randn(n, dim, generator=g, dtype=torch.float64)
    texts = torch.randn(m, dim, generator=g, dtype=torch.float64)
    owner = torch.tensor([i for i, c in enumerate(captions) for _ in range(c)])
    # captions are shuffled so that owners are not contiguous
    perm = torch.randperm(m, generator=g)
    return images, texts[perm], owner[perm]


def _assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == KEYS
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_metric_key_names() -> None:
    assert list(METRIC_KEYS) == KEYS
    g = torch.Generator().manual_seed(0)
    out = recall_at_k(torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g),
                      torch.tensor([0, 0, 1, 2, 3, 3]))
    assert list(out) == KEYS
    assert all(isinstance(v, float) for v in out.values())


@settings(max_examples=50)
@given(retrieval_problems())
def test_matches_brute_force_reference(problem) -> None:
    images, texts, owner = problem
    want = reference_recall(images.tolist(), texts.tolist(), owner.tolist())
    # float32 embeddings, as the evaluation receives them from a model
    _assert_same(recall_at_k(images.float(), texts.float(), owner), want)


@settings(max_examples=25)
@given(retrieval_problems(), st.integers(1, 7), st.floats(0.01, 100.0))
def test_chunking_and_scale_do_not_change_results(problem, chunk, scale) -> None:
    images, texts, owner = problem
    base = recall_at_k(images, texts, owner)
    assert recall_at_k(images * scale, texts, owner, chunk=chunk) == base


@settings(max_examples=25)
@given(retrieval_problems())
def test_rsum_and_ranges(problem) -> None:
    images, texts, owner = problem
    out = recall_at_k(images, texts, owner)
    assert out["rsum"] == pytest.approx(sum(out[k] for k in KEYS[:6]))
    for direction in ("i2t", "t2i"):
        r1, r5, r10 = (out[f"{direction}_R@{k}"] for k in (1, 5, 10))
        assert 0.0 <= r1 <= r5 <= r10 <= 100.0
    assert 0.0 <= out["rsum"] <= 600.0


@pytest.mark.parametrize(("n", "captions"), [(1, 1), (3, 2), (12, 5), (30, 1)])
def test_perfect_embeddings_score_100(n: int, captions: int) -> None:
    g = torch.Generator().manual_seed(n)
    images = torch.randn(n, 8, generator=g)
    owner = torch.arange(n).repeat_interleave(captions)
    texts = images[owner] * 3.0  # same directions, other norms
    out = recall_at_k(images, texts, owner)
    assert all(out[k] == 100.0 for k in KEYS[:6])
    assert out["rsum"] == 600.0


def _at(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_hand_built_three_images() -> None:
    """Unit vectors at angles; cosine similarity falls with the angle between them.

    images: I0 at 0, I1 at 90, I2 at 180 degrees.
    captions (angle, owner): c0 (10, 0), c1 (290, 0), c2 (60, 1), c3 (125, 1), c4 (100, 2),
    c5 (200, 2).

    i2t, nearest caption: I0 -> c0 (10 deg away, owner 0: hit); I1 -> c4 (10 away, owner 2:
    miss; its own c2 is second); I2 -> c5 (20 away: hit). R@1 = 2/3. Any 5 of the 6 captions
    hold one of each image's two captions, so R@5 = R@10 = 100.
    t2i, nearest image: c0 -> I0 hit, c1 (70 from I0, 110 from I2) -> I0 hit, c2 -> I1 hit,
    c3 (35 from I1, 55 from I2) -> I1 hit, c4 (10 from I1) -> I1 miss, c5 -> I2 hit:
    R@1 = 5/6. Three images: R@5 = R@10 = 100.
    """
    images = torch.tensor([_at(0), _at(90), _at(180)])
    texts = torch.tensor([_at(a) for a in (10, 290, 60, 125, 100, 200)])
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    want = {
        "i2t_R@1": 100 * 2 / 3,
        "i2t_R@5": 100.0,
        "i2t_R@10": 100.0,
        "t2i_R@1": 100 * 5 / 6,
        "t2i_R@5": 100.0,
        "t2i_R@10": 100.0,
    }
    want["rsum"] = sum(want.values())
    out = recall_at_k(images, texts, owner)
    _assert_same(out, want)
    _assert_same(out, reference_recall(images.tolist(), texts.tolist(), owner.tolist()))


def test_hand_built_recall_at_5_and_10() -> None:
    """Twelve images on a circle, 30 degrees apart; caption j belongs to image j.

    Caption j sits at 30 * (j + s_j) - 1 degrees for a shift s_j. Seen from the caption, the
    images lie 1, 29, 31, 59, 61, ... degrees away; its own image (s_j steps back) is
    30 * s_j - 1 away, so 2 * s_j - 1 images are nearer and its rank is 2 * s_j (rank 1 for
    s_j = 0, where it sits exactly on its image).
    Shifts (0, 1, 2, 3, 5, 6, 0, 0, 0, 0, 0, 0) give ranks (1, 2, 4, 6, 10, 12, 1, ...):
    t2i R@1 = 7/12 (the seven zero shifts), R@5 = 9/12 (+ ranks 2 and 4), R@10 = 11/12
    (+ ranks 6 and 10; rank 12 never counts).
    """
    shifts = [0, 1, 2, 3, 5, 6, 0, 0, 0, 0, 0, 0]
    images = torch.tensor([_at(30 * i) for i in range(12)], dtype=torch.float64)
    texts = torch.tensor([_at(30 * (j + s) - (1 if s else 0)) for j, s in enumerate(shifts)],
                         dtype=torch.float64)
    owner = torch.arange(12)
    out = recall_at_k(images, texts, owner)
    assert out["t2i_R@1"] == pytest.approx(100 * 7 / 12)
    assert out["t2i_R@5"] == pytest.approx(100 * 9 / 12)
    assert out["t2i_R@10"] == pytest.approx(100 * 11 / 12)
    _assert_same(out, reference_recall(images.tolist(), texts.tolist(), owner.tolist()))


def test_query_counts_are_images_for_i2t_and_captions_for_t2i() -> None:
    """One image with 4 captions, one with 1: i2t counts images, t2i counts captions."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 0's captions all point at image 1's direction except one; image 1's caption too
    texts = torch.tensor([[0.1, 1.0], [0.2, 1.0], [0.3, 1.0], [1.0, 0.05], [0.0, 1.0]])
    owner = torch.tensor([0, 0, 0, 0, 1])
    out = recall_at_k(images, texts, owner)
    # i2t R@1: image 0's nearest caption is [1, 0.05] (its own) -> hit; image 1's nearest
    # caption is [0, 1] (its own) -> hit
    assert out["i2t_R@1"] == 100.0
    # t2i R@1: captions 0..2 are nearer image 1 -> 3 misses of 5
    assert out["t2i_R@1"] == pytest.approx(100 * 2 / 5)
    assert out["t2i_R@5"] == 100.0
