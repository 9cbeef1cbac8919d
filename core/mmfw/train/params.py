"""Named parameters and parameter groups: what freezing, LR multipliers and balancing act on.

Every trainable parameter gets a stable full name: the ``DualEncoder`` attribute it lives under
(``vision``, ``text``, ``vision_adapter``, ``text_adapter``, any other top-level module such as a
fusion head) followed by its name inside it, and ``loss.<name>`` for loss parameters. Groups come
from the encoders' optional ``named_groups()`` (see :class:`mmfw.contracts.Encoder`):
``vision.embeddings``, ``vision.layers.0`` ... ``vision.head``; an encoder without it is one group
(``vision``), parameters its ``named_groups`` leaves out form ``<tower>.other``; every other
top-level module is one group named after it, and the loss is ``loss``.

Patterns (recipe ``freeze``, ``lr_mult``, stage plans) match a name when :func:`fnmatch` does or
when the pattern is a dotted prefix of it: ``vision`` names the whole vision encoder (every group
and parameter under ``vision.``) but not ``vision_adapter``; ``vision.layers.1`` does not match
``vision.layers.10``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence

import attrs
import torch
from torch import nn

from ..spi.errors import PluginError

#: model attributes holding the two encoders, in the order groups are listed
TOWERS = ("vision", "text")


def matches(pattern: str, name: str) -> bool:
    """fnmatch, or ``pattern`` is ``name`` or a dotted prefix of it."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def first_match(name: str, table: Iterable[tuple[str, float]]) -> float | None:
    """The value of the first ``(pattern, value)`` whose pattern matches ``name``."""
    for pattern, value in table:
        if matches(pattern, name):
            return value
    return None


@attrs.frozen
class NamedParam:
    name: str  # full name, e.g. "vision.model.blocks.0.attn.qkv.weight"
    group: str  # e.g. "vision.layers.0"
    param: nn.Parameter


def _encoder_groups(prefix: str, module: nn.Module) -> dict[str, str]:
    """Encoder-relative parameter name -> full group name, from ``named_groups()``."""
    fn = getattr(module, "named_groups", None)
    if not callable(fn):
        return {}
    known = dict(module.named_parameters())
    out: dict[str, str] = {}
    for group, names in fn().items():
        for n in names:
            if n not in known:
                raise PluginError(f"encoder '{prefix}': named_groups() lists '{n}' in group "
                                  f"'{group}', but the encoder has no such parameter")
            if n in out:
                raise PluginError(f"encoder '{prefix}': parameter '{n}' is in two groups of "
                                  f"named_groups() ('{out[n]}' and '{prefix}.{group}')")
            out[n] = f"{prefix}.{group}"
    return out


