"""Peak training memory and samples/s of one tower against batch size: full fine-tuning, gradient
checkpointing, LoRA, LoRA + checkpointing, and GradCache (``optim.accumulate``).

The towers are a BERT-base-shaped ``hf-text`` (hidden 768, 12 heads, MLP 3072; 12 layers, or
``--layers``) and a ViT-B/16-shaped ``hf-vision`` (224 px, patch 16, hidden 768, 12 heads),
randomly initialised from transformers configs written to a temporary folder and built by the
encoders themselves (``pretrained = false``): nothing is downloaded. A training step is what
``mmfw run`` does with one tower: the tower's embeddings against a fixed batch of partner
embeddings through the ``infonce`` loss, backward, AdamW on the trainable parameters; with
``--accumulate N`` the step is mmfw's GradCache (``mmfw.train.gradcache.gradcache_step``).

Each configuration runs in a fresh process, so one configuration's allocator state never
holds another's memory: on CPU a child forked from a parent that imported torch, transformers,
peft and mmfw but ran no torch op (imports cost seconds a configuration otherwise); on CUDA a
new interpreter (a forked child must not inherit CUDA). Peak memory is

- CPU: the growth of the process's peak resident set (``resource.getrusage(RUSAGE_SELF)
  .ru_maxrss``) from just before the first step (model, optimizer object and inputs built) to
  after the last: activations, gradients, optimizer state and allocator overhead of training.
  (tracemalloc does not see torch's allocations: they are not Python objects.)
- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the first step.

``--quick`` (about 2 minutes on an idle 2-core machine): 2 layers of each tower, 32-token
captions, batch sizes 2 and 4, one warm-up and two timed steps. The full run is for a GPU machine::

    OMP_NUM_THREADS=2 python benchmarks/memory.py --quick
    python benchmarks/memory.py --device cuda --batch-sizes 32,64,128,256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MODES = {  # name -> (grad_checkpointing, lora, accumulate multiplier)
    "full": (False, False, 1),
    "ckpt": (True, False, 1),
    "lora": (False, True, 1),
    "lora+ckpt": (True, True, 1),
    "gradcache": (False, False, 0),  # 0: --accumulate
}


def write_towers(root: Path, layers: int) -> dict[str, Path]:
    """BERT-base and ViT-B/16 configs (random init at build time), a tokenizer, a processor."""
    import transformers as tf

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    text, vision = root / "bert-base", root / "vit-base-patch16-224"
    tf.BertConfig(num_hidden_layers=layers).save_pretrained(text)
    tf.BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(text)
    tf.ViTConfig(num_hidden_layers=layers).save_pretrained(vision)
    tf.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(vision)
    return {"text": text, "vision": vision}


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import contextlib

    import torch

    import mmfw
    from mmfw.train.gradcache import gradcache_step

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    ckpt, lora, _ = MODES[cfg["mode"]]
    name = "hf-text" if cfg["tower"] == "text" else "hf-vision"
    enc = mmfw.create("encoder", name, model=cfg["folder"], pretrained=False,
                      grad_checkpointing=ckpt, lora={"rank": 8} if lora else None).to(device)
    enc.train()
    loss = mmfw.create("loss", "infonce").to(device)
    trainable = [p for p in [*enc.parameters(), *loss.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    b = cfg["batch"]
    partner = torch.randn(b, enc.dim, device=device)  # the other tower's embeddings
    if cfg["tower"] == "text":
        tokens = {"input_ids": torch.randint(5, 30, (b, cfg["seq"]), device=device),
                  "attention_mask": torch.ones(b, cfg["seq"], dtype=torch.long, device=device)}
        pixels = partner
    else:
        pixels = torch.randn(b, 3, 224, 224, device=device)
        tokens = {"emb": partner}

    class OneTower(torch.nn.Module):
        """``encode_image`` / ``encode_text`` with the tower on one side, the fixed partner
        embeddings on the other (they have no graph: GradCache skips their backward)."""

        def __init__(self) -> None:
            super().__init__()
            self.tower = enc

        def encode_image(self, x: torch.Tensor) -> torch.Tensor:
            return x if cfg["tower"] == "text" else self.tower(x)

        def encode_text(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
            return t["emb"] if cfg["tower"] == "vision" else self.tower(t)

    model = OneTower()
    batch = SimpleNamespace(pixels=pixels, tokens=tokens,
                            image_ids=torch.arange(b, device=device),
                            text_ids=torch.arange(b, device=device))
    amp = cfg["precision"] != "fp32"
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float16

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if cfg["accumulate"] > 1:
            gradcache_step(model, loss, batch, cfg["accumulate"], autocast=autocast)
        else:
            with autocast():
                out = loss(model.encode_image(batch.pixels), model.encode_text(batch.tokens),
                           image_ids=batch.image_ids, text_ids=batch.text_ids)
            out.loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(cfg["warmup"]):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    sync()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {**_label(cfg), "peak_mib": round(peak, 1),
            "samples_per_s": round(b * cfg["steps"] / seconds, 2),
            "trainable": sum(p.numel() for p in trainable)}


def _label(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in ("tower", "mode", "batch", "accumulate")}


def fork_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """``child(cfg)`` in a forked process (CPU). The parent has imported torch, transformers,
    peft and mmfw but run no torch op, so the child starts with no tensor and no thread pool
    and skips the imports (seconds each on a small machine); its peak RSS is its own."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        os.close(read)
        code = 0
        try:
            out = child(cfg)
        except Exception as err:  # reported as that configuration's row
            out, code = {**_label(cfg), "error": f"{type(err).__name__}: {err}"[:300]}, 1
        with os.fdopen(write, "w") as f:
            f.write(json.dumps(out))
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else {**_label(cfg), "error": "the child died"}


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """``child(cfg)`` in a new interpreter (CUDA: a forked child must not inherit CUDA)."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {**_label(cfg), "error": tail or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per tower/mode, peak MiB and samples/s per batch size."""
    batches = sorted({r["batch"] for r in rows})
    head = "| tower | mode | trainable | " + " | ".join(
        f"B={b} peak MiB | B={b} samples/s" for b in batches) + " |"
    out = [head, "|" + "---|" * (3 + 2 * len(batches))]
    keys = list(dict.fromkeys((r["tower"], r["mode"], r["accumulate"]) for r in rows))
    for tower, mode, acc in keys:
        cells = []
        trainable = ""
        for b in batches:
            r = next((r for r in rows if (r["tower"], r["mode"], r["accumulate"], r["batch"])
                      == (tower, mode, acc, b)), None)
            if r is None or "error" in r:
                cells += ["error" if r else "", ""]
                continue
            trainable = f"{r['trainable'] / 1e6:.2f} M"
            cells += [f"{r['peak_mib']:.0f}", f"{r['samples_per_s']:.2f}"]
        label = f"{mode} (accumulate {acc})" if mode == "gradcache" else mode
        out.append(f"| {tower} | {label} | {trainable} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, batch 2 and 4, "
                    "2 timed steps: about 2 minutes on 2 CPU cores")
    ap.add_argument("--device", default="", help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--towers", default="text,vision")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batch-sizes", default="")
    ap.add_argument("--layers", type=int, default=0, help="encoder layers (default 12; "
                    "--quick: 2)")
    ap.add_argument("--seq", type=int, default=0, help="caption tokens (default 64; "
                    "--quick: 32)")
    ap.add_argument("--accumulate", type=int, default=4, help="GradCache chunks of the "
                    "gradcache mode")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 5; --quick: 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", default="", help="fp32, bf16 or fp16 (default: bf16 on "
                    "CUDA, fp32 on CPU)")
    ap.add_argument("--json", default="", help="write the rows and the machine's state here")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import peft  # noqa: F401  (imported once here: forked children inherit it)
    import torch
    import transformers  # noqa: F401

    import mmfw
    from mmfw.train import gradcache  # noqa: F401

    mmfw.available()  # plugin discovery (entry points, their imports) once, before any fork

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spawn = device != "cpu"
    layers = args.layers or (2 if args.quick else 12)
    seq = args.seq or (32 if args.quick else 64)
    steps = args.steps or (2 if args.quick else 5)
    batches = [int(b) for b in (args.batch_sizes or ("2,4" if args.quick else
                                                     "8,16,32")).split(",")]
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    load_before = os.getloadavg()
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_towers(Path(tmp), layers)
        for tower in args.towers.split(","):
            for mode in args.modes.split(","):
                for b in batches:
                    acc = args.accumulate if MODES[mode][2] == 0 else 1
                    cfg = {"tower": tower, "mode": mode, "batch": b, "accumulate": acc,
                           "folder": str(folders[tower]), "device": device, "seq": seq,
                           "steps": steps, "warmup": args.warmup, "precision": precision}
                    rows.append(run_child(cfg) if spawn else fork_child(cfg))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    meta = {"device": device, "precision": precision, "layers": layers, "seq": seq,
            "steps": steps, "threads": os.environ.get("OMP_NUM_THREADS", ""),
            "torch": torch.__version__, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "seconds": round(time.perf_counter() - started)}
    print(table(rows))
    print("\n" + json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1),
                                   encoding="utf-8")


if __name__ == "__main__":
    main()
