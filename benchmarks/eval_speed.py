"""Retrieval evaluation speed: embedding time and ranking time, separately (not a test).

Ranking: ``mmfw.eval.retrieval.recall_at_k`` on random unit embeddings (N images x 5N captions,
width 512), checked against a plain full-sort reference so a fast wrong answer cannot pass.
Embedding: ``mmfw.eval.retrieval.embed_split`` of a tiny from-scratch model over N synthetic images
and their 5N captions (image generation is not timed).

    python benchmarks/eval_speed.py --sizes 1000 5000 --threads 2
    python benchmarks/eval_speed.py --sizes 1000 --skip-embed
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import record  # benchmarks/record.py
import torch
import torch.nn.functional as F

import mmfw
from mmfw.eval.retrieval import KS, embed_split, recall_at_k

HERE = Path(__file__).resolve().parent
GOAL_S = 1.0  # ranking 1k x 5k on CPU (issue 9)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Seconds of each run after one untimed warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def reference_recall(image: torch.Tensor, text: torch.Tensor, owner: torch.Tensor
                     ) -> dict[str, float]:
    """Karpathy's evaluation written the obvious way: full argsort, rank of the first hit."""
    v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    sim = v @ t.T
    n, m = sim.shape
    order = sim.argsort(dim=1, descending=True)            # [N, M] captions by score
    hit = owner[order] == torch.arange(n)[:, None]
    rank_i2t = hit.float().argmax(1)                        # first caption of the image
    order_t = sim.T.argsort(dim=1, descending=True)         # [M, N]
    rank_t2i = (order_t == owner[:, None]).float().argmax(1)
    out = {f"i2t_R@{k}": 100.0 * float((rank_i2t < k).sum()) / n for k in KS}
    out.update({f"t2i_R@{k}": 100.0 * float((rank_t2i < k).sum()) / m for k in KS})
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def ranking(n: int, dim: int, repeat: int, check: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(n)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    owner = torch.arange(n).repeat_interleave(5)
    # captions near their image, so recalls are neither 0 nor 100 and every branch counts
    text = F.normalize(image[owner] + 1.2 * torch.randn(5 * n, dim, generator=g) / dim**0.5,
                       dim=-1)
    times, metrics = timed(lambda: recall_at_k(image, text, owner), repeat)
    res: dict[str, Any] = {"images": n, "captions": 5 * n, "dim": dim,
                           "recall_at_k_s": times, "median_s": statistics.median(times),
                           "metrics": metrics}
    # where the time goes: the two similarity products and their top-k
    sim_t, _ = timed(lambda: image @ text.T, repeat)
    sim = image @ text.T
    topk_i2t, _ = timed(lambda: sim.topk(max(KS), dim=1), repeat)
    simt = text @ image.T
    topk_t2i, _ = timed(lambda: simt.topk(max(KS), dim=1), repeat)
    res["parts_median_s"] = {"matmul (one direction)": statistics.median(sim_t),
                             "topk i2t": statistics.median(topk_i2t),
                             "topk t2i": statistics.median(topk_t2i)}
    if check:
        ref_t, ref = timed(lambda: reference_recall(image, text, owner), 1)
        res["reference_full_sort_s"] = statistics.median(ref_t)
        res["matches_reference"] = all(abs(ref[k] - metrics[k]) < 1e-9 for k in ref)
    return res


def embedding(n: int, batch_size: int, repeat: int) -> dict[str, Any]:
    """Tiny quickstart-sized model (48 px scratch ViT, 3-layer text transformer)."""
    t0 = time.perf_counter()
    data = mmfw.create("dataset", "synthetic", train_images=1, val_images=0, test_images=n,
                       captions_per_image=5, image_size=48)
    split = data.split("test")
    gen_s = time.perf_counter() - t0
    recipe = mmfw.load_recipe({
        "data": {"dataset": "synthetic"},
        "model": {"embed_dim": 128,
                  "vision": {"name": "scratch-vision", "image_size": 48, "patch_size": 8,
                             "width": 128, "depth": 4, "heads": 4},
                  "text": {"name": "scratch-text", "width": 128, "depth": 3, "heads": 4}},
    })
    from mmfw.model import build_model

    model = build_model(recipe.model)
    model.text.prepare([c for i in range(len(split)) for c in split.captions(i)])
    times, (img, txt, owner) = timed(
        lambda: embed_split(model, split, batch_size=batch_size), repeat)
    rank_t, _ = timed(lambda: recall_at_k(img, txt, owner), repeat)
    parts = embedding_parts(model, split, batch_size)
    return {"parts_s": parts, "images": n, "captions": int(txt.shape[0]),
            "embed_dim": int(img.shape[1]),
            "batch_size": batch_size, "generate_images_s": gen_s, "embed_split_s": times,
            "median_s": statistics.median(times),
            "images_plus_captions_per_s": (n + txt.shape[0]) / statistics.median(times),
            "ranking_median_s": statistics.median(rank_t)}


def embedding_parts(model: Any, split: Any, batch_size: int) -> dict[str, float]:
    """The pieces of ``embed_split``, each timed alone (median of 3 after a warm-up)."""
    n = len(split)
    captions = [c for i in range(n) for c in split.captions(i)]
    pre, tok = model.vision.preprocess, model.text.tokenize
    chunks = range(0, n, batch_size)
    text_chunks = range(0, len(captions), batch_size)
    pixels = [torch.stack([pre(split[i].image) for i in range(s, min(s + batch_size, n))])
              for s in chunks]
    tokens = [tok(captions[s:s + batch_size]) for s in text_chunks]

    def med(fn: Callable[[], Any]) -> float:
        return statistics.median(timed(fn, 3)[0])

    with torch.no_grad():
        return {
            "preprocess images": med(lambda: [torch.stack([pre(split[i].image) for i in range(
                s, min(s + batch_size, n))]) for s in chunks]),
            "tokenize captions": med(lambda: [tok(captions[s:s + batch_size])
                                              for s in text_chunks]),
            "image forward": med(lambda: [model.encode_image(p) for p in pixels]),
            "text forward": med(lambda: [model.encode_text(t) for t in tokens]),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="N images")
    ap.add_argument("--dim", type=int, default=512, help="embedding width for ranking")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs after one warm-up")
    ap.add_argument("--embed-repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256, help="embedding batch (eval default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the full-sort reference")
    ap.add_argument("--json", default=str(HERE / "results" / "eval_speed.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    result: dict[str, Any] = record.new_result(args=vars(a), ranking=[], embedding=[])
    load = result["machine"].get("loadavg", [])
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads,"
          f" load {' '.join(load)}")
    print(f"\nranking: mmfw.eval.retrieval.recall_at_k, random unit embeddings, width {a.dim}")
    print(f"{'images x captions':<20} {'median s':>9} {'min s':>8} {'matmul':>8} {'topk i2t':>9} "
          f"{'topk t2i':>9} {'full sort':>10}  same metrics")
    for n in a.sizes:
        r = ranking(n, a.dim, a.repeat, not a.no_check)
        result["ranking"].append(r)
        p = r["parts_median_s"]
        ref = f"{r['reference_full_sort_s']:.3f}" if "reference_full_sort_s" in r else "-"
        goal = f"  (goal < {GOAL_S:.0f} s: {'met' if r['median_s'] < GOAL_S else 'NOT met'})" \
            if n == 1000 else ""
        print(f"{f'{n} x {5 * n}':<20} {r['median_s']:>9.3f} {min(r['recall_at_k_s']):>8.3f} "
              f"{p['matmul (one direction)']:>8.3f} {p['topk i2t']:>9.3f} {p['topk t2i']:>9.3f} "
              f"{ref:>10}  {r.get('matches_reference', '-')}{goal}")
    if not a.skip_embed:
        print("\nembedding: mmfw.eval.retrieval.embed_split, tiny scratch model, 48 px synthetic "
              f"images, batch {a.batch_size}")
        print(f"{'images x captions':<20} {'median s':>9} {'items/s':>9} {'rank s':>8}   parts "
              "(each timed alone)")
        for n in a.sizes:
            e = embedding(n, a.batch_size, a.embed_repeat)
            result["embedding"].append(e)
            label = f"{n} x {e['captions']}"
            print(f"{label:<20} {e['median_s']:>9.2f} "
                  f"{e['images_plus_captions_per_s']:>9.0f} {e['ranking_median_s']:>8.3f}   "
                  + ", ".join(f"{k} {v:.2f}" for k, v in e["parts_s"].items()))
    record.write(a.json, result)


if __name__ == "__main__":
    main()
