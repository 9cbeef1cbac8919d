"""The collapse detector: turns diagnostics rows into a warning that says what to change.

Two symptoms, each needing ``patience`` consecutive checks so one noisy batch does not warn:

- ``no-gap``: positive pairs are not more similar than the rest (``sim/gap <= gap_threshold``),
  seed 001's "diagonal similarity not higher than mean": the model does not tell pairs apart.
- ``low-rank``: the embeddings of a modality span few directions (effective rank below
  ``rank_fraction`` of the width it could reach): dimensional collapse.

Non-finite statistics (a diverged run) count as both. Checks before ``grace_steps`` are not
judged: every model starts with a gap of zero. After a warning a symptom must be gone for
``patience`` checks before it can warn again, so a value hovering at a threshold warns once.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

#: the recipe keys that usually cure collapse, with the advice for each (seed 001 §3.1, §5.2)
_CURES = {
    "loss.temperature": "keep tau in 0.02-0.1 (a very low tau saturates the softmax, a high one "
                        "flattens it), or let it learn: loss.learn_temperature = true",
    "optim.lr": "lower the peak LR (1e-4 .. 1e-3 for AdamW) and give pretrained encoders a "
                "smaller LR than the adapters (optim.lr_mult, e.g. {vision = 0.1, text = 0.1})",
    "sampler.batch_size": "more negatives per step: a larger batch, or loss.name = "
                          "\"memory_queue\" to reuse past embeddings as negatives",
    "model.adapter.name": "try another projection: the adapter decides how gradients reach the "
                          "encoders (seed 001's BatchNorm projection with a large feature scale "
                          "did not prevent collapse; \"linear\", \"mlp\" and "
                          "\"bn-projection\" are built in)",
}
_RANK_CURES = {
    "loss.name": "add an anti-collapse term: a \"mixture\" with \"decorrelation\", \"vicreg\" "
                 "or \"barlow_twins\"",
}


@attrs.frozen
class Symptom:
    """One fired warning: what was seen, the numbers, and the keys to change."""

    kind: str
    step: int
    source: str
    checks: int
    values: dict[str, Any]
    cures: dict[str, str]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"symptom": self.kind, "source": self.source, "checks": self.checks,
                "values": self.values, "keys": list(self.cures), "message": self.message}


def _bad(value: Any, ok: Any) -> bool:
    """True when ``value`` is missing or non-finite, or ``ok(value)`` is false."""
    return not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value))


def _current(recipe: Any, key: str) -> str:
    """The recipe's value at ``key`` (for the warning), or '' when not set there."""
    if recipe is None:
        return ""
    node: Any = recipe.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return f" (now {node!r})"


class CollapseDetector:
    """Counts consecutive bad checks per symptom; ``update`` returns the symptoms that fired."""

    def __init__(self, *, gap_threshold: float = 0.02, rank_fraction: float = 0.01,
                 patience: int = 3, grace_steps: int = 0, recipe: Any = None) -> None:
        self.gap_threshold, self.rank_fraction = gap_threshold, rank_fraction
        self.patience, self.grace_steps, self.recipe = patience, grace_steps, recipe
        self.streak = {"no-gap": 0, "low-rank": 0}  # consecutive bad checks
        self.clear = {"no-gap": 0, "low-rank": 0}  # consecutive good checks
        self.armed = {"no-gap": True, "low-rank": True}

    def state_dict(self) -> dict[str, Any]:
        """The streaks, so a resumed run warns (and stops) exactly as the unbroken one."""
        return {"streak": dict(self.streak), "clear": dict(self.clear), "armed": dict(self.armed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("streak", "clear", "armed"):
            getattr(self, name).update(state.get(name, {}))

    def update(self, step: int, stats: dict[str, Any], source: str = "probe") -> list[Symptom]:
        if step < self.grace_steps:
            return []
        found = {"no-gap": _bad(stats.get("sim/gap"), lambda g: g > self.gap_threshold)}
        fracs = {m: stats.get(f"{m}/eff_rank_frac") for m in ("image", "text")}
        found["low-rank"] = any(_bad(f, lambda f: f >= self.rank_fraction)
                                for f in fracs.values())
        fired = []
        for kind, bad in found.items():
            self.streak[kind] = self.streak[kind] + 1 if bad else 0
            self.clear[kind] = 0 if bad else self.clear[kind] + 1
            if self.clear[kind] >= self.patience:
                self.armed[kind] = True
            if self.armed[kind] and self.streak[kind] >= self.patience:
                self.armed[kind] = False
                fired.append(self._symptom(kind, step, stats, source))
        return fired

    def _symptom(self, kind: str, step: int, stats: dict[str, Any], source: str) -> Symptom:
        g = {k: stats.get(k, float("nan")) for k in ("sim/pos_mean", "sim/neg_mean", "sim/gap")}
        values: dict[str, Any] = dict(g)
        for m in ("image", "text"):
            for k in ("eff_rank", "eff_rank_frac", "low_var_dims"):
                values[f"{m}/{k}"] = stats.get(f"{m}/{k}")
        where = f"{source} batch, {self.patience} checks in a row"
        if kind == "no-gap":
            head = (f"COLLAPSE WARNING at step {step} ({where}): positive pairs are not more "
                    f"similar than the rest: diagonal (positive) similarity "
                    f"{g['sim/pos_mean']:.4f} vs off-diagonal {g['sim/neg_mean']:.4f}, gap "
                    f"{g['sim/gap']:.4f} <= {self.gap_threshold}. The model does not tell "
                    "matched image-text pairs from unmatched ones.")
            cures = dict(_CURES)
        else:
            worst = min(("image", "text"), key=lambda m: _key(stats.get(f"{m}/eff_rank_frac")))
            frac = _key(stats.get(f"{worst}/eff_rank_frac"))
            head = (f"COLLAPSE WARNING at step {step} ({where}): dimensional collapse of the "
                    f"{worst} embeddings: effective rank {_f(stats.get(f'{worst}/eff_rank'))} "
                    f"({100 * frac:.1f}% of what the width allows, threshold "
                    f"{100 * self.rank_fraction:g}%): they span very few directions."
                    if frac >= 0 else
                    f"COLLAPSE WARNING at step {step} ({where}): the {worst} embeddings are not "
                    "finite (NaN or inf): training diverged.")
            cures = {**_CURES, **_RANK_CURES}
        low = [f"{m} {stats.get(f'{m}/low_var_dims')}" for m in ("image", "text")
               if stats.get(f"{m}/low_var_dims")]
        if low:
            head += " Low-variance dimensions: " + ", ".join(low) + "."
        lines = [head, "  Usually cured by changing (recipe keys):"]
        lines += [f"    {key}{_current(self.recipe, key)}: {advice}"
                  for key, advice in cures.items()]
        lines.append("  See docs/diagnosing-collapse.md; set diagnostics.stop_on_collapse = true "
                     "to end such runs early.")
        return Symptom(kind, step, source, self.patience, values, cures, "\n".join(lines))


def _key(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -1.0


def _f(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "n/a"
