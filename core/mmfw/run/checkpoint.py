"""Checkpoints: safetensors weights + JSON state, each file written atomically.

A checkpoint ``step-00000123`` is three files (four when callbacks keep tensors, an EMA of
the weights: ``.callbacks.safetensors``); the ``.json`` is written last and is the commit
marker, so a run killed while saving leaves either a complete checkpoint or none (plus orphan
parts that ``clean`` removes). The ``.json`` records the size and SHA-256 of each part
(``"files"``), so ``verify`` tells a damaged checkpoint from a good one and ``latest_intact``
falls back past damaged ones. ``latest`` is the newest step whose ``.json`` exists. The file
``best`` names the checkpoint with the best val rsum; pruning to the newest ``keep`` never
deletes it, nor the checkpoint being written.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..spi.errors import MmfwError

_STEP = re.compile(r"step-(\d{8})\.json$")
#: a part file of a checkpoint (weights, optimizer + RNG, or callbacks' tensors)
_PART = re.compile(r"step-(\d{8})(?:\.train|\.callbacks)?\.safetensors$")
#: a temp file ``atomic_write`` left behind (mkstemp: f".{name}." + random letters)
_TEMP = re.compile(r"\.(?:step-\d{8}(?:\.train|\.callbacks)?\.(?:safetensors|json)|best)"
                   r"\.[A-Za-z0-9_]+$")
#: the part holding callbacks' tensors, as ``<callback>/<name>`` keys
CALLBACKS_PART = ".callbacks.safetensors"
#: names the checkpoint with the best val rsum (JSON; no .json suffix, so no step is misread)
BEST = "best"
_CHUNK = 1 << 20  # hash in 1 MiB reads


class CheckpointError(MmfwError):
    """A checkpoint file is missing, unreadable or damaged: ``file`` names it, ``reason`` why."""

    def __init__(self, file: Path | str, reason: str) -> None:
        self.file, self.reason = Path(file), reason
        super().__init__(f"checkpoint file {self.file}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (crosses processes)
        return type(self), (self.file, self.reason)

    @property
    def detail(self) -> str:
        """``"<file name>: <reason>"``, for a one-line warning."""
        return f"{self.file.name}: {self.reason}"


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(f: Any) -> tuple[str, int]:
    """SHA-256 hex digest and size of the open binary file ``f``, read from where it is."""
    h, n, buf = hashlib.sha256(), 0, bytearray(_CHUNK)
    view = memoryview(buf)
    while k := f.readinto(buf):
        h.update(view[:k])
        n += k
    return h.hexdigest(), n


def _write(path: Path, write: Callable[[str], None], digest: bool) -> dict[str, Any] | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    record = None
    try:
        write(tmp)
        # mkstemp makes 0600; files follow the umask like any other the run writes (a file
        # system without modes refuses: keep what it has)
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            if digest:  # read back from the page cache, just written: cheap
                sha, size = _sha256(f)
                record = {"sha256": sha, "bytes": size}
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return record


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path`` (same directory).

    The file gets the umask's permissions; the file and the rename are fsynced."""
    _write(path, write, digest=False)


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


