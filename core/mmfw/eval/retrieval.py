"""Cross-modal retrieval: Recall@K both ways and rsum, by the Karpathy convention.

Image-to-text: a query image scores a hit at K if *any* of its captions is among the K most
similar captions. Text-to-image: a caption hits at K if its image is among the top K images.
Similarities are cosine; ranking is one batched top-k, no Python loop over queries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data.datasource import Prepared, pixel_preprocess
from ..registry import create
from ..spi.contracts import Problem
from ..spi.errors import DataError, MmfwError

if TYPE_CHECKING:
    from ..config.recipe import Recipe

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


#: precision names and their autocast dtypes (fp32: none)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_context(device: Any, precision: str = "fp32"
                   ) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The forward context of the default backend of ``device``'s type, for embeddings
    computed without a run's backend: on the CPU the ``cpu`` backend's (its attention
    kernel, ``backend.sdpa``, so they match what training's evaluation computes), else
    ``torch.autocast`` to ``precision`` (none for fp32)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return create("backend", "cpu", precision=precision).autocast
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(dev.type, dtype=dtype)


def placement(backend: tuple[str, dict[str, Any]] | None, device: str | torch.device | None,
              precision: str | None
              ) -> tuple[torch.device, str, Callable[[], contextlib.AbstractContextManager[Any]]]:
    """Device, precision name and autocast factory: the run's backend (when it is available
    here) unless ``device`` / ``precision`` say otherwise."""
    if precision is not None and precision not in PRECISIONS:
        raise MmfwError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device is None and backend is not None:
        try:
            built = create("backend", backend[0], **backend[1])
        except (MmfwError, TypeError):  # a backend plugin not installed here: the CPU
            built = None
        if built is not None and built.available():
            if precision is None:
                # the precision the backend runs (``auto`` resolved), else its option
                prec = str(getattr(built, "precision", None)
                           or getattr(getattr(built, "options", None), "precision", "fp32"))
                return built.device, prec if prec in PRECISIONS else "fp32", built.autocast
            device = built.device
    dev = torch.device(device) if device is not None else torch.device("cpu")
    prec = precision or "fp32"
    return dev, prec, device_context(dev, prec)


@torch.no_grad()
def embed_split(model: Any, split: Any, *, batch_size: int = 256, device: Any = "cpu",
                autocast: Any = None, max_images: int = 0, num_workers: int = 0,
                uint8: bool = False, progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Embed every image and caption of a split: ``(images [N, D], texts [M, D], owner [M])``.

    Images are read and preprocessed in chunks by a DataLoader, in ``num_workers`` processes
    (0: this one); ``uint8`` hands them over as the encoder's uint8 pixels and normalises them
    on ``device`` (``data.uint8``); ``progress`` shows a bar on a terminal. The model sees the
    same batches of ``batch_size`` whatever the loading, so the embeddings are the same.
    ``embed_options(recipe)`` gives the three as a run's recipe sets them.
    """
    model.eval()
    n = len(split) if not max_images else min(max_images, len(split))
    ctx = autocast if autocast is not None else device_context(device)
    tok = model.text.tokenize
    imgs, txts, owner, captions = [], [], [], []
    for i in range(n):
        for c in split.captions(i):
            captions.append(c)
            owner.append(i)
    with _bar(progress, n + len(captions)) as bar:
        for pixels in image_batches(model, split, n, batch_size=batch_size, device=device,
                                    num_workers=num_workers, uint8=uint8):
            with ctx():
                imgs.append(model.encode_image(pixels).float())
            bar.update(pixels.shape[0])
        for s in range(0, len(captions), batch_size):
            tokens = {k: v.to(device) for k, v in tok(captions[s:s + batch_size]).items()}
            with ctx():
                txts.append(model.encode_text(tokens).float())
            bar.update(len(captions[s:s + batch_size]))
    return torch.cat(imgs), torch.cat(txts), torch.tensor(owner, dtype=torch.long)


def embed_options(recipe: Recipe) -> dict[str, Any]:
    """``embed_split``'s loading keywords as a run's recipe sets them: ``data.num_workers``
    worker processes, ``data.uint8``, ``run.progress``."""
    return {"num_workers": recipe.data.num_workers, "uint8": recipe.data.uint8,
            "progress": recipe.run.progress}


