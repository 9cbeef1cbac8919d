"""Staged schedules: the seeds' three-stage training and progressive unfreezing.

Both speak the engine's ``StagePlan``: freeze patterns, LR multipliers per parameter group and
the active loss (see ``mmfw.train.params`` for the names: ``vision``, ``vision.layers.3``,
``vision_adapter``, ``loss``; a pattern without wildcards names a dotted subtree).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

import mmfw
from mmfw.spi import PluginError, RecipeError, StagePlan, option

from .lr import warmup_cosine

_ge0 = attrs.validators.ge(0)
_ratio = [attrs.validators.ge(0), attrs.validators.le(1)]

#: the name a fusion module (cross-attention / ITM head) carries in the model
FUSION = "fusion"


def _check_loss(instance: Any, attribute: Any, value: str | dict) -> None:
    if value in ("", {}):
        return
    name, opts = loss_spec(value)
    try:
        mmfw.make_options("loss", name, opts)
    except PluginError as err:
        raise RecipeError(str(err), key="loss.name", given=name) from None
    except RecipeError as err:
        raise err.within(prefix="loss") from None


def loss_spec(value: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"infonce"`` or ``{name = "memory_queue", size = 8192}`` -> (name, options)."""
    if isinstance(value, str):
        return value, {}
    opts = dict(value)
    name = opts.pop("name", None)
    if not isinstance(name, str) or not name:
        raise RecipeError("a stage's loss table needs the name of a loss", key="loss.name",
                          expected='e.g. {name = "memory_queue", size = 8192}', given=name)
    return name, opts


@attrs.frozen
class Stage:
    """One stage: its length, what is frozen, LR multipliers and the loss it trains with."""

    name: str = option("", doc="label in logs (default: stage-<n>)")
    epochs: float = option(0.0, doc="length in epochs", validator=_ge0)
    steps: int = option(0, doc="length in optimizer steps", validator=_ge0)
    fraction: float = option(0.0, doc="length as a fraction of the run", validator=_ratio)
    freeze: tuple[str, ...] = option((), doc="parameter / group name patterns to freeze")
    lr_mult: dict[str, float] = option(attrs.Factory(dict), doc="group pattern -> LR "
                                       "multiplier (first match wins; others 1)")
    loss: str | dict[str, Any] = option("", doc='loss for this stage: a name or a table '
                                        '{name = ..., options}; "" = the recipe\'s [loss]',
                                        validator=_check_loss)

    def __attrs_post_init__(self) -> None:
        given = [k for k in ("epochs", "steps", "fraction") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"a stage takes one length, 'epochs', 'steps' or 'fraction'; "
                             f"'{given[0]}' and '{given[1]}' are both set")

    def length(self, steps_per_epoch: int, total_steps: int) -> int | None:
        if self.steps:
            return self.steps
        if self.epochs:
            return max(1, round(self.epochs * steps_per_epoch))
        if self.fraction:
            return max(1, round(self.fraction * total_steps))
        return None


#: seed 001 §1.1: (1) modality-specific learning with InfoNCE, fusion frozen, base encoders at
#: 0.1x; (2) cross-modal fusion with an 8192-entry memory queue, base encoders frozen;
#: (3) end-to-end fine-tuning with semi-hard negative mining, base encoders at 0.02x and
#: fusion at 0.1x. Projections (adapters) train at 1x throughout.
SEED_STAGES = (
    Stage(name="modality", fraction=0.3, freeze=(FUSION,),
          lr_mult={"vision": 0.1, "text": 0.1}, loss={"name": "infonce"}),
    Stage(name="fusion", fraction=0.3, freeze=("vision", "text"),
          loss={"name": "memory_queue", "size": 8192}),
    Stage(name="finetune", lr_mult={"vision": 0.02, "text": 0.02, FUSION: 0.1},
          loss={"name": "hard_negative", "mining": "semi-hard", "factor": 2.0}),
)


def _check_stages(instance: Any, attribute: Any, stages: tuple[Stage, ...]) -> None:
    if not stages:
        raise ValueError("'stages' needs at least one stage")
    for i, st in enumerate(stages[:-1]):
        if st.length(1, 1) is None:
            raise RecipeError("only the last stage may leave its length out (it runs to the "
                              "end of training)", key=f"stages[{i}]",
                              expected="epochs, steps or fraction", given=st.name or None)


@attrs.frozen
class ThreeStageOptions:
    stages: tuple[Stage, ...] = option(SEED_STAGES, doc="[[schedule.stages]] tables: name, "
                                       "length (epochs | steps | fraction; the last stage runs "
                                       "to the end), freeze, lr_mult, loss",
                                       validator=_check_stages)
    warmup_steps: int = option(50, doc="linear warm-up at the start of every stage",
                               validator=_ge0)
    min_lr_ratio: float = option(0.0, doc="each stage decays (cosine) to this fraction of "
                                 "optim.lr", validator=_ratio)


