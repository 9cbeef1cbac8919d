"""What components promise each other. Plugins implement these; the core relies on nothing more.

These are structural types (``typing.Protocol``): a plugin need not inherit from them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Modality = Literal["image", "text"]


class LossOutput(NamedTuple):
    """What every loss returns: the scalar to minimise and its named parts (for logging)."""

    loss: Tensor
    terms: dict[str, Tensor]


@runtime_checkable
class Loss(Protocol):
    """``loss(image [Bi, D], text [Bt, D], *, image_ids=None, text_ids=None, **context)``.

    Rows i, j are positives iff ``image_ids[i] == text_ids[j]``; with no ids row i pairs with row
    i. Inputs are raw embeddings: the loss normalises where its math says so. ``context`` may hold
    ``step``, ``epoch``, ``labels``, ``teacher_image``/``teacher_text``; ignore what you don't use.
    """

    def __call__(
        self,
        image: Tensor,
        text: Tensor,
        *,
        image_ids: Tensor | None = None,
        text_ids: Tensor | None = None,
        **context: Any,
    ) -> LossOutput: ...


@runtime_checkable
class Encoder(Protocol):
    """An nn.Module mapping a batch of one modality to ``[B, dim]``.

    ``dim`` is the real output width, read from the built model. Image encoders implement
    ``preprocess(image) -> Tensor[3, H, W]`` (PIL image or uint8 ``[3, H, W]`` tensor in), text
    encoders ``tokenize(list[str]) -> dict[str, Tensor]`` (padding, truncation included).
    Optional: ``prepare(train_texts)`` (fit a tokenizer before training), ``save_assets(dir)`` /
    ``load_assets(dir)`` (files such as a tokenizer that live in the run directory).

    Optional: ``named_groups() -> dict[str, list[str]]``: parameter names (as in
    ``named_parameters()`` of the encoder) by group, ordered from input to output:
    ``"embeddings"``, ``"layers.0"`` ... ``"layers.N-1"``, ``"head"`` (final norm / pooler).
    Freezing patterns, layer-wise LR decay and progressive unfreezing are expressed on these.
    """

    dim: int
    modality: Modality

    def forward(self, inputs: Any) -> Tensor: ...


class Item(NamedTuple):
    """One dataset item: an image (PIL image or uint8 ``[3, H, W]`` tensor), its captions, id."""

    image: Any
    captions: Sequence[str]
    image_id: int


@runtime_checkable
class Split(Protocol):
    """A map-style dataset of ``Item``. ``captions(i)`` must not decode the image."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Item: ...

    def captions(self, index: int) -> Sequence[str]: ...


@runtime_checkable
class DatasetSource(Protocol):
    """A dataset plugin: named splits (``train``, ``val``, ``test``)."""

    splits: Sequence[str]

    def split(self, name: str) -> Split: ...


@runtime_checkable
class Sampler(Protocol):
    """Yields lists of pair indices. ``match_ids[i]`` is the id pair ``i`` was batched with.

    Optional mid-epoch resume: ``state_dict()`` / ``load_state_dict(state)``. The engine saves
    ``state_dict()`` with ``epoch`` and ``position`` (batches trained in that epoch) set by
    itself, since DataLoader workers read the sampler ahead of training.
    """

    match_ids: Sequence[int]

    def __iter__(self) -> Iterator[list[int]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Where and how tensors are computed."""

    name: str
    device: torch.device

    def available(self) -> bool: ...

    def autocast(self) -> AbstractContextManager[Any]: ...

    def grad_scaler(self) -> Any:
        """A ``torch.amp.GradScaler`` when the precision needs one, else None."""

    def seed(self, seed: int) -> None: ...

    def memory_stats(self) -> dict[str, float]: ...

    def describe(self) -> str: ...


@runtime_checkable
class Scheduler(Protocol):
    """Decides the learning-rate factor (multiplying ``optim.lr``) at each optimizer step."""

    def lr_factor(self, step: int) -> float: ...


def has_assets(module: nn.Module) -> bool:
    return callable(getattr(module, "save_assets", None))


def asset_dir(run_dir: Path, modality: Modality) -> Path:
    return Path(run_dir) / "assets" / modality
