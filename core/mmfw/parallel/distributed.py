"""torch.distributed as torchrun sets it up: who we are, and gathering features across ranks.

mmfw starts no processes of its own: ``torchrun --nproc_per_node N -m mmfw run R`` starts them
and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; this module reads
them. The contrastive loss must see the global batch, so embeddings (and their ids) are
all-gathered. ``gather_with_grad`` keeps the autograd graph: its backward sums, for each rank's
slice, the gradients every rank computed, so with every rank evaluating the same global loss and
DDP averaging, each parameter gets exactly the single-process gradient of the concatenated batch.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


@attrs.frozen
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The process's place in the job, from torchrun's environment (one process without it)."""
    def env(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return World(env("RANK", 0), env("WORLD_SIZE", 1), env("LOCAL_RANK", 0))


def init(device: torch.device, timeout_minutes: float = 30.0) -> World:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA); idempotent."""
    world = world_from_env()
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return world


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sizes(x: Tensor) -> list[int]:
    n = torch.tensor([x.shape[0]], device=x.device)
    out = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(out, n)
    return [int(v) for v in out]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank in rank order, differentiable (rows may differ)."""
    return gather_rows(x)[0]


def gather_rows(x: Tensor) -> tuple[Tensor, slice]:
    """:func:`gather_with_grad`, and this rank's rows in the result (for a local loss)."""
    if not active():
        return x, slice(0, x.shape[0])
    sizes = _sizes(x)
    pad = max(sizes) - x.shape[0]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)) if pad else x
    parts = _AllGather.apply(padded.contiguous()).chunk(len(sizes))
    start = sum(sizes[:dist.get_rank()])
    return (torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]),
            slice(start, start + x.shape[0]))


class _AllGather(torch.autograd.Function):
    """All-gather (rank order, concatenated) whose backward hands each rank the sum of the
    gradients every rank's loss sent to its rows (all-reduce, then its own slice)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


@torch.no_grad()
def average(x: Tensor) -> Tensor:
    """The mean of ``x`` over ranks (logged figures of a loss each rank computed locally)."""
    if not active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` (ids, eval embeddings) from every rank in rank order, no graph."""
    if not active():
        return x
    sizes = _sizes(x)
    pad = max(sizes) - x.shape[0]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)) if pad else x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


#: how long ranks wait for rank 0's own work (validation, the final evaluation, plots): not
#: ``distributed.timeout_minutes``, which bounds the collectives of training steps, since an
#: evaluation of a large split may take far longer than any step
RANK0_WORK_TIMEOUT = timedelta(days=1)
_waiting: list[Any] = []  # the gloo group those waits use, made at first need


def _wait_group() -> Any:
    if not _waiting:
        _waiting.append(dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT))
    return _waiting[0]


def barrier() -> None:
    """Wait for every rank, however long rank 0's own work (evaluation, plots) takes."""
    if active():
        dist.barrier(group=_wait_group())


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank; waits as long as :func:`barrier`."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_wait_group())
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        _waiting.clear()
        dist.destroy_process_group()
