"""Retrieval quality at an equal wall-clock budget: mmfw against open_clip, on real data (not a
test).

Both sides train on the development set of ``benchmarks/dev_data.py`` (real images with
human-written descriptions, Karpathy format), each through its own entry point, and both are
evaluated on its test split with mmfw's Recall@K (Karpathy convention). open_clip's towers are
named by ``--open-clip`` variants: ``resnet10t+minilm-locked`` is the towers of
``small_real.toml`` (timm's resnet10t from scratch at 64 px, the locked MiniLM-L6), the same
work on both sides; ``quickstart-shape`` is the quickstart's towers from scratch (width 128,
4 vision / 3 text layers, 4 heads, patches of 8 at 64 px), the reference of the first points.

- **mmfw**: ``mmfw run recipes/small_real.toml`` with ``run.max_minutes`` = the budget (the
  final evaluation included: ``schedule.fit_budget``).
- **open_clip**: ``python -m open_clip_train.main`` (run by a two-line launcher that registers
  the model config with ``open_clip.add_model_config``, then calls its ``main``), its CSV loader
  with every caption as a row, its cosine schedule, and as many epochs as fit the budget:
  runs of 1 and 2 epochs in each of ``--open-clip-precision`` (fp32, and amp_bf16 on a CPU
  with bf16 matrix instructions) time its epoch and its fixed cost first (outside every
  budget); it trains in the faster precision (its best on the machine) for as many epochs
  as fit in the seconds mmfw's whole process took (start-up and mmfw's final evaluation
  included; open_clip's evaluation is outside).
  Its last checkpoint is loaded by ``open_clip.create_model_and_transforms`` and its
  test embeddings come from its own preprocessing and tokenizer (the variant's: CLIP's BPE
  or MiniLM's WordPiece, context 32).

Each seed runs the two sides one after the other (never at once) and the ratio of test rsums
is reported with the seed-to-seed spread. Choose recipes on val, report test.

    python benchmarks/dev_data.py --out data/dev
    python benchmarks/quality_vs_open_clip.py --data data/dev --minutes 10 --seeds 0 1 2 \
        --open-clip resnet10t+minilm-locked quickstart-shape --open-clip-seeds 0
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

from mmfw_backends.cpufeatures import native_bf16

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "small_real.toml"
#: open_clip's model config of the quickstart shape (open_clip's own config format)
OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32,
                   "patch_size": 8, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4,
                 "layers": 3, "mlp_ratio": 4.0},
}
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


#: image towers a variant may name instead of the quickstart's ViT: timm CNNs from scratch at
#: 64 px through open_clip's own ``TimmModel`` (average pool, linear projection), as mmfw's
#: timm-vision rows build them
TIMM_TOWERS = ("resnet10t", "resnet18", "regnetx_002")


def open_clip_variant(name: str) -> tuple[dict[str, Any], list[str]]:
    """open_clip's model config and extra arguments of a ``--open-clip`` variant: parts
    joined by ``+``.

    ``quickstart-shape``: the towers above, from scratch. ``minilm-locked``: the MiniLM-L6
    text tower mmfw loads (the same local copy, through open_clip's ``HFTextEncoder``: mean
    pooling, a linear projection), frozen by open_clip's own ``--lock-text``, as mmfw's
    ``minilm-locked`` recipes freeze it. A name of ``TIMM_TOWERS`` (e.g. ``resnet10t``): that
    timm model from scratch as the image tower (open_clip's ``timm_model_name``).
    """
    config, extra = dict(OPEN_CLIP_CONFIG), []
    for part in name.split("+"):
        if part == "quickstart-shape":
            continue
        if part == "minilm-locked":
            from mmfw_encoders.hub import resolve

            path = resolve(MINILM, "hf-text").location
            config["text_cfg"] = {"hf_model_name": path, "hf_tokenizer_name": path,
                                  "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                                  "context_length": 32}
            extra.append("--lock-text")
        elif part in TIMM_TOWERS:
            config["vision_cfg"] = {"timm_model_name": part, "timm_model_pretrained": False,
                                    "timm_pool": "avg", "timm_proj": "linear",
                                    "image_size": 64}
        else:
            raise SystemExit(f"unknown --open-clip variant part {part!r}: quickstart-shape, "
                             f"minilm-locked, {', '.join(TIMM_TOWERS)} (joined by '+')")
    return config, extra


def model_name(variant: str) -> str:
    return f"mmfw-dev-{variant.replace('+', '-')}"


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

def open_clip_files(data: Path, work: Path, variant: str) -> tuple[Path, Path]:
    """The CSV of the train split (a row per caption) and the variant's model config file."""
    rows = [(str(data / "images" / r["filename"]), s["raw"]) for r in karpathy(data)
            if r["split"] == "train" for s in r["sentences"]]
    table = work / "train.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    config = work / f"{model_name(variant)}.json"
    config.write_text(json.dumps(open_clip_variant(variant)[0]))
    return table, config


def open_clip_command(variant: str, table: Path, config: Path, logs: Path, name: str,
                      epochs: int, seed: int, threads: int, precision: str) -> list[str]:
    # the quickstart's optimisation: AdamW lr 1e-3, wd 0.1, 100 warm-up steps, batch 128
    return [sys.executable, "-c", LAUNCHER, str(config),
            "--train-data", str(table), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--model", model_name(variant), "--batch-size", "128", "--epochs", str(epochs),
            "--lr", "1e-3", "--wd", "0.1", "--warmup", "100", "--precision", precision,
            "--workers", str(max(threads - 1, 0)), "--seed", str(seed), "--device", "cpu",
            "--logs", str(logs), "--name", name, "--save-frequency", "1",
            "--log-every-n-steps", "50", "--report-to", "", *open_clip_variant(variant)[1]]


def calibrate_open_clip(data: Path, work: Path, variant: str, threads: int,
                        precisions: list[str]) -> dict[str, Any]:
    """open_clip's seconds per epoch in each precision (a 1-epoch run each), and for the
    fastest its fixed cost (start-up, checkpoints) from a 2-epoch run; outside every budget."""
    table, config = open_clip_files(data, work, variant)

    def took(precision: str, epochs: int) -> float:
        cmd = open_clip_command(variant, table, config, work / "logs",
                                f"calibrate-{variant}-{precision}-{epochs}", epochs, 0,
                                threads, precision)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env(threads),
                              check=False)
        if proc.returncode:
            raise SystemExit(f"open_clip failed:\n{proc.stderr[-3000:]}")
        return time.perf_counter() - t0

    one = {p: took(p, 1) for p in precisions}
    precision = min(one, key=one.__getitem__)
    epoch = max(took(precision, 2) - one[precision], 1e-3)
    out = {"precision": precision, "one_epoch_run_s": {p: round(t, 1) for p, t in one.items()},
           "epoch_s": round(epoch, 1), "fixed_s": round(max(one[precision] - epoch, 0.0), 1)}
    print(f"open_clip {variant}: {out}", flush=True)
    return out


