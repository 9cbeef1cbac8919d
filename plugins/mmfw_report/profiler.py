"""``profiler``: ``run.profile = {start = N, steps = K}`` runs torch.profiler over optimizer
steps N .. N+K-1 (each from the wait for its batch to the end of its callbacks) and writes
into ``<run_dir>/profile/``:

- ``steps-<N>-<M>.pt.trace.json``: the Chrome trace (open it in https://ui.perfetto.dev or
  ``chrome://tracing``; TensorBoard's profiler plugin reads ``*.pt.trace.json`` too), one
  ``mmfw step <n>`` span per step;
- ``top_ops.txt``: the operators by self time (CUDA time on a GPU, CPU time otherwise).

Rank 0 profiles; with ``run.profile.steps = 0`` (the default) the callback has no events at
all, so it costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmfw.spi import Callback, RunContext, StepEnd

PROFILE = "profile"


class Profiler(Callback):
    #: last: the profiled span of a step includes the other callbacks' work
    order = 1000

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.prof: Any = None
        self.span: Any = None

    def on_run_start(self, ctx: RunContext) -> None:
        if ctx.step == self.start - 1:
            self._begin(ctx)

    def on_step_end(self, ctx: RunContext, step: StepEnd) -> None:
        if self.prof is None:
            if ctx.step == self.start - 1:
                self._begin(ctx)
            return
        self.span.__exit__(None, None, None)
        if ctx.step >= self.start + self.steps - 1:
            self._end(ctx)
        else:
            self._span(ctx.step + 1)

    def on_run_end(self, ctx: RunContext, stopped_by: str) -> None:
        if self.prof is not None:  # the run ended inside the profiled steps
            self.span.__exit__(None, None, None)
            self._end(ctx)

    def _begin(self, ctx: RunContext) -> None:
        if not ctx.is_main:
            return
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" on CPU
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if ctx.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self._span(ctx.step + 1)

    def _span(self, step: int) -> None:
        from torch.profiler import record_function

        self.span = record_function(f"mmfw step {step}")
        self.span.__enter__()

    def _end(self, ctx: RunContext) -> None:
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        out = Path(ctx.run_dir) / PROFILE
        out.mkdir(parents=True, exist_ok=True)
        first, last = self.start, ctx.step
        trace = out / f"steps-{first}-{last}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        cuda = ctx.device.type == "cuda"
        averages = prof.key_averages()
        by = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = averages.table(sort_by=by, row_limit=30)
        (out / "top_ops.txt").write_text(
            f"torch.profiler, optimizer steps {first}-{last} of {ctx.recipe.run.name}\n\n"
            f"{table}\n", encoding="utf-8")
        ctx.say(f"profile: steps {first}-{last} -> {trace} and {out / 'top_ops.txt'}")


class _Off(Callback):
    """``run.profile.steps = 0``: implements no event."""


def profiler(options: Any) -> Callback:
    """torch.profiler trace and top-ops table of ``run.profile`` steps (off by default)."""
    p = options.profile
    return Profiler(p.start, p.steps) if p.steps else _Off()


profiler.default = True  # type: ignore[attr-defined]
profiler.section = "run"  # type: ignore[attr-defined]
