"""What training a recipe returns."""

from __future__ import annotations

from pathlib import Path

import attrs


@attrs.frozen
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    steps: int
    seconds: float
    stopped_by: str  # "epochs", "max_steps", "max_minutes", "collapse", "early_stopping",
    #                  "done" (an ensemble member already trained), or "ensemble" (then
    #                  ``members`` holds each seed's result)
    members: tuple[RunResult, ...] = ()
