"""The plugin contract, in one place: component hooks and a run's lifecycle events.

**Component hooks.** A plugin is any module that implements some of the ``mmfw_*`` hooks
below with ``@mmfw.spi.hookimpl`` and is named by an entry point in the ``mmfw`` group
(``[project.entry-points.mmfw]`` in its pyproject.toml); the built-in plugins under
``plugins/`` are registered exactly that way. Each hook returns ``{name: factory}`` for one
kind of component. A factory is a callable ``factory(options, **context) -> component``:
``options`` is an instance of ``factory.Options``, a frozen attrs class the recipe section is
validated against (a factory with no ``Options`` takes ``options=None``); ``context`` is what
the core knows and the recipe does not say, fixed per kind (the ``context`` of each hook's
:func:`kind` below; the registry's tables are read from these declarations).

**Lifecycle events.** A ``callback`` component takes part in a run: the methods of
:class:`Callback` are the events, called in this order::

    on_run_start
      (per step)  on_batch_start -> on_after_backward -> on_step_end
                  on_log_row (whenever a row is logged)
      (per epoch) on_epoch_end [on_eval_start -> on_eval_end (validation)] -> on_checkpoint_save
    on_run_end [on_eval_start -> on_eval_end (final)]
    on_checkpoint_restore (on --resume, before steps)

A callback implements the events it needs (subclassing :class:`Callback` is optional: the
core calls the methods an object has, checked once against these signatures). A callback
with ``state_dict()`` / ``load_state_dict(state)`` (:class:`~mmfw.spi.capabilities.Stateful`)
has its state saved in every checkpoint and restored on ``--resume``, so a resumed run
behaves as the unbroken one; tensors (an EMA of the weights) go through
:class:`~mmfw.spi.capabilities.TensorStateful` instead. A callback factory may declare:

- ``section``: the recipe table that configures it (``"diagnostics"``); a table of the core
  (``"eval"``) is handed over as the core validated it, any other is validated against the
  factory's ``Options``. Default: ``callbacks.<name>``.
  A sub-table of a core table (``"optim.ema"``) is the callback's own: the core's table is
  validated without it, so unknown keys of ``[optim]`` are refused as before.
- ``default = True``: it runs in every run (the built-in ones do). Other callbacks run when
  the recipe lists them: ``run.callbacks = ["<name>", ...]``.
- ``when_configured = True``: it runs when the recipe has its ``section`` table (``[optim.ema]``
  turns EMA on), with no need to list it.
- ``why_unavailable()``: None when it can run here, else one sentence saying why not (a
  missing optional package, with the extra that installs it: ``pip install mmfw[wandb]``);
  a recipe that lists it is refused with that sentence at its key. Checked when the recipe
  is loaded, so the package is imported only by runs that use it.
- ``order`` (on the component): callbacks are called by ascending ``order`` (default 0),
  then by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import pluggy

from .context import RunContext, StepEnd

if TYPE_CHECKING:
    from ..data.batching import Batch

hookspec = pluggy.HookspecMarker("mmfw")
hookimpl = pluggy.HookimplMarker("mmfw")

Factories = dict[str, Callable[..., object]]


class Kind(NamedTuple):
    """An extension kind: its hook, the keywords its factories get, what they make."""

    name: str
    hook: str
    context: tuple[str, ...]
    produces: str


#: kind name -> :class:`Kind`, in declaration order (public: the kinds are API)
KINDS: dict[str, Kind] = {}


def kind(name: str, *, context: tuple[str, ...] = (), produces: str = ""
         ) -> Callable[[Callable[..., Factories]], Callable[..., Factories]]:
    """Declare a component hook as extension kind ``name`` whose factories get ``context``."""

    def mark(fn: Callable[..., Factories]) -> Callable[..., Factories]:
        KINDS[name] = Kind(name, fn.__name__, context, produces)
        return hookspec(fn)

    return mark


# ---------------------------------------------------------------------------------------
# component hooks


@kind("encoder", produces="Encoder: nn.Module with dim, modality; preprocess / tokenize")
def mmfw_encoders() -> Factories:
    """Image and text encoders: ``{name: factory}`` producing ``Encoder`` modules."""


@kind("adapter", context=("in_dim", "out_dim", "other_dim"),
      produces="nn.Module mapping [B, in_dim] -> [B, out_dim] (other_dim: fusion's image width)")
def mmfw_adapters() -> Factories:
    """Adapters from an encoder's width to the shared embedding width."""


@kind("loss", produces="loss(image, text, *, image_ids, text_ids, **context) -> LossOutput")
def mmfw_losses() -> Factories:
    """Losses following the ``loss(image, text, *, image_ids, text_ids, **context)`` convention.

    A loss that needs context entries a callback provides declares ``requires_context =
    {"teacher_image": "distill.teacher", ...}``: context key -> the recipe key that makes a
    callback provide it; the run refuses to start without them.
    """


@kind("sampler", context=("match_ids", "batch_size", "seed", "drop_last", "texts", "groups",
                           "rank", "world_size"),
      produces="Sampler: iterable of index lists; match_ids; set_epoch(epoch)")
def mmfw_samplers() -> Factories:
    """Batch samplers that yield index lists and expose the match ids they built them with."""


@kind("backend", produces="Backend: device, autocast, grad_scaler, seed, memory_stats")
def mmfw_backends() -> Factories:
    """Device backends: device, precision policy, seeding, memory stats."""


@kind("scheduler", context=("total_steps", "steps_per_epoch", "groups"),
      produces="Scheduler: lr_factor(step); StagedScheduler: plan(step, epoch), losses()")
