"""Checkpoint integrity: hashes in the .json marker, ``verify``, falling back past damaged
checkpoints, readable errors instead of tracebacks, umask permissions, durable renames,
orphan clean-up and pruning that keeps what it must (tiny modules, no training)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from mmfw.run import checkpoint as ckpt
from mmfw.spi.errors import MmfwError


def _stem(step: int) -> str:
    return f"step-{step:08d}"


def _modules() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    # 64x64 weights: the middle of the .safetensors is tensor data, not the header
    model = nn.Linear(64, 64)
    loss = nn.Module()
    loss.register_buffer("queue", torch.randn(4, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()  # AdamW state (exp_avg, ...) in the .train.safetensors
    return model, loss, opt


def _save(d: Path, step: int, keep: int = 0, protect: tuple[int, ...] = ()) -> None:
    model, loss, opt = _modules()
    ckpt.save(d, step, model=model, loss=loss, optimizer=opt, state={"epoch": 0}, keep=keep,
              protect=protect)


@pytest.fixture
def three(tmp_path: Path) -> Path:
    d = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(d, step)
    return d


def _warnings() -> tuple[list[str], Callable[[str], None]]:
    lines: list[str] = []
    return lines, lines.append


# damage ------------------------------------------------------------------------------------
def _truncate(d: Path) -> str:
    p = d / f"{_stem(3)}.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p.name


def _delete_train(d: Path) -> str:
    p = d / f"{_stem(3)}.train.safetensors"
    p.unlink()
    return p.name


def _garbage_json(d: Path) -> str:
    p = d / f"{_stem(3)}.json"
    p.write_bytes(b'{"step": 3, "epo\x00\xff garbage')
    return p.name


def _json_without_step(d: Path) -> str:
    p = d / f"{_stem(3)}.json"
    p.write_text(json.dumps({"epoch": 0}))
    return p.name


def _flip_byte(d: Path) -> str:
    p = d / f"{_stem(3)}.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    size = p.stat().st_size
    p.write_bytes(bytes(data))
    assert p.stat().st_size == size
    return p.name


DAMAGE = {"truncated": _truncate, "train-missing": _delete_train, "json-garbage": _garbage_json,
          "json-no-step": _json_without_step, "flipped-byte": _flip_byte}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_is_named_and_skipped(three: Path, kind: str) -> None:
    bad = DAMAGE[kind](three)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.verify(three, 3)
    assert err.value.file.name == bad
    assert bad in str(err.value)
    assert isinstance(err.value, MmfwError)  # the CLI prints it as one line
    if kind == "flipped-byte":
        assert "content does not match the hash its .json recorded" in str(err.value)
    ckpt.verify(three, 2)
    ckpt.verify(three, 1)
    assert ckpt.latest(three) == 3  # "is there a checkpoint" is unchanged
    lines, warn = _warnings()
    assert ckpt.latest_intact(three, warn) == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"checkpoint {_stem(3)} is damaged (")
    assert bad in lines[0]
    assert lines[0].endswith(f"; resuming from {_stem(2)} instead")


@pytest.mark.parametrize("kind", ["truncated", "train-missing", "json-garbage", "json-no-step"])
def test_loading_a_damaged_file_raises_checkpoint_error(three: Path, kind: str) -> None:
    bad = DAMAGE[kind](three)
    _, _, opt = _modules()

    def load() -> None:
        ckpt.read_weights(three, 3)
        state = ckpt.load_state(three, 3)
        ckpt.load_training(three, 3, opt, state)

    with pytest.raises(ckpt.CheckpointError) as err:
        load()
    assert err.value.file.name == bad


def test_load_training_without_optimizer_state_names_the_json(three: Path) -> None:
    _, _, opt = _modules()
    state = ckpt.load_state(three, 3)
    del state["rng"]
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_training(three, 3, opt, state)
    assert err.value.file.name == f"{_stem(3)}.json"


def test_every_damaged_newer_step_warns_once(three: Path) -> None:
    _flip_byte(three)
    (three / f"{_stem(2)}.safetensors").unlink()
    lines, warn = _warnings()
    assert ckpt.latest_intact(three, warn) == 1
    assert [ln.split(" is damaged")[0] for ln in lines] == [
        f"checkpoint {_stem(3)}", f"checkpoint {_stem(2)}"]
    assert all(ln.endswith(f"resuming from {_stem(1)} instead") for ln in lines)
    (three / f"{_stem(1)}.json").write_text("")
    lines, warn = _warnings()
    assert ckpt.latest_intact(three, warn) is None
    assert len(lines) == 3


def test_json_records_size_and_sha256_of_each_part(three: Path) -> None:
    state = json.loads((three / f"{_stem(3)}.json").read_text())
    names = {f"{_stem(3)}.safetensors", f"{_stem(3)}.train.safetensors"}
    assert set(state["files"]) == names
    for name in names:
        data = (three / name).read_bytes()
        assert state["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(),
                                        "bytes": len(data)}
    assert ckpt.verified(three, 3)["epoch"] == 0


def test_old_format_checkpoint_still_verifies(three: Path) -> None:
    for step in (1, 2, 3):
        marker = three / f"{_stem(step)}.json"
        state = json.loads(marker.read_text())
        del state["files"]
        marker.write_text(json.dumps(state))
        ckpt.verify(three, step)
    lines, warn = _warnings()
    assert ckpt.latest_intact(three, warn) == 3
    assert lines == []
    # without hashes a truncated part is still caught by its safetensors header
    bad = _truncate(three)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.verify(three, 3)
    assert err.value.file.name == bad
    assert ckpt.latest_intact(three, warn) == 2
    assert len(lines) == 1


def test_checkpoint_error_pickles() -> None:
    e = ckpt.CheckpointError(Path("/x/step-00000001.json"), "missing")
    back = pickle.loads(pickle.dumps(e))
    assert (back.file, back.reason, str(back)) == (e.file, e.reason, str(e))


# permissions and durability ----------------------------------------------------------------
@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640)],
                         ids=["umask-022", "umask-027"])
def test_files_get_the_umask_permissions(tmp_path: Path, umask: Callable[[int], None],
                                         mask: int, mode: int) -> None:
    umask(mask)
    d = tmp_path / "checkpoints"
    _save(d, 1)
    ckpt.mark_best(d, 1, {"rsum": 1.0})
    ckpt.atomic_text(tmp_path / "metrics.json", "{}")
    files = [*d.iterdir(), tmp_path / "metrics.json"]
    assert len(files) == 5
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p.name


def test_rename_is_followed_by_a_directory_fsync(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpt.atomic_text(tmp_path / "a.txt", "hello")
    assert synced == [False, True]  # the file, then the directory holding the rename


# best and pruning --------------------------------------------------------------------------
@pytest.mark.parametrize("text", ['{"step": 3', "", "[]", '{"step": "x"}', '{"rsum": 1}',
                                  "\xff"])
def test_torn_best_file_names_no_best(three: Path, text: str) -> None:
    (three / ckpt.BEST).write_text(text, encoding="latin-1")
    assert ckpt.best(three) is None
    _save(three, 4, keep=2)  # pruning reads it: must not crash
    assert ckpt.list_steps(three) == [3, 4]


def test_pruning_keeps_the_best_and_the_checkpoint_being_written(three: Path) -> None:
    ckpt.mark_best(three, 1, {"rsum": 1.0})
    _save(three, 5, keep=1)
    assert ckpt.list_steps(three) == [1, 5]
    # a stale newer step (e.g. resumed from an older intact one): the new save survives
    _save(three, 9)
    _save(three, 6, keep=1)
    assert ckpt.list_steps(three) == [1, 6, 9]
    ckpt.verify(three, 6)


# orphans -----------------------------------------------------------------------------------
def test_clean_removes_temp_files_and_orphan_parts_only(three: Path) -> None:
    ckpt.mark_best(three, 2, {"rsum": 1.0})
    planted = []
    for name in (f"{_stem(4)}.safetensors", f"{_stem(4)}.json", ckpt.BEST):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=three)  # as atomic_write names them
        os.close(fd)
        planted.append(Path(tmp).name)
    # killed between the weights and the marker: parts of step 4, no step-00000004.json
    for suffix in (".safetensors", ".train.safetensors"):
        (three / f"{_stem(4)}{suffix}").write_bytes(b"partial")
    (three / "notes.txt").write_text("mine")
    (three / ".hidden").write_text("mine")
    before = {p.name for p in three.iterdir()}
    removed = ckpt.clean(three)
    assert sorted(removed) == sorted(
        [*planted, f"{_stem(4)}.safetensors", f"{_stem(4)}.train.safetensors"])
    assert {p.name for p in three.iterdir()} == before - set(removed)
    for step in (1, 2, 3):
        ckpt.verify(three, step)
    assert ckpt.best(three) == 2
    assert ckpt.clean(three) == []
    assert ckpt.clean(three / "missing") == []