# ------------------------------------------------------------------------------------------
# reading a split's images for embedding: chunks preprocessed in DataLoader workers

#: images one loader item carries: small enough to spread a 1k split over the workers, large
#: enough that handing a chunk between processes costs little next to decoding it
CHUNK = 32


class _Problems:
    """What a worker's view of an evaluation split met while loading (``on_error``), handed
    back with the chunk so ``data.on_bad`` runs in the main process, never in a worker."""

    def __init__(self) -> None:
        self.found: list[Problem] = []

    def __call__(self, problem: Problem) -> None:
        self.found.append(problem)


class SplitImages(Dataset):
    """Item ``k``: the images of ``ranges[k]`` preprocessed and stacked, as ``(pixels,
    problems, error)``.

    An image that fails to load in a split made for evaluation (a ``Prepared`` view, whose
    ``on_error`` is the bad-data policy) comes back as a blank plus its ``Problem``; in any
    other split, as the DataError's message (``error``, pixels None). Either way the main
    process raises or reports it: a worker never raises a DataError itself, which the
    DataLoader would turn into its own exception with the worker's traceback.
    """

    def __init__(self, split: Any, ranges: Sequence[tuple[int, int]],
                 preprocess: Callable[[Any], Tensor]) -> None:
        self.ranges, self.preprocess = list(ranges), preprocess
        self.problems = _Problems()
        watched = isinstance(split, Prepared) and split.on_error is not None
        self.split = split.view(self.problems) if watched else split

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, k: int) -> tuple[Tensor | None, list[Problem], str | None]:
        start, stop = self.ranges[k]
        self.problems.found.clear()
        pixels = []
        for i in range(start, stop):
            try:
                image = self.split[i].image
            except DataError as err:
                return None, [], str(err)
            pixels.append(self.preprocess(image))
        return torch.stack(pixels), list(self.problems.found), None


def image_batches(model: Any, split: Any, n: int, *, batch_size: int, device: Any = "cpu",
                  num_workers: int = 0, uint8: bool = False) -> Iterator[Tensor]:
    """The first ``n`` images of ``split`` as pixel batches on ``device``, ready for
    ``model.encode_image``: batch ``b`` holds images ``b * batch_size`` up to the next
    multiple (what the one-by-one loop made), loaded by workers as chunks of :data:`CHUNK`
    (by this process, a batch at a time).

    Load failures follow the split's ``on_error`` (``data.on_bad``) in this process.
    """
    vision = model.vision
    preprocess = pixel_preprocess(vision, uint8)
    on_device = preprocess != vision.preprocess  # uint8 out: normalize() finishes it here
    starts = range(0, n, batch_size)
    ends = [min(b + batch_size, n) for b in starts]
    ranges = [(s, min(s + CHUNK, e)) for b, e in zip(starts, ends) for s in range(b, e, CHUNK)]
    # one chunk has nothing to share out, and a filled cache nothing to decode: workers
    # would only add their start-up
    cache = split.cache if isinstance(split, Prepared) else None
    warm = cache is not None and cache.filled() == cache.n
    workers = min(num_workers, len(ranges)) if len(ranges) > 1 and not warm else 0
    if not workers:  # in this process a chunk is a whole batch: nothing to join up
        ranges = list(zip(starts, ends))
    dev = torch.device(device)
    loader = DataLoader(SplitImages(split, ranges, preprocess), batch_size=None,
                        num_workers=workers, pin_memory=dev.type == "cuda",
                        generator=torch.Generator())  # not a draw from the run's global RNG
    on_error = split.on_error if isinstance(split, Prepared) else None
    parts: list[Tensor] = []
    for (_, stop), (pixels, problems, error) in zip(ranges, _survived(loader, workers)):
        if error is not None:
            raise DataError(error)
        for p in problems:
            if on_error is not None:
                on_error(p)  # "error": raises, naming the file; "skip": logged, blank kept
        parts.append(pixels)
        if stop in ends:
            x = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(
                dev, non_blocking=dev.type == "cuda")
            parts = []
            yield vision.normalize(x) if on_device else x


