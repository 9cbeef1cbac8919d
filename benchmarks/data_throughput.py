"""Data-pipeline throughput from Karpathy-format image files (not a test).

Writes N synthetic scenes (mmfw's ``synthetic`` drawings and captions, with pixel noise so the
files have a photo's size) as JPEG and/or PNG files plus a ``dataset_*.json`` Karpathy split
file into a temporary folder, then reads them back exactly as training does: a
``mmfw.train.loop.Trainer`` built from a recipe with ``data.dataset = "karpathy"``, whose
``loader`` is the engine's own pipeline (pre-training scan, ``Pairs``, random sampler,
``Collate``: decode, resize, normalise, tokenize), with ``data.num_workers`` 1 and 2, and
``data.cache`` off and on (the memory-mapped cache of decoded images: epoch 1 fills it, epoch 2
reads it, so both epochs are reported). No model step runs: this is the input side alone.

    python benchmarks/data_throughput.py --images 1000 --workers 1 2 --formats jpeg png
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import record  # benchmarks/record.py
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import mmfw
from mmfw.train.loop import Trainer

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


def recipe(a: argparse.Namespace, ann: Path, images: Path, workers: int, cache: str,
           out: Path, uint8: bool = True) -> dict[str, Any]:
    return {
        "run": {"name": "data", "output_dir": str(out), "progress": False},
        "backend": {"name": "cpu", "threads": a.threads},
        "data": {"dataset": "karpathy", "annotations": str(ann), "images": str(images),
                 "num_workers": workers, "cache": cache, "uint8": uint8},
        "sampler": {"name": "random", "batch_size": a.batch_size, "drop_last": False},
        "model": {"embed_dim": 128,
                  "vision": {"name": "scratch-vision", "image_size": a.image_size,
                             "patch_size": 16},
                  "text": {"name": "scratch-text"}},
        "eval": {"val_split": ""},
    }


def run(a: argparse.Namespace, ann: Path, images: Path, workers: int, cache: str,
        out: Path, uint8: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    trainer = Trainer(mmfw.load_recipe(recipe(a, ann, images, workers, cache, out, uint8)),
                      overwrite=True, console=lambda _msg: None)
    setup_s = time.perf_counter() - t0  # annotation read, image scan, tokenizer, model
    epoch_s, first_batch_s, n = [], 0.0, 0
    for epoch in range(a.epochs):
        trainer.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        for k, batch in enumerate(trainer.loader):
            if k == 0 and epoch == 0:
                first_batch_s = time.perf_counter() - t0
            trainer.model.prepare_pixels(batch.pixels)  # uint8: normalised as a step does
            n += len(batch)
        epoch_s.append(time.perf_counter() - t0)
    del trainer
    gc.collect()  # its persistent workers end here, not in the next run's setup
    return {"setup_s": setup_s, "epoch_s": epoch_s, "pairs_per_epoch": n,
            "pairs_per_s": [n / s for s in epoch_s], "first_batch_s": first_batch_s}


class _Constant(Dataset):
    """Hands out one ready batch again and again: what moving a batch costs, nothing else."""

    def __init__(self, batch: torch.Tensor, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch.clone()


def transfer_ceiling(batch_size: int, size: int, workers: int, n: int = 30) -> dict[str, float]:
    """Images/s a DataLoader can hand over when its batches are ready-made pixel tensors of
    the collate's output size, float32 (what ``Collate`` gives now) vs uint8: the ceiling the
    worker-to-main-process copy puts on any pipeline, however fast its decoding."""
    out = {}
    for dtype in (torch.float32, torch.uint8):
        batch = torch.zeros(batch_size, 3, size, size, dtype=dtype)
        it = iter(DataLoader(_Constant(batch, n + 1), batch_size=None, num_workers=workers))
        next(it)
        t0 = time.perf_counter()
        k = sum(1 for _ in it)
        out[str(dtype).removeprefix("torch.")] = k * batch_size / (time.perf_counter() - t0)
    return out


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
    ap.add_argument("--uint8", nargs="+", type=lambda v: v.lower() in ("1", "true", "on"),
                    default=[True, False], metavar="BOOL",
                    help="data.uint8 values to measure (true: uint8 hand-over, normalised "
                         "after the loader; false: float32 from the workers)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    ap.add_argument("--json", default=str(HERE / "results" / "data_throughput.json"))
    ap.add_argument("--no-workers-0", action="store_true",
                    help="skip the main-process baseline (num_workers = 0)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if "karpathy" not in mmfw.available("dataset"):
        raise SystemExit("the 'karpathy' dataset is not installed yet (plugins/mmfw_data): "
                         "nothing to measure")
    workers = a.workers if a.no_workers_0 else [0, *[w for w in a.workers if w]]
    result: dict[str, Any] = record.new_result(args=vars(a), runs=[])
    load = result["machine"].get("loadavg", [])
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load {' '.join(load)}; "
          f"{a.images} images of {a.side} px (noise {a.noise}), 5 captions each (one pair per "
          f"caption), resized to {a.image_size}, batch {a.batch_size}")
    print(f"{'format':<6} {'data.cache':<10} {'data.uint8':<10} {'workers':>7} {'setup s':>8} "
          f"{'1st batch s':>11} "
          + " ".join(f"{f'epoch {e + 1} pairs/s':>17}" for e in range(a.epochs)))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for fmt in a.formats:
            root = tmp / fmt
            t0 = time.perf_counter()
            ann = write_karpathy(root, a.images, a.side, fmt, a.noise)
            size = sum(p.stat().st_size for p in (root / "images").iterdir())
            print(f"# {fmt}: wrote {a.images} files, {size / 2**20:.1f} MiB "
                  f"({time.perf_counter() - t0:.1f}s)")
            for cached, w, uint8 in itertools.product((False, True), workers, a.uint8):
                name = f"{fmt}-{'cache' if cached else 'nocache'}-{w}-{'u8' if uint8 else 'f32'}"
                cache = str(tmp / "cache" / name) if cached else ""  # a fresh cache each
                r = run(a, ann, root / "images", w, cache, tmp / "runs" / name, uint8)
                r.update(format=fmt, cache=cached, workers=w, uint8=uint8, bytes=size)
                result["runs"].append(r)
                print(f"{fmt:<6} {'on' if cached else 'off':<10} {str(uint8).lower():<10} "
                      f"{w:>7} {r['setup_s']:>8.1f} {r['first_batch_s']:>11.2f} "
                      + " ".join(f"{v:>17.0f}" for v in r["pairs_per_s"]))
    print(f"\nceiling from moving ready batches [{a.batch_size}, 3, {a.image_size}, "
          f"{a.image_size}] out of the loader (images/s):")
    result["transfer_ceiling"] = {}
    for w in workers:
        c = transfer_ceiling(a.batch_size, a.image_size, w)
        result["transfer_ceiling"][str(w)] = c
        print(f"  workers {w}: " + ", ".join(f"{k} {v:.0f}" for k, v in c.items()))
    record.write(a.json, result)


if __name__ == "__main__":
    main()
