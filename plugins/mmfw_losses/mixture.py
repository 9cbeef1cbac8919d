"""Weighted sum of any registered losses: the seeds' MultiModalMixedContrastiveLoss."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor, nn

import mmfw
from mmfw.spi import LossOutput, PluginError, RecipeError, option


def split_term(i: int, term: Any) -> tuple[str, float, dict[str, Any]]:
    """``(name, weight, options)`` of ``terms[i]``, or a RecipeError keyed ``terms[i]...``."""
    key = f"terms[{i}]"
    if not isinstance(term, Mapping):
        raise RecipeError("each term must be a table", key=key,
                          expected='a table such as {name = "infonce", weight = 1.0}', given=term)
    opts = dict(term)
    name, weight = opts.pop("name", None), opts.pop("weight", 1.0)
    if not isinstance(name, str):
        raise RecipeError("a term needs the name of a loss", key=f"{key}.name",
                          expected="the name of an installed loss (see `mmfw list loss`)",
                          given=name)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RecipeError("wrong type", key=f"{key}.weight", expected="float", given=weight)
    return name, float(weight), opts


def _validate_terms(instance: Any, attribute: Any, terms: tuple) -> None:
    if not terms:
        raise RecipeError("a mixture needs at least one term", key="terms",
                          expected='[[loss.terms]] tables, each with name = "<loss>"', given=[])
    for i, term in enumerate(terms):
        name, _, opts = split_term(i, term)
        try:
            mmfw.make_options("loss", name, opts)
        except PluginError as err:
            raise RecipeError(str(err), key=f"terms[{i}].name", given=name) from None
        except RecipeError as err:
            raise err.within(prefix=f"terms[{i}]") from None


@attrs.frozen
class MixtureOptions:
    terms: tuple[dict, ...] = option(
        doc="tables with a loss `name`, a `weight` (default 1.0) and that loss's options",
        validator=_validate_terms)


class Mixture(nn.Module):
    r"""Weighted sum of losses (the seeds' MultiModalMixedContrastiveLoss, seed 001 §2).

    .. math::
        L = \sum_k w_k\, L_k(\text{image}, \text{text}; \text{ids}, \text{context})

    Each :math:`L_k` is built by name through the registry, so any installed loss (third-party
    ones too) can be a term; the sub-losses live in an ``nn.ModuleList``, so their parameters
    reach the optimizer and their buffers the checkpoint. Terms report each *unweighted* sub-loss
    as ``"<name>"`` and its own terms as ``"<name>.<term>"``; a name used twice becomes
    ``"<name>[k]"`` (``k`` the term's index). Local loss: the context's ``image_rows`` /
    ``text_rows`` reach every term, so it is supported when every term supports it.
    """

    Options = MixtureOptions

    def __init__(self, options: MixtureOptions | None = None) -> None:
        super().__init__()
        if options is None:
            raise RecipeError("the mixture loss needs its terms", key="terms",
                              expected='[[loss.terms]] tables, each with name = "<loss>"')
        self.options = options
        specs = [split_term(i, term) for i, term in enumerate(options.terms)]
        counts = Counter(name for name, _, _ in specs)
        self.labels = [name if counts[name] == 1 else f"{name}[{k}]"
                       for k, (name, _, _) in enumerate(specs)]
        self.weights = [w for _, w, _ in specs]
        self.losses = nn.ModuleList(mmfw.create("loss", name, **opts)
                                    for name, _, opts in specs)

    @property
    def requires_context(self) -> dict[str, str]:
        """What the terms need in their context (a distillation term: the teacher's)."""
        return {k: v for loss in self.losses
                for k, v in (getattr(loss, "requires_context", None) or {}).items()}

    @property
    def supports_local_loss(self) -> bool:
        """Every term takes ``image_rows`` / ``text_rows`` (``distributed.local_loss``)."""
        return all(getattr(loss, "supports_local_loss", False) for loss in self.losses)

    def forward(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, **context) -> LossOutput:
        total = torch.zeros((), device=image.device)
        terms: dict[str, Tensor] = {}
        for label, weight, loss in zip(self.labels, self.weights, self.losses):
            out = loss(image, text, image_ids=image_ids, text_ids=text_ids, **context)
            total = total + weight * out.loss
            terms[label] = out.loss.detach()
            terms.update({f"{label}.{k}": v for k, v in out.terms.items()})
        return LossOutput(total, terms)
