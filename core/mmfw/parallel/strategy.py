"""How a run shares its work: one process, DDP, or FSDP, behind one object.

The training step and the loop ask the strategy for what differs between them: the module to
call forward on (``forward_model``), the loss on the global batch (``global_loss``), the
gradient averaging the wrapper does not do (``average``), the clipping that knows about
shards, whole-model copies for rank 0's own work (``whole_model``) and whole state dicts for
checkpoints, and agreement on when to stop. Choosing one happens once (:func:`strategy_for`).

Under torchrun (``WORLD_SIZE`` > 1) ``sampler.batch_size`` is the global contrastive batch,
each rank embeds ``batch_size / world_size`` of it and the loss sees all of it, gathered with
gradients (see :mod:`mmfw.parallel.distributed`); rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..model import Match, fusion_of
from ..spi.contracts import LossOutput
from ..spi.errors import RecipeError
from . import distributed, sharding
from .distributed import World


class GlobalBatch(nn.Module):
    """The loss on the global batch under torchrun: every rank's embeddings, gathered with
    their graphs (rank order), and ids and per-row context (teacher embeddings) without.
    Every rank computes the same loss; DDP's averaging then gives each parameter the
    single-process gradient of the concatenated batch (see distributed.py)."""

    def __init__(self, loss: Callable[..., LossOutput], local: bool = False) -> None:
        super().__init__()
        self.inner, self.local = loss, local

    def forward(self, image: Tensor, text: Tensor, *,
                image_ids: Tensor | None = None, text_ids: Tensor | None = None,
                **context: Any) -> LossOutput:
        for key, n in (("teacher_image", image.shape[0]), ("teacher_text", text.shape[0])):
            v = context.get(key)
            if torch.is_tensor(v) and v.shape[0] == n:
                context[key] = distributed.gather(v)
        image, image_rows = distributed.gather_rows(image)
        text, text_rows = distributed.gather_rows(text)
        if self.local:  # distributed.local_loss: this rank's rows against the global batch
            context.update(image_rows=image_rows, text_rows=text_rows,
                           shards=torch.distributed.get_world_size())
        if isinstance(context.get("match"), Match):  # [model.fusion]: tokens stay local
            context["match"] = context["match"].within(image_rows, text_rows)
        return self.inner(image, text,
                          image_ids=None if image_ids is None else distributed.gather(image_ids),
                          text_ids=None if text_ids is None else distributed.gather(text_ids),
                          **context)


def average_gradients(params: list[Tensor], world_size: int) -> None:
    """All-reduce-average the gradients of ``params`` (one flat buffer, one collective)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world_size < 2:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class SingleProcess:
    """One process: the model is called as it is, nothing is gathered or averaged."""

    distributed = False
    sharded = False

    def __init__(self, world: World, device: torch.device) -> None:
        self.world, self.device = world, device
        self.model: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def setup(self, model: nn.Module, say: Callable[[str], None]) -> None:
        self.model = model

    def forward_model(self) -> nn.Module:
        return self.model  # type: ignore[return-value]

    def global_loss(self, loss: Callable[..., LossOutput], local: bool = False
                    ) -> Callable[..., LossOutput]:
        return loss

    def average(self, params: list[Tensor]) -> None:
        """Average gradients the wrapper left alone (none on one process)."""

    def clip(self, params: list[Tensor], max_norm: float) -> Tensor:
        return nn.utils.clip_grad_norm_(params, max_norm)

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[nn.Module]:
        yield self.model  # type: ignore[misc]

    def model_state(self) -> dict[str, Tensor] | None:
        """The whole model's state for a checkpoint (None: the model's own state dict)."""
        return None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return None

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)  # type: ignore[union-attr]

    def optimizer_loader(self, optimizer: torch.optim.Optimizer
                         ) -> Callable[[dict], dict] | None:
        return None

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a stop decision, metrics)."""
        return value

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for)."""

    def release(self) -> None:
        """Drop what holds the process group before it is destroyed."""