def save(directory: Path, step: int, *, model: nn.Module | None, loss: nn.Module | None,
         optimizer: torch.optim.Optimizer | None, state: dict[str, Any], keep: int = 2,
         protect: Iterable[int] = (), scaler: Any = None,
         model_state: Mapping[str, torch.Tensor] | None = None,
         optimizer_state: dict[str, Any] | None = None,
         callback_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
         loss_state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` and delete all but the newest ``keep`` and ``protect``.

    ``loss`` holds every loss of the run (their parameters and state, e.g. a memory queue);
    ``scaler`` is a GradScaler whose state goes in the JSON. ``model_state`` /
    ``optimizer_state`` replace the modules' own state dicts (FSDP: gathered whole).
    ``callback_tensors`` (callback name -> its tensors) go in one more part, hashed like the
    others. ``model`` / ``loss`` may be None when ``model_state`` / ``loss_state`` give their
    tensors (weights made by arithmetic: ``mmfw average``).
    """
    stem = directory / f"step-{step:08d}"
    model_state = model_state if model_state is not None else model.state_dict()  # type: ignore[union-attr]
    loss_state = loss_state if loss_state is not None else loss.state_dict()  # type: ignore[union-attr]
    weights = {f"model.{k}": v for k, v in _tensors(model_state).items()}
    weights.update({f"loss.{k}": v for k, v in _tensors(loss_state).items()})
    files: dict[str, Any] = {}
    part = stem.with_suffix(".safetensors")
    files[part.name] = _write(part, lambda p: save_file(weights, p), digest=True)
    cb_tensors = {f"{name}/{k}": v for name, tensors in (callback_tensors or {}).items()
                  for k, v in _tensors(tensors).items()}
    if cb_tensors:
        part = Path(f"{stem}{CALLBACKS_PART}")
        files[part.name] = _write(part, lambda p: save_file(cb_tensors, p), digest=True)
    extra: dict[str, Any] = {}
    if optimizer is not None:
        opt_tensors, opt_plain = _flatten_optimizer(
            optimizer.state_dict() if optimizer_state is None else optimizer_state)
        rng_tensors, rng_plain = rng_state()
        part = Path(f"{stem}.train.safetensors")
        files[part.name] = _write(part, lambda p: save_file({**opt_tensors, **rng_tensors}, p),
                                  digest=True)
        extra = {"optimizer": opt_plain, "rng": rng_plain}
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
    atomic_text(stem.with_suffix(".json"),
                json.dumps({"step": step, **state, **extra, "files": files}))
    keep_steps = {step, *protect}  # never the checkpoint just written (older than stale ones)
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
    try:  # a torn or hand-edited file names no best
        step = int(json.loads((directory / BEST).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None
    return step if (directory / f"step-{step:08d}.json").is_file() else None


def list_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _STEP.match(p.name)))


def remove(directory: Path, step: int) -> None:
    stem = directory / f"step-{step:08d}"
    for suffix in (".json", ".safetensors", ".train.safetensors", CALLBACKS_PART):
        Path(f"{stem}{suffix}").unlink(missing_ok=True)


def latest(directory: Path) -> int | None:
    """The newest step whose ``.json`` exists (intact or not: see ``latest_intact``)."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror or e})") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(path, "not valid JSON (torn or damaged on disk?)") from None
    if not isinstance(data, dict) or "step" not in data:
        raise CheckpointError(path, 'has no "step" (not a checkpoint marker?)')
    return data


def _check_header(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({e})") from None


def _check_part(path: Path, record: Any, marker: Path) -> None:
    if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
            and isinstance(record.get("bytes"), int)):
        raise CheckpointError(marker, f'records a malformed "files" entry for {path.name}')
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != record["bytes"]:
                raise CheckpointError(path, f"{size} bytes, but its .json recorded "
                                            f"{record['bytes']} (truncated?)")
            sha, _ = _sha256(f)
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror or e})") from None
    if sha != record["sha256"]:
        raise CheckpointError(
            path, "content does not match the hash its .json recorded (damaged on disk?)")


def verified(directory: Path, step: int) -> dict[str, Any]:
    """``verify`` checkpoint ``step`` and return its state (the ``.json``)."""
    stem = directory / _name(step)
    marker = stem.with_suffix(".json")
    state = _read_json(marker)
    if state["step"] != step:
        raise CheckpointError(marker, f"records step {state['step']!r}, not {step}")
    files = state.get("files")
    if files is not None and not isinstance(files, dict):
        raise CheckpointError(marker, 'records a malformed "files" entry')
    files = files or {}
    parts = [stem.with_suffix(".safetensors").name]
    if "optimizer" in state:
        parts.append(f"{stem.name}.train.safetensors")
    parts += [n for n in files if n not in parts]
    for name in parts:
        if Path(name).name != name:  # the .json names files beside it, nothing else
            raise CheckpointError(marker, f'records a file outside its directory: {name!r}')
        if name in files:
            _check_part(directory / name, files[name], marker)
        else:  # written before checkpoints recorded hashes: only that it is there and loads
            _check_header(directory / name)
    return state


def verify(directory: Path, step: int) -> None:
    """Raise ``CheckpointError`` naming the file and why, unless checkpoint ``step`` is intact:
    its ``.json`` parses and has ``"step"``, and every part it records is there with the
    recorded size and SHA-256. Checkpoints written before hashes were recorded are checked
    for their parts' presence and readable safetensors headers only."""
    verified(directory, step)


def latest_intact(directory: Path, warn: Callable[[str], None]) -> int | None:
    """The newest step that passes ``verify``; each newer damaged one is ``warn``-ed once."""
    damaged: list[tuple[int, CheckpointError]] = []
    found = None
    for step in reversed(list_steps(directory)):
        try:
            verify(directory, step)
        except CheckpointError as e:
            damaged.append((step, e))
            continue
        found = step
        break
    instead = (f"resuming from {_name(found)} instead" if found is not None
               else "no intact checkpoint is left")
    for step, e in damaged:
        warn(f"checkpoint {_name(step)} is damaged ({e.detail}); {instead}")
    return found


def clean(directory: Path) -> list[str]:
    """Remove what interrupted saves left: temp files and the parts of steps with no ``.json``
    (killed between the weights and the marker). Returns the removed names. Call it only while
    nothing is saving into ``directory`` (at resume)."""
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        orphan = (m := _PART.match(p.name)) and not (directory / f"{_name(int(m[1]))}.json"
                                                     ).exists()
        if (orphan or _TEMP.match(p.name)) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p.name)
    if removed:
        _fsync_dir(directory)
    return removed


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({e})") from None


def read_weights(directory: Path, step: int
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's and the losses' tensors of checkpoint ``step``."""
    tensors = _load_tensors(directory / f"{_name(step)}.safetensors")
    return ({k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
            {k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})


def read_callback_tensors(directory: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint ``step``'s callback tensors, by callback name (none: ``{}``)."""
    path = Path(f"{directory / _name(step)}{CALLBACKS_PART}")
    if not path.is_file():
        return {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _load_tensors(path).items():
        name, _, sub = key.partition("/")
        out.setdefault(name, {})[sub] = value
    return out


def read_eval_weights(directory: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights checkpoint ``step`` is evaluated with: those of the callback its
    ``.json`` names in ``eval_weights`` (an EMA of the weights), else the trained ones."""
    name = load_state(directory, step).get("eval_weights")
    if not name:
        return read_weights(directory, step)[0]
    tensors = read_callback_tensors(directory, step).get(str(name))
    if not tensors:
        raise CheckpointError(Path(f"{directory / _name(step)}{CALLBACKS_PART}"),
                              f"has no tensors of callback {name!r}, which its .json names "
                              "as the evaluated weights")
    return tensors


def load_weights(directory: Path, step: int, model: nn.Module, loss: nn.Module | None) -> None:
    model_state, loss_state = read_weights(directory, step)
    model.load_state_dict(model_state)
    if loss is not None:
        loss.load_state_dict(loss_state)


def load_state(directory: Path, step: int) -> dict[str, Any]:
    return _read_json(directory / f"{_name(step)}.json")


def load_training(directory: Path, step: int, optimizer: torch.optim.Optimizer,
                  state: dict[str, Any], scaler: Any = None,
                  prepare: Callable[[dict], dict] | None = None) -> None:
    """Restore optimizer, GradScaler and RNG states saved with ``save``; ``prepare`` turns
    the saved optimizer state into what the optimizer loads (FSDP: this rank's shards)."""
    path = directory / f"{_name(step)}.train.safetensors"
    tensors = _load_tensors(path)
    marker = directory / f"{_name(step)}.json"
    for key in ("optimizer", "rng"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(marker, f'has no "{key}" state (saved without an optimizer?)')
    if "rng.torch" not in tensors:
        raise CheckpointError(path, 'has no "rng.torch" tensor')
    try:
        sd = _unflatten_optimizer(tensors, state["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(marker, f"optimizer state is malformed ({e!r})") from None
    optimizer.load_state_dict(prepare(sd) if prepare is not None else sd)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    try:
        set_rng_state(tensors, state["rng"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(marker, f"RNG state is malformed ({e!r})") from None
