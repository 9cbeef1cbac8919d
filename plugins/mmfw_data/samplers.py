"""Batch samplers over (image, caption) pairs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch


@attrs.frozen
class RandomOptions:
    pass


class RandomSampler:
    """Every pair once per epoch in a seeded random order (``seed + epoch``).

    Two captions of one image may land in one batch; their shared id makes them positives of
    each other, never false negatives. Resumable mid-epoch through ``state_dict``.
    """

    Options = RandomOptions

    def __init__(
        self,
        options: RandomOptions | None = None,
        *,
        match_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.match_ids = list(match_ids)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        n, b = len(self.match_ids), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.match_ids), generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order, b = self._order(), self.batch_size
        for k in range(self.position, len(self)):
            self.position = k + 1
            yield order[k * b : (k + 1) * b]
        self.position = 0
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