def run_open_clip(data: Path, variant: str, wall_s: float, seed: int, work: Path,
                  threads: int, calibration: dict[str, Any]) -> dict[str, Any]:
    """open_clip in its faster precision, with as many epochs as fit in ``wall_s`` (the
    seconds mmfw's whole process took, start-up and final evaluation included; open_clip's
    evaluation here is outside its time)."""
    table, config = open_clip_files(data, work, variant)
    precision, c = calibration["precision"], calibration
    epochs = max(1, int((wall_s - c["fixed_s"]) // c["epoch_s"]))
    name = f"open_clip-{variant}-seed{seed}"
    cmd = open_clip_command(variant, table, config, work / "logs", name, epochs, seed,
                            threads, precision)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(threads), check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"open_clip failed:\n{proc.stderr[-3000:]}")
    checkpoint = work / "logs" / name / "checkpoints" / f"epoch_{epochs}.pt"
    metrics = evaluate_open_clip(data, variant, config, checkpoint)
    return {"command": " ".join([*cmd[:2], "<launcher>", *cmd[3:]]), "epochs": epochs,
            "precision": precision, "seconds": round(seconds, 1), "metrics": metrics}


@torch.no_grad()
def evaluate_open_clip(data: Path, variant: str, config: Path, checkpoint: Path
                       ) -> dict[str, float]:
    """open_clip's checkpoint loaded by open_clip, embedded with its preprocessing and
    tokenizer; Recall@K by mmfw's Karpathy convention."""
    import open_clip
    from PIL import Image

    from mmfw.eval.retrieval import recall_at_k

    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name(variant),
                                                                 pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(model_name(variant))
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
    ap.add_argument("--open-clip-precision", nargs="+",
                    default=["fp32", "amp_bf16"] if native_bf16() else ["fp32"],
                    help="open_clip's --precision candidates: each is timed for one epoch "
                         "and open_clip trains in the fastest (its best on this machine; "
                         "default: amp_bf16 too where the CPU multiplies bf16 in hardware, "
                         "as mmfw's precision = \"auto\" does)")
    ap.add_argument("--open-clip", nargs="+",
                    default=["resnet10t+minilm-locked", "quickstart-shape"],
                    help="open_clip variants: quickstart-shape (the towers from scratch), "
                         "minilm-locked (its HF text tower on the same MiniLM, --lock-text), "
                         f"an image tower of {', '.join(TIMM_TOWERS)}; parts joined by '+' "
                         "(resnet10t+minilm-locked)")
    ap.add_argument("--open-clip-seeds", type=int, nargs="*",
                    help="seeds the open_clip variants after the first run on (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                    / "quality_vs_open_clip.json")
    a = ap.parse_args()
    if not (a.data / "dataset_dev.json").is_file():
        raise SystemExit(f"no {a.data}/dataset_dev.json: python benchmarks/dev_data.py "
                         f"--out {a.data}")
    torch.set_num_threads(a.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = {v: calibrate_open_clip(a.data, Path(tmp), v, a.threads,
                                              a.open_clip_precision) for v in a.open_clip}
        for seed in a.seeds:
            work = Path(tmp) / f"seed{seed}"
            work.mkdir()
            m = run_mmfw(a.data, a.minutes, seed, work / "runs", a.threads, a.mmfw_set)
            run: dict[str, Any] = {"seed": seed, "mmfw": m, "open_clip": {}, "ratio": {}}
            for k, variant in enumerate(a.open_clip):
                if k and a.open_clip_seeds is not None and seed not in a.open_clip_seeds:
                    continue
                o = run_open_clip(a.data, variant, m["seconds"], seed, work, a.threads,
                                  calibration[variant])
                ratio = m["metrics"]["rsum"] / o["metrics"]["rsum"]
                print(f"seed {seed}: mmfw test rsum {m['metrics']['rsum']:.1f} "
                      f"({m['seconds']:.0f} s), open_clip {variant} {o['metrics']['rsum']:.1f} "
                      f"({o['epochs']} epochs, {o['precision']}, {o['seconds']:.0f} s): "
                      f"{ratio:.2f}x", flush=True)
                # the epoch count comes from the calibration: say when open_clip got more
                # wall time than mmfw (its epochs ran slower than calibrated), not hide it
                o["over_budget"] = o["seconds"] > 1.05 * m["seconds"]
                if o["over_budget"]:
                    print(f"  note: open_clip {variant} took {o['seconds']:.0f} s against "
                          f"mmfw's {m['seconds']:.0f} s: it had more time, not less",
                          flush=True)
                run["open_clip"][variant], run["ratio"][variant] = o, ratio
            runs.append(run)
    summary = {}
    for variant in a.open_clip:
        ratios = [r["ratio"][variant] for r in runs if variant in r["ratio"]]
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        summary[variant] = {"mean_ratio": statistics.mean(ratios), "sd": spread,
                            "min": min(ratios), "max": max(ratios), "seeds": len(ratios)}
        print(f"\nmmfw/open_clip ({variant}) test rsum at {a.minutes:g} minutes: "
              f"{statistics.mean(ratios):.2f}x (seed-to-seed sd {spread:.2f}, range "
              f"{min(ratios):.2f}..{max(ratios):.2f}, {len(ratios)} seeds)")
    record.write(a.out, record.new_result(minutes=a.minutes, data=str(a.data),
                                          recipe=str(RECIPE.relative_to(ROOT)),
                                          mmfw_set=a.mmfw_set, runs=runs,
                                          open_clip_calibration=calibration,
                                          summary=summary))


if __name__ == "__main__":
    main()
