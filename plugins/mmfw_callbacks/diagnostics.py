"""``[diagnostics]``: collapse diagnostics measured while training (seed 001 §2.2, §7.3).

Every ``diagnostics.every`` optimizer steps this callback logs one ``"type": "diagnostics"``
row in ``metrics.jsonl``. It holds the statistics of the current training batch (prefix
``batch/``) and of a fixed probe batch embedded in eval mode without gradients (prefix
``probe/``), so successive rows are comparable; the per-module gradient norms of that step
(``grad/``); and the temperature. The :mod:`collapse <mmfw_callbacks.collapse>` detector reads
each row and warns when the model stops telling pairs apart; its streaks are checkpointed, so
a resumed run warns (and stops) exactly as the unbroken one.

All statistics are of L2-normalised embeddings, because that is what the loss and retrieval
compare: a model whose raw features vary a lot can still point every sample the same way.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from mmfw.data.batching import Batch
from mmfw.diagnostics.stats import (
    embedding_stats,
    gradient_groups,
    gradient_norms,
    probe_batch,
)
from mmfw.spi import Callback, RecipeError, RunContext, StepEnd, option

from .collapse import CollapseDetector, Symptom

WARNINGS_JSONL = "warnings.jsonl"

_ge0, _ge1, _gt0 = attrs.validators.ge(0), attrs.validators.ge(1), attrs.validators.gt(0)


@attrs.frozen
class DiagnosticsOptions:
    """Collapse diagnostics computed while training (see ``mmfw_callbacks.diagnostics``)."""

    every: int = option(50, doc="optimizer steps between diagnostics (0: off)", validator=_ge0)
    probe_size: int = option(256, doc="images (one caption each) in the fixed probe batch "
                             "embedded in eval mode at each check (0: current batch only)",
                             validator=_ge0)
    probe_split: str = option("", doc="split the probe batch comes from ('': eval.val_split "
                              "if the dataset has it, else data.train_split)")
    gap_threshold: float = option(0.02, doc="collapse when positive minus negative mean cosine "
                                  "similarity stays at or below this")
    rank_fraction: float = option(0.01, doc="collapse when a modality's effective rank stays "
                                  "below this fraction of min(embed_dim, probe rows - 1)",
                                  validator=[_ge0, attrs.validators.le(1)])
    patience: int = option(3, doc="consecutive checks a symptom must last before it warns",
                           validator=_ge1)
    grace_steps: int = option(100, doc="checks before this step are logged but not judged (a "
                              "fresh model has no gap yet)", validator=_ge0)
    stop_on_collapse: bool = option(False, doc="end training (stopped_by = \"collapse\") when "
                                    "the detector fires; the run still evaluates")
    low_variance: float = option(0.1, doc="a dimension is low-variance below this fraction of "
                                 "1/embed_dim (its variance under an isotropic spread)",
                                 validator=_gt0)
    spectrum_top: int = option(16, doc="leading covariance eigenvalues stored per check",
                               validator=_ge1)
    map_method: Literal["auto", "umap", "tsne", "pca"] = option(
        "auto", doc="2-D embedding map at the final evaluation (auto: UMAP when umap-learn is "
        "installed, else t-SNE)")
    map_points: int = option(300, doc="test images (and one caption each) in the final "
                             "plots (0: no embedding plots)", validator=_ge0)


class Diagnostics(Callback):
    """Inert when ``every`` is 0. Gradients are read on due steps after backward; the row,
    the probe and the detector run at the step's end."""

    def __init__(self, options: DiagnosticsOptions) -> None:
        self.config = c = options
        self.every = c.every
        self._grads: dict[str, Tensor] = {}
        self._groups: dict[str, list[torch.nn.Parameter]] = {}
        self.probe: Batch | None = None
        self.probe_split = ""
        self.detector = CollapseDetector(gap_threshold=c.gap_threshold,
                                         rank_fraction=c.rank_fraction, patience=c.patience,
                                         grace_steps=c.grace_steps)

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)

    def on_run_start(self, ctx: RunContext) -> None:
        self.detector.recipe = ctx.recipe
        if not self.every:
            return
        # every loss the run may use (a stage scheduler can switch losses)
        self._groups = gradient_groups(ctx.model, ctx.losses)
        if self.config.probe_size:
            self.probe_split = name = self._probe_split_name(ctx)
            model = ctx.model
            probe = probe_batch(ctx.source.split(name), self.config.probe_size,
                                model.vision.preprocess, model.text.tokenize)
            self.probe = probe.to(ctx.device) if probe is not None else None

    def _probe_split_name(self, ctx: RunContext) -> str:
        r, splits, c = ctx.recipe, ctx.source.splits, self.config
        if c.probe_split:
            if c.probe_split not in splits:
                raise RecipeError(f"dataset '{r.data.dataset.name}' has no split "
                                  f"'{c.probe_split}'", key="diagnostics.probe_split",
                                  expected="one of " + ", ".join(splits), given=c.probe_split)
            return c.probe_split
        return r.eval.val_split if r.eval.val_split in splits else r.data.train_split

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) is a diagnostics step."""
        return bool(self.every) and step % self.every == 0

    def on_after_backward(self, ctx: RunContext, step: int) -> None:
        if self.due(step):  # per-part norms of the step being trained (final, unclipped)
            self._grads = gradient_norms(self._groups)

    def on_step_end(self, ctx: RunContext, step: StepEnd) -> None:
        if not self.due(ctx.step):
            return
        with ctx.whole_model() as model:
            fired = self.check(ctx, model, step.batch, step.image, step.text) \
                if ctx.is_main else []
        if fired and self.config.stop_on_collapse:
            ctx.stop("collapse")

    @torch.no_grad()
    def probe_embeddings(self, ctx: RunContext, model: torch.nn.Module) -> tuple[Tensor, Tensor]:
        """The probe batch embedded in eval mode; each module's train/eval mode is restored."""
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with ctx.backend.autocast():
                img = model.encode_image(self.probe.pixels).float()
                txt = model.encode_text(self.probe.tokens).float()
        finally:
            for m, mode in modes:
                m.training = mode
        return img, txt

    def check(self, ctx: RunContext, model: torch.nn.Module, batch: Batch, image: Tensor,
              text: Tensor) -> list[Symptom]:
        """Log one diagnostics row for the step just taken; return symptoms that fired."""
        c = self.config
        row: dict[str, Any] = {"type": "diagnostics", "step": ctx.step, "epoch": ctx.epoch}
        kw = {"low_variance": c.low_variance, "top_k": c.spectrum_top}
        device = image.device
        stats = embedding_stats(image, text, batch.image_ids.to(device),
                                batch.text_ids.to(device), **kw)
        row.update({f"batch/{k}": v for k, v in stats.items()})
        if self.probe is not None:
            img, txt = self.probe_embeddings(ctx, model)
            probe = embedding_stats(img, txt, self.probe.image_ids, self.probe.text_ids, **kw)
            row.update({f"probe/{k}": v for k, v in probe.items()})
            row["probe/split"] = self.probe_split
            row["probe/size"] = int(img.shape[0])
            stats = probe
        row.update({f"grad/{k}": float(v) for k, v in self._grads.items()})
        self._grads = {}
        temperature = ctx.temperature()
        if temperature is not None:
            row["temperature"] = temperature
        ctx.log(row)
        fired = self.detector.update(ctx.step, stats, source="probe" if self.probe is not None
                                     else "batch")
        for symptom in fired:
            entry = {"type": "warning", "step": ctx.step, "epoch": ctx.epoch,
                     **symptom.to_dict()}
            ctx.log(entry)
            ctx.run_dir.append(entry, WARNINGS_JSONL)
            ctx.say(symptom.message)
        return fired


def diagnostics_callback(options: DiagnosticsOptions) -> Diagnostics:
    return Diagnostics(options)


diagnostics_callback.Options = DiagnosticsOptions  # type: ignore[attr-defined]
diagnostics_callback.section = "diagnostics"  # type: ignore[attr-defined]
diagnostics_callback.default = True  # type: ignore[attr-defined]
