"""Cross-modal retrieval: Recall@K both ways and rsum, by the Karpathy convention.

Image-to-text: a query image scores a hit at K if *any* of its captions is among the K most
similar captions. Text-to-image: a caption hits at K if its image is among the top K images.
Similarities are cosine; ranking is one batched top-k, no Python loop over queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

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


def evaluate_split(model: Any, split: Any, rerank_top_k: int = 0, **kwargs: Any
                   ) -> dict[str, float]:
    """Recall@K of a split; ``rerank_top_k`` re-scores each query's top k by the model's
    fusion head (``eval.rerank_top_k``)."""
    if rerank_top_k:
        return rerank_split(model, split, rerank_top_k, **kwargs).metrics
    img, txt, owner = embed_split(model, split, **kwargs)
    return recall_at_k(img, txt, owner)


# ------------------------------------------------------------------------------------------
# re-ranking the dual encoder's top-k with a fusion (ITM) head (ALBEF / BLIP style)


class Reranked(NamedTuple):
    """Recall of the re-ranked lists, the lists before / after (``[N, K]`` images -> captions,
    ``[M, K]`` captions -> images, K = max(10, k)) and the seconds spent on each part."""

    metrics: dict[str, float]
    i2t: Tensor
    t2i: Tensor
    i2t_plain: Tensor
    t2i_plain: Tensor
    seconds: dict[str, float]


def top_ranks(image_emb: Tensor, text_emb: Tensor, kmax: int, chunk: int = 4096
              ) -> tuple[Tensor, Tensor]:
    """Indices of the ``kmax`` most cosine-similar captions per image and images per caption."""
    v = F.normalize(image_emb.float(), dim=-1)
    t = F.normalize(text_emb.float(), dim=-1)
    i2t = torch.cat([(v[s:s + chunk] @ t.T).topk(min(kmax, t.shape[0]), dim=1).indices
                     for s in range(0, v.shape[0], chunk)])
    t2i = torch.cat([(t[s:s + chunk] @ v.T).topk(min(kmax, v.shape[0]), dim=1).indices
                     for s in range(0, t.shape[0], chunk)])
    return i2t, t2i


def recall_from_ranks(i2t: Tensor, t2i: Tensor, text_to_image: Tensor,
                      ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K (percent) and rsum from ranked lists, by the same rules as ``recall_at_k``."""
    owner = text_to_image.to(i2t.device).long()
    n, m = i2t.shape[0], t2i.shape[0]
    own_i2t = owner[i2t] == torch.arange(n, device=i2t.device)[:, None]
    own_t2i = t2i == owner[:, None]
    out = {f"i2t_R@{k}": 100.0 * int(own_i2t[:, :k].any(1).sum()) / n for k in ks}
    out.update({f"t2i_R@{k}": 100.0 * int(own_t2i[:, :k].any(1).sum()) / m for k in ks})
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


@torch.no_grad()
def rerank(top: Tensor, k: int, score: Any, batch_size: int = 256) -> Tensor:
    """``top`` ``[Q, K]`` with each row's first ``k`` entries reordered by
    ``score(query_rows, candidate_rows) -> [P]`` (descending); the rest keep their order."""
    k = min(k, top.shape[1])
    q = torch.arange(top.shape[0], device=top.device)[:, None].expand(-1, k).reshape(-1)
    c = top[:, :k].reshape(-1)
    logits = torch.cat([score(q[s:s + batch_size], c[s:s + batch_size]).float()
                        for s in range(0, q.numel(), batch_size)]).view(-1, k)
    order = logits.argsort(dim=1, descending=True, stable=True)
    return torch.cat([top[:, :k].gather(1, order), top[:, k:]], dim=1)


@torch.no_grad()
def embed_split_tokens(model: Any, split: Any, *, batch_size: int = 256, device: Any = "cpu",
                       autocast: Any = None, max_images: int = 0
                       ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor],
                                  tuple[Tensor, Tensor]]:
    """``embed_split`` plus every image's and caption's token features and masks (kept on
    the CPU, captions padded to the longest): what re-ranking needs, and only it."""
    import contextlib

    model.eval()
    n = len(split) if not max_images else min(max_images, len(split))
    ctx = autocast if autocast is not None else contextlib.nullcontext
    pre, tok = model.vision.preprocess, model.text.tokenize
    owner = [i for i in range(n) for _ in split.captions(i)]
    captions = [c for i in range(n) for c in split.captions(i)]
    imgs, txts, vtok, ttok = [], [], [], []
    for s in range(0, n, batch_size):
        pixels = torch.stack([pre(split[i].image) for i in range(s, min(s + batch_size, n))])
        with ctx():
            e, t, m = model.encode_image_tokens(pixels.to(device))
        imgs.append(e.float())
        vtok.append((t.cpu(), m.cpu()))
    for s in range(0, len(captions), batch_size):
        tokens = {k: v.to(device) for k, v in tok(captions[s:s + batch_size]).items()}
        with ctx():
            e, t, m = model.encode_text_tokens(tokens)
        txts.append(e.float())
        ttok.append((t.cpu(), m.cpu()))
    return (torch.cat(imgs), torch.cat(txts), torch.tensor(owner, dtype=torch.long),
            _pad_tokens(vtok), _pad_tokens(ttok))


def _pad_tokens(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    length = max(t.shape[1] for t, _ in parts)
    toks = [F.pad(t, (0, 0, 0, length - t.shape[1])) for t, _ in parts]
    masks = [F.pad(m, (0, length - m.shape[1]), value=False) for _, m in parts]
    return torch.cat(toks), torch.cat(masks)


@torch.no_grad()
def rerank_split(model: Any, split: Any, k: int, *, batch_size: int = 256, device: Any = "cpu",
                 autocast: Any = None, max_images: int = 0) -> Reranked:
    """Recall@K after re-scoring each query's top ``k`` by the model's fusion head.

    The dual encoder ranks everything (one matrix product); the ITM head then scores only
    ``k`` pairs per query, in batches of ``batch_size`` pairs, and those ``k`` are reordered
    by its logit (ALBEF's inference). Ranks below ``k`` are the dual encoder's.
    """
    import contextlib
    import time

    if getattr(model, "fusion", None) is None:
        from ..spi.errors import RecipeError

        raise RecipeError("re-ranking needs a fusion head", key="eval.rerank_top_k",
                          expected="0, or a [model.fusion] section in the recipe", given=k)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    t0 = time.perf_counter()
    img, txt, owner, (vt, vm), (tt, tm) = embed_split_tokens(
        model, split, batch_size=batch_size, device=device, autocast=autocast,
        max_images=max_images)
    t1 = time.perf_counter()
    kmax = max(max(KS), k)
    i2t_plain, t2i_plain = top_ranks(img, txt, kmax)
    t2 = time.perf_counter()

    def score(images: Tensor, texts: Tensor) -> Tensor:
        with ctx():
            return model.fusion(vt[images].to(device), vm[images].to(device),
                                tt[texts].to(device), tm[texts].to(device))

    i2t_plain, t2i_plain = i2t_plain.cpu(), t2i_plain.cpu()
    i2t = rerank(i2t_plain, k, score, batch_size)
    t2i = rerank(t2i_plain, k, lambda q, c: score(c, q), batch_size)
    t3 = time.perf_counter()
    seconds = {"embed": t1 - t0, "rank": t2 - t1, "rerank": t3 - t2}
    return Reranked(recall_from_ranks(i2t, t2i, owner), i2t, t2i, i2t_plain, t2i_plain,
                    seconds)


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
