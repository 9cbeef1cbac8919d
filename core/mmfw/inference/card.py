"""The model card (``README.md``) written into every export: Hugging Face's model-card format.

YAML front matter (``library_name: mmfw``, tags, datasets, and ``model-index`` with the run's
final retrieval metrics) made by ``huggingface_hub.ModelCardData``, so the Hub shows the
metrics and ``huggingface_hub.ModelCard.load`` reads them back; then what the model is, how to
use it in the exported format, the recipe and data in short, training time and hardware (read
from the run directory's checkpoints and ``metrics.jsonl`` ``sys/*`` columns), and its
intended use and limitations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..eval.retrieval import METRIC_KEYS
from ..run import checkpoint as ckpt
from ..run.jsonl import read_jsonl
from ..run.loaded import LoadedRun
from ..run.rundir import CHECKPOINTS, METRICS_JSON, METRICS_JSONL
from ..spi.errors import MmfwError

CARD = "README.md"

#: how each export format is used, for the card's "Usage" section
USAGE = {
    "mmfw": ("```python\nimport mmfw\n\n# this folder (from the Hub: "
             "huggingface_hub.snapshot_download(repo_id))\n"
             "model = mmfw.load(\"{path}\")\n"
             "texts = model.encode_texts([\"a red circle left of a blue square\"])\n"
             "images = model.encode_images([\"photo.jpg\"])  # L2-normalised rows\n"
             "print(images @ texts.T)  # cosine similarities\n```"),
    "hf": "Load the folder with Hugging Face transformers (see the files' own config.json).",
    "open_clip": "Load the folder with open_clip (its model config and weights are inside).",
    "onnx": "Run the ONNX graphs with onnxruntime (the image and text encoders, each its own "
            "graph).",
}


def _metrics(run: LoadedRun) -> dict[str, float]:
    path = Path(run.run_dir) / METRICS_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise MmfwError(f"{path} is not valid JSON ({err})") from None
    return {k: float(data[k]) for k in METRIC_KEYS if isinstance(data.get(k), (int, float))}


def _dataset_name(run: LoadedRun) -> str:
    """A readable name of the training data: the annotation file's stem where there is one
    (``dataset_flickr30k.json`` -> ``flickr30k``), else the dataset plugin's name."""
    values = run.recipe.data.dataset.values()
    ann = values.get("annotations")
    if isinstance(ann, str) and ann:
        stem = Path(ann).stem
        return stem.removeprefix("dataset_") or stem
    return run.recipe.data.dataset.name


def training_facts(run: LoadedRun) -> dict[str, Any]:
    """Seconds trained, steps, throughput and the machine, from the run directory."""
    d = Path(run.run_dir)
    facts: dict[str, Any] = {"step": run.step}
    try:
        facts["seconds"] = float(ckpt.load_state(d / CHECKPOINTS, run.step).get("seconds", 0))
    except MmfwError:
        facts["seconds"] = None
    rows = [r for r in read_jsonl(d / METRICS_JSONL) if r.get("type") == "train"]
    if rows:
        sps = [r["samples_per_s"] for r in rows if isinstance(r.get("samples_per_s"), (int,
                                                                                       float))]
        facts["samples_per_s"] = sum(sps) / len(sps) if sps else None
        for key in ("sys/rss_mb", "sys/cuda_peak_mb", "sys/mps_alloc_mb"):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if vals:
                facts[key] = max(vals)
        threads = [r["sys/threads"] for r in rows if isinstance(r.get("sys/threads"), int)]
        facts["threads"] = threads[-1] if threads else None
        facts["world_size"] = rows[-1].get("world_size")
    b = run.recipe.backend
    facts["backend"] = b.name
    # what the steps ran in (``auto`` resolved on the training machine), else the recipe's
    ran = rows[-1].get("precision") if rows else None
    facts["precision"] = ran if isinstance(ran, str) else b.values().get("precision", "")
    return facts


def _plugin_line(plugin: Any) -> str:
    """``name`` (key = value, ...) of a recipe plugin section (or a core section holding one
    as ``plugin``, as [schedule] does)."""
    plugin = getattr(plugin, "plugin", plugin)
    values = plugin.values()
    shown = ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()
                      if not isinstance(v, (dict, list)) or v)
    return f"`{plugin.name}`" + (f" ({shown})" if shown else "")


