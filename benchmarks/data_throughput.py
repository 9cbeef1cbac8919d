"""Data-pipeline throughput from Karpathy-format image files (not a test).

Writes N synthetic scenes (mmfw's ``synthetic`` drawings and captions) as JPEG and/or PNG files
plus a ``dataset_*.json`` Karpathy split file into a temporary folder, then reads them back the
way training does: ``mmfw.create("dataset", "karpathy", annotations=..., images=...)``, the
engine's ``Pairs`` / random sampler / ``Collate`` (decode, resize, normalise, tokenize) in a
``DataLoader`` with 1 and 2 worker processes, with and without the ``karpathy`` dataset's
decoded-image cache. Epoch 1 fills a cache, epoch 2 reads from it, so both are reported.

    python benchmarks/data_throughput.py --images 1000 --workers 1 2 --formats jpeg png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mmfw
from mmfw.batching import Collate, Pairs
from mmfw.registry import options_class

HERE = Path(__file__).resolve().parent
EXT = {"jpeg": "jpg", "png": "png"}


def write_karpathy(root: Path, n: int, side: int, fmt: str, noise: float) -> Path:
    """``n`` images of ``side`` pixels in ``root/images`` and ``root/dataset_synthetic.json``.

    Gaussian ``noise`` (pixel std) gives the files a photo's entropy: flat drawings compress to
    a few KiB and decode far faster than the Flickr30k JPEGs they stand in for."""
    data = mmfw.create("dataset", "synthetic", train_images=n, val_images=0, test_images=0,
                       captions_per_image=5, image_size=side, seed=1)
    split = data.split("train")
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        name = f"{i:06d}.{EXT[fmt]}"
        pixels = split.images[i].permute(1, 2, 0).float()
        if noise:
            pixels += noise * torch.randn(pixels.shape, generator=g)
        img = Image.fromarray(pixels.clamp(0, 255).round().to(torch.uint8).numpy())
        if fmt == "jpeg":
            img.save(root / "images" / name, quality=90)
        else:
            img.save(root / "images" / name)
        entries.append({"filename": name, "imgid": i, "split": "train",
                        "sentences": [{"raw": c, "tokens": c.split()} for c in
                                      split.captions(i)]})
    ann = root / "dataset_synthetic.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "synthetic"}))
    return ann


def cache_settings() -> list[tuple[str, dict[str, Any]]]:
    """(label, options) for the cache off and on, from the ``karpathy`` options that name a
    cache (its exact option is another engineer's; found, not assumed)."""
    cls = options_class("dataset", "karpathy")
    fields = [f for f in attrs.fields(cls) if "cache" in f.name] if cls is not None else []
    if not fields:
        return [("no cache option", {})]
    f = fields[0]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in kind:
        return [(f"{f.name}=false", {f.name: False}), (f"{f.name}=true", {f.name: True})]
    if "int" in kind or "float" in kind:
        return [(f"{f.name}=0", {f.name: 0}), (f"{f.name}=4096", {f.name: 4096})]
    return [(f"{f.name}=''", {f.name: ""}), (f"{f.name}=<tmp dir>", {f.name: "<tmp>"})]


def run(ann: Path, images: Path, options: dict[str, Any], workers: int, batch_size: int,
        epochs: int, image_size: int, tmp: Path) -> dict[str, Any]:
    options = {k: (str(tmp / "cache") if v == "<tmp>" else v) for k, v in options.items()}
    data = mmfw.create("dataset", "karpathy", annotations=str(ann), images=str(images),
                       **options)
    split = data.split("train")
    pairs = Pairs(split)
    vision = mmfw.create("encoder", "scratch-vision", image_size=image_size, patch_size=16)
    text = mmfw.create("encoder", "scratch-text")
    text.prepare(pairs.texts())
    sampler = mmfw.create("sampler", "random", match_ids=pairs.items, batch_size=batch_size,
                          seed=0, drop_last=False)
    loader = DataLoader(pairs, batch_sampler=sampler,
                        collate_fn=Collate(vision.preprocess, text.tokenize, sampler.match_ids),
                        num_workers=workers, persistent_workers=workers > 0)
    epoch_s, first_batch_s = [], None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        for k, batch in enumerate(loader):
            if k == 0 and epoch == 0:
                first_batch_s = time.perf_counter() - t0
            n += len(batch)
        epoch_s.append(time.perf_counter() - t0)
    del loader
    return {"pairs": len(pairs), "images": len(split), "epoch_s": epoch_s,
            "pairs_per_s": [len(pairs) / s for s in epoch_s],
            "first_batch_s": first_batch_s, "pairs_counted": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="images (5 captions each)")
    ap.add_argument("--side", type=int, default=384, help="side of the stored images")
    ap.add_argument("--noise", type=float, default=8.0, help="pixel noise std (photo-like "
                    "file sizes; 0: flat drawings)")
    ap.add_argument("--image-size", type=int, default=224, help="model input side (resize)")
    ap.add_argument("--formats", nargs="+", choices=tuple(EXT), default=["jpeg", "png"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    ap.add_argument("--json", default=str(HERE / "results" / "data_throughput.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if "karpathy" not in mmfw.available("dataset"):
        raise SystemExit("the 'karpathy' dataset is not installed yet (plugins/mmfw_data): "
                         "nothing to measure")
    caches = cache_settings()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load {' '.join(load)}; "
          f"{a.images} images of {a.side} px (noise {a.noise}), 5 captions each, resized to "
          f"{a.image_size}, "
          f"batch {a.batch_size}; cache options: {[c for c, _ in caches]}")
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(a),
                              "loadavg": load, "runs": []}
    header = f"{'format':<6} {'cache':<24} {'workers':>7} " + " ".join(
        f"{f'epoch {e + 1} pairs/s':>17}" for e in range(a.epochs)) + f" {'1st batch s':>11}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for fmt in a.formats:
            root = tmp / fmt
            t0 = time.perf_counter()
            ann = write_karpathy(root, a.images, a.side, fmt, a.noise)
            size = sum(p.stat().st_size for p in (root / "images").iterdir())
            print(f"# {fmt}: wrote {a.images} files, {size / 2**20:.1f} MiB, "
                  f"{time.perf_counter() - t0:.1f}s")
            for label, options in caches:
                for w in a.workers:
                    r = run(ann, root / "images", options, w, a.batch_size, a.epochs,
                            a.image_size, tmp / f"{fmt}-{w}")
                    r.update(format=fmt, cache=label, workers=w, bytes=size)
                    result["runs"].append(r)
                    print(f"{fmt:<6} {label:<24} {w:>7} " + " ".join(
                        f"{v:>17.0f}" for v in r["pairs_per_s"]) + f" {r['first_batch_s']:>11.2f}")
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
