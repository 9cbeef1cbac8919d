"""FSDP (``distributed.strategy = "fsdp"``): the model's parameters, gradients and optimizer
state sharded across the ranks of a torchrun job, with PyTorch's FSDP2 ``fully_shard``.

Each encoder block (a ``layers.N`` parameter group of ``vision`` / ``text``, as
``distributed.fsdp_units`` names them) becomes one unit whose parameters are gathered just
before its forward and freed after; the rest of the model is the root unit. The parameters
become ``DTensor``\\ s with the same names, so parameter groups, freezing patterns and the
optimizer work unchanged.

Checkpoints keep the one-process format (whole tensors, the optimizer's index layout): every
rank joins the gathers, rank 0 writes. Loading cuts whole tensors back into each rank's shard.
Everything here that touches a ``DTensor`` is a collective: every rank must call it, in the
same order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..train.params import ParamTable, matches


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(x: Any) -> bool:
    return isinstance(x, _dtensor())


def full(x: Any) -> Any:
    """A DTensor's whole value (collective); anything else as it is."""
    return x.full_tensor() if is_sharded(x) else x


def unit_modules(model: nn.Module, patterns: Iterable[str]) -> list[nn.Module]:
    """The modules to shard as their own units: for each parameter group matching a pattern,
    the smallest module holding all its parameters; innermost first (FSDP2 wants children
    sharded before their parents)."""
    table = ParamTable(model, {})
    patterns = tuple(patterns)
    found: dict[str, nn.Module] = {}
    for group, params in table.by_group().items():
        if not any(matches(p, group) for p in patterns):
            continue
        names = [p.name.split(".") for p in params]
        prefix: list[str] = []
        for parts in zip(*(n[:-1] for n in names)):
            if len(set(parts)) > 1:
                break
            prefix.append(parts[0])
        if len(prefix) > 1:  # never a whole tower: that is not a block
            found[".".join(prefix)] = model.get_submodule(".".join(prefix))
    return [found[k] for k in sorted(found, key=lambda k: -k.count("."))]


def shard(model: nn.Module, device: torch.device, world_size: int, patterns: Iterable[str],
          reshard_after_forward: bool = True) -> list[str]:
    """Shard ``model`` in place across the process group; returns the units' names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    units = unit_modules(model, patterns)
    names = {id(m): n for n, m in model.named_modules()}
    for m in units:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for method in ("encode_image", "encode_text"):  # GradCache and eval call these directly
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    return [names[id(m)] for m in units]


def unsharded_copy(model: nn.Module) -> nn.Module:
    """A whole copy of the model before it is sharded, kept on the CPU: what rank 0 evaluates,
    probes and plots with (after :func:`load_whole` puts the current weights in it)."""
    return copy.deepcopy(model).to("cpu")


@torch.no_grad()
def whole_state(module: nn.Module, main: bool) -> dict[str, Tensor]:
    """The module's state dict with whole tensors on the CPU on rank 0 (``{}`` elsewhere)."""
    out = {}
    for k, v in module.state_dict().items():
        v = full(v)
        if main:
            out[k] = v.detach().cpu().clone()
    return out


@torch.no_grad()
def whole_optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole tensors (rank 0; ``{}`` elsewhere)."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        st = {key: full(val) for key, val in sd["state"][idx].items()}
        if main:
            state[idx] = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                          for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else {}


def _like(value: Tensor, target: Tensor) -> Tensor:
    """``value`` (whole) cut like ``target`` (a DTensor: this rank's shard)."""
    from torch.distributed.tensor import distribute_tensor

    if not is_sharded(target):
        return value
    return distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                             target.placements)


@torch.no_grad()
def load_whole(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load whole tensors into a sharded (or plain) module; every rank passes the same."""
    current = module.state_dict()
    module.load_state_dict({k: _like(v, current[k]) if k in current else v
                            for k, v in state.items()})


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]
                          ) -> dict[str, Any]:
    """A saved (whole) optimizer state dict cut into this rank's shards of each parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: _like(v, p) if torch.is_tensor(v) and v.shape == p.shape and v.dim()
                      else v for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """``nn.utils.clip_grad_norm_`` for a mix of sharded (model) and whole (loss) gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]
    parts = []
    if sharded:
        parts.append(full(nn.utils.get_total_norm(sharded, norm_type=2.0)))
    if plain:
        parts.append(nn.utils.get_total_norm(plain, norm_type=2.0))
    if not parts:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([t.float().to(parts[0].device)
                                                  for t in parts]))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for group in (sharded, plain):
        if group and coef < 1.0:
            torch._foreach_mul_(group, coef)
    return total
