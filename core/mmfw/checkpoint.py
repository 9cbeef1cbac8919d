"""Checkpoints: safetensors weights + JSON state, each file written atomically.

A checkpoint ``step-00000123`` is three files; the ``.json`` is written last and is the commit
marker, so a run killed while saving leaves either a complete checkpoint or none. Resuming picks
the newest step whose ``.json`` exists. The file ``best`` names the checkpoint with the best val
rsum; pruning to the newest ``keep`` never deletes it.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

_STEP = re.compile(r"step-(\d{8})\.json$")
#: names the checkpoint with the best val rsum (JSON; no .json suffix, so no step is misread)
BEST = "best"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path`` (same directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights)
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        plain["state"][str(idx)] = {}
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][key] = val
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, val in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    plain = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuples(plain["python"]))
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def save(directory: Path, step: int, *, model: nn.Module, loss: nn.Module,
         optimizer: torch.optim.Optimizer | None, state: dict[str, Any], keep: int = 2,
         protect: Iterable[int] = (), scaler: Any = None,
         model_state: Mapping[str, torch.Tensor] | None = None,
         optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` and delete all but the newest ``keep`` and ``protect``.

    ``loss`` holds every loss of the run (their parameters and state, e.g. a memory queue);
    ``scaler`` is a GradScaler whose state goes in the JSON. ``model_state`` /
    ``optimizer_state`` replace the modules' own state dicts (FSDP: gathered whole).
    """
    stem = directory / f"step-{step:08d}"
    weights = {f"model.{k}": v for k, v in _tensors(
        model.state_dict() if model_state is None else model_state).items()}
    weights.update({f"loss.{k}": v for k, v in _tensors(loss.state_dict()).items()})
    atomic_write(stem.with_suffix(".safetensors"), lambda p: save_file(weights, p))
    extra: dict[str, Any] = {}
    if optimizer is not None:
        opt_tensors, opt_plain = _flatten_optimizer(
            optimizer.state_dict() if optimizer_state is None else optimizer_state)
        rng_tensors, rng_plain = rng_state()
        atomic_write(Path(f"{stem}.train.safetensors"),
                     lambda p: save_file({**opt_tensors, **rng_tensors}, p))
        extra = {"optimizer": opt_plain, "rng": rng_plain}
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
    atomic_text(stem.with_suffix(".json"), json.dumps({"step": step, **state, **extra}))
    keep_steps = set(protect)
    best_step = best(directory)
    if best_step is not None:
        keep_steps.add(best_step)
    for old in list_steps(directory)[:-keep] if keep else []:
        if old not in keep_steps:
            remove(directory, old)
    return stem


def mark_best(directory: Path, step: int, metrics: dict[str, float]) -> None:
    """Record checkpoint ``step`` as the best (written atomically; the checkpoint must exist)."""
    atomic_text(directory / BEST, json.dumps({"step": step, **metrics}))


def best(directory: Path) -> int | None:
    """The best checkpoint's step, if one is recorded and still on disk."""
    path = directory / BEST
    if not path.is_file():
        return None
    step = int(json.loads(path.read_text())["step"])
    return step if (directory / f"step-{step:08d}.json").is_file() else None


def list_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _STEP.match(p.name)))


def remove(directory: Path, step: int) -> None:
    stem = directory / f"step-{step:08d}"
    for suffix in (".json", ".safetensors", ".train.safetensors"):
        Path(f"{stem}{suffix}").unlink(missing_ok=True)


def latest(directory: Path) -> int | None:
    steps = list_steps(directory)
    return steps[-1] if steps else None


def read_weights(directory: Path, step: int
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's and the losses' tensors of checkpoint ``step``."""
    tensors = load_file(str(directory / f"step-{step:08d}.safetensors"))
    return ({k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
            {k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})


def load_weights(directory: Path, step: int, model: nn.Module, loss: nn.Module | None) -> None:
    model_state, loss_state = read_weights(directory, step)
    model.load_state_dict(model_state)
    if loss is not None:
        loss.load_state_dict(loss_state)


def load_state(directory: Path, step: int) -> dict[str, Any]:
    return json.loads((directory / f"step-{step:08d}.json").read_text())


def load_training(directory: Path, step: int, optimizer: torch.optim.Optimizer,
                  state: dict[str, Any], scaler: Any = None,
                  prepare: Callable[[dict], dict] | None = None) -> None:
    """Restore optimizer, GradScaler and RNG states saved with ``save``; ``prepare`` turns
    the saved optimizer state into what the optimizer loads (FSDP: this rank's shards)."""
    tensors = load_file(str(directory / f"step-{step:08d}.train.safetensors"))
    sd = _unflatten_optimizer(tensors, state["optimizer"])
    optimizer.load_state_dict(prepare(sd) if prepare is not None else sd)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(tensors, state["rng"])
