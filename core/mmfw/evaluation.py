"""Cross-modal retrieval: Recall@K both ways and rsum, by the Karpathy convention.

Image-to-text: a query image scores a hit at K if *any* of its captions is among the K most
similar captions. Text-to-image: a caption hits at K if its image is among the top K images.
Similarities are cosine; ranking is one batched top-k, no Python loop over queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

KS = (1, 5, 10)
METRIC_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def recall_at_k(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor,
                ks: Sequence[int] = KS, chunk: int = 4096) -> dict[str, float]:
    """Recall@K in percent from embeddings ``[N, D]``, ``[M, D]`` and caption owners ``[M]``.

    ``text_to_image[j]`` is the row of ``image_emb`` that caption ``j`` describes.
    """
    v = F.normalize(image_emb.float(), dim=-1)
    t = F.normalize(text_emb.float(), dim=-1)
    owner = text_to_image.to(v.device).long()
    n, m, kmax = v.shape[0], t.shape[0], max(ks)
    out: dict[str, float] = {}
    # image -> text: is any of the top-k captions owned by the query image?
    hits_i2t = torch.zeros(len(ks), dtype=torch.long, device=v.device)
    for s in range(0, n, chunk):
        top = (v[s:s + chunk] @ t.T).topk(min(kmax, m), dim=1).indices  # [b, K]
        own = owner[top] == torch.arange(s, min(s + chunk, n), device=v.device)[:, None]
        for i, k in enumerate(ks):
            hits_i2t[i] += own[:, :k].any(1).sum()
    # text -> image: is the caption's image in its top-k images?
    hits_t2i = torch.zeros(len(ks), dtype=torch.long, device=v.device)
    for s in range(0, m, chunk):
        top = (t[s:s + chunk] @ v.T).topk(min(kmax, n), dim=1).indices
        own = top == owner[s:s + chunk, None]
        for i, k in enumerate(ks):
            hits_t2i[i] += own[:, :k].any(1).sum()
    for i, k in enumerate(ks):
        out[f"i2t_R@{k}"] = 100.0 * int(hits_i2t[i]) / n  # integer counts, float64 division
    for i, k in enumerate(ks):
        out[f"t2i_R@{k}"] = 100.0 * int(hits_t2i[i]) / m
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


@torch.no_grad()
def embed_split(model: Any, split: Any, *, batch_size: int = 256, device: Any = "cpu",
                autocast: Any = None, max_images: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Embed every image and caption of a split: ``(images [N, D], texts [M, D], owner [M])``."""
    import contextlib

    model.eval()
    n = len(split) if not max_images else min(max_images, len(split))
    ctx = autocast if autocast is not None else contextlib.nullcontext
    pre, tok = model.vision.preprocess, model.text.tokenize
    imgs, txts, owner, captions = [], [], [], []
    for i in range(n):
        for c in split.captions(i):
            captions.append(c)
            owner.append(i)
    for s in range(0, n, batch_size):
        pixels = torch.stack([pre(split[i].image) for i in range(s, min(s + batch_size, n))])
        with ctx():
            imgs.append(model.encode_image(pixels.to(device)).float())
    for s in range(0, len(captions), batch_size):
        tokens = {k: v.to(device) for k, v in tok(captions[s:s + batch_size]).items()}
        with ctx():
            txts.append(model.encode_text(tokens).float())
    return torch.cat(imgs), torch.cat(txts), torch.tensor(owner, dtype=torch.long)


def evaluate_split(model: Any, split: Any, **kwargs: Any) -> dict[str, float]:
    img, txt, owner = embed_split(model, split, **kwargs)
    return recall_at_k(img, txt, owner)


def ensemble_embeddings(images: Sequence[Tensor], texts: Sequence[Tensor]
                        ) -> tuple[Tensor, Tensor]:
    r"""Joint embeddings of K models whose dot product is their *averaged* cosine similarity.

    With :math:`\hat v_k, \hat t_k` each model's normalised embeddings,
    :math:`[\hat v_1, \dots, \hat v_K] / \sqrt K \cdot [\hat t_1, \dots, \hat t_K] / \sqrt K
    = \frac1K \sum_k \hat v_k^\top \hat t_k` (seed 000 §5's ``ensemble_predict``), and the
    concatenations have unit norm, so ranking them by cosine (``recall_at_k``) ranks by the
    averaged similarity without ever holding an ``[N, M]`` matrix.
    """
    if not images or len(images) != len(texts):
        raise ValueError("ensemble_embeddings needs as many image as text embedding sets (>= 1)")
    k = len(images) ** 0.5
    img = torch.cat([F.normalize(x.float(), dim=-1) for x in images], dim=1) / k
    txt = torch.cat([F.normalize(x.float(), dim=-1) for x in texts], dim=1) / k
    return img, txt


def ensemble_similarity(images: Sequence[Tensor], texts: Sequence[Tensor]) -> Tensor:
    """The averaged cosine similarity matrix ``[N, M]`` of K models (for inspection)."""
    sims = [F.normalize(v.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T
            for v, t in zip(images, texts)]
    return torch.stack(sims).mean(0)


def evaluate_ensemble(models: Sequence[Any], split: Any, **kwargs: Any) -> dict[str, float]:
    """Recall@K of the averaged similarity of several models; each embeds with its own
    preprocessing and tokenizer, all on the same split."""
    imgs, txts, owner = [], [], None
    for model in models:
        img, txt, own = embed_split(model, split, **kwargs)
        if owner is not None and not torch.equal(owner, own):
            raise ValueError("ensemble members embedded different captions")
        imgs.append(img)
        txts.append(txt)
        owner = own
    img, txt = ensemble_embeddings(imgs, txts)
    return recall_at_k(img, txt, owner)
