"""Optional capabilities a component declares by having their methods, checked once when it is
built (never probed per step).

Each capability is a small :class:`typing.Protocol`. A component that has *some* of a
capability's methods but not all is a plugin bug, reported when the component is built,
with the missing method named: :func:`check` does that. The core then asks
``isinstance(component, Capability)`` once and keeps the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .contracts import StagePlan
from .errors import PluginError


@runtime_checkable
class Stateful(Protocol):
    """Has state to checkpoint: ``state_dict()`` (JSON-able) and ``load_state_dict(state)``.
    Samplers, schedulers and callbacks with it are saved and restored on ``--resume``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class TensorStateful(Protocol):
    """Has tensors to checkpoint (an EMA of the weights): ``tensor_state_dict()`` ->
    ``{name: Tensor}`` and ``load_tensor_state_dict(tensors)``. A callback with it has them
    saved in one more safetensors file of every checkpoint (``step-N.callbacks.safetensors``,
    hashed and verified like the weights) and restored bit for bit on ``--resume``.

    A callback whose tensors are a state dict of the run's model that the run is evaluated
    with says so with the attribute ``eval_weights = True``: the checkpoint records it, and
    ``mmfw.load_run`` (so ``mmfw eval``, exports, ``mmfw average``) loads those weights."""

    def tensor_state_dict(self) -> dict[str, Tensor]: ...

    def load_tensor_state_dict(self, tensors: dict[str, Tensor]) -> None: ...


@runtime_checkable
class StagedScheduler(Protocol):
    """A scheduler with stages: ``plan(step, epoch)`` says what is frozen, the LR multipliers
    and the active loss."""

    def plan(self, step: int, epoch: int) -> StagePlan: ...


@runtime_checkable
class StageLosses(Protocol):
    """A staged scheduler whose plans name losses: ``losses()`` lists every one (label ->
    (loss plugin, options)), built before training."""

    def losses(self) -> dict[str, tuple[str, dict[str, Any]]]: ...


@runtime_checkable
class MomentumScheduler(Protocol):
    """A scheduler that also sets AdamW's beta1 (OneCycle cycles it)."""

    def momentum(self, step: int) -> float | None: ...


@runtime_checkable
class Uint8Vision(Protocol):
    """An image encoder whose preprocessing splits into a uint8 part (resize and crop, in the
    loader) and ``normalize`` (on the device): ``data.uint8``."""

    def preprocess_uint8(self, image: Any) -> Tensor: ...

    def normalize(self, pixels: Tensor) -> Tensor: ...


@runtime_checkable
class TokenEncoder(Protocol):
    """An encoder that exposes its token features, for ``[model.fusion]`` (with, optionally,
    ``pool_tokens(tokens, mask)`` so one pass gives both tokens and the embedding)."""

    def forward_tokens(self, inputs: Any) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class PreparedEncoder(Protocol):
    """An encoder fitted before training (a tokenizer trained on the training captions) whose
    files live in the run directory."""

    def prepare(self, texts: Sequence[str]) -> None: ...

    def save_assets(self, directory: Any) -> None: ...

    def load_assets(self, directory: Any) -> None: ...


@runtime_checkable
class MergesAdapters(Protocol):
    """An encoder carrying trainable adapters (LoRA through peft) that can fold them into its
    own weights: after ``merge_adapters()`` it computes the same outputs with plain modules,
    so an export needs no peft."""

    def merge_adapters(self) -> None: ...


@runtime_checkable
class SuggestsTemperature(Protocol):
    """An encoder from a pair trained contrastively (a CLIP or SigLIP tower) that knows where
    that training left the loss: ``initial_temperature()`` is ``tau = 1 / exp(logit_scale)``,
    ``initial_bias()`` the logit bias (SigLIP); either is None when it has none (random
    weights, CLIP's bias).

    Read once when the run's ``[loss]`` is built: an option ``temperature`` (``bias``) of the
    loss that the recipe does not set starts at the suggested value, and the run directory's
    resolved recipe records it. The value belongs to the pair: it is used only when both
    encoders suggest the same one; ``[[loss.terms]]`` and the losses of stage schedules keep
    their own values."""

    def initial_temperature(self) -> float | None: ...

    def initial_bias(self) -> float | None: ...


CAPABILITIES: tuple[type, ...] = (Stateful, TensorStateful, StagedScheduler, StageLosses,
                                  MomentumScheduler,
                                  Uint8Vision, TokenEncoder, MergesAdapters,
                                  SuggestsTemperature)


def _methods(cap: type) -> list[str]:
    return [n for n in vars(cap) if not n.startswith("_") and callable(vars(cap)[n])]


def check(component: object, what: str, capabilities: Iterable[type] = CAPABILITIES) -> None:
    """Refuse ``component`` when it has part of a capability: some methods, not all.

    ``what`` names it in the error (``"scheduler 'three-stage'"``).
    """
    for cap in capabilities:
        names = _methods(cap)
        have = [n for n in names if callable(getattr(component, n, None))]
        if have and len(have) < len(names):
            missing = [n for n in names if n not in have]
            raise PluginError(
                f"{what} has {', '.join(f'{n}()' for n in have)} but not "
                f"{', '.join(f'{n}()' for n in missing)}: the {cap.__name__} capability needs "
                f"all of {', '.join(f'{n}()' for n in names)} (see mmfw.spi.capabilities)")


__all__ = [
    "CAPABILITIES",
    "MergesAdapters",
    "MomentumScheduler",
    "PreparedEncoder",
    "StageLosses",
    "StagedScheduler",
    "Stateful",
    "SuggestsTemperature",
    "TensorStateful",
    "TokenEncoder",
    "Uint8Vision",
    "check",
]
