"""The run context callbacks receive: a read-only view of a :class:`~mmfw.train.loop.Trainer`
with the services of :class:`mmfw.spi.RunContext`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..data.batching import Batch
from ..eval.protocols import evaluate_protocol
from ..eval.retrieval import embed_options
from ..run import checkpoint as ckpt
from ..spi.temperature import Temperature
from .budget import evaluation_items

if TYPE_CHECKING:
    from .loop import Trainer


class TrainerContext:
    """:class:`mmfw.spi.RunContext` over one trainer."""

    def __init__(self, trainer: Trainer) -> None:
        self._t = trainer
        self._model: nn.Module | None = None  # inside whole_model(): the whole copy
        self.stop_reason: str | None = None
        self.final: dict[str, float] | None = None

    # state ------------------------------------------------------------------------------
    recipe = property(lambda self: self._t.recipe)
    run_dir = property(lambda self: self._t.run_dir)
    step = property(lambda self: self._t.progress.step)
    epoch = property(lambda self: self._t.progress.epoch)
    total_steps = property(lambda self: self._t.total_steps)
    steps_per_epoch = property(lambda self: self._t.steps_per_epoch)
    losses = property(lambda self: self._t.opt.losses)
    device = property(lambda self: self._t.device)
    backend = property(lambda self: self._t.backend)
    source = property(lambda self: self._t.data.source)
    pairs = property(lambda self: self._t.data.pairs)
    rank = property(lambda self: self._t.world.rank)
    world_size = property(lambda self: self._t.world.world_size)
    is_main = property(lambda self: self._t.world.is_main)

    @property
    def model(self) -> nn.Module:
        return self._model if self._model is not None else self._t.model

    # services ---------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        self._t.callbacks.fire("on_log_row", self, row)

    def say(self, message: str) -> None:
        self._t.say(message)

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[nn.Module]:
        if self._model is not None:  # nested: already whole
            yield self._model
            return
        with self._t.strategy.whole_model() as whole:
            self._model = whole
            try:
                yield whole
            finally:
                self._model = None

    def evaluate(self, split: str, *, final: bool = False) -> dict[str, float]:
        e, t = self.recipe.eval, self._t
        t.callbacks.fire("on_eval_start", self, split, final)
        began, data = time.perf_counter(), t.data.source.split(split)
        with self.whole_model() as model:
            # eval.protocol is the final split's (validation ranks the whole val split)
            metrics = evaluate_protocol(
                model, data, batch_size=e.batch_size, device=t.device,
                autocast=t.backend.autocast, max_images=e.max_images,
                rerank_top_k=e.rerank_top_k, fold_size=e.fold_size,
                **embed_options(self.recipe),
                protocol=e.protocol if split == e.split else "karpathy") \
                if self.is_main else None
            model.train()
        if t.opt.clock is not None:  # its pace: the final evaluation's share of the budget
            t.opt.clock.evaluated(evaluation_items(data, e.max_images),
                                  time.perf_counter() - began)
        return t.strategy.agree(metrics)

    def final_work(self, items: int) -> None:
        if self._t.opt.clock is not None:
            self._t.opt.clock.final_items += int(items)

    def report_eval(self, split: str, metrics: dict[str, float], *, final: bool = False
                    ) -> None:
        row = {"type": "eval", "split": split, "step": self.step, "epoch": self.epoch,
               **({"final": True} if final else {}), **metrics}
        self.log(row)
        if final:
            self.final = dict(metrics)
        self._t.callbacks.fire("on_eval_end", self, split, metrics, final)

    def temperature(self) -> float | None:
        t = getattr(self._t.opt.loss, "temperature", None)
        return t.value if isinstance(t, Temperature) else None

    def load_weights(self, step: int) -> None:
        model_state, _ = ckpt.read_weights(self.run_dir.checkpoints, step)
        self._t.strategy.load_model_state(model_state)
        self._t.callbacks.load_tensor_state_dict(
            ckpt.read_callback_tensors(self.run_dir.checkpoints, step))

    def mix(self, batch: Batch, pixels: Tensor) -> Tensor:
        return self._t.mixer(Batch(pixels, {}, batch.image_ids, batch.text_ids),
                             self.step).pixels

    def wrap_collate(self, wrap: Callable[[Callable[[Any], Batch]], Callable[[Any], Batch]]
                     ) -> None:
        loader = self._t.loader.loader
        loader.collate_fn = wrap(loader.collate_fn)
