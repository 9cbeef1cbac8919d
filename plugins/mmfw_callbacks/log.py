"""The metrics log (``metrics.jsonl``) and the console (progress bar on a terminal, log lines
otherwise): how every row a run logs reaches the disk and the user."""

from __future__ import annotations

import sys
from typing import Any

from mmfw.spi import Callback, RunContext, StepEnd


class MetricsLog(Callback):
    """Appends every logged row to ``metrics.jsonl`` (rank 0), first of all callbacks."""

    order = -100

    def on_log_row(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if ctx.is_main:
            ctx.run_dir.append(row)


class Console(Callback):
    """The training line, one line per train row (or a tqdm bar on a terminal with
    ``run.progress``), and the closing line."""

    order = -90

    def __init__(self, options: Any) -> None:
        self.run = options
        self.bar: Any = None

    def on_run_start(self, ctx: RunContext) -> None:
        r = ctx.recipe
        ctx.say(f"training: {ctx.total_steps} steps ({r.run.epochs} epochs x "
                f"{ctx.steps_per_epoch}), batch {r.sampler.batch_size}, "
                f"{ctx.backend.describe()}")
        if self.run.progress and ctx.is_main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=ctx.total_steps, initial=ctx.step, unit="step",
                            dynamic_ncols=True, mininterval=0.5)

    def on_step_end(self, ctx: RunContext, step: StepEnd) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log_row(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if row.get("type") != "train":
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                 sps=f"{row['samples_per_s']:.0f}", refresh=False)
        else:
            ctx.say(f"step {row['step']}/{ctx.total_steps} loss {row['loss']:.4f} "
                    f"lr {row['lr']:.2e} {row['samples_per_s']:.0f} samples/s "
                    f"sim gap {row['sim/gap']:.3f}")

    def on_run_end(self, ctx: RunContext, stopped_by: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def metrics_log(options: None) -> MetricsLog:
    return MetricsLog()


def console(options: Any) -> Console:
    return Console(options)


metrics_log.default = True  # type: ignore[attr-defined]
console.default = True  # type: ignore[attr-defined]
console.section = "run"  # type: ignore[attr-defined]