class DDP(SingleProcess):
    """torchrun with DistributedDataParallel: each rank holds the whole model."""

    distributed = True

    def __init__(self, world: World, device: torch.device) -> None:
        super().__init__(world, device)
        self._ddp: nn.Module | None = None
        self._key: tuple[bool, ...] = ()

    def forward_model(self) -> nn.Module:
        """The model in DistributedDataParallel, rebuilt when a stage freezes or unfreezes
        parameters (DDP reduces only what was trainable when it was built)."""
        model = self.model
        key = tuple(p.requires_grad for p in model.parameters())
        if self._ddp is None or key != self._key:
            ids = [self.device.index] if self.device.type == "cuda" else None
            head = fusion_of(model)
            if head is not None:  # scored outside forward: DDP would mark it ready twice
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, [f"fusion.{n}" for n, _ in (*head.named_parameters(),
                                                       *head.named_buffers())])
                for t in head.state_dict().values():  # DDP's start-up broadcast, for it
                    torch.distributed.broadcast(t, 0)
            self._ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=True)
            self._key = key
        return self._ddp

    def global_loss(self, loss: Callable[..., LossOutput], local: bool = False
                    ) -> Callable[..., LossOutput]:
        return GlobalBatch(loss, local=local)

    def average(self, params: list[Tensor]) -> None:
        average_gradients(params, self.world.world_size)

    def agree(self, value: Any) -> Any:
        return distributed.broadcast_object(value)

    def barrier(self) -> None:
        distributed.barrier()

    def release(self) -> None:
        """Drop the DDP wrapper before the process group is destroyed: its reducer holds the
        group, whose gloo threads would otherwise outlive it and abort the interpreter's exit."""
        self._ddp = None
        gc.collect()


class FSDP(DDP):
    """torchrun with FSDP2 (``fully_shard``): parameters, gradients and optimizer state
    sharded; rank 0 keeps an unsharded CPU copy for its own work and whole checkpoints."""

    sharded = True

    def __init__(self, world: World, device: torch.device, units: tuple[str, ...],
                 reshard_after_forward: bool) -> None:
        super().__init__(world, device)
        self.units, self.reshard = units, reshard_after_forward
        self._whole: nn.Module | None = None

    def setup(self, model: nn.Module, say: Callable[[str], None]) -> None:
        if fusion_of(model) is not None:
            raise RecipeError("[model.fusion] is not supported with FSDP yet",
                              key="distributed.strategy", expected='"ddp"', given="fsdp")
        if self.world.is_main:
            self._whole = sharding.unsharded_copy(model)
        units = sharding.shard(model, self.device, self.world.world_size, self.units,
                               self.reshard)
        say(f"fsdp: {len(units)} units over {self.world.world_size} ranks"
            + (f" ({units[-1]}, ...)" if units else
               " (no group matches distributed.fsdp_units: one unit, the whole model)"))
        self.model = model

    def forward_model(self) -> nn.Module:
        return self.model  # type: ignore[return-value]  (FSDP2 shards in place)

    def clip(self, params: list[Tensor], max_norm: float) -> Tensor:
        return sharding.clip_grad_norm_(params, max_norm)

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[nn.Module]:
        """Every rank joins the gather of the weights; rank 0 gets its unsharded copy with
        them, the others their shards (to do nothing with)."""
        state = sharding.whole_state(self.model, self.world.is_main)
        if not self.world.is_main:
            yield self.model  # type: ignore[misc]
            return
        whole, sharded = self._whole, self.model
        whole.load_state_dict(state)
        whole.to(self.device).train(sharded.training)
        try:
            yield whole
        finally:
            if self.device.type != "cpu":
                whole.to("cpu")  # the copy holds no accelerator memory while training

    def model_state(self) -> dict[str, Tensor] | None:
        return sharding.whole_state(self.model, self.world.is_main)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return sharding.whole_optimizer_state(optimizer, self.world.is_main)

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        sharding.load_whole(self.model, state)  # every rank cuts its own shards

    def optimizer_loader(self, optimizer: torch.optim.Optimizer
                         ) -> Callable[[dict], dict] | None:
        return lambda sd: sharding.shard_optimizer_state(optimizer, sd)


Strategy = SingleProcess


def strategy_for(world: World, device: torch.device, config: Any) -> SingleProcess:
    """The strategy of ``[distributed]`` (``config``) for this job."""
    if not world.distributed:
        return SingleProcess(world, device)
    if config.strategy == "fsdp":
        return FSDP(world, device, tuple(config.fsdp_units), config.reshard_after_forward)
    return DDP(world, device)


__all__ = ["DDP", "FSDP", "GlobalBatch", "SingleProcess", "Strategy", "average_gradients",
           "strategy_for"]
