"""Collapse diagnostics measured while training (seed 001 §2.2, §7.3).

Every ``diagnostics.every`` optimizer steps the engine asks :class:`Diagnostics` for one
``"type": "diagnostics"`` row in ``metrics.jsonl``. It holds the statistics of the current
training batch (prefix ``batch/``) and of a fixed probe batch embedded in eval mode without
gradients (prefix ``probe/``), so successive rows are comparable; the per-module gradient norms
of that step (``grad/``); and the temperature. The :mod:`mmfw.collapse` detector reads each row
and warns when the model stops telling pairs apart.

All statistics are of L2-normalised embeddings, because that is what the loss and retrieval
compare: a model whose raw features vary a lot can still point every sample the same way (the
seeds' "raw variance reasonable, normalised features collapsed").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batching import Batch, Collate
from ..parallel.sharding import full

#: statistics keys of one source (batch or probe), in the order rows list them
SIM_KEYS = ("sim/mean", "sim/std", "sim/min", "sim/max", "sim/pos_mean", "sim/neg_mean",
            "sim/gap")


def effective_rank(eigenvalues: Tensor) -> float:
    """``exp(H(p))`` with ``p`` the eigenvalues normalised to sum 1 (Roy & Vetterli 2007).

    Ranges from 1 (all variance along one direction) to the number of eigenvalues (isotropic).
    """
    ev = eigenvalues.double().clamp_min(0)
    total = ev.sum()
    if not torch.isfinite(total) or total <= 0:
        return float("nan") if not torch.isfinite(total) else 1.0
    p = ev / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum(x: Tensor) -> Tensor:
    """Eigenvalues of the covariance of the rows of ``x`` ``[N, D]``, largest first."""
    x = x.double()
    xc = x - x.mean(0, keepdim=True)
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)


@torch.no_grad()
def modality_stats(x: Tensor, *, low_variance: float = 0.1, top_k: int = 16
                   ) -> dict[str, Any]:
    """Spread of one modality's normalised embeddings ``[N, D]``.

    ``var_*`` are per-dimension variances across the rows; a dimension is *low-variance* below
    ``low_variance / D`` (the variance every dimension has when the rows are spread isotropically
    on the sphere). ``eff_rank_frac`` divides the effective rank by the largest it can be with N
    rows, ``min(D, N - 1)``. ``uniformity`` is Wang & Isola's ``log E exp(-2 |x - y|^2)`` over
    distinct rows (lower: more uniform; ``-4`` is the limit in high dimension).
    """
    n, d = x.shape
    x = F.normalize(x.float(), dim=-1)
    out: dict[str, Any] = {}
    if not torch.isfinite(x).all():
        nan = float("nan")
        return {"var_mean": nan, "var_min": nan, "low_var_dims": d, "eff_rank": nan,
                "eff_rank_frac": nan, "uniformity": nan, "spectrum": []}
    var = x.var(0, unbiased=True) if n > 1 else torch.zeros(d)
    out["var_mean"] = float(var.mean())
    out["var_min"] = float(var.min())
    out["low_var_dims"] = int((var < low_variance / d).sum())
    ev = spectrum(x)
    er = effective_rank(ev)
    out["eff_rank"] = er
    out["eff_rank_frac"] = er / max(min(d, n - 1), 1)
    out["uniformity"] = (float(torch.pdist(x).pow(2).mul(-2).exp().mean().log())
                         if n > 1 else float("nan"))
    total = float(ev.sum())
    out["spectrum"] = [float(e) / total if total > 0 else 0.0 for e in ev[:top_k]]
    return out


@torch.no_grad()
def embedding_stats(image: Tensor, text: Tensor, image_ids: Tensor, text_ids: Tensor, *,
                    low_variance: float = 0.1, top_k: int = 16) -> dict[str, Any]:
    """Everything the collapse detector and the plots read, for one set of embeddings.

    ``sim/gap`` is the mean cosine similarity of positive pairs (equal ids: the "diagonal")
    minus that of the other pairs: the seeds' failing signal was a gap of ~0. ``align`` is Wang &
    Isola's alignment ``E |v - t|^2`` over positive pairs (lower: positives closer).
    ``modality_gap`` is the distance between the two modalities' mean embeddings.
    """
    v = F.normalize(image.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    sim = v @ t.T
    pos = image_ids.to(sim.device)[:, None] == text_ids.to(sim.device)[None, :]
    neg = ~pos
    pos_mean = sim[pos].mean() if pos.any() else torch.tensor(float("nan"))
    neg_mean = sim[neg].mean() if neg.any() else torch.tensor(float("nan"))
    out: dict[str, Any] = {
        "sim/mean": float(sim.mean()),
        "sim/std": float(sim.std()) if sim.numel() > 1 else 0.0,
        "sim/min": float(sim.min()),
        "sim/max": float(sim.max()),
        "sim/pos_mean": float(pos_mean),
        "sim/neg_mean": float(neg_mean),
        "sim/gap": float(pos_mean - neg_mean),
        "align": float((2 - 2 * sim[pos]).mean()) if pos.any() else float("nan"),
        "modality_gap": float((v.mean(0) - t.mean(0)).norm()),
    }
    for name, x in (("image", image), ("text", text)):
        for k, val in modality_stats(x, low_variance=low_variance, top_k=top_k).items():
            out[f"{name}/{k}"] = val
    return out


# gradients -------------------------------------------------------------------------------------


def gradient_groups(model: nn.Module, loss: nn.Module | None = None
                    ) -> dict[str, list[nn.Parameter]]:
    """Parameters by part: ``vision`` and ``text`` towers, ``adapters``, ``loss``, and any other
    top-level part of the model under its own name (a fusion head, say)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, child in model.named_children():
        key = "adapters" if name.endswith("adapter") else name
        groups.setdefault(key, []).extend(child.parameters())
    if loss is not None:
        groups["loss"] = list(loss.parameters())
    return {k: v for k, v in groups.items() if v}


def _norm(tensors: list[Tensor]) -> Tensor:
    get_total_norm = getattr(nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(tensors, norm_type=2.0)
    return torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in tensors]))


@torch.no_grad()
def gradient_norms(groups: Mapping[str, Iterable[nn.Parameter]]) -> dict[str, Tensor]:
    """L2 norm of the gradients of each group and of all together (``total``); groups without
    gradients (frozen) are left out. Values stay tensors: no host sync until they are logged."""
    out: dict[str, Tensor] = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:  # (a sharded model's norm is whole after full(): every rank calls this)
            out[name] = full(_norm(grads))
    if out:
        out["total"] = torch.linalg.vector_norm(torch.stack([v.float() for v in out.values()]))
    return out


# the probe batch -------------------------------------------------------------------------------


def probe_batch(split: Any, size: int, preprocess: Any, tokenize: Any) -> Batch | None:
    """A fixed batch of ``size`` images spread evenly over ``split``, one caption each (the
    ``i``-th image takes caption ``i mod captions``), so positives are exactly the diagonal."""
    n = min(size, len(split))
    if n < 2:
        return None
    idx = sorted({round(i * (len(split) - 1) / max(n - 1, 1)) for i in range(n)})
    rows, ids = [], []
    for k, i in enumerate(idx):
        item = split[i]
        captions = list(item.captions)
        rows.append((item.image, captions[k % len(captions)], k, k))
        ids.append(k)
    return Collate(preprocess, tokenize, ids)(rows)
