"""From dataset items to model inputs: (image, caption) pairs, batches, collation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .contracts import Split


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

    def __getitem__(self, k: int) -> tuple[Any, str, int, int]:
        """``(image, caption, pair index, item index)``."""
        i, c = self.index[k]
        item = self.split[i]
        return item.image, item.captions[c], k, i

    def texts(self) -> list[str]:
        return [self.split.captions(i)[c] for i, c in self.index]


class Batch:
    """A training batch. Images are de-duplicated: ``image_ids`` has one entry per distinct
    image, ``text_ids`` one per caption; rows and columns with equal ids are positives."""

    __slots__ = ("image_ids", "pixels", "text_ids", "tokens")

    def __init__(self, pixels: Tensor, tokens: dict[str, Tensor], image_ids: Tensor,
                 text_ids: Tensor) -> None:
        self.pixels, self.tokens = pixels, tokens
        self.image_ids, self.text_ids = image_ids, text_ids

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            self.pixels.to(device, non_blocking=nb),
            {k: v.to(device, non_blocking=nb) for k, v in self.tokens.items()},
            self.image_ids.to(device, non_blocking=nb),
            self.text_ids.to(device, non_blocking=nb),
        )

    def __len__(self) -> int:
        return int(self.text_ids.shape[0])


class Collate:
    """Preprocess images with the vision encoder, tokenize captions with the text encoder;
    ids come from the sampler's ``match_ids`` (indexed by pair)."""

    def __init__(self, preprocess: Any, tokenize: Any, match_ids: Sequence[int]) -> None:
        self.preprocess, self.tokenize, self.match_ids = preprocess, tokenize, match_ids

    def __call__(self, rows: Sequence[tuple[Any, str, int, int]]) -> Batch:
        first: dict[int, int] = {}  # item index -> its match id
        pixels = []
        for image, _caption, k, item in rows:
            if item not in first:
                first[item] = int(self.match_ids[k])
                pixels.append(self.preprocess(image))
        return Batch(
            torch.stack(pixels),
            self.tokenize([r[1] for r in rows]),
            torch.tensor(list(first.values()), dtype=torch.long),
            torch.tensor([int(self.match_ids[r[2]]) for r in rows], dtype=torch.long),
        )
