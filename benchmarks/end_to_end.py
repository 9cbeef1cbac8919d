"""End-to-end training throughput from image files: ``mmfw run`` against
``python -m open_clip_train.main`` (not a test).

A Karpathy-layout folder of real image files (mmfw's ``synthetic`` scenes drawn with Pillow,
with pixel noise so the files have a photo's entropy; PNG and JPEG alternating, one file per
image, five captions each) is written once, then each side trains on it through its own entry
point, in its own process, for the same number of optimizer steps:

- **mmfw**: ``python -m mmfw run <run>.toml`` (written next to the folder and stored in the
  JSON: the quickstart's towers at 64 px, each as shipped) pointed at the folder,
  ``run.max_steps`` = the steps, random sampler, no cache, no validation, the final
  evaluation on the test split, ``model.text.vocab_size`` 49408 (open_clip's BPE table, so
  both models have the same parameters), augmentation off (its default).
- **open_clip**: ``python -m open_clip_train.main`` through the launcher of
  ``quality_vs_open_clip.py`` (registers the model config with ``open_clip.add_model_config``,
  then calls ``main``), its CSV loader over the same (image, caption) pairs (``--val-data``:
  the test split's, so it evaluates the same images after its epoch), one epoch =
  the same steps (CSV rows = steps x batch; its loader drops the last partial batch), its BPE
  tokenizer at context 48, ``--aug-cfg scale=(1.0,1.0)`` (its RandomResizedCrop of square
  images then keeps the whole image: augmentation off).

Both: the same batch size, data workers, threads, precision, LR schedule and AdamW settings
(each side's own AdamW implementation, as shipped). Reported per side: the process's wall
time (start-up, tokenizer, data scan, the steps, the final checkpoint and the evaluation of
``--test-images`` (100) test images: end to end) and samples/s = steps x batch / wall; the
ratio mmfw/open_clip of samples/s per pair, ABBA order over ``--pairs`` pairs, geometric mean
with a bootstrap 95% CI.

    python benchmarks/end_to_end.py --threads 2 --workers 1
    python benchmarks/end_to_end.py --quick          # smoke run, not protocol-grade
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import record  # benchmarks/record.py
import tomli_w
import torch
from PIL import Image
from train_throughput import (  # benchmarks/train_throughput.py
    SHAPES,
    bootstrap_ci,
    geo_mean,
    mmfw_recipe,
    versions,
)

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
MODEL = "mmfw-e2e-shape"
LR, WD, WARMUP, CLIP = 1e-3, 0.1, 100, 1.0  # recipes/quickstart.toml's optimisation
CAPTIONS = 5

#: recipes/quickstart.toml's towers at 64 px with CLIP's BPE vocabulary (open_clip's
#: tokenizer), so both models have the same parameters
SHAPE = dataclasses.replace(SHAPES["quickstart"], image_size=64, vocab_size=49408)

#: the same towers in open_clip's config format
OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": SHAPE.embed_dim,
    "vision_cfg": {"image_size": SHAPE.image_size, "layers": SHAPE.vision_depth,
                   "width": SHAPE.vision_width,
                   "head_width": SHAPE.vision_width // SHAPE.vision_heads,
                   "patch_size": SHAPE.patch_size, "mlp_ratio": SHAPE.mlp_ratio},
    "text_cfg": {"context_length": SHAPE.context_length, "vocab_size": SHAPE.vocab_size,
                 "width": SHAPE.text_width, "heads": SHAPE.text_heads,
                 "layers": SHAPE.text_depth, "mlp_ratio": SHAPE.mlp_ratio},
}

LAUNCHER = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
            "from open_clip_train.main import main; main(sys.argv[2:])")


def env(threads: int) -> dict[str, str]:
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        out["OMP_NUM_THREADS"] = str(threads)
    return out


def write_folder(root: Path, n: int, n_test: int, side: int, noise: float) -> Path:
    """``n + n_test`` images of ``side`` pixels (even index PNG, odd JPEG q90) in
    ``root/images`` and ``root/dataset_e2e.json``: the first ``n`` in the train split, the
    rest in the test split."""
    import mmfw

    data = mmfw.create("dataset", "synthetic", train_images=n + n_test, val_images=0,
                       test_images=0, captions_per_image=CAPTIONS, image_size=side, seed=1)
    split = data.split("train")
    (root / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    entries = []
    for i in range(n + n_test):
        name = f"{i:06d}.{'png' if i % 2 == 0 else 'jpg'}"
        pixels = split.images[i].permute(1, 2, 0).float()
        pixels += noise * torch.randn(pixels.shape, generator=g)
        img = Image.fromarray(pixels.clamp(0, 255).round().to(torch.uint8).numpy())
        img.save(root / "images" / name, **({} if name.endswith("png") else {"quality": 90}))
        entries.append({"filename": name, "imgid": i, "split": "train" if i < n else "test",
                        "sentences": [{"raw": c, "tokens": c.split()}
                                      for c in split.captions(i)]})
    ann = root / "dataset_e2e.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "e2e"}))
    return ann


def write_csv(root: Path, ann: Path, split: str) -> Path:
    """open_clip's CSV of the same pairs of ``split``: one row per (image, caption)."""
    table = root / f"{split}.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for r in json.loads(ann.read_text())["images"]:
            if r["split"] != split:
                continue
            for s in r["sentences"]:
                w.writerow([str(root / "images" / r["filename"]), s["raw"]])
    return table


