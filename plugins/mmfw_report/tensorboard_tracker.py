"""``tensorboard``: every row as scalars, the recipe as text and hyperparameters (HPARAMS tab,
with the final metrics), the plots as images; event files under ``<run_dir>/tensorboard``.

``tensorboard --logdir runs`` shows every run of that folder side by side. On ``--resume`` the
same folder gets a new event file that starts with a purge at the checkpoint's step: the steps
the killed run logged after its last checkpoint are dropped, as the resumed run logs them
again (``SummaryWriter(purge_step=...)``). Each row is flushed as it is logged, so a killed
run's event file holds every row up to the kill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from mmfw.spi import RunContext, option

from .tracker import Tracker, finite, flatten, needs, plots


@attrs.frozen
class TensorBoardOptions:
    """``[report.tensorboard]``."""

    log_dir: str = option("", doc="folder of the event files: '' = <run_dir>/tensorboard; "
                          "a folder = <log_dir>/<run.name>, so several runs share one "
                          "`tensorboard --logdir <log_dir>`")


class TensorBoard(Tracker):
    def __init__(self, options: TensorBoardOptions) -> None:
        super().__init__(options)
        self.writer: Any = None

    def log_dir(self, ctx: RunContext) -> str:
        if self.options.log_dir:
            return str(Path(self.options.log_dir).expanduser() / ctx.recipe.run.name)
        return str(Path(ctx.run_dir) / "tensorboard")

    def open(self, ctx: RunContext, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = self.run_id or self.log_dir(ctx)
        self.writer = SummaryWriter(self.run_id, purge_step=ctx.step + 1 if resumed else None)
        if not resumed:
            text = "\n".join("    " + line for line in ctx.recipe.to_toml().splitlines())
            self.writer.add_text("recipe", text, 0)  # an indented block: shown as code

    def log(self, step: int, values: dict[str, float], row: dict[str, Any]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if row.get("type") == "warning":
            self.writer.add_text("warnings", str(row.get("message", row)), step)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self, ctx: RunContext | None, status: str) -> None:
        if ctx is not None:
            self._images(ctx)
            self._hparams(ctx)
        self.writer.close()

    def _images(self, ctx: RunContext) -> None:
        import numpy as np
        from PIL import Image

        for path in plots(ctx):
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
            self.writer.add_image(f"plots/{path.stem}", pixels, ctx.step, dataformats="HWC")

    def _hparams(self, ctx: RunContext) -> None:
        """The recipe in the HPARAMS tab, with the final metrics (the scalars of the final
        evaluation, ``eval/<split>/<metric>``) as its metrics; written into this run's own
        event file (not the sub-folder ``add_hparams`` makes)."""
        from torch.utils.tensorboard.summary import hparams

        split, metrics = self.final or ("", {})
        found = {f"eval/{split}/{k}": v for k, v in finite(metrics).items()}
        for summary in hparams(flatten(ctx.recipe.to_dict()), found):
            self.writer.file_writer.add_summary(summary)


def tensorboard_tracker(options: TensorBoardOptions) -> TensorBoard:
    """Logs the run to TensorBoard event files (``run.report_to = ["tensorboard"]``)."""
    return TensorBoard(options)


tensorboard_tracker.Options = TensorBoardOptions  # type: ignore[attr-defined]
tensorboard_tracker.section = "report.tensorboard"  # type: ignore[attr-defined]
tensorboard_tracker.why_unavailable = needs(  # type: ignore[attr-defined]
    "tensorboard", "tensorboard", "tensorboard")
