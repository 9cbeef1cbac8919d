"""Batch samplers over (image, caption) pairs.

Every sampler makes an epoch's *plan* (a list of batches of pair indices) from ``(seed,
epoch)`` alone, so it is deterministic, and a resumed run rebuilds the same plan and skips the
``position`` batches already trained. With several distributed ranks, rank ``r`` of ``W``
takes batches ``r, r + W, r + 2W, ...`` of the plan: disjoint shards, equally many on every
rank (``drop_last`` drops the plan's last ``< W`` batches; otherwise the shortest ranks wrap
around to the plan's first batches, so every pair is still seen).

``match_ids[k]`` is the id pair ``k`` is batched with: rows and columns with equal ids are
positives of each other, never false negatives (seed 001 §1.1).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import attrs
import numpy as np
import torch

from mmfw.spi import option

#: how far ahead packing looks for a group that fits the space left in a batch
LOOKAHEAD = 256


class PlanSampler:
    """Common machinery: the plan, rank shards, epoch and mid-epoch position."""

    salt = 0

    def __init__(
        self,
        options: Any = None,
        *,
        match_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        texts: Sequence[str] | None = None,
        groups: Sequence[str | None] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size "
                             f"{world_size})")
        if texts is not None and len(texts) != len(match_ids):
            raise ValueError(f"{len(texts)} texts for {len(match_ids)} pairs")
        if groups is not None and len(groups) != len(match_ids):
            raise ValueError(f"{len(groups)} group keys for {len(match_ids)} pairs")
        self.options = options
        self.match_ids = [int(i) for i in match_ids]
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.texts, self.groups = texts, groups
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    # to implement ------------------------------------------------------------------------
    def epoch_pairs(self) -> int:
        """Pairs in one epoch's plan (the same every epoch)."""
        return len(self.match_ids)

    def plan(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    # shared ------------------------------------------------------------------------------
    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, self.salt])

    def _plan_batches(self) -> int:
        n, b = self.epoch_pairs(), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _cut(self, flat: Sequence[int]) -> list[list[int]]:
        b = self.batch_size
        batches = [list(flat[k:k + b]) for k in range(0, len(flat), b)]
        return batches[: self._plan_batches()]

    def __len__(self) -> int:
        nb, w = self._plan_batches(), self.world_size
        return nb // w if self.drop_last or w == 1 else math.ceil(nb / w)

    def shard(self, plan: list[list[int]]) -> list[list[int]]:
        """This rank's batches of the plan (see the module docstring)."""
        w, r, nb = self.world_size, self.rank, len(plan)
        if w == 1 or not nb:
            return plan
        return [plan[(j * w + r) % nb] for j in range(len(self))]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.shard(self.plan(self.epoch))
        for k in range(self.position, len(batches)):
            self.position = k + 1
            yield batches[k]
        self.position = 0
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def pack(units: list[list[int]], batch_size: int) -> list[int]:
    """Units (groups of pairs) laid end to end so that batch boundaries cut as few as possible.

    A unit that does not fit in the space left in the current batch is swapped with the next
    unit (within ``LOOKAHEAD``) that does; only when none does is it cut in two. Every batch but
    the last holds exactly ``batch_size`` pairs.
    """
    out: list[int] = []
    units = [list(u) for u in units]
    i = 0
    while i < len(units):
        space = batch_size - len(out) % batch_size
        unit = units[i]
        if len(unit) > space:
            j = next((j for j in range(i + 1, min(i + 1 + LOOKAHEAD, len(units)))
                      if len(units[j]) <= space), None)
            if j is not None:
                units[i], units[j] = units[j], units[i]
                unit = units[i]
            else:  # nothing fits: cut this one, its rest opens the next batch
                out.extend(unit[:space])
                units[i] = unit[space:]
                continue
        out.extend(unit)
        i += 1
    return out


