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
    evals = [r for r in rows if r.get("type") == "eval"]
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
    if evals:
        es = [r["step"] for r in evals]
        for key in ("i2t_R@1", "t2i_R@1", "i2t_R@10", "t2i_R@10"):
            axes[2].plot(es, [r[key] for r in evals], marker="o", label=key)
        axes[2].legend()
    axes[2].set(title="retrieval (%)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
