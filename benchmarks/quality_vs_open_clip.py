"""Retrieval quality at an equal wall-clock budget: mmfw against open_clip, on real data (not a
test).

Both sides train the same model shape (the quickstart's towers: width 128, 4 vision / 3 text
layers, 4 heads, patches of 8 at 64 px) on the development set of ``benchmarks/dev_data.py``
(real images with human-written descriptions, Karpathy format), each through its own entry
point, and both are evaluated on its test split with mmfw's Recall@K (Karpathy convention):

- **mmfw**: ``mmfw run recipes/small_real.toml`` with ``run.max_minutes`` = the budget (the
  final evaluation included: ``schedule.fit_budget``).
- **open_clip**: ``python -m open_clip_train.main`` (run by a two-line launcher that registers
  the model config with ``open_clip.add_model_config``, then calls its ``main``), its CSV loader
  with every caption as a row, its cosine schedule, and as many epochs as fit the budget: one
  epoch is timed first (outside the budget) and the epoch count is the budget over that
  time. Its last checkpoint is loaded by ``open_clip.create_model_and_transforms`` and its
  test embeddings come from its own preprocessing and tokenizer (CLIP's BPE, context 32).

Each seed runs the two sides one after the other (never at once) and the ratio of test rsums
is reported with the seed-to-seed spread. Choose recipes on val, report test.

    python benchmarks/dev_data.py --out data/dev
    python benchmarks/quality_vs_open_clip.py --data data/dev --minutes 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import record  # benchmarks/record.py
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "small_real.toml"
MODEL = "mmfw-dev-quickstart-shape"

#: open_clip's model config of the quickstart shape (open_clip's own config format)
OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32,
                   "patch_size": 8, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4,
                 "layers": 3, "mlp_ratio": 4.0},
}

LAUNCHER = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
            "from open_clip_train.main import main; main(sys.argv[2:])")


def env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def karpathy(data: Path) -> list[dict[str, Any]]:
    return json.loads((data / "dataset_dev.json").read_text())["images"]


# ---- mmfw ------------------------------------------------------------------------------------

def run_mmfw(data: Path, minutes: float, seed: int, out: Path, threads: int,
             extra: list[str]) -> dict[str, Any]:
    sets = [f"run.name=mmfw-seed{seed}", f"run.output_dir={out}", f"run.seed={seed}",
            f"run.max_minutes={minutes}", "run.progress=false", f"backend.threads={threads}",
            f"data.annotations={data / 'dataset_dev.json'}", f"data.images={data / 'images'}",
            f"data.cache={data / 'cache'}", *extra]
    cmd = [sys.executable, "-m", "mmfw", "run", str(RECIPE),
           *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(threads), check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"mmfw failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / f"mmfw-seed{seed}" / "metrics.json").read_text())
    return {"command": " ".join(cmd), "seconds": round(seconds, 1), "metrics": metrics}


# ---- open_clip -------------------------------------------------------------------------------

def open_clip_files(data: Path, work: Path) -> tuple[Path, Path]:
    """The CSV of the train split (a row per caption) and the model config file."""
    rows = [(str(data / "images" / r["filename"]), s["raw"]) for r in karpathy(data)
            if r["split"] == "train" for s in r["sentences"]]
    table = work / "train.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    config = work / f"{MODEL}.json"
    config.write_text(json.dumps(OPEN_CLIP_CONFIG))
    return table, config


def open_clip_command(table: Path, config: Path, logs: Path, name: str, epochs: int,
                      seed: int, threads: int) -> list[str]:
    # the quickstart's optimisation: AdamW lr 1e-3, wd 0.1, 100 warm-up steps, batch 128
    return [sys.executable, "-c", LAUNCHER, str(config),
            "--train-data", str(table), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--model", MODEL, "--batch-size", "128", "--epochs", str(epochs),
            "--lr", "1e-3", "--wd", "0.1", "--warmup", "100", "--precision", "fp32",
            "--workers", str(max(threads - 1, 0)), "--seed", str(seed), "--device", "cpu",
            "--logs", str(logs), "--name", name, "--save-frequency", "1",
            "--log-every-n-steps", "50", "--report-to", ""]


def run_open_clip(data: Path, minutes: float, seed: int, work: Path, threads: int
                  ) -> dict[str, Any]:
    table, config = open_clip_files(data, work)
    # one epoch timed first (not counted in the budget) to fit the epoch count to it
    calib = open_clip_command(table, config, work / "logs", f"calibrate-{seed}", 1, seed,
                              threads)
    t0 = time.perf_counter()
    proc = subprocess.run(calib, capture_output=True, text=True, env=env(threads), check=False)
    epoch_s = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"open_clip failed:\n{proc.stderr[-3000:]}")
    epochs = max(1, int(minutes * 60 // epoch_s))
    name = f"open_clip-seed{seed}"
    cmd = open_clip_command(table, config, work / "logs", name, epochs, seed, threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(threads), check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"open_clip failed:\n{proc.stderr[-3000:]}")
    checkpoint = work / "logs" / name / "checkpoints" / f"epoch_{epochs}.pt"
    metrics = evaluate_open_clip(data, config, checkpoint)
    return {"command": " ".join([*cmd[:2], "<launcher>", *cmd[3:]]), "epochs": epochs,
            "epoch_seconds": round(epoch_s, 1), "seconds": round(seconds, 1),
            "metrics": metrics}


@torch.no_grad()
def evaluate_open_clip(data: Path, config: Path, checkpoint: Path) -> dict[str, float]:
    """open_clip's checkpoint loaded by open_clip, embedded with its preprocessing and
    tokenizer; Recall@K by mmfw's Karpathy convention."""
    import open_clip
    from PIL import Image

    from mmfw.eval.retrieval import recall_at_k

    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL,
                                                                 pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(MODEL)
    model.eval()
    test = [r for r in karpathy(data) if r["split"] == "test"]
    images, texts, owner = [], [], []
    for i in range(0, len(test), 128):
        chunk = test[i:i + 128]
        pixels = torch.stack([preprocess(Image.open(data / "images" / r["filename"]))
                              for r in chunk])
        images.append(model.encode_image(pixels))
    captions = [(k, s["raw"]) for k, r in enumerate(test) for s in r["sentences"]]
    for i in range(0, len(captions), 256):
        chunk = captions[i:i + 256]
        texts.append(model.encode_text(tokenizer([c for _, c in chunk])))
        owner += [k for k, _ in chunk]
    return recall_at_k(torch.cat(images), torch.cat(texts), torch.tensor(owner))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "dev")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mmfw-set", nargs="*", default=[], help="extra --set for mmfw")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                    / "quality_vs_open_clip.json")
    a = ap.parse_args()
    if not (a.data / "dataset_dev.json").is_file():
        raise SystemExit(f"no {a.data}/dataset_dev.json: python benchmarks/dev_data.py "
                         f"--out {a.data}")
    torch.set_num_threads(a.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            work = Path(tmp) / f"seed{seed}"
            work.mkdir()
            m = run_mmfw(a.data, a.minutes, seed, work / "runs", a.threads, a.mmfw_set)
            o = run_open_clip(a.data, a.minutes, seed, work, a.threads)
            ratio = m["metrics"]["rsum"] / o["metrics"]["rsum"]
            print(f"seed {seed}: mmfw test rsum {m['metrics']['rsum']:.1f} ({m['seconds']:.0f}"
                  f" s), open_clip {o['metrics']['rsum']:.1f} ({o['epochs']} epochs, "
                  f"{o['seconds']:.0f} s): {ratio:.2f}x", flush=True)
            runs.append({"seed": seed, "mmfw": m, "open_clip": o, "ratio": ratio})
    ratios = [r["ratio"] for r in runs]
    spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    print(f"\nmmfw/open_clip test rsum at {a.minutes:g} minutes: "
          f"{statistics.mean(ratios):.2f}x (seed-to-seed sd {spread:.2f}, "
          f"{len(ratios)} seeds)")
    record.write(a.out, record.new_result(minutes=a.minutes, data=str(a.data),
                                          recipe=str(RECIPE.relative_to(ROOT)), runs=runs,
                                          mean_ratio=statistics.mean(ratios), sd=spread))


if __name__ == "__main__":
    main()