def _members(ids: Sequence[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for k, i in enumerate(ids):
        members.setdefault(i, []).append(k)
    return members


@attrs.frozen
class RandomOptions:
    pass


class RandomSampler(PlanSampler):
    """Every pair once per epoch in a seeded random order (``seed + epoch``).

    Two captions of one image may land in one batch; their shared id makes them positives of
    each other, never false negatives.
    """

    Options = RandomOptions

    def plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self._cut(torch.randperm(len(self.match_ids), generator=g).tolist())


@attrs.frozen
class SemanticGroupsOptions:
    k: int = option(2, doc="pairs of one id put side by side in a batch: k captions of an image "
                    "(or k pairs of a group), positives of each other",
                    validator=attrs.validators.ge(1))
    by: Literal["image", "group"] = option(
        "image", doc="what makes pairs positives: the same image, or the same group key of "
        "the dataset (data.group_column); images sharing a key become positives")


class SemanticGroupsSampler(PlanSampler):
    """Batches made of groups of ``k`` pairs sharing an id (seed 001 §1.1), every pair once
    per epoch: several positives per anchor in every batch, masked by ids, never negatives.

    ``by = "group"`` makes the dataset's group keys the match ids, so images that share a key
    (near-duplicates, one product, one class) are positives instead of false negatives.
    Groups are cut only where no other group fits a batch's last places (see ``pack``).
    """

    Options = SemanticGroupsOptions
    salt = 1

    def __init__(self, options: SemanticGroupsOptions | None = None, **context: Any) -> None:
        super().__init__(options or SemanticGroupsOptions(), **context)
        o = self.options
        if o.k > self.batch_size:
            raise ValueError(f"k ({o.k}) must not exceed batch_size ({self.batch_size})")
        if o.by == "group":
            if self.groups is None:
                raise ValueError("by = \"group\" needs group keys from the dataset (e.g. "
                                 "data.group_column of csv / jsonl); this dataset has none")
            codes: dict[tuple[str, Any], int] = {}
            self.match_ids = [
                codes.setdefault(("group", g) if g is not None else ("image", i), len(codes))
                for g, i in zip(self.groups, self.match_ids)
            ]
        self.members = _members(self.match_ids)

    def plan(self, epoch: int) -> list[list[int]]:
        rng, k = self._rng(epoch), self.options.k
        units: list[list[int]] = []
        for pairs in self.members.values():
            order = [pairs[j] for j in rng.permutation(len(pairs))]
            units += [order[s:s + k] for s in range(0, len(order), k)]
        units = [units[j] for j in rng.permutation(len(units))]
        return self._cut(pack(units, self.batch_size))


@attrs.frozen
class BalancedOptions:
    positives: int = option(2, doc="captions of each image in a batch: every anchor has "
                            "positives - 1 positives and the rest of the batch as negatives",
                            validator=attrs.validators.ge(1))


class BalancedSampler(PlanSampler):
    """Every image once per epoch with exactly ``positives`` of its captions (all it has when
    fewer), so positives per anchor are the same for every image however many captions it has
    (COCO's 5-7, a web set's 1-20). Captions rotate across epochs: over ``c / positives``
    epochs an image with ``c`` captions shows each of them."""

    Options = BalancedOptions
    salt = 2

    def __init__(self, options: BalancedOptions | None = None, **context: Any) -> None:
        super().__init__(options or BalancedOptions(), **context)
        if self.options.positives > self.batch_size:
            raise ValueError(f"positives ({self.options.positives}) must not exceed "
                             f"batch_size ({self.batch_size})")
        self.members = _members(self.match_ids)

    def epoch_pairs(self) -> int:
        p = self.options.positives
        return sum(min(p, len(m)) for m in self.members.values())

    def plan(self, epoch: int) -> list[list[int]]:
        rng, p = self._rng(epoch), self.options.positives
        units = []
        for pairs in self.members.values():
            c = len(pairs)
            start = epoch * p % c
            units.append([pairs[(start + j) % c] for j in range(min(p, c))])
        units = [units[j] for j in rng.permutation(len(units))]
        return self._cut(pack(units, self.batch_size))


@attrs.frozen
class CurriculumOptions:
    difficulty: Literal["length", "rarity"] = option(
        "length", doc="how hard a caption is: its length in words (seed 000 §3), or how rare "
        "its words are in the training captions")
    max_words: int = option(20, doc="length at which a caption counts as hardest",
                            validator=attrs.validators.ge(1))
    start: float = option(0.5, doc="difficulty threshold at epoch 0: harder captions are "
                          "down-weighted (the seed's 0.3 is below every caption's difficulty, "
                          "so it would weight all alike)",
                          validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    ramp_epochs: float = option(5.0, doc="epochs over which the threshold rises to 1 (all "
                                "captions at full weight); seed 000: 0.7 x epochs",
                                validator=attrs.validators.gt(0))
    hard_weight: float = option(0.2, doc="sampling weight of captions above the threshold",
                                validator=[attrs.validators.ge(0), attrs.validators.le(1)])


class CurriculumSampler(PlanSampler):
    """Easy captions first (seed 000 §3): each epoch draws as many pairs as there are, with
    replacement, weight 1 for captions at or under the epoch's difficulty threshold and
    ``hard_weight`` above it. The threshold rises from ``start`` to 1 over ``ramp_epochs``, so
    the weights change every epoch; ``weights(epoch)`` shows them. Difficulty is in [0.3, 1]
    as in the seed: ``0.3 + 0.7 * min(1, words / max_words)`` (or word rarity, same range).
    """

    Options = CurriculumOptions
    salt = 3

    def __init__(self, options: CurriculumOptions | None = None, **context: Any) -> None:
        super().__init__(options or CurriculumOptions(), **context)
        if self.texts is None:
            raise ValueError("the curriculum sampler needs the captions (texts) to rate them")
        self.difficulty = self._difficulty(self.texts)

    def _difficulty(self, texts: Sequence[str]) -> np.ndarray:
        o = self.options
        words = [t.lower().split() for t in texts]
        if o.difficulty == "length":
            raw = np.array([min(1.0, len(w) / o.max_words) for w in words])
        else:
            counts = Counter(x for w in words for x in w)
            total = sum(counts.values()) or 1
            raw = np.array([np.mean([-math.log(counts[x] / total) for x in w]) if w else 0.0
                            for w in words])
            lo, hi = (raw.min(), raw.max()) if len(raw) else (0.0, 1.0)
            raw = (raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw)
        return 0.3 + 0.7 * raw

    def threshold(self, epoch: int) -> float:
        o = self.options
        return o.start + (1.0 - o.start) * min(1.0, epoch / o.ramp_epochs)

    def weights(self, epoch: int) -> np.ndarray:
        return np.where(self.difficulty <= self.threshold(epoch) + 1e-12, 1.0,
                        self.options.hard_weight)

    def plan(self, epoch: int) -> list[list[int]]:
        w = self.weights(epoch)
        if not w.sum():
            w = np.ones_like(w)
        n = len(self.match_ids)
        drawn = self._rng(epoch).choice(n, size=n, replace=True, p=w / w.sum()) if n else []
        return self._cut([int(k) for k in drawn])
