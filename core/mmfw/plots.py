"""Training plots (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_rows(metrics_jsonl: Path) -> list[dict]:
    if not metrics_jsonl.is_file():
        return []
    return [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]


def training_plot(metrics_jsonl: Path, out: Path) -> Path | None:
    """Loss by term, learning rate, and recall over evaluations, side by side."""
    rows = read_rows(metrics_jsonl)
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval" and not r.get("final")]
    final = [r for r in rows if r.get("type") == "eval" and r.get("final")]
    if not train:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="loss", lw=2)
    for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
        axes[0].plot(steps, [r.get(key, float("nan")) for r in train], label=key[5:], lw=1)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    for key in ("i2t_R@1", "t2i_R@1", "i2t_R@10", "t2i_R@10"):
        (line,) = axes[2].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o",
                               label=f"{key} ({evals[0]['split']})" if evals else key)
        for r in final:  # the final evaluation is on another split: a marker, not the line
            axes[2].plot([r["step"]], [r[key]], marker="*", ms=12, ls="",
                         color=line.get_color(), label=f"{key} ({r['split']}, final)")
    if evals or final:
        axes[2].legend(fontsize=7)
    axes[2].set(title="retrieval (%)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