class ParamTable:
    """The trainable parameters of a model and its loss(es), named and grouped, in model order.

    Only parameters that require grad when the table is built are listed: a plugin that froze
    some of its own parameters keeps them frozen whatever a schedule says.
    """

    def __init__(self, model: nn.Module, losses: Mapping[str, nn.Module]) -> None:
        self.params: list[NamedParam] = []
        #: tower -> its group names ordered input -> output (encoders with named_groups only)
        self.tower_groups: dict[str, list[str]] = {}
        children = dict(model.named_children())
        order = [c for c in TOWERS if c in children] + [c for c in children if c not in TOWERS]
        for child in order:
            module = children[child]
            groups = _encoder_groups(child, module) if child in TOWERS else {}
            if groups:
                self.tower_groups[child] = list(dict.fromkeys(groups.values()))
            for n, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                group = groups.get(n, f"{child}.other") if groups else child
                self.params.append(NamedParam(f"{child}.{n}", group, p))
        for prefix, loss in losses.items():
            for n, p in loss.named_parameters():
                if p.requires_grad:
                    self.params.append(NamedParam(f"{prefix}.{n}", prefix, p))
        self.groups: list[str] = list(dict.fromkeys(np.group for np in self.params))

    def __iter__(self):
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def by_group(self) -> dict[str, list[NamedParam]]:
        out: dict[str, list[NamedParam]] = {g: [] for g in self.groups}
        for np_ in self.params:
            out[np_.group].append(np_)
        return out

    def tower(self, name: str) -> list[nn.Parameter]:
        """Parameters of one modality's tower: its encoder and its adapter."""
        return [np_.param for np_ in self.params
                if matches(name, np_.group) or matches(f"{name}_adapter", np_.group)]

    # optimizer ------------------------------------------------------------------------------
    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """One AdamW group per named group and decay kind (no decay on gains, biases, scalars:
        open_clip's ``ndim < 2`` rule), each tagged with its ``group`` name and ``lr_mult``."""
        out = []
        for group, members in self.by_group().items():
            decay = [m.param for m in members if m.param.ndim >= 2]
            no_decay = [m.param for m in members if m.param.ndim < 2]
            for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
                if params:
                    out.append({"params": params, "weight_decay": wd, "group": group,
                                "lr_mult": 1.0})
        return out

    # freezing -------------------------------------------------------------------------------
    def freeze(self, patterns: Sequence[str]) -> list[str]:
        """Freeze parameters whose full or group name matches a pattern, unfreeze the rest.

        A frozen parameter gets no gradient, so AdamW skips it (no moment or weight-decay
        update) and its optimizer state resumes untouched when it is unfrozen. Returns the
        patterns that matched nothing.
        """
        used = set()
        for np_ in self.params:
            hit = [p for p in patterns if matches(p, np_.group) or matches(p, np_.name)]
            used.update(hit)
            np_.param.requires_grad_(not hit)
        return [p for p in patterns if p not in used]

    def frozen(self) -> list[str]:
        return [np_.name for np_ in self.params if not np_.param.requires_grad]

    # multipliers ----------------------------------------------------------------------------
    def layer_decay(self, decay: float) -> dict[str, float]:
        """Layer-wise LR decay (BEiT/ELECTRA): per encoder, the group ``k`` places below the
        top gets ``decay ** k``; the head shares the top block's ``decay ** 1``; adapters,
        the loss and groups of encoders without ``named_groups`` keep 1."""
        out = dict.fromkeys(self.groups, 1.0)
        if decay == 1.0:
            return out
        for groups in self.tower_groups.values():
            ordered = [g for g in groups if not g.endswith(".head")]
            n = len(ordered)
            for i, g in enumerate(ordered):
                out[g] = decay ** (n - i)
            for g in groups:
                if g.endswith(".head"):
                    out[g] = decay
        return out


def lr_multipliers(table: ParamTable, *tables: Iterable[tuple[str, float]],
                   base: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per group: ``base`` (e.g. layer decay) times the first match in each pattern table."""
    out = {}
    for g in table.groups:
        m = (base or {}).get(g, 1.0)
        for t in tables:
            v = first_match(g, t)
            if v is not None:
                m *= v
        out[g] = m
    return out


@torch.no_grad()
def grad_norm(params: Iterable[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    # FSDP: a shard's norm is partial; full_tensor() completes it (every rank calls this)
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


@torch.no_grad()
def balance_towers(vision: Sequence[torch.Tensor], text: Sequence[torch.Tensor], *,
                   ratio: float, strength: float) -> dict[str, float]:
    r"""Scale the two towers' gradients toward ``|g_v| / |g_t| = ratio`` (seed 001 §1.1's
    modality balancing), keeping their joint norm.

    Full balancing (``strength = 1``) sets :math:`|g_v| = rG/\sqrt{1+r^2}` and
    :math:`|g_t| = G/\sqrt{1+r^2}` with :math:`G^2 = |g_v|^2 + |g_t|^2`, so the LR keeps its
    meaning; ``strength`` in (0, 1) moves each scale only part of the way (geometrically).
    Returns the norms before and after (the metrics ``balance/*``).
    """
    gv, gt = grad_norm(vision), grad_norm(text)
    stats = {"balance/vision_before": gv, "balance/text_before": gt}
    if gv > 0 and gt > 0 and math.isfinite(gv) and math.isfinite(gt) and strength > 0:
        total = math.hypot(gv, gt)
        want_t = total / math.sqrt(1 + ratio * ratio)
        sv = (ratio * want_t / gv) ** strength
        st = (want_t / gt) ** strength
        for params, s in ((vision, sv), (text, st)):
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, s)
        gv, gt = gv * sv, gt * st
    stats.update({"balance/vision_after": gv, "balance/text_after": gt})
    return stats
