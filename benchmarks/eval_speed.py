"""Retrieval evaluation speed: embedding time and ranking time, separately (not a test).

Ranking: ``mmfw.eval.retrieval.recall_at_k`` on random unit embeddings (N images x 5N captions,
width 512), checked against a plain full-sort reference so a fast wrong answer cannot pass.
Embedding: ``mmfw.eval.retrieval.embed_split`` of a tiny from-scratch model over N synthetic images
and their 5N captions (image generation is not timed).
Files (``--files N``): the evaluation loader on real image files, ``--side`` px PNGs in the
Karpathy layout written to a temporary folder (not timed), read as ``mmfw eval`` reads the split
(a scanned ``CheckedSource`` view): ``embed_split`` as it was at ``--old-rev`` (each image read
and preprocessed in the main process, one after the other; the module is loaded from ``git show``)
against the DataLoader path (``--workers`` processes, ``data.uint8``), with ``data.cache`` off,
on and empty (the pass that fills it) and on and filled (every later evaluation; read in the
main process). Every output is checked ``torch.equal`` to the old one. The model is small
(``--file-image-size`` px input) so that reading the images, what changed, is most of the
time, as it is for a model on a GPU.

    python benchmarks/eval_speed.py --sizes 1000 5000 --threads 2
    python benchmarks/eval_speed.py --sizes 1000 --skip-embed
    OMP_NUM_THREADS=2 python benchmarks/eval_speed.py --threads 2 --files 1000 --skip-ranking \
        --skip-embed
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import record  # benchmarks/record.py
import torch
import torch.nn.functional as F
from torch import Tensor

import mmfw
from mmfw.eval.retrieval import KS, embed_split, recall_at_k

HERE = Path(__file__).resolve().parent
GOAL_S = 1.0  # ranking 1k x 5k on CPU (issue 9)
#: the last commit whose embed_split read images one by one in the main process
OLD_REV = "f4ef1ed1e73cd9f7774d504e3d6b280eccf241c6"
FILES_GOAL = 3.0  # images/s of the loader path against the one-by-one loop (issue 21)


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


def old_retrieval(rev: str) -> ModuleType:
    """``mmfw/eval/retrieval.py`` as it was at ``rev``, imported from a temporary copy (its
    ``embed_split`` imports nothing relative, so it runs alone)."""
    text = subprocess.run(["git", "show", f"{rev}:core/mmfw/eval/retrieval.py"], cwd=HERE,
                          capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="mmfw-old-")) / "old_retrieval.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_retrieval", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def write_pngs(root: Path, n: int, side: int) -> Path:
    """``n`` PNG files of ``side`` px with a photo's entropy (smooth colour fields plus pixel
    noise) and one caption each, in the Karpathy layout; returns the annotation file."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):  # numpy and Pillow: small torch ops crawl on a loaded machine
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
            (side, side), Image.Resampling.BILINEAR)
        pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 12, (side, side, 3))
        Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8)).save(
            root / "images" / f"{i:05d}.png")
        rows.append({"filename": f"{i:05d}.png", "imgid": i, "split": "test",
                     "sentences": [{"raw": f"a photo of scene {i % 97} with {i % 13} things"}]})
    ann = root / "dataset_files.json"
    ann.write_text(json.dumps({"images": rows, "dataset": "files"}))
    return ann


