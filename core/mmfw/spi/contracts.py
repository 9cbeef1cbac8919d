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

    Optional: ``supports_local_loss = True`` (``distributed.local_loss``): under torchrun the
    context then holds ``image_rows`` / ``text_rows`` (this rank's slices of the gathered
    batch) and ``shards`` (the number of ranks); the loss computes only those rows' terms
    against the whole batch, scaled so that the mean over the ranks is the whole batch's loss.
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

    Optional (``data.uint8``): ``preprocess_uint8(image) -> uint8 Tensor[3, H, W]`` (the
    resizing and cropping of ``preprocess``) and ``normalize(pixels uint8 [B, 3, H, W]) ->
    float`` (the rest, on whatever device the batch is on), with ``normalize(
    preprocess_uint8(x)[None])[0] == preprocess(x)``: the loader then hands out bytes and the
    engine normalises on the device. ``preprocess_uint8`` may raise ``NotImplementedError``
    (a configuration it cannot split): the loader falls back to ``preprocess``.

    Optional: ``named_groups() -> dict[str, list[str]]``: parameter names (as in
    ``named_parameters()`` of the encoder) by group, ordered from input to output:
    ``"embeddings"``, ``"layers.0"`` ... ``"layers.N-1"``, ``"head"`` (final norm / pooler).
    Freezing patterns, layer-wise LR decay and progressive unfreezing are expressed on these.

    Optional (cross-modal fusion, ``[model.fusion]``): ``forward_tokens(inputs) -> (tokens
    [B, L, width], mask [B, L] bool)``, the token features before pooling (``mask`` true on real
    tokens; ``width`` may differ from ``dim``), and ``pool_tokens(tokens, mask) -> [B, dim]``
    with ``pool_tokens(*forward_tokens(x)) == forward(x)``, so one pass gives both.
    """

    dim: int
    modality: Modality

    def forward(self, inputs: Any) -> Tensor: ...


class Item(NamedTuple):
    """One dataset item: an image (PIL image or uint8 ``[3, H, W]`` tensor), its captions, id."""

    image: Any
    captions: Sequence[str]
    image_id: int


class Problem(NamedTuple):
    """One piece of bad data: where it is (a file path, or ``file:row``), what is wrong, and
    the index of the split item it makes unusable (None when no item was made from it)."""

    where: str
    reason: str
    index: int | None = None


class Row(NamedTuple):
    """One (image, caption) pair on its way to a batch.

    ``pair`` indexes the sampler's ``match_ids`` (-1 for streams: then ``item`` is the match
    id). A row whose image could not be loaded has ``image`` None and says why in ``problem``;
    the collate leaves it out and the training loader applies ``data.on_bad`` to it.
    """

    image: Any
    caption: str
    pair: int
    item: int
    problem: Problem | None = None
    where: str = ""


@runtime_checkable
class Split(Protocol):
    """A map-style dataset of ``Item``. ``captions(i)`` must not decode the image.

    An item whose image cannot be loaded raises ``mmfw.errors.DataError`` naming the file.
    Optional: ``problems(full=False) -> list[Problem]``: the bad data found while reading the
    annotations (rows never made into items) plus a scan of every image (exists, non-empty,
    readable header; ``full`` decodes them all); the engine applies ``data.on_bad`` to them
    before training. ``group(i) -> str | None``: a group key (images sharing one are
    positives of each other for the ``semantic-groups`` sampler with ``by = "group"``).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Item: ...

    def captions(self, index: int) -> Sequence[str]: ...


@runtime_checkable
class LabelledSplit(Protocol):
    """A split of labelled images, for zero-shot classification (``[eval.zeroshot]``).

    ``label(i)`` is the class index of item ``i`` (an index into ``classnames``; it must not
    decode the image); ``classnames`` may be empty when the labels are bare indices (the
    recipe's ``eval.zeroshot.classnames`` then names them). Optional: ``templates``, the
    dataset's own prompt templates (``"{c}"`` standing for the class name), and
    ``problems(full=False)`` as for :class:`Split`.
    """

    classnames: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Item: ...

    def label(self, index: int) -> int: ...


@runtime_checkable
class DatasetSource(Protocol):
    """A dataset plugin: named splits (``train``, ``val``, ``test``).

    Optional: ``stream(name, *, batch_size, seed, drop_last, rank, world_size, exclude)``: the
    split as a streaming source (an ``IterableDataset`` of row batches that also acts as its own
    sampler); the engine trains from it instead of from ``split(name)`` (see docs/data.md).
    """

    splits: Sequence[str]

    def split(self, name: str) -> Split: ...


