"""Distillation from a trained run or ensemble (seed 000 §5): the teacher's view of each batch.

``[distill] teacher = "runs/big"`` loads the teacher (a run directory, or an ensemble directory:
then its members' averaged similarity is the target), frozen and in eval mode. For every training
batch the engine embeds the *same* images and captions with it under ``torch.no_grad`` and passes
``teacher_image`` / ``teacher_text`` to the loss (the ``distillation`` loss reads them; see its
docstring). The teacher tokenizes the captions with its own tokenizer, in the DataLoader's
collate, from the same rows (with the same augmentation); its images are the student's tensors
when its preprocessing gives the same tensors (checked on a few training images), else its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from mmfw import ensemble_members, load_run
from mmfw.data.batching import Batch, Collate
from mmfw.eval.retrieval import ensemble_embeddings
from mmfw.spi import Callback, MmfwError, RunContext, option

Inputs = tuple[Tensor | None, dict[str, Tensor]]


def _slots(cls: type) -> list[str]:
    return [s for c in cls.__mro__ for s in getattr(c, "__slots__", ())]


class TeacherBatch(Batch):
    """A training batch carrying the teacher's own inputs: per teacher model, its pixels (None
    where it reuses the student's) and its tokens."""

    __slots__ = ("teacher",)

    @classmethod
    def of(cls, batch: Batch, teacher: list[Inputs]) -> TeacherBatch:
        out = object.__new__(cls)
        for name in _slots(type(batch)):
            if name != "teacher" and hasattr(batch, name):
                setattr(out, name, getattr(batch, name))
        out.teacher = teacher
        return out

    def to(self, device: torch.device) -> TeacherBatch:
        moved: list[Inputs] = [(None if px is None else px.to(device),
                                {k: v.to(device) for k, v in tok.items()})
                               for px, tok in self.teacher]
        return TeacherBatch.of(super().to(device), moved)


def _no_pixels(image: Any) -> Tensor:
    return torch.empty(0)


class TeacherCollate:
    """Wraps the student's collate: the same rows, tokenized (and, where ``preprocess`` is
    given, preprocessed) for each teacher model. Each gets a :class:`Collate` of its own with
    the student's ids and augmentation, which is seeded by the rows, so the teacher sees the
    same augmented images and captions in the same order."""

    def __init__(self, inner: Callable[[Any], Batch],
                 members: Sequence[tuple[Callable | None, Callable]]) -> None:
        self.inner = inner
        ids, augment = getattr(inner, "match_ids", None), getattr(inner, "augment", None)
        self.collates = [Collate(pre or _no_pixels, tok, ids, augment) for pre, tok in members]
        self.own_pixels = [pre is not None for pre, _ in members]

    def __call__(self, rows: Sequence[Any]) -> TeacherBatch:
        batch = self.inner(rows)
        inputs: list[Inputs] = []
        for collate, own_pixels in zip(self.collates, self.own_pixels):
            own = collate(rows)
            inputs.append((own.pixels if own_pixels else None, own.tokens))
        return TeacherBatch.of(batch, inputs)


def _same_pixels(teacher: nn.Module, student: nn.Module, pairs: Any, n: int = 4) -> bool:
    """Do teacher and student preprocess the first ``n`` training images identically?

    Image preprocessing is a fixed function of its configuration (size, crop, mean/std), so a
    difference shows on any image. (Tokenizers are not compared: vocabularies can agree on a
    sample and differ elsewhere, so the teacher always tokenizes for itself.)
    """
    if not hasattr(pairs, "__getitem__"):  # a stream: nothing to probe without consuming it
        return False
    rows = [r for r in (pairs[k] for k in range(min(n, len(pairs)))) if r[0] is not None]
    for r in rows:
        a, b = student.vision.preprocess(r[0]), teacher.vision.preprocess(r[0])
        if a.shape != b.shape or not torch.equal(a, b):
            return False
    return bool(rows)


