"""Helpers shared by the tests: the tiny recipe and ways to run the CLI."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from click.testing import CliRunner, Result

#: environment for `python -m mmfw` subprocesses: offline and single-threaded
SUBPROCESS_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}

#: the smallest recipe that trains end to end (2 epochs of 20 steps on the synthetic set)
TINY: dict[str, Any] = {
    "run": {"name": "tiny", "seed": 0, "epochs": 2, "progress": False},
    "backend": {"name": "cpu", "threads": 1},
    "data": {
        "dataset": "synthetic",
        "train_images": 64,
        "val_images": 16,
        "test_images": 32,
        "image_size": 16,
    },
    "sampler": {"name": "random", "batch_size": 16},
    "model": {
        "embed_dim": 32,
        "vision": {
            "name": "scratch-vision",
            "image_size": 16,
            "patch_size": 8,
            "width": 32,
            "depth": 1,
            "heads": 2,
        },
        "text": {"name": "scratch-text", "width": 32, "depth": 1, "heads": 2, "vocab_size": 200},
    },
    "loss": {"name": "infonce"},
    "schedule": {"name": "warmup-cosine", "warmup_steps": 5},
    # matplotlib is most of a tiny run's time: tests that look at plots turn them on
    "plots": {"enabled": False},
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: the backend section of tests that compare two ways of computing the same training (ranks
#: against one process, pieces against the whole batch): fp32, whatever the CPU, because bf16
#: autocast (the default on CPUs with bf16 matrix instructions) rounds each way differently
EXACT_BACKEND = {"precision": "fp32"}


def tiny_recipe(output_dir: Path | str, name: str = "tiny", **sections: Any) -> dict[str, Any]:
    """TINY with its run directory under ``output_dir``; keyword sections are merged in."""
    data = deep_merge(TINY, {"run": {"name": name, "output_dir": str(output_dir)}})
    return deep_merge(data, sections)


def cli(*args: str | Path) -> Result:
    """Invoke the click app in-process (stdout and stderr both end up in ``result.output``)."""
    from mmfw.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def run_module(*args: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m mmfw ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "mmfw", *[str(a) for a in args]],
        cwd=cwd,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_user_error(result: Result, *fragments: str, code: int = 2) -> str:
    """A user mistake: the promised exit code, an ``error:`` line, the fragments, no traceback."""
    out = result.output
    assert result.exit_code == code, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error:" in out
    assert "Traceback" not in out
    for fragment in fragments:
        assert fragment in out, f"{fragment!r} not in {out!r}"
    return out


def load_package(path: Path) -> ModuleType:
    """Import a contrib package from its source folder, without installing it."""
    name = path.name
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def mmfw_cli(site: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m mmfw ARGS`` with distributions installed in ``site`` importable."""
    env = dict(SUBPROCESS_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "mmfw", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def wordpiece_tokenizer(folder: Path, words: Iterable[str]) -> Any:
    """A BERT WordPiece tokenizer over ``words`` (their characters and ``##`` pieces too),
    its ``vocab.txt`` written in ``folder``: one line a token (ids are line numbers)."""
    import transformers as tf

    words = list(words)
    chars = sorted({c for w in words for c in w})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                              *chars, *(f"##{c}" for c in chars), *words]))
                     + "\n", encoding="utf-8")
    # vocab=, not vocab_file=: transformers 5 ignores the latter and keeps 5 special tokens
    return tf.BertTokenizerFast(vocab=str(vocab))
