"""Run plots (PNG, matplotlib's Agg backend: no display needed).

``training.png`` and ``diagnostics.png`` are drawn from ``metrics.jsonl``; ``similarity.png``,
``spectrum.png`` and ``embedding_map.png`` from test-split embeddings at the final evaluation
(:func:`run_plots`). Every figure is optional: a plot that fails says so on the console and the
run's metrics are already on disk.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from ..run.jsonl import read_jsonl

PLOTS = "plots"
IMAGE, TEXT = "#1f77b4", "#d62728"


def read_rows(metrics_jsonl: Path) -> list[dict]:
    """The rows of a run's log; a torn last line (a killed run) is left out."""
    return read_jsonl(metrics_jsonl)


def subplots(*grid: int, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure and its axes, drawn off-screen: matplotlib's object API, so no pyplot
    backend is chosen or changed (a notebook's stays as it is)."""
    fig = Figure(figsize=figsize)
    return fig, (fig.subplots(*grid) if grid else fig.subplots())


def save_figure(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def training_plot(metrics_jsonl: Path, out: Path) -> Path | None:
    """Loss by term, learning rate (and temperature), and recall over evaluations."""
    rows = read_rows(metrics_jsonl)
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval" and not r.get("final")]
    final = [r for r in rows if r.get("type") == "eval" and r.get("final")]
    if not train:
        return None
    fig, axes = subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="loss", lw=2)
    for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
        axes[0].plot(steps, [r.get(key, float("nan")) for r in train], label=key[5:], lw=1)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train], label="lr")
    axes[1].set(title="learning rate", xlabel="step")
    if any("temperature" in r for r in train):
        tax = axes[1].twinx()
        tax.plot(steps, [r.get("temperature", float("nan")) for r in train], color="C1",
                 label="temperature")
        tax.set_ylabel("temperature", color="C1")
        axes[1].set_title("learning rate and temperature")
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
    return save_figure(fig, out)


def _series(rows: Sequence[dict], key: str) -> list[float]:
    return [r.get(key, float("nan")) if r.get(key) is not None else float("nan") for r in rows]