def _survived(loader: DataLoader, workers: int) -> Iterator[Any]:
    """The loader's items; a worker process that died (killed for memory, out of shared
    memory in a container) is said in one line with what to change, not as a traceback.

    The workers are shut down as this ends, however it ends: a traceback that keeps this frame
    (an error shown later) then holds no live loader whose workers stop at some later GC."""
    it = iter(loader)
    try:
        yield from it
    except RuntimeError as err:
        if not workers or "DataLoader worker" not in str(err):
            raise
        raise MmfwError(f"an evaluation loader worker died ({str(err).splitlines()[0]}): "
                        "evaluate with fewer workers (data.num_workers, `mmfw eval ... --data "
                        "num_workers=0`) or give the machine more memory (or the container a "
                        "larger /dev/shm)") from None
    finally:
        del it  # the last reference: its __del__ stops the workers now


def _bar(progress: bool, total: int) -> Any:
    """A tqdm bar on a terminal with ``progress`` (``run.progress``), else a stand-in."""
    import sys

    if not (progress and sys.stderr.isatty()):
        return contextlib.nullcontext(_NoBar())
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="item", desc="embedding", leave=False, dynamic_ncols=True,
                mininterval=0.5)


class _NoBar:
    def update(self, k: int) -> None:
        pass


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
                       autocast: Any = None, max_images: int = 0, num_workers: int = 0,
                       uint8: bool = False, progress: bool = False
                       ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor],
                                  tuple[Tensor, Tensor]]:
    """``embed_split`` plus every image's and caption's token features and masks (kept on
    the CPU, captions padded to the longest): what re-ranking needs, and only it."""
    model.eval()
    n = len(split) if not max_images else min(max_images, len(split))
    ctx = autocast if autocast is not None else device_context(device)
    tok = model.text.tokenize
    owner = [i for i in range(n) for _ in split.captions(i)]
    captions = [c for i in range(n) for c in split.captions(i)]
    imgs, txts, vtok, ttok = [], [], [], []
    with _bar(progress, n + len(captions)) as bar:
        for pixels in image_batches(model, split, n, batch_size=batch_size, device=device,
                                    num_workers=num_workers, uint8=uint8):
            with ctx():
                e, t, m = model.encode_image_tokens(pixels)
            imgs.append(e.float())
            vtok.append((t.cpu(), m.cpu()))
            bar.update(pixels.shape[0])
        for s in range(0, len(captions), batch_size):
            tokens = {k: v.to(device) for k, v in tok(captions[s:s + batch_size]).items()}
            with ctx():
                e, t, m = model.encode_text_tokens(tokens)
            txts.append(e.float())
            ttok.append((t.cpu(), m.cpu()))
            bar.update(len(captions[s:s + batch_size]))
    return (torch.cat(imgs), torch.cat(txts), torch.tensor(owner, dtype=torch.long),
            _pad_tokens(vtok), _pad_tokens(ttok))


def _pad_tokens(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    length = max(t.shape[1] for t, _ in parts)
    toks = [F.pad(t, (0, 0, 0, length - t.shape[1])) for t, _ in parts]
    masks = [F.pad(m, (0, length - m.shape[1]), value=False) for _, m in parts]
    return torch.cat(toks), torch.cat(masks)


@torch.no_grad()
def rerank_split(model: Any, split: Any, k: int, *, batch_size: int = 256, device: Any = "cpu",
                 autocast: Any = None, max_images: int = 0, num_workers: int = 0,
                 uint8: bool = False, progress: bool = False) -> Reranked:
    """Recall@K after re-scoring each query's top ``k`` by the model's fusion head.

    The dual encoder ranks everything (one matrix product); the ITM head then scores only
    ``k`` pairs per query, in batches of ``batch_size`` pairs, and those ``k`` are reordered
    by its logit (ALBEF's inference). Ranks below ``k`` are the dual encoder's.
    """
    import time

    if getattr(model, "fusion", None) is None:
        from ..spi.errors import RecipeError

        raise RecipeError("re-ranking needs a fusion head", key="eval.rerank_top_k",
                          expected="0, or a [model.fusion] section in the recipe", given=k)
    ctx = autocast if autocast is not None else device_context(device)
    t0 = time.perf_counter()
    img, txt, owner, (vt, vm), (tt, tm) = embed_split_tokens(
        model, split, batch_size=batch_size, device=device, autocast=autocast,
        max_images=max_images, num_workers=num_workers, uint8=uint8, progress=progress)
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
