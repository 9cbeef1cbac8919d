"""Shared set-up: one torch thread, a deterministic hypothesis profile, a recipe writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, settings

# One intra-op thread: the test machine is small and shared, and thread contention between
# processes makes tiny models orders of magnitude slower.
torch.set_num_threads(1)

settings.register_profile(
    "mmfw",
    deadline=None,
    max_examples=40,
    derandomize=True,  # the suite is deterministic: same examples on every run
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("mmfw")


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """``write_recipe(data_or_text, name="recipe.toml") -> path`` in the test's tmp_path."""

    def write(content: dict[str, Any] | str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        text = content if isinstance(content, str) else tomli_w.dumps(content)
        path.write_text(text, encoding="utf-8")
        return path

    return write
