"""Plots of a finished run into ``plots/`` (training curves, diagnostics, similarity
histogram, spectrum, embedding map), after the final evaluation; a failing plot says so and
never loses the metrics, already on disk."""

from __future__ import annotations

from mmfw.spi import Callback, RunContext


class Plots(Callback):
    order = 20  # after the final evaluation (metrics.json first)

    def on_run_end(self, ctx: RunContext, stopped_by: str) -> None:
        from mmfw.tools.plots import run_plots  # matplotlib: only when a run ends

        with ctx.whole_model():
            if ctx.is_main:
                run_plots(ctx, ctx.recipe.eval.split)


def plots(options: None) -> Plots:
    """The run's plots (drawn as ``[diagnostics]`` map_method / map_points say)."""
    return Plots()


plots.default = True  # type: ignore[attr-defined]
