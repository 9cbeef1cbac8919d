"""``wandb``: one W&B run per mmfw run (named ``run.name``, in ``project``): the resolved
recipe as its config, every row logged at its step, the plots as images, the run's files
(recipe.toml, metrics.json, warnings.jsonl, profile/) saved with it.

``mode = "offline"`` (the default) sends nothing anywhere: the run is written under
``<run_dir>/wandb/offline-run-*`` and ``wandb sync`` uploads it later; ``"online"`` streams to
the W&B server (``wandb login`` first). On ``--resume`` the same W&B run id continues
(``resume = "allow"``; offline, a second ``offline-run-*`` folder with the same id, which
``wandb sync`` merges into one run). A SIGKILL loses what W&B's service process had not yet
written, so the resumed run first logs again, from metrics.jsonl, the rows up to its
checkpoint that the W&B run may lack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs

from mmfw.spi import RunContext, option

from .tracker import Tracker, needs, plots, run_files, scalars


@attrs.frozen
class WandbOptions:
    """``[report.wandb]``."""

    project: str = option("mmfw", doc="W&B project")
    entity: str = option("", doc="W&B team or user ('' = your default entity)")
    mode: Literal["offline", "online"] = option(
        "offline", doc="offline: written under <run_dir>/wandb, nothing leaves the machine "
        "(upload later with `wandb sync`); online: streamed to the W&B server")


class Wandb(Tracker):
    def __init__(self, options: WandbOptions) -> None:
        super().__init__(options)
        self.run: Any = None

    def open(self, ctx: RunContext, resumed: bool) -> None:
        import wandb

        o = self.options
        self.run = wandb.init(
            project=o.project, entity=o.entity or None, name=ctx.recipe.run.name,
            id=self.run_id, resume="allow" if resumed else None, mode=o.mode,
            dir=str(ctx.run_dir), config=ctx.recipe.to_dict(), allow_val_change=True,
            reinit="create_new")  # (config again on resume: a killed start may have lost it)
        self.run_id = self.run.id
        if resumed:
            self._replay(ctx)

    def _replay(self, ctx: RunContext) -> None:
        """Log again the rows up to the checkpoint the W&B run may lack. A killed process
        loses what its W&B service had not yet written or sent (offline: possibly all of
        it); the resumed run logs metrics.jsonl's rows from the W&B run's next step (0
        offline, where nothing is known; online, past the last step the server holds) up to
        the checkpoint's, so the W&B run has every step."""
        from mmfw.tools.plots import read_rows  # (matplotlib: not at registration)

        first = self.run.step
        for row in read_rows(Path(ctx.run_dir) / "metrics.jsonl"):
            step = int(row.get("step", 0))
            if first <= step <= ctx.step:
                self.log(step, scalars(row), row)

    def log(self, step: int, values: dict[str, float], row: dict[str, Any]) -> None:
        if values:
            self.run.log(values, step=step)

    def close(self, ctx: RunContext | None, status: str) -> None:
        if ctx is not None:
            import wandb

            images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in plots(ctx)}
            if images:
                self.run.log(images, step=ctx.step)
            base = str(Path(ctx.run_dir))
            for path, folder in run_files(ctx):
                if folder != "plots":  # the plots are in the run as images
                    self.run.save(str(path), base_path=base, policy="now")
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def wandb_tracker(options: WandbOptions) -> Wandb:
    """Logs the run to Weights & Biases (``run.report_to = ["wandb"]``)."""
    return Wandb(options)


wandb_tracker.Options = WandbOptions  # type: ignore[attr-defined]
wandb_tracker.section = "report.wandb"  # type: ignore[attr-defined]
wandb_tracker.why_unavailable = needs("wandb", "wandb", "wandb")  # type: ignore[attr-defined]