def mmfw_command(a: argparse.Namespace, root: Path, ann: Path, out: Path, name: str
                 ) -> list[str]:
    """``mmfw run`` of ``<name>.toml``, written into ``root``: train_throughput.py's recipe of
    SHAPE (each tower as shipped: scratch-text unpadded, the packed-QKV attention) over the
    folder, with this script's optimisation, evaluated on the test split."""
    recipe = mmfw_recipe(SHAPE, batch=a.batch_size, device=a.device, precision=a.precision,
                         threads=a.threads, out_dir=str(out), train_images=0,
                         max_steps=a.steps)
    recipe["run"].update(name=name, max_minutes=0)
    recipe["data"] = {"dataset": "karpathy", "annotations": str(ann),
                      "images": str(root / "images"), "num_workers": a.workers, "cache": ""}
    recipe["optim"] = {"lr": LR, "weight_decay": WD, "grad_clip": CLIP}
    recipe["schedule"]["warmup_steps"] = WARMUP
    recipe["eval"] = {"split": "test", "val_split": ""}
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(recipe))
    sets = [x for s in a.mmfw_set for x in ("--set", s)]
    return [sys.executable, "-m", "mmfw", "run", str(path), *sets]


def open_clip_command(a: argparse.Namespace, table: Path, test: Path, config: Path,
                      logs: Path, name: str) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, str(config),
            "--train-data", str(table), "--val-data", str(test), "--dataset-type", "csv",
            "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--model", MODEL, "--batch-size", str(a.batch_size), "--epochs", "1",
            "--lr", str(LR), "--wd", str(WD), "--warmup", str(WARMUP),
            "--grad-clip-norm", str(CLIP), "--beta1", "0.9", "--beta2", "0.98",
            "--eps", "1e-6", "--precision", "amp_bf16" if a.precision == "bf16" else "fp32",
            "--workers", str(a.workers), "--seed", "0", "--device", a.device,
            "--logs", str(logs), "--name", name, "--report-to", "",
            "--aug-cfg", "scale=(1.0,1.0)"]