class Teacher:
    """One frozen model, or an ensemble's members, embedding training batches."""

    def __init__(self, models: Sequence[nn.Module], source: Path,
                 autocast: Callable[[], AbstractContextManager]) -> None:
        self.models, self.source, self.autocast = list(models), source, autocast
        self.own_pixels = [True] * len(self.models)
        for m in self.models:
            m.eval()
            m.requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> Teacher:
        """Load a run or ensemble directory; the global RNG is left as it was, so a student
        starts from the same random stream with or without a teacher."""
        d = Path(path)
        if not d.is_dir():
            raise MmfwError(f"distill.teacher: {d} is not a directory (expected the run or "
                            "ensemble directory of a trained teacher)")
        members = ensemble_members(d) or [d]
        with torch.random.fork_rng(devices=[]):
            models = [load_run(m, device=device).model for m in members]
        return cls(models, d, autocast)

    def collate(self, student: nn.Module, pairs: Any) -> Callable[[Callable], TeacherCollate]:
        """How to wrap the student's collate so it also tokenizes for the teacher, and
        preprocesses images for the teacher models whose preprocessing differs."""
        with torch.random.fork_rng(devices=[]):  # augmentation in preprocess draws numbers
            self.own_pixels = [not _same_pixels(m, student, pairs) for m in self.models]
        members = [(m.vision.preprocess if own else None, m.text.tokenize)
                   for m, own in zip(self.models, self.own_pixels)]
        return lambda inner: TeacherCollate(inner, members)

    @torch.no_grad()
    def embed(self, batch: Batch, inputs: list[Inputs] | None = None,
              mix: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Teacher embeddings ``[Bi, D']``, ``[Bt, D']`` of the batch; for an ensemble, joint
        embeddings whose cosine is the members' averaged cosine similarity.

        ``inputs``: the batch's teacher inputs (default ``batch.teacher``); ``mix`` mixes the
        teacher's own images as the student's were mixed (MixUp/CutMix).
        """
        imgs, txts = [], []
        own = inputs if inputs is not None else getattr(batch, "teacher", None)
        if own is None:
            raise MmfwError("the batch carries no teacher inputs (a step between the collate "
                            "and the loss rebuilt it)")
        for (pixels, tokens), model in zip(own, self.models):
            if pixels is None:
                pixels = batch.pixels  # shared preprocessing: mixed already if mixing is on
            elif mix is not None:
                pixels = mix(pixels)
            with self.autocast():
                imgs.append(model.encode_image(pixels).float())
                txts.append(model.encode_text(tokens).float())
        if len(self.models) == 1:
            return imgs[0], txts[0]
        return ensemble_embeddings(imgs, txts)


@attrs.frozen
class DistillOptions:
    """Distil a trained model (or ensemble) into this run's model (seed 000 §5)."""

    teacher: str = option("", doc="run directory (or ensemble directory) of the teacher; its "
                          "embeddings of each batch reach the loss as teacher_image / "
                          "teacher_text ('': none)")


class TeacherCallback(Callback):
    """``[distill] teacher``: the teacher's embeddings of every batch in the loss context."""

    order = -10  # the loss context is complete before any other callback looks at a batch

    def __init__(self, options: DistillOptions) -> None:
        self.options = options
        self.teacher: Teacher | None = None

    def provides_context(self) -> tuple[str, ...]:
        return ("teacher_image", "teacher_text") if self.options.teacher else ()

    def on_run_start(self, ctx: RunContext) -> None:
        if not self.options.teacher:
            return
        uses = any("teacher_image" in (getattr(m, "requires_context", None) or {})
                   for m in ctx.losses.modules())
        if not uses:
            ctx.say("note: distill.teacher is set but no loss uses the teacher (e.g. "
                    "'distillation'): its embeddings reach the loss as context only")
        self.teacher = Teacher.load(self.options.teacher, device=ctx.device,
                                    autocast=ctx.backend.autocast)
        ctx.wrap_collate(self.teacher.collate(ctx.model, ctx.pairs))
        n = len(self.teacher.models)
        ctx.say(f"distillation teacher: {self.teacher.source} ({n} model"
                f"{'s' if n > 1 else ''}, {sum(self.teacher.own_pixels)} preprocessing images "
                "its own way)")

    def on_batch_start(self, ctx: RunContext, batch: Batch, context: dict[str, Any]) -> None:
        if self.teacher is None:
            return
        mix = (lambda px: ctx.mix(batch, px)) if batch.mix is not None else None
        context["teacher_image"], context["teacher_text"] = self.teacher.embed(batch, mix=mix)


def teacher_callback(options: DistillOptions) -> TeacherCallback:
    return TeacherCallback(options)


teacher_callback.Options = DistillOptions  # type: ignore[attr-defined]
teacher_callback.section = "distill"  # type: ignore[attr-defined]
teacher_callback.default = True  # type: ignore[attr-defined]
