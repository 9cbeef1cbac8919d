"""The metrics log (``metrics.jsonl``) and the console (progress bar on a terminal, log lines
otherwise): how every row a run logs reaches the disk and the user."""

from __future__ import annotations

import os
import sys
from typing import Any

from mmfw.spi import Callback, RunContext, StepEnd


class MetricsLog(Callback):
    """Appends every logged row to ``metrics.jsonl`` (rank 0), first of all callbacks."""

    order = -100

    def on_log_row(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if ctx.is_main:
            ctx.run_dir.append(row)


#: a train row whose steps waited this share of their wall time for the loader says so
DATA_WAIT_SHOWN = 0.2


def data_wait_hint(ctx: RunContext, frac: float) -> str:
    """What to change when the loader is the bottleneck, with the keys' present values."""
    d = ctx.recipe.data
    keys = []
    if d.num_workers < (os.cpu_count() or 1):
        keys.append(f"raise data.num_workers (now {d.num_workers})")
    if not d.cache:
        keys.append('set data.cache = "<folder>" (decoded images kept on disk)')
    todo = " or ".join(keys) or "a faster disk or smaller images: data.num_workers and " \
        "data.cache are already set"
    return (f"note: the steps wait for data {frac:.0%} of their time (time/data_frac in "
            f"metrics.jsonl): {todo}")


class Console(Callback):
    """The training line, one line per train row (or a tqdm bar on a terminal with
    ``run.progress``), and the closing line. A row whose steps waited for the loader more
    than :data:`DATA_WAIT_SHOWN` of their time shows that share, and the first such row
    (past the first, which counts the loader's start) says which keys help."""

    order = -90

    def __init__(self, options: Any) -> None:
        self.run = options
        self.bar: Any = None
        self.rows = 0
        self.hinted = False

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
        self.rows += 1
        frac = row.get("time/data_frac", 0.0)
        slow = frac > DATA_WAIT_SHOWN
        if self.bar is not None:
            extra = {"data": f"{frac:.0%}"} if slow else {}
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                 sps=f"{row['samples_per_s']:.0f}", **extra, refresh=False)
        else:
            ctx.say(f"step {row['step']}/{ctx.total_steps} loss {row['loss']:.4f} "
                    f"lr {row['lr']:.2e} {row['samples_per_s']:.0f} samples/s "
                    f"sim gap {row['sim/gap']:.3f}" + (f" data wait {frac:.0%}" if slow else ""))
        if slow and self.rows > 1 and not self.hinted:
            self.hinted = True
            ctx.say(data_wait_hint(ctx, frac))

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
