"""The worst-ranked retrieval queries, both ways: what a model confuses.

Pure functions of the embeddings ``embed_split`` returns (images ``[N, D]``, captions
``[M, D]``, caption owners ``[M]``), ranked by cosine similarity like ``recall_at_k``:

- image -> text: the rank of an image's *best-ranked* own caption (a query hits at K if any of
  its captions is in the top K, the Karpathy convention);
- text -> image: the rank of the caption's image.

A rank is 1 + the number of candidates strictly more similar to the query than its best
correct one, so ``rank <= K`` exactly when ``recall_at_k`` counts the query as a hit at K. An
exact tie (duplicate captions, a collapsed model) is resolved in the query's favour, and the
candidates shown put a correct one first among equals, so a query of rank r <= k shows its
answer r-th. The similarity matrix is made in row chunks, so a COCO-size split (5k x 25k)
never sits in memory whole.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

#: query rows per similarity chunk
CHUNK = 1024


@attrs.frozen
class Failure:
    """One query and where its answer ranked.

    ``query``: the image row (image -> text) or caption row (text -> image). ``rank``: the
    1-based rank of its best correct candidate, ``truth`` that candidate (the image's
    best-ranked own caption; the caption's image; -1 for an image without captions) and
    ``truth_score`` its cosine similarity to the query. ``top``: the ``k`` most similar
    candidates, best first, with their cosine ``scores`` and whether each is ``correct``.
    """

    query: int
    rank: int
    truth: int
    truth_score: float
    top: tuple[int, ...]
    scores: tuple[float, ...]
    correct: tuple[bool, ...]


class Failures(NamedTuple):
    """The worst queries each way (worst first) and every query's rank."""

    i2t: list[Failure]
    t2i: list[Failure]
    i2t_ranks: Tensor  # [N]
    t2i_ranks: Tensor  # [M]


def _unit(image_emb: Tensor, text_emb: Tensor) -> tuple[Tensor, Tensor]:
    return F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)


def i2t_ranks(image_emb: Tensor, text_emb: Tensor, owner: Tensor, chunk: int = CHUNK
              ) -> tuple[Tensor, Tensor]:
    """Per image: the rank of its best own caption ``[N]`` and that caption's row ``[N]``.

    An image without captions ranks ``M + 1`` (never found) with caption row -1.
    """
    v, t = _unit(image_emb, text_emb)
    owner = owner.to(v.device).long()
    ranks, truth = [], []
    for s in range(0, v.shape[0], chunk):
        sim = v[s:s + chunk] @ t.T  # [b, M]
        rows = torch.arange(s, s + sim.shape[0], device=v.device)
        own = owner[None, :] == rows[:, None]
        best, where = sim.masked_fill(~own, float("-inf")).max(dim=1)
        found = own.any(dim=1)
        ranks.append(torch.where(found, 1 + (sim > best[:, None]).sum(1), t.shape[0] + 1))
        truth.append(torch.where(found, where, -1))
    return torch.cat(ranks).cpu(), torch.cat(truth).cpu()


def t2i_ranks(image_emb: Tensor, text_emb: Tensor, owner: Tensor, chunk: int = CHUNK
              ) -> Tensor:
    """Per caption: the rank of its image among all images ``[M]``."""
    v, t = _unit(image_emb, text_emb)
    owner = owner.to(v.device).long()
    ranks = []
    for s in range(0, t.shape[0], chunk):
        sim = t[s:s + chunk] @ v.T  # [b, N]
        true = sim.gather(1, owner[s:s + chunk, None])
        ranks.append(1 + (sim > true).sum(1))
    return torch.cat(ranks).cpu()


def worst(ranks: Tensor, count: int) -> list[int]:
    """The ``count`` queries with the highest rank, worst first; equal ranks by query row."""
    order = torch.argsort(-ranks.long(), stable=True)
    return [int(i) for i in order[:max(count, 0)]]


def top_candidates(sim: Tensor, correct: Tensor, k: int) -> Tensor:
    """Each row's ``k`` most similar candidates, a correct one first among equal similarities:
    the order the ranks count in, so a query of rank r <= k shows its answer r-th.

    ``sim`` and ``correct`` are ``[Q, C]``; the sort is stable (equal candidates by index).
    """
    first = torch.argsort((~correct).to(torch.int8), dim=1, stable=True)
    then = torch.argsort(-sim.gather(1, first), dim=1, stable=True)
    return first.gather(1, then)[:, :k]


def worst_queries(image_emb: Tensor, text_emb: Tensor, owner: Tensor, count: int = 10,
                  k: int = 5, chunk: int = CHUNK) -> Failures:
    """The ``count`` worst-ranked queries each way, each with its ``k`` top candidates."""
    v, t = _unit(image_emb, text_emb)
    owner = owner.to(v.device).long()
    ri, truth = i2t_ranks(v, t, owner, chunk)
    rt = t2i_ranks(v, t, owner, chunk)
    i2t, t2i = [], []
    pick = worst(ri, count)
    if pick:
        sim = v[pick] @ t.T  # only the chosen rows: [count, M]
        correct = owner[None, :] == torch.tensor(pick, device=v.device)[:, None]
        top = top_candidates(sim, correct, k)
        for r, q in enumerate(pick):
            cols, j = top[r].tolist(), int(truth[q])
            i2t.append(Failure(q, int(ri[q]), j, float(sim[r, j]) if j >= 0 else float("nan"),
                               tuple(cols), tuple(sim[r, cols].tolist()),
                               tuple(bool(correct[r, c]) for c in cols)))
    pick = worst(rt, count)
    if pick:
        sim = t[pick] @ v.T  # [count, N]
        true = owner[pick]
        correct = torch.arange(v.shape[0], device=v.device)[None, :] == true[:, None]
        top = top_candidates(sim, correct, k)
        for r, q in enumerate(pick):
            cols, j = top[r].tolist(), int(true[r])
            t2i.append(Failure(q, int(rt[q]), j, float(sim[r, j]), tuple(cols),
                               tuple(sim[r, cols].tolist()), tuple(c == j for c in cols)))
    return Failures(i2t, t2i, ri, rt)


__all__ = ["Failure", "Failures", "i2t_ranks", "t2i_ranks", "top_candidates", "worst",
           "worst_queries"]