def card_text(run: LoadedRun, fmt: str, path: str = ".") -> str:
    """The model card of ``run`` exported as ``fmt``, as Markdown with YAML front matter."""
    from huggingface_hub import EvalResult, ModelCardData

    r = run.recipe
    metrics = _metrics(run)
    dataset = _dataset_name(run)
    split = r.eval.split
    results = [EvalResult(task_type="image-text-retrieval", task_name="Image-text retrieval",
                          dataset_type=r.data.dataset.name, dataset_name=dataset,
                          dataset_split=split, metric_type=key.lower().replace("@", "_at_"),
                          metric_name=key, metric_value=round(value, 4))
               for key, value in metrics.items()]
    tags = ["mmfw", "image-text", "dual-encoder", "contrastive-learning", "retrieval",
            r.model.vision.name, r.model.text.name, r.loss.name, f"export-{fmt}"]
    data = ModelCardData(library_name="mmfw", tags=list(dict.fromkeys(tags)),
                         datasets=[dataset], model_name=r.run.name,
                         eval_results=results or None,
                         pipeline_tag="zero-shot-image-classification")
    facts = training_facts(run)
    secs = facts.get("seconds")
    time_line = f"{secs / 60:.1f} minutes" if secs and secs >= 60 else (
        f"{secs:.1f} seconds" if secs is not None else "not recorded")
    machine = [f"backend `{facts['backend']}`"
               + (f" ({facts['precision']})" if facts.get("precision") else "")]
    if facts.get("threads"):
        n = facts["threads"]
        machine.append(f"{n} CPU thread{'s' if n != 1 else ''}")
    if facts.get("world_size"):
        machine.append(f"{facts['world_size']} processes")
    if facts.get("sys/cuda_peak_mb"):
        machine.append(f"peak GPU memory {facts['sys/cuda_peak_mb']:.0f} MB")
    if facts.get("sys/rss_mb"):
        machine.append(f"peak resident memory {facts['sys/rss_mb']:.0f} MB")
    table = "\n".join(f"| {k} | {v:.2f} |" for k, v in metrics.items())
    metric_section = (f"On the `{split}` split of {dataset} (Recall@K in percent, rsum their "
                      f"sum):\n\n| metric | value |\n|---|---|\n{table}" if metrics else
                      "The run has no final evaluation (metrics.json) yet.")
    speed = facts.get("samples_per_s")
    speed_text = f", {speed:.0f} pairs/s on average" if speed else ""
    m = r.model
    body = f"""
# {r.run.name}

An image–text dual encoder trained with [mmfw](https://pypi.org/project/mmfw/): a vision
tower and a text tower, each followed by an adapter into one {m.embed_dim}-wide embedding
space where a caption and the image it describes are close (cosine similarity). This folder
is the `{fmt}` export of the run's checkpoint at step {run.step}.

## Usage

{USAGE.get(fmt, USAGE["mmfw"]).replace("{path}", path)}

## Model

- vision tower: {_plugin_line(m.vision)}
- text tower: {_plugin_line(m.text)}
- adapter: {_plugin_line(m.adapter)}, embedding width {m.embed_dim}
{f"- fusion head (re-ranking): {_plugin_line(m.fusion)}" if m.fusion else ""}

## Training

- loss: {_plugin_line(r.loss)}
- optimiser: AdamW, lr {r.optim.lr:g}, weight decay {r.optim.weight_decay:g}; schedule
  {_plugin_line(r.schedule)}
- batch: {r.sampler.batch_size} pairs (sampler `{r.sampler.plugin.name}`), {r.run.epochs}
  epochs{f", at most {r.run.max_steps} steps" if r.run.max_steps else ""}; seed {r.run.seed}

## Data

Dataset {_plugin_line(r.data.dataset)}, trained on its `{r.data.train_split}` split.

## Evaluation

{metric_section}

## Training time and hardware

{time_line} of training ({facts['step']} steps{speed_text}) on {", ".join(machine)}.

## Intended use and limitations

Intended for image–text retrieval and similarity (search images by a caption, captions by
an image, zero-shot labelling by comparing an image with captions of each label) on data
like the training data above. The model knows only what that data shows: on images or
wording far from it (other domains, languages, long or complex captions) retrieval quality
drops, and the metrics above say nothing about such data. It inherits the biases of its
training data and of any pretrained towers; do not use it for decisions about people.
Embeddings are compared by cosine similarity; scores are not calibrated probabilities.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def write_card(run: LoadedRun, output: Path, fmt: str) -> Path:
    """Write ``README.md`` (the model card) into the export folder ``output``."""
    path = Path(output) / CARD
    path.write_text(card_text(run, fmt, str(output)), encoding="utf-8")
    return path


__all__ = ["CARD", "card_text", "training_facts", "write_card"]