def mmfw_schedulers() -> Factories:
    """Stage schedulers: LR schedule (and, for staged ones, freezing and LR multipliers)."""


@kind("dataset", produces="DatasetSource: splits, split(name)")
def mmfw_datasets() -> Factories:
    """Datasets whose splits yield ``(image, captions, image_id)`` items."""


@kind("callback", produces="Callback: the lifecycle events below")
def mmfw_callbacks() -> Factories:
    """Run participants receiving the lifecycle events (see :class:`Callback`)."""


@kind("exporter", produces="Exporter: refuse(run) -> reason or None; export(run, output) "
      "-> folder")
def mmfw_exporters() -> Factories:
    """Export formats for ``mmfw export RUN_DIR --format <name>``: each factory makes an
    :class:`~mmfw.spi.contracts.Exporter`. ``refuse(run)`` says in one sentence why the run's
    model cannot be written in this format (the tower or adapter that does not map, and the
    formats that would take it), or returns None; ``export(run, output)`` writes the folder
    and returns it. ``run`` is a :class:`mmfw.LoadedRun` (model on the CPU, in eval mode, with
    LoRA adapters merged into their towers)."""


# Catalogues (optional): not component kinds, but data an encoder plugin offers users.


@hookspec
def mmfw_models() -> list[dict[str, object]]:
    """Known pretrained models, for ``mmfw list encoder --models``: a list of rows
    ``{"name", "encoder", "modality", "width", "input_size", "note"}``. ``width`` is the TRUE
    output width (read from the model's config, never guessed from its name); ``input_size``
    is the image side in pixels or the text model's position count."""


@hookspec
def mmfw_presets() -> dict[str, dict[str, object]]:
    """Size presets for ``model.preset``: ``{name: {"width": int, "vision": {section},
    "text": {section}, "note": str, "adapter": {section}}}``, where the sections are
    ``[model.vision]`` / ``[model.text]`` tables (``name`` + options) whose encoders are both
    ``width`` wide, and the optional ``adapter`` is the ``[model.adapter]`` a recipe using
    both at that width gets (e.g. ``{"name": "identity"}``)."""


# ---------------------------------------------------------------------------------------
# lifecycle events


class Callback:
    """The events of a run. Every method is optional; these bodies do nothing.

    ``ctx`` is the run's :class:`~mmfw.spi.context.RunContext`. Events are called on every
    rank under torchrun, in the same order; a callback that writes does so on
    ``ctx.is_main``. An event runs inside the training loop: keep per-step events cheap
    (no host sync unless the step is one you act on).
    """

    order: int = 0

    def on_run_start(self, ctx: RunContext) -> None:
        """Everything is built (and restored, on ``--resume``); no step has run yet."""

    def on_batch_start(self, ctx: RunContext, batch: Batch, context: dict[str, Any]) -> None:
        """A batch is on the device (mixed, when MixUp/CutMix is on); add entries to the
        loss's ``context`` here (a teacher's embeddings). Called before the forward pass."""

    def on_after_backward(self, ctx: RunContext, step: int) -> None:
        """Gradients of step ``step`` (counted from 1) are final and unscaled, not yet
        clipped nor applied: read ``p.grad`` of ``ctx.model`` / ``ctx.losses`` here."""

    def on_step_end(self, ctx: RunContext, step: StepEnd) -> None:
        """The optimizer step is done and ``ctx.step`` counts it."""

    def on_log_row(self, ctx: RunContext, row: dict[str, Any]) -> None:
        """A row was logged (``type``: ``train``, ``eval``, ``diagnostics``, ``warning``,
        ...); on rank 0 it is already in ``metrics.jsonl``."""

    def on_eval_start(self, ctx: RunContext, split: str, final: bool) -> None:
        """``ctx.evaluate`` is about to embed ``split`` with ``ctx.model`` (``final``: the run's
        final evaluation). A callback may put other weights into the model here (EMA); it
        puts the trained ones back in ``on_eval_end`` (which ``ctx.report_eval`` sends after
        every evaluation of the core), or at the latest before the next step."""

    def on_eval_end(self, ctx: RunContext, split: str, metrics: dict[str, float],
                    final: bool) -> None:
        """An evaluation finished (``final``: the run's final evaluation, metrics.json)."""

    def on_epoch_end(self, ctx: RunContext, epoch: int) -> None:
        """Epoch ``epoch`` (counted from 1) is done; its checkpoint is written next."""

    def on_checkpoint_save(self, ctx: RunContext, step: int) -> None:
        """Checkpoint ``step`` is on disk (with this callback's ``state_dict()``)."""

    def on_checkpoint_restore(self, ctx: RunContext, step: int) -> None:
        """The run resumed from checkpoint ``step`` (``load_state_dict`` already called)."""

    def on_run_end(self, ctx: RunContext, stopped_by: str) -> None:
        """Training ended (``epochs``, ``max_steps``, ``max_minutes`` or a callback's
        reason) and the last checkpoint is written; the final evaluation happens here."""


#: the event names, in the order of the contract above
EVENTS: tuple[str, ...] = tuple(n for n in vars(Callback) if n.startswith("on_"))


__all__ = ["EVENTS", "KINDS", "Callback", "Factories", "Kind", "RunContext", "StepEnd",
           "hookimpl", "hookspec", "kind", "mmfw_adapters", "mmfw_backends", "mmfw_callbacks",
           "mmfw_datasets", "mmfw_encoders", "mmfw_exporters", "mmfw_losses", "mmfw_models",
           "mmfw_presets", "mmfw_samplers", "mmfw_schedulers"]