def timed(cmd: list[str], threads: int, what: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(threads), check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    return seconds


def check_mmfw(run_dir: Path, steps: int) -> None:
    """The run trained ``steps`` steps and wrote its final metrics."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if ln.strip()]
    last = max((r.get("step", 0) for r in rows), default=0)
    if last != steps or not (run_dir / "metrics.json").is_file():
        raise SystemExit(f"mmfw run {run_dir}: last logged step {last}, expected {steps}, "
                         "or no metrics.json")


def check_open_clip(log_dir: Path, steps: int, batch: int) -> None:
    """Its epoch covered ``steps`` batches and it evaluated the test split."""
    text = (log_dir / "out.log").read_text()
    done = re.findall(r"Train Epoch: 0 \[\s*(\d+)/\d+ \(100%\)\]", text)
    if done != [str(steps * batch)] or "Eval Epoch: 1" not in text:
        raise SystemExit(f"open_clip run {log_dir}: no complete epoch of {steps} steps or no "
                         f"evaluation in out.log:\n{text[-2000:]}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=5, help="ABBA pairs")
    ap.add_argument("--workers", type=int, default=1, help="data workers, both sides")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--test-images", type=int, default=100, help="images of the test split "
                    "both sides evaluate after training (mmfw's final evaluation, open_clip's "
                    "--val-data retrieval metrics)")
    ap.add_argument("--side", type=int, default=96, help="pixels of the image files")
    ap.add_argument("--noise", type=float, default=8.0, help="pixel noise std of the files")
    ap.add_argument("--mmfw-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe setting for mmfw (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pair, 4 steps, batch "
                    "16: NOT protocol-grade")
    ap.add_argument("--json", default=None, help="result file (default: benchmarks/results/"
                    "end_to_end_<device>_<precision>[_quick].json)")
    a = ap.parse_args(argv)
    if a.quick:
        a.pairs, a.steps, a.batch_size, a.test_images = 1, 4, 16, 10
    a.protocol_grade = not a.quick and a.pairs >= 5
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    header = record.new_result()
    info = header["machine"]
    print(f"machine: {info['cpu']}, {info['nproc']} cores, torch {info['torch']}, open_clip "
          f"{info.get('open_clip')}, load {' '.join(info.get('loadavg', []))}")
    pairs_n = a.steps * a.batch_size
    n_images = -(-pairs_n // CAPTIONS)
    runs: dict[str, list[float]] = {"mmfw": [], "open_clip": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        ann = write_folder(root, n_images, a.test_images, a.side, a.noise)
        table, test = write_csv(root, ann, "train"), write_csv(root, ann, "test")
        config = root / f"{MODEL}.json"
        config.write_text(json.dumps(OPEN_CLIP_CONFIG))
        print(f"{n_images} + {a.test_images} test image files ({a.side} px, PNG and JPEG), "
              f"{n_images * CAPTIONS} training pairs; {a.steps} steps of {a.batch_size}, "
              f"{a.workers} data workers, "
              f"{a.precision} (written in {time.perf_counter() - t0:.1f} s)"
              + ("  [--quick: NOT protocol-grade]" if a.quick else ""))
        commands: dict[str, list[str]] = {}
        for p in range(a.pairs):
            order = ("mmfw", "open_clip") if p % 2 == 0 else ("open_clip", "mmfw")
            for side in order:
                name = f"{side}-{p}"
                if side == "mmfw":
                    cmd = mmfw_command(a, root, ann, root / "runs", name)
                else:
                    cmd = open_clip_command(a, table, test, config, root / "logs", name)
                commands[side] = cmd
                runs[side].append(timed(cmd, a.threads, side))
                if side == "mmfw":
                    check_mmfw(root / "runs" / name, a.steps)
                else:
                    check_open_clip(root / "logs" / name, a.steps, a.batch_size)
            print(f"pair {p + 1}/{a.pairs} ({'-'.join(order)}): mmfw {runs['mmfw'][-1]:.1f} s,"
                  f" open_clip {runs['open_clip'][-1]:.1f} s", flush=True)
        recipe_text = (root / "mmfw-0.toml").read_text()
    samples = a.steps * a.batch_size
    ratios = [o / m for m, o in zip(runs["mmfw"], runs["open_clip"], strict=True)]
    lo, hi = bootstrap_ci(ratios)
    sides = {}
    for side, secs in runs.items():
        med = sorted(secs)[len(secs) // 2]
        sides[side] = {"wall_s": secs, "median_wall_s": med, "samples_per_s": samples / med}
        print(f"{side:<10} wall median {med:8.1f} s   {samples / med:8.1f} samples/s")
    tag = "  [--quick: NOT protocol-grade]" if a.quick else ""
    print(f"end to end (files on disk, own entry points): mmfw/open_clip = "
          f"{geo_mean(ratios):.2f}x [{lo:.2f}, {hi:.2f}]{tag}")
    shown = {k: " ".join([*v[:2], "<launcher>", *v[3:]]) if k == "open_clip" else " ".join(v)
             for k, v in commands.items()}
    result = {**header, "machine_end": record.machine(), "versions": versions(),
              "protocol_grade": a.protocol_grade,
              "args": vars(a), "images": n_images, "pairs_of_data": n_images * CAPTIONS,
              "commands": shown, "mmfw_recipe": recipe_text,
              "open_clip_config": OPEN_CLIP_CONFIG, "sides": sides,
              "ratio": geo_mean(ratios), "ci95": [lo, hi], "pair_ratios": ratios}
    record.write(a.json or HERE / "results" / (
        f"end_to_end_{a.device}_{a.precision}{'_quick' if a.quick else ''}.json"), result)


if __name__ == "__main__":
    main()
