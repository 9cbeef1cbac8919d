"""From dataset items to model inputs: (image, caption) pairs, batches, collation."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..spi.contracts import Problem, Row, Split
from ..spi.errors import DataError


class Pairs(Dataset):
    """Every (image, caption) pair of a split as one index: the unit samplers draw.

    ``items[k]`` is the split index of pair ``k``'s image; it is the default match id, so all
    captions of an image are positives of it and of each other.
    """

    def __init__(self, split: Split) -> None:
        self.split = split
        self.index: list[tuple[int, int]] = [
            (i, c) for i in range(len(split)) for c in range(len(split.captions(i)))
        ]
        self.items = [i for i, _ in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Row:
        i, c = self.index[k]
        try:
            item = self.split[i]
        except DataError as err:  # decoding failed in this worker: reported, never dropped
            where, _, why = str(err).partition(": ")
            return Row(None, self.split.captions(i)[c], k, i, Problem(where, why or where, i))
        return Row(item.image, item.captions[c], k, i)

    def texts(self) -> list[str]:
        return [self.split.captions(i)[c] for i, c in self.index]

    def groups(self) -> list[str | None] | None:
        """The group key of each pair's image, or None when the split has no groups."""
        group = getattr(self.split, "group", None)
        if not callable(group):
            return None
        per_item = [group(i) for i in range(len(self.split))]
        if all(g is None for g in per_item):
            return None
        return [per_item[i] for i in self.items]


class Batch:
    """A training batch. Images are de-duplicated: ``image_ids`` has one entry per distinct
    image, ``text_ids`` one per caption; rows and columns with equal ids are positives.

    ``problems``: rows left out because their image failed to load. ``mix``: set by
    :class:`mmfw.augment.Mixer` when the images were mixed (MixUp/CutMix).
    """

    __slots__ = ("image_ids", "mix", "pixels", "problems", "text_ids", "tokens")

    def __init__(self, pixels: Tensor, tokens: dict[str, Tensor], image_ids: Tensor,
                 text_ids: Tensor, *, problems: Sequence[Problem] = (), mix: Any = None) -> None:
        self.pixels, self.tokens = pixels, tokens
        self.image_ids, self.text_ids = image_ids, text_ids
        self.problems, self.mix = tuple(problems), mix

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            self.pixels.to(device, non_blocking=nb),
            {k: v.to(device, non_blocking=nb) for k, v in self.tokens.items()},
            self.image_ids.to(device, non_blocking=nb),
            self.text_ids.to(device, non_blocking=nb),
            problems=self.problems, mix=self.mix,
        )

    def __len__(self) -> int:
        return int(self.text_ids.shape[0])


#: ``augment(images, captions, owner, seed) -> (images, captions)``; ``owner[j]`` is the
#: index in ``images`` of caption ``j``'s image (see :class:`mmfw.augment.TrainAugment`)
Augment = Callable[[list[Any], list[str], list[int], int], tuple[list[Any], list[str]]]


class Collate:
    """Preprocess images with the vision encoder, tokenize captions with the text encoder;
    ids come from the sampler's ``match_ids`` (indexed by pair), or are the rows' ``item``
    when ``match_ids`` is None (streams). ``augment`` (training only) changes images and
    captions first, seeded by the batch's pairs so a batch augments the same way in any worker.
    """

    def __init__(self, preprocess: Any, tokenize: Any, match_ids: Sequence[int] | None,
                 augment: Augment | None = None) -> None:
        self.preprocess, self.tokenize, self.match_ids = preprocess, tokenize, match_ids
        self.augment = augment

    def _id(self, row: Sequence[Any]) -> int:
        return int(row[3]) if self.match_ids is None or row[2] < 0 else int(
            self.match_ids[row[2]])

    def __call__(self, rows: Sequence[Sequence[Any]]) -> Batch:
        problems = [r[4] for r in rows if len(r) > 4 and r[4] is not None]
        rows = [r for r in rows if len(r) <= 4 or r[4] is None]
        first: dict[int, int] = {}  # item -> position among the batch's images
        images, image_ids, owner = [], [], []
        for image, _caption, _k, item, *_ in rows:
            if item not in first:
                first[item] = len(images)
                images.append(image)
                image_ids.append(self._id((image, _caption, _k, item)))
            owner.append(first[item])
        captions = [r[1] for r in rows]
        if not rows:
            empty = torch.empty(0, dtype=torch.long)
            return Batch(torch.empty(0), {}, empty, empty, problems=problems)
        if self.augment is not None:
            key = zlib.crc32(repr([(r[2], r[3]) for r in rows]).encode())
            images, captions = self.augment(images, captions, owner, key)
        return Batch(
            torch.stack([self.preprocess(image) for image in images]),
            self.tokenize(captions),
            torch.tensor(image_ids, dtype=torch.long),
            torch.tensor([self._id(r) for r in rows], dtype=torch.long),
            problems=problems,
        )