class ThreeStage:
    """The seeds' multi-stage training (seed 001 §1.1), any number of stages.

    Stage ``k`` covers steps ``[b_k, b_{k+1})``; the last runs to the end of training. Within a
    stage the LR warms up for ``warmup_steps`` and decays by cosine to ``min_lr_ratio`` at the
    stage's end, so each stage starts fresh after the switch (new loss, newly unfrozen
    parameters). Losses named by stages are built once, before training: a loss used again in
    a later stage continues with its learned temperature or queue.
    """

    Options = ThreeStageOptions

    def __init__(self, options: ThreeStageOptions | None = None, *, total_steps: int,
                 steps_per_epoch: int = 1, groups: Sequence[str] = (), **context: object
                 ) -> None:
        o = self.options = options or ThreeStageOptions()
        self.total_steps = max(1, total_steps)
        self.bounds: list[int] = [0]
        for st in o.stages[:-1]:
            self.bounds.append(self.bounds[-1] + (st.length(steps_per_epoch, total_steps) or 0))
        self.bounds.append(max(self.bounds[-1], self.total_steps))
        self.labels = _loss_labels(o.stages)

    def stage_at(self, step: int) -> int:
        for k in range(len(self.options.stages) - 1, -1, -1):
            if step >= self.bounds[k]:
                return k
        return 0

    def lr_factor(self, step: int) -> float:
        k = self.stage_at(step)
        start, end = self.bounds[k], max(self.bounds[k + 1], self.bounds[k] + 1)
        return warmup_cosine(step - start, end - start, self.options.warmup_steps,
                             self.options.min_lr_ratio)

    def plan(self, step: int, epoch: int) -> StagePlan:
        k = self.stage_at(step)
        st = self.options.stages[k]
        return StagePlan(stage=st.name or f"stage-{k + 1}", index=k, frozen=tuple(st.freeze),
                         lr_mult=tuple(st.lr_mult.items()), loss=self.labels[k])

    def losses(self) -> dict[str, tuple[str, dict[str, Any]]]:
        out = {}
        for st, label in zip(self.options.stages, self.labels):
            if label is not None:
                out[label] = loss_spec(st.loss)
        return out


def _loss_labels(stages: Sequence[Stage]) -> list[str | None]:
    """One label per distinct loss spec: the loss name, or ``name[k]`` (k the first stage
    using it) when one name appears with different options. Equal specs share one loss."""
    specs = [None if st.loss in ("", {}) else loss_spec(st.loss) for st in stages]
    keys = [None if s is None else json.dumps(s, sort_keys=True) for s in specs]
    names: dict[str, set[str]] = {}
    for s, key in zip(specs, keys):
        if s is not None and key is not None:
            names.setdefault(s[0], set()).add(key)
    first: dict[str, int] = {}
    labels: list[str | None] = []
    for k, (s, key) in enumerate(zip(specs, keys)):
        if s is None or key is None:
            labels.append(None)
            continue
        first.setdefault(key, k)
        labels.append(s[0] if len(names[s[0]]) == 1 else f"{s[0]}[{first[key]}]")
    return labels


@attrs.frozen
class ProgressiveUnfreezeOptions:
    every_epochs: int = option(1, doc="epochs between unfreezing steps",
                               validator=attrs.validators.ge(1))
    blocks: int = option(1, doc="encoder blocks (layers.N groups) unfrozen at each step",
                         validator=attrs.validators.ge(1))
    initial_blocks: int = option(0, doc="top blocks trainable from the start (0: encoders "
                                 "frozen, adapters train)", validator=_ge0)
    towers: tuple[str, ...] = option(("vision", "text"), doc="encoders to unfreeze "
                                     "progressively (the others train throughout)")
    embeddings: bool = option(True, doc="unfreeze the embeddings at the step after the last "
                              "block (false: they stay frozen)")
    warmup_steps: int = option(100, doc="linear warm-up steps", validator=_ge0)
    min_lr_ratio: float = option(0.0, doc="cosine decay over the run to this fraction",
                                 validator=_ratio)


_LAYER = re.compile(r"^(?P<tower>[^.]+)\.layers\.(?P<i>\d+)$")


class ProgressiveUnfreeze:
    """Howard & Ruder's gradual unfreezing (ULMFiT), the curriculum seed 001 §6.1/§7.4 asks for.

    Encoders start frozen (adapters and the loss train); every ``every_epochs`` epochs the next
    ``blocks`` blocks from the top (``layers.N-1`` first) become trainable. An encoder's
    ``head`` group (final norm) and parameters outside its named groups (``other``) thaw with
    its first block; its ``embeddings`` count as one more block below ``layers.0``. An encoder
    without ``named_groups`` is one block. The LR follows warm-up + cosine over the
    whole run; combine with ``optim.layer_decay`` for lower LRs deeper down.
    """

    Options = ProgressiveUnfreezeOptions

    def __init__(self, options: ProgressiveUnfreezeOptions | None = None, *, total_steps: int,
                 steps_per_epoch: int = 1, groups: Sequence[str] = (), **context: object
                 ) -> None:
        self.options = options or ProgressiveUnfreezeOptions()
        self.total_steps = max(1, total_steps)
        self.groups = set(groups)
        self.layers: dict[str, int] = {}
        for g in groups:
            m = _LAYER.match(g)
            if m and m["tower"] in self.options.towers:
                self.layers[m["tower"]] = max(self.layers.get(m["tower"], 0), int(m["i"]) + 1)

    def lr_factor(self, step: int) -> float:
        o = self.options
        return warmup_cosine(step, self.total_steps, o.warmup_steps, o.min_lr_ratio)

    def thawed(self, epoch: int) -> int:
        """How many top blocks are trainable in ``epoch``."""
        o = self.options
        return o.initial_blocks + o.blocks * (epoch // o.every_epochs)

    def plan(self, step: int, epoch: int) -> StagePlan:
        k = self.thawed(epoch)
        frozen: list[str] = []
        for tower in self.options.towers:
            n = self.layers.get(tower, 0)
            if n == 0:  # no named groups: the encoder is one block
                if k == 0:
                    frozen.append(tower)
                continue
            names = [f"{tower}.layers.{i}" for i in range(max(0, n - k))]
            if k == 0:
                names += [f"{tower}.head", f"{tower}.other"]
            if k <= n or not self.options.embeddings:
                names.append(f"{tower}.embeddings")
            frozen += [g for g in names if g in self.groups]
        return StagePlan(stage=f"top-{k}", index=epoch // self.options.every_epochs,
                         frozen=tuple(frozen))
