"""Plots of a finished run into ``plots/`` (training curves, diagnostics, similarity
histogram, spectrum, embedding map), after the final evaluation; a failing plot says so and
never loses the metrics, already on disk."""

from __future__ import annotations

import attrs

from mmfw.spi import Callback, RunContext, option


@attrs.frozen
class PlotsOptions:
    enabled: bool = option(True, doc="draw plots/ when the run ends (training curves, "
                           "diagnostics, and with diagnostics.map_points the similarity "
                           "histogram, spectrum and embedding map); false: no plots (matplotlib "
                           "takes a second or two per figure on a small CPU)")


class Plots(Callback):
    order = 20  # after the final evaluation (metrics.json first)

    def __init__(self, options: PlotsOptions) -> None:
        self.enabled = options.enabled

    def on_run_end(self, ctx: RunContext, stopped_by: str) -> None:
        if not self.enabled:
            return
        from mmfw.tools.plots import run_plots  # matplotlib: only when a run ends

        with ctx.whole_model():
            if ctx.is_main:
                run_plots(ctx, ctx.recipe.eval.split)


def plots(options: PlotsOptions) -> Plots:
    """The run's plots (drawn as ``[diagnostics]`` map_method / map_points say)."""
    return Plots(options)


plots.Options = PlotsOptions  # type: ignore[attr-defined]
plots.section = "plots"  # type: ignore[attr-defined]
plots.default = True  # type: ignore[attr-defined]