@runtime_checkable
class Sampler(Protocol):
    """Yields lists of pair indices. ``match_ids[i]`` is the id pair ``i`` was batched with.

    Built with ``match_ids``, ``batch_size``, ``seed``, ``drop_last``, ``texts`` (caption of
    each pair), ``groups`` (group key of each pair, or None), ``rank`` and ``world_size``
    (each rank iterates its own, equally long share of every epoch).

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
    """Where and how tensors are computed.

    Optional: ``prepare(model)`` (called once the model is on ``device``: memory format,
    ``torch.compile``), ``memory_format`` (a ``torch.memory_format`` the engine gives image
    batches, e.g. ``channels_last``), ``step_context()`` (a context manager a whole training
    step runs in, backward passes included: kernel choices that activation checkpointing's
    recomputation must see again; ``autocast()`` covers forward passes only),
    ``why_unavailable() -> str`` (said when ``available()`` is false) and
    ``explain(error) -> str | None`` (a hint for an error raised while training, e.g. an
    operator MPS lacks).
    """

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
    """Decides the learning-rate factor (multiplying ``optim.lr``) at each optimizer step.

    Optional, for staged schedules (``mmfw.params`` says how names and patterns work):

    - ``plan(step, epoch) -> StagePlan``: what is frozen, the LR multiplier of each parameter
      group and the active loss at this step; the engine applies a plan when it changes.
    - ``losses() -> dict[str, tuple[str, dict]]``: every loss a plan may name, as ``label ->
      (loss plugin name, its options)``. The engine builds them all before training, so their
      parameters are in the optimizer and their state (a memory queue) in the checkpoint.
    - ``momentum(step) -> float | None``: AdamW's beta1 at this step (OneCycle cycles it).
    - ``state_dict()`` / ``load_state_dict(state)`` (JSON-able): saved in checkpoints.
    """

    def lr_factor(self, step: int) -> float: ...


class StagePlan(NamedTuple):
    """A staged scheduler's decision for one step (see ``Scheduler.plan``).

    ``frozen``: patterns of parameter or group names to freeze (everything else trains).
    ``lr_mult``: ``(pattern, multiplier)`` pairs on group names; the first match wins, groups
    matching none keep 1. ``loss``: a label from ``losses()``, or None for the recipe's
    ``[loss]``. ``stage``: the stage's name and ``index`` its position (for logs).
    """

    stage: str = ""
    index: int = 0
    frozen: tuple[str, ...] = ()
    lr_mult: tuple[tuple[str, float], ...] = ()
    loss: str | None = None


@runtime_checkable
class Exporter(Protocol):
    """Writes a run's model in one format (``mmfw export --format <name>``).

    ``refuse(run)``: None when the run maps to this format exactly, else one sentence saying
    which tower or adapter does not map and which formats would take it (shown to the user as
    is). ``export(run, output)``: write the format's files into the folder ``output`` (made
    if missing) and return it. ``run`` is a :class:`mmfw.LoadedRun`.
    """

    def refuse(self, run: Any) -> str | None: ...

    def export(self, run: Any, output: Path) -> Path: ...


def has_assets(module: nn.Module) -> bool:
    return callable(getattr(module, "save_assets", None))


def asset_dir(run_dir: Path, modality: Modality) -> Path:
    return Path(run_dir) / "assets" / modality


#: the ``mmfw`` export format (written by the ``mmfw`` exporter, opened by ``mmfw.load``): a
#: folder with this manifest (JSON: ``model`` = the ``[model]`` table to rebuild from,
#: ``paths`` = option keys of that table naming files inside the folder, ``backend``,
#: ``run``, ``step``, ``embed_dim``), the weights, the resolved recipe, ``assets/`` (see
#: :func:`asset_dir`) and ``metrics.json``
EXPORT_MANIFEST = "mmfw-export.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_RECIPE = "recipe.toml"

__all__ = [
    'EXPORT_MANIFEST', 'EXPORT_RECIPE', 'EXPORT_WEIGHTS', 'Backend', 'DatasetSource', 'Encoder',
    'Exporter', 'Item', 'LabelledSplit', 'Loss', 'LossOutput', 'Modality', 'Problem', 'Row',
    'Sampler', 'Scheduler', 'Split', 'StagePlan', 'asset_dir', 'has_assets',
]
