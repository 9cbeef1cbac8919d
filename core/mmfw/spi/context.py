"""What a callback sees of a run: :class:`RunContext` (read-only state plus a few services)
and the payload of the step-end event, :class:`StepEnd`.

The context is the same object for every event of a run; its attributes always show the
present (``step`` is the number of optimizer steps taken so far). Callbacks read it and use
its services (``log``, ``say``, ``stop``, ``evaluate``, ...); they never reach into the
trainer, so the trainer can change without breaking them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from .contracts import Backend, DatasetSource, LossOutput

if TYPE_CHECKING:  # the types of two core objects, named without importing the core
    from ..config.recipe import Recipe
    from ..data.batching import Batch
    from ..run.rundir import RunDir


class StepEnd(NamedTuple):
    """One optimizer step, as ``on_step_end`` receives it.

    ``output``: the loss output (tensors still on the device: read them only when you log,
    a ``float()`` is a host sync). ``image`` / ``text``: the batch's embeddings, detached.
    ``batch``: the batch as the loss saw it (ids, pixels, tokens). ``lr``: the step's base
    learning rate. ``row``: the train row logged at this step, or None on steps that do not
    log (``run.log_every``).
    """

    output: LossOutput
    image: Tensor
    text: Tensor
    batch: Batch
    lr: float
    row: dict[str, Any] | None


class RunContext(Protocol):
    """The run as callbacks see it. Attributes are read-only; services are methods.

    Under torchrun every rank has its own context and every callback runs on every rank:
    write files and talk on ``is_main`` only, and call ``evaluate`` / ``whole_model`` on every
    rank (FSDP gathers the weights with all of them).
    """

    @property
    def recipe(self) -> Recipe:
        """The resolved recipe of the run."""

    @property
    def run_dir(self) -> RunDir:
        """The run directory (its layout, its logs, its checkpoints)."""

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""

    @property
    def epoch(self) -> int:
        """Epochs completed so far."""

    @property
    def total_steps(self) -> int: ...

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def model(self) -> nn.Module:
        """The dual encoder (``encode_image`` / ``encode_text``; under FSDP, the whole copy
        inside ``whole_model()`` on rank 0, the local shards elsewhere)."""

    @property
    def losses(self) -> nn.Module:
        """Every loss of the run in one module (the recipe's and a staged schedule's)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def backend(self) -> Backend:
        """The device backend (``autocast()`` for forward passes of your own)."""

    @property
    def source(self) -> DatasetSource:
        """The run's dataset with ``data.on_bad`` applied to its splits."""

    @property
    def pairs(self) -> Any:
        """The training pairs: a map-style dataset of rows ``(image, caption, pair, item)``,
        or a stream (then not indexable)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def is_main(self) -> bool:
        """Rank 0 (always, without torchrun): the rank that writes and talks."""

    def log(self, row: dict[str, Any]) -> None:
        """Append a row to ``metrics.jsonl`` (rank 0) and send it to every ``on_log_row``."""

    def say(self, message: str) -> None:
        """Print a line on the console (rank 0 only)."""

    def stop(self, reason: str) -> None:
        """Ask the run to end after this step (``stopped_by = reason``); rank 0 decides under
        torchrun. The run still checkpoints and evaluates."""

    def evaluate(self, split: str, *, final: bool = False) -> dict[str, float]:
        """Retrieval metrics of the model on ``split`` (every rank gets rank 0's), after
        ``on_eval_start`` (``final``: the run's final evaluation; an EMA callback puts its
        weights in the model there)."""

    def final_work(self, items: int) -> None:
        """After training, an evaluation beyond ``eval.split`` will embed ``items`` images and
        captions (a zero-shot set): a budget-fitted schedule (``schedule.fit_budget``) keeps
        time for it. Call it in ``on_run_start``."""

    def report_eval(self, split: str, metrics: dict[str, float], *, final: bool = False
                    ) -> None:
        """Log an evaluation row and send ``on_eval_end``; ``final`` marks the run's result
        (what ``mmfw.train`` returns)."""

    def whole_model(self) -> AbstractContextManager[nn.Module]:
        """The whole model for rank 0's own work (FSDP: gathered; otherwise the model)."""

    def temperature(self) -> float | None:
        """The active loss's temperature, when it has one."""

    def load_weights(self, step: int) -> None:
        """Load the model weights of checkpoint ``step`` (the final evaluation's best), and
        the tensors of that checkpoint's tensor-stateful callbacks (an EMA's weights)."""

    def mix(self, batch: Batch, pixels: Tensor) -> Tensor:
        """``pixels`` mixed (MixUp/CutMix) exactly as ``batch``'s images were."""

    def wrap_collate(self, wrap: Callable[[Callable[[Any], Batch]], Callable[[Any], Batch]]
                     ) -> None:
        """Replace the training loader's collate by ``wrap(collate)`` (before the first
        step: a teacher tokenizing the same rows its own way)."""


__all__ = ["RunContext", "StepEnd"]