def files(a: argparse.Namespace) -> dict[str, Any]:
    """Old one-by-one loop against the loader path on ``a.files`` PNG files: the whole
    ``embed_split`` (images and captions through the model), then the image loading alone."""
    from mmfw.data.augment import encoder_input_size
    from mmfw.data.datasource import BadData, CheckedSource
    from mmfw.eval.retrieval import image_batches
    from mmfw.model import build_model

    old = old_retrieval(a.old_rev)
    root = Path(tempfile.mkdtemp(prefix="mmfw-evalfiles-"))
    t0 = time.perf_counter()
    ann = write_pngs(root, a.files, a.side)
    write_s = time.perf_counter() - t0

    def recipe(cache: str) -> Any:
        return mmfw.load_recipe({
            "run": {"progress": False},
            "data": {"dataset": "karpathy", "annotations": str(ann),
                     "images": str(root / "images"), "cache": cache},
            "model": {"embed_dim": 64,
                      "vision": {"name": "scratch-vision", "image_size": a.file_image_size,
                                 "patch_size": 16, "width": 64, "depth": 1, "heads": 2},
                      "text": {"name": "scratch-text", "width": 64, "depth": 1, "heads": 2,
                               "vocab_size": 500}},
        })

    r0 = recipe("")
    model = build_model(r0.model).eval()
    raw = mmfw.create("dataset", "karpathy", options=r0.data.dataset.options)
    model.text.prepare([c for i in range(a.files) for c in raw.split("test").captions(i)])
    size = encoder_input_size(model.vision.preprocess)

    def split(cache: str = "") -> Any:
        """The test split as ``mmfw eval`` reads it; scanned now, before any clock starts."""
        source = CheckedSource(raw, recipe(cache), BadData("error", None, print,
                                                           evaluating=True))
        view = source.split("test")
        if cache:
            source.use_cache(size)  # type: ignore[arg-type]
        return view

    with torch.no_grad():  # the model's first call, not counted in either path
        model.encode_image(torch.zeros(2, 3, a.file_image_size, a.file_image_size))
    n, bs, w = a.files, a.batch_size, a.workers
    cached, plain = split(str(root / "cache")), [split() for _ in range(3)]
    kw = {"batch_size": bs}
    whole: list[tuple[str, Callable[[], Any]]] = [
        ("old: one by one (git " + a.old_rev[:7] + ")",
         lambda: old.embed_split(model, plain[0], **kw)),
        ("new: 0 workers, uint8", lambda: embed_split(model, plain[1], uint8=True, **kw)),
        (f"new: {w} workers, uint8, no cache",
         lambda: embed_split(model, plain[2], num_workers=w, uint8=True, **kw)),
        (f"new: {w} workers, uint8, cache empty (fills it)",
         lambda: embed_split(model, cached, num_workers=w, uint8=True, **kw)),
        # a filled cache is read in this process whatever num_workers says
        (f"new: {w} workers, uint8, cache filled",
         lambda: embed_split(model, cached, num_workers=w, uint8=True, **kw)),
    ]
    pre = model.vision.preprocess
    cached2, plain2 = split(str(root / "cache2")), [split() for _ in range(2)]

    def old_loop(view: Any) -> list[Tensor]:  # old embed_split's image lines, no model
        return [torch.stack([pre(view[i].image) for i in range(s, min(s + bs, n))])
                for s in range(0, n, bs)]

    def new_loop(view: Any, workers: int) -> list[Tensor]:
        return list(image_batches(model, view, n, batch_size=bs, num_workers=workers,
                                  uint8=True))

    loading: list[tuple[str, Callable[[], Any]]] = [
        ("old: one by one (its image lines, copied)", lambda: old_loop(plain2[0])),
        (f"new: {w} workers, uint8, no cache", lambda: new_loop(plain2[1], w)),
        (f"new: {w} workers, uint8, cache empty (fills it)", lambda: new_loop(cached2, w)),
        (f"new: {w} workers, uint8, cache filled", lambda: new_loop(cached2, w)),
    ]

    def timed_rows(cases: list[tuple[str, Callable[[], Any]]]) -> list[dict[str, Any]]:
        rows, ref = [], None
        for label, fn in cases:
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            ref = out if ref is None else ref
            same = len(out) == len(ref) and all(torch.equal(x, y) for x, y in zip(out, ref))
            rows.append({"path": label, "seconds": dt, "images_per_s": n / dt, "same": same})
        for r in rows:
            r["vs_old"] = r["images_per_s"] / rows[0]["images_per_s"]
        return rows

    rows = timed_rows(whole)
    load_rows = timed_rows(loading)
    with torch.no_grad():  # what no loader can save: the model's own work
        px = torch.zeros(bs, 3, a.file_image_size, a.file_image_size)
        t = time.perf_counter()
        for _ in range(0, n, bs):
            model.encode_image(px)
        forward_s = time.perf_counter() - t
    return {"images": n, "side": a.side, "format": "png", "captions_per_image": 1,
            "model_image_size": a.file_image_size, "batch_size": bs, "workers": w,
            "old_rev": a.old_rev, "write_files_s": write_s, "image_forward_s": forward_s,
            "rows": rows, "loading_rows": load_rows}


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"{title:<48} {'s':>7} {'images/s':>9} {'x old':>6}  same as old")
    for r in rows:
        print(f"{r['path']:<48} {r['seconds']:>7.2f} {r['images_per_s']:>9.0f} "
              f"{r['vs_old']:>6.2f}  {r['same']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="N images")
    ap.add_argument("--dim", type=int, default=512, help="embedding width for ranking")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs after one warm-up")
    ap.add_argument("--embed-repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256, help="embedding batch (eval default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--skip-ranking", action="store_true")
    ap.add_argument("--files", type=int, default=0,
                    help="N PNG files: old one-by-one loop against the loader (0: skip)")
    ap.add_argument("--side", type=int, default=128, help="the files' size in px")
    ap.add_argument("--file-image-size", type=int, default=64, help="the model's input px")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes")
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision of the old embed_split")
    ap.add_argument("--no-check", action="store_true", help="skip the full-sort reference")
    ap.add_argument("--json", default=str(HERE / "results" / "eval_speed.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    result: dict[str, Any] = record.new_result(args=vars(a), ranking=[], embedding=[])
    load = result["machine"].get("loadavg", [])
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads,"
          f" load {' '.join(load)}")
    if a.files:
        print(f"\nfiles: embed_split of {a.files} PNG files of {a.side} px (Karpathy layout, 1 "
              f"caption each), model input {a.file_image_size} px, batch {a.batch_size}")
        f = files(a)
        result["files"] = f
        print(f"(writing the files, not timed: {f['write_files_s']:.1f} s)")
        print_rows("embed_split (images + captions, model)", f["rows"])
        print()
        print_rows("image loading alone (no model)", f["loading_rows"])
        print(f"(model image forward alone: {f['image_forward_s']:.2f} s; goal >= "
              f"{FILES_GOAL:.0f}x old)")
        f["loadavg_after"] = record.machine().get("loadavg", [])
        print(f"load after: {' '.join(f['loadavg_after'])}")
    if not a.skip_ranking:
        rankings(a, result)
    if not a.skip_embed:
        embeddings(a, result)
    record.write(a.json, result)


def rankings(a: argparse.Namespace, result: dict[str, Any]) -> None:
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


def embeddings(a: argparse.Namespace, result: dict[str, Any]) -> None:
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

if __name__ == "__main__":
    main()
