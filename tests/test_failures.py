"""The failure browser's ranking (mmfw.tools.failures): worst queries both ways, without a model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmfw.eval.retrieval import KS, recall_at_k
from mmfw.tools.failures import i2t_ranks, t2i_ranks, worst, worst_queries

# Four images on the axes of R^4 and five captions, each a permutation of (1, 2, 3, 4): every
# caption has norm sqrt(30), so the cosine of caption j and image i is t[j][i] / sqrt(30) and
# the ranks below can be read off the table (ties are equal floats: both sides are exact).
IMAGES = torch.eye(4)
TEXTS = torch.tensor([[4.0, 3, 2, 1],   # image 0's: its image first           -> t2i rank 1
                      [1.0, 4, 3, 2],   # image 0's: images 1, 2, 3 beat it     -> t2i rank 4
                      [3.0, 2, 4, 1],   # image 1's: images 2, 0 beat it        -> t2i rank 3
                      [1.0, 2, 3, 4],   # image 2's: image 3 beats it           -> t2i rank 2
                      [2.0, 1, 3, 4]])  # image 3's: its image first           -> t2i rank 1
OWNER = torch.tensor([0, 0, 1, 2, 3])
# image -> text, a column of TEXTS each: image 0 scores (4,1,3,1,2), its caption 0 is first
# (rank 1); image 1 (3,4,2,2,1): its caption 2 (2) is beaten by 3 and 4 (rank 3); image 2
# (2,3,4,3,3): its caption 3 (3) is beaten only by 4, the other 3s tie (rank 2); image 3
# (1,2,1,4,4): its caption 4 ties with caption 3 for first (rank 1).
I2T_RANKS = [1, 3, 2, 1]
T2I_RANKS = [1, 4, 3, 2, 1]


def test_ranks_of_hand_made_embeddings() -> None:
    ranks, truth = i2t_ranks(IMAGES, TEXTS, OWNER)
    assert ranks.tolist() == I2T_RANKS
    assert truth.tolist() == [0, 2, 3, 4]
    assert t2i_ranks(IMAGES, TEXTS, OWNER).tolist() == T2I_RANKS
    for chunk in (1, 2, 3):  # the similarity matrix in row chunks gives the same ranks
        assert i2t_ranks(IMAGES, TEXTS, OWNER, chunk)[0].tolist() == I2T_RANKS
        assert t2i_ranks(IMAGES, TEXTS, OWNER, chunk).tolist() == T2I_RANKS


def test_worst_queries_of_hand_made_embeddings() -> None:
    found = worst_queries(IMAGES, TEXTS, OWNER, count=2, k=2)
    assert [f.query for f in found.i2t] == [1, 2]
    assert [f.query for f in found.t2i] == [1, 2]
    first = found.i2t[0]  # image 1: captions 1 (4) and 0 (3) lead, neither is its own
    assert (first.rank, first.truth, first.top, first.correct) == (3, 2, (1, 0), (False, False))
    assert first.scores == pytest.approx((4 / math.sqrt(30), 3 / math.sqrt(30)))
    assert first.truth_score == pytest.approx(2 / math.sqrt(30))
    tied = found.i2t[1]  # image 2: caption 2 (4) leads; its caption 3 ties with 1 and 4 (3)
    assert (tied.rank, tied.top, tied.correct) == (2, (2, 3), (False, True))  # shown 2nd
    caption = found.t2i[0]  # caption 1: images 1 (4) and 2 (3) lead; its image 0 scores 1
    assert (caption.rank, caption.truth, caption.top, caption.correct) == (
        4, 0, (1, 2), (False, False))
    assert caption.truth_score == pytest.approx(1 / math.sqrt(30))
    # a query that is a hit shows its correct candidates as such
    everything = worst_queries(IMAGES, TEXTS, OWNER, count=10, k=4)
    assert len(everything.i2t) == 4 and len(everything.t2i) == 5  # count beyond the split
    image0 = next(f for f in everything.i2t if f.query == 0)
    assert image0.top[0] == 0 and image0.correct[0] and image0.rank == 1
    assert worst_queries(IMAGES, TEXTS, OWNER, count=0).i2t == []


def test_worst_orders_by_rank_then_row() -> None:
    assert worst(torch.tensor([2, 5, 5, 1, 7]), 4) == [4, 1, 2, 0]
    assert worst(torch.tensor([3, 3, 3]), 2) == [0, 1]
    assert worst(torch.tensor([1, 2]), 0) == []


def _loop(sim: list[list[float]], owner: list[int]) -> tuple[list[int], list[int]]:
    """The ranks by their definition, one query at a time."""
    n, m = len(sim), len(owner)
    i2t = []
    for i in range(n):
        best = max((sim[i][j] for j in range(m) if owner[j] == i), default=None)
        i2t.append(m + 1 if best is None else 1 + sum(sim[i][j] > best for j in range(m)))
    t2i = [1 + sum(sim[i][j] > sim[owner[j]][j] for i in range(n)) for j in range(m)]
    return i2t, t2i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_a_plain_loop_and_recall(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, d = 13, 6
    per_image = torch.randint(1, 4, (n,), generator=g)
    per_image[5] = 0  # an image without captions: never found
    owner = torch.repeat_interleave(torch.arange(n), per_image)
    images, texts = torch.randn(n, d, generator=g), torch.randn(len(owner), d, generator=g)
    sim = (F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T).tolist()
    want_i2t, want_t2i = _loop(sim, owner.tolist())
    ranks, truth = i2t_ranks(images, texts, owner, chunk=4)
    assert ranks.tolist() == want_i2t
    assert t2i_ranks(images, texts, owner, chunk=4).tolist() == want_t2i
    assert truth[5] == -1 and all(owner[truth[i]] == i for i in range(n) if i != 5)
    # rank <= K is exactly what Recall@K counts
    recall = recall_at_k(images, texts, owner)
    for k in KS:
        assert recall[f"i2t_R@{k}"] == pytest.approx(100 * (ranks <= k).float().mean().item())
        t2i = t2i_ranks(images, texts, owner)
        assert recall[f"t2i_R@{k}"] == pytest.approx(100 * (t2i <= k).float().mean().item())
    # the worst queries: highest ranks, their top candidates the most similar ones
    found = worst_queries(images, texts, owner, count=3, k=4, chunk=5)
    assert [f.rank for f in found.i2t] == sorted(want_i2t, reverse=True)[:3]
    assert [f.rank for f in found.t2i] == sorted(want_t2i, reverse=True)[:3]
    for f in found.t2i:
        row = [sim[i][f.query] for i in range(n)]
        assert list(f.top) == sorted(range(n), key=lambda i: -row[i])[:4]
        assert f.scores == pytest.approx([row[i] for i in f.top], abs=1e-6)
        assert f.correct == tuple(i == owner[f.query] for i in f.top)
        assert f.truth == owner[f.query] and f.truth_score == pytest.approx(row[f.truth],
                                                                            abs=1e-6)
    for f in found.i2t:
        row = sim[f.query]
        assert list(f.top) == sorted(range(len(owner)), key=lambda j: -row[j])[:4]
        assert f.correct == tuple(bool(owner[j] == f.query) for j in f.top)


def test_shown_candidates_agree_with_ranks() -> None:
    """With every candidate shown, a query's first correct one sits at its rank, ties too."""
    g = torch.Generator().manual_seed(3)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    images = torch.randn(4, 3, generator=g)
    texts = torch.randn(len(owner), 3, generator=g)
    texts[4] = texts[1]  # a duplicate caption of another image: an exact tie
    found = worst_queries(images, texts, owner, count=len(owner), k=len(owner))
    for f in [*found.i2t, *found.t2i]:
        assert f.correct.index(True) + 1 == f.rank