def diagnostics_plot(metrics_jsonl: Path, out: Path) -> Path | None:
    """The collapse diagnostics over training: similarity gap, effective rank, low-variance
    dimensions, alignment/uniformity, gradient norms by part, and the latest eigen-spectrum."""
    rows = [r for r in read_rows(metrics_jsonl) if r.get("type") == "diagnostics"]
    if not rows:
        return None
    warnings = [r for r in read_rows(metrics_jsonl) if r.get("type") == "warning"]
    src = "probe" if any("probe/sim/gap" in r for r in rows) else "batch"
    steps = [r["step"] for r in rows]
    fig, axes = subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    for s, ls in (("probe", "-"), ("batch", ":")):
        if any(f"{s}/sim/gap" in r for r in rows):
            ax.plot(steps, _series(rows, f"{s}/sim/pos_mean"), ls, color="C2",
                    label=f"positive ({s})")
            ax.plot(steps, _series(rows, f"{s}/sim/neg_mean"), ls, color="C7",
                    label=f"negative ({s})")
            ax.plot(steps, _series(rows, f"{s}/sim/gap"), ls, color="C3", lw=2,
                    label=f"gap ({s})")
    ax.set(title="cosine similarity: positives vs negatives", xlabel="step")
    ax = axes[0, 1]
    for m, color in (("image", IMAGE), ("text", TEXT)):
        ax.plot(steps, _series(rows, f"{src}/{m}/eff_rank"), color=color, label=m)
    ax.set(title=f"effective rank ({src})", xlabel="step")
    ax.set_ylim(bottom=0)
    ax = axes[0, 2]
    for m, color in (("image", IMAGE), ("text", TEXT)):
        ax.plot(steps, _series(rows, f"{src}/{m}/low_var_dims"), color=color, label=m)
    ax.set(title=f"low-variance dimensions ({src})", xlabel="step")
    ax = axes[1, 0]
    ax.plot(steps, _series(rows, f"{src}/align"), color="C2", label="alignment")
    for m, color in (("image", IMAGE), ("text", TEXT)):
        ax.plot(steps, _series(rows, f"{src}/{m}/uniformity"), color=color,
                label=f"uniformity {m}")
    ax.set(title=f"alignment / uniformity ({src}, lower is better)", xlabel="step")
    ax = axes[1, 1]
    for key in sorted({k for r in rows for k in r if k.startswith("grad/")}):
        vals = [v if v and v > 0 else float("nan") for v in _series(rows, key)]
        ax.plot(steps, vals, label=key[5:], lw=2 if key == "grad/total" else 1)
    ax.set(title="gradient norm by part", xlabel="step")
    if any(k.startswith("grad/") for r in rows for k in r):
        ax.set_yscale("log")
    ax = axes[1, 2]
    picks = sorted({0, len(rows) // 2, len(rows) - 1})
    for i in picks:
        for m, color in (("image", IMAGE), ("text", TEXT)):
            spec = rows[i].get(f"{src}/{m}/spectrum") or []
            if spec:
                ax.plot(range(1, len(spec) + 1), [max(v, 1e-8) for v in spec], color=color,
                        alpha=0.35 + 0.65 * (i + 1) / len(rows), marker=".",
                        label=f"{m} @ {rows[i]['step']}")
    ax.set(title=f"leading eigenvalues ({src}, share of variance)", xlabel="rank",
           yscale="log")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for w in warnings:
            if ax is not axes[1, 2]:
                ax.axvline(w["step"], color="k", ls="--", lw=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if warnings:
        fig.suptitle("collapse warning(s) at step " + ", ".join(
            f"{w['step']} ({w.get('symptom')})" for w in warnings), color="darkred")
    fig.tight_layout()
    return save_figure(fig, out)


# plots from embeddings ---------------------------------------------------------------------------


def _normalised(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def similarity_histogram(image: Tensor, text: Tensor, owner: Tensor, out: Path) -> Path:
    """Cosine similarity of positive pairs vs all other pairs: two separated humps is a model
    that learned; one hump is collapse."""
    sim = _normalised(image) @ _normalised(text).T
    pos = owner[None, :].to(sim.device) == torch.arange(sim.shape[0], device=sim.device)[:, None]
    p, n = sim[pos].cpu().numpy(), sim[~pos].cpu().numpy()
    fig, ax = subplots(figsize=(6.5, 4))
    lo, hi = float(min(p.min(), n.min())), float(max(p.max(), n.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 60)
    ax.hist(n, bins=bins, density=True, alpha=0.55, color="C7", label=f"negatives (n={n.size})")
    ax.hist(p, bins=bins, density=True, alpha=0.65, color="C2", label=f"positives (n={p.size})")
    ax.axvline(float(n.mean()), color="C7", ls="--")
    ax.axvline(float(p.mean()), color="C2", ls="--")
    ax.set(title=f"image-text cosine similarity (gap {p.mean() - n.mean():.3f})",
           xlabel="cosine similarity", ylabel="density")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def spectrum_plot(image: Tensor, text: Tensor, out: Path) -> Path:
    """Covariance eigen-spectrum of each modality's normalised embeddings (share of variance,
    log scale); a spectrum that drops off after a few eigenvalues is dimensional collapse."""
    from ..diagnostics.stats import effective_rank, spectrum

    fig, ax = subplots(figsize=(6.5, 4))
    for name, x, color in (("image", image, IMAGE), ("text", text, TEXT)):
        ev = spectrum(_normalised(x))
        share = (ev / ev.sum().clamp_min(1e-12)).cpu().numpy()
        ax.plot(np.arange(1, share.size + 1), np.maximum(share, 1e-10), color=color,
                label=f"{name} (effective rank {effective_rank(ev):.1f} of {share.size})")
    ax.set(title="eigen-spectrum of the embedding covariance", xlabel="eigenvalue rank",
           ylabel="share of variance", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def project_2d(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``x`` and the method used: UMAP (umap-learn), t-SNE
    (scikit-learn) or PCA. ``auto`` takes the first of these that is installed."""
    order = {"auto": ("umap", "tsne", "pca"), "umap": ("umap", "tsne", "pca"),
             "tsne": ("tsne", "pca"), "pca": ("pca",)}[method]
    n = x.shape[0]
    for m in order:
        if m == "umap":
            try:
                import umap
            except ImportError:
                continue
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed,
                                n_jobs=1)
            with warnings.catch_warnings():  # "n_jobs overridden by random_state": we know
                warnings.simplefilter("ignore", UserWarning)
                return np.asarray(reducer.fit_transform(x)), "UMAP"
        if m == "tsne":
            try:
                from sklearn.manifold import TSNE
            except ImportError:
                continue
            tsne = TSNE(n_components=2, perplexity=max(1.0, min(30.0, (n - 1) / 3)),
                        init="pca", random_state=seed)
            return tsne.fit_transform(x), "t-SNE"
    xc = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T, "PCA"


def embedding_map(image: Tensor, text: Tensor, owner: Tensor, out: Path, *,
                  method: str = "auto", points: int = 300) -> tuple[Path, str]:
    """Images and one caption each in one 2-D map, each pair linked by a line. Short lines:
    pairs land together; every point in one blob: collapse."""
    n = min(points, image.shape[0])
    first = {}
    for j, i in enumerate(owner.tolist()):
        if i < n and i not in first:
            first[i] = j
    idx = sorted(first)
    v = _normalised(image[idx]).cpu().numpy()
    t = _normalised(text[[first[i] for i in idx]]).cpu().numpy()
    xy, used = project_2d(np.concatenate([v, t]), method)
    a, b = xy[: len(idx)], xy[len(idx):]
    fig, ax = subplots(figsize=(7, 6.5))
    for (x0, y0), (x1, y1) in zip(a, b):
        ax.plot([x0, x1], [y0, y1], color="0.6", lw=0.5, alpha=0.6, zorder=1)
    ax.scatter(a[:, 0], a[:, 1], s=12, color=IMAGE, label="image", zorder=2)
    ax.scatter(b[:, 0], b[:, 1], s=12, color=TEXT, marker="^", label="caption", zorder=2)
    ax.set(title=f"{used} map of {len(idx)} test pairs (lines link an image to its caption)",
           xticks=[], yticks=[])
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out), used


# at the end of a run -----------------------------------------------------------------------------


def _attempt(say: Callable[[str], None], what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:  # a plot must never cost the run its results
        say(f"warning: could not draw {what}: {type(err).__name__}: {err}")
        return None


def run_plots(trainer: Any, split: str) -> list[Path]:
    """Every plot of a finished run into ``<run_dir>/plots``; failures are reported, not raised."""
    from ..eval.retrieval import embed_split

    d = Path(trainer.run_dir)
    out = d / PLOTS
    say = trainer.say
    made = [_attempt(say, "training.png", lambda: training_plot(
                d / "metrics.jsonl", out / "training.png")),
            _attempt(say, "diagnostics.png", lambda: diagnostics_plot(
                d / "metrics.jsonl", out / "diagnostics.png"))]
    c = trainer.recipe.diagnostics
    if c.map_points:
        emb = _attempt(say, "the test embeddings for plots", lambda: embed_split(
            trainer.model, trainer.source.split(split), batch_size=trainer.recipe.eval.batch_size,
            device=trainer.device, autocast=trainer.backend.autocast, max_images=c.map_points))
        if emb is not None and emb[0].shape[0] >= 2:
            image, text, owner = (e.cpu() for e in emb)
            made.append(_attempt(say, "similarity.png", lambda: similarity_histogram(
                image, text, owner, out / "similarity.png")))
            made.append(_attempt(say, "spectrum.png", lambda: spectrum_plot(
                image, text, out / "spectrum.png")))
            m = _attempt(say, "embedding_map.png", lambda: embedding_map(
                image, text, owner, out / "embedding_map.png", method=c.map_method,
                points=c.map_points))
            if m is not None:
                made.append(m[0])
                wanted = {"umap": "UMAP", "tsne": "t-SNE"}.get(c.map_method)
                if wanted and m[1] != wanted:
                    extra = "umap" if c.map_method == "umap" else "plots"
                    say(f"note: embedding map drawn with {m[1]}: {wanted} is not installed "
                        f"(pip install 'mmfw[{extra}]')")
    return [p for p in made if p is not None]
