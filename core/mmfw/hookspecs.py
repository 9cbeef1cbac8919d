"""The plugin contract. Every hook returns ``{name: factory}`` for one extension kind.

A plugin is any module that implements some of these hooks with ``@mmfw.hookimpl`` and is named
by an entry point in the ``mmfw`` group (``[project.entry-points.mmfw]`` in its pyproject.toml);
the built-in plugins under ``plugins/`` are registered exactly that way.

A factory is a callable ``factory(options, **context) -> component``. ``options`` is an instance
of ``factory.Options``, a frozen attrs class the recipe section is validated against (a factory
with no ``Options`` takes ``options=None``). ``context`` is what the engine knows and the recipe
does not say; it is fixed per kind:

========== =================================== ===========================================
kind       context keywords                    component contract (see ``mmfw.contracts``)
========== =================================== ===========================================
encoder    (none)                              ``Encoder``: nn.Module, ``dim``, ``modality``
adapter    ``in_dim``, ``out_dim``             nn.Module mapping ``[B, in_dim] -> [B, out_dim]``
loss       (none)                              ``loss(image, text, *, image_ids, text_ids,
                                               **context) -> LossOutput``
sampler    ``match_ids``, ``batch_size``,      iterable of index lists; ``match_ids``;
           ``seed``, ``drop_last``, ``texts``  ``set_epoch(epoch)``; shards by ``rank``
           (caption per pair), ``groups``
           (group key per pair, or None),
           ``rank``, ``world_size``
backend    (none)                              ``Backend``
scheduler  ``total_steps``,                    ``Scheduler``: ``lr_factor(step)``; optional
           ``steps_per_epoch``, ``groups``     ``plan(step, epoch)``, ``losses()``, ...
dataset    (none)                              ``DatasetSource``: ``split(name)``
========== =================================== ===========================================
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("mmfw")
hookimpl = pluggy.HookimplMarker("mmfw")

Factories = dict[str, Callable[..., object]]


@hookspec
def mmfw_encoders() -> Factories:
    """Image and text encoders: ``{name: factory}`` producing ``Encoder`` modules."""


@hookspec
def mmfw_adapters() -> Factories:
    """Adapters from an encoder's width to the shared embedding width."""


@hookspec
def mmfw_losses() -> Factories:
    """Losses following the ``loss(image, text, *, image_ids, text_ids, **context)`` convention."""


@hookspec
def mmfw_samplers() -> Factories:
    """Batch samplers that yield index lists and expose the match ids they built them with."""


@hookspec
def mmfw_backends() -> Factories:
    """Device backends: device, precision policy, seeding, memory stats."""


@hookspec
def mmfw_schedulers() -> Factories:
    """Stage schedulers: LR schedule (and, for staged ones, freezing and LR multipliers)."""


@hookspec
def mmfw_datasets() -> Factories:
    """Datasets whose splits yield ``(image, captions, image_id)`` items."""


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
    "text": {section}, "note": str}}``, where the sections are ``[model.vision]`` /
    ``[model.text]`` tables (``name`` + options) whose encoders are both ``width`` wide."""
