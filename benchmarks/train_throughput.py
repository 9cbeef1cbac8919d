"""Training throughput of mmfw against open_clip, three labelled regimes (not a test).

Both sides train the same ViT + text transformer on the same pre-built batches (mmfw's
``synthetic`` dataset, rendered once by mmfw's own ``Collate`` and tokenizer), each through its
own training loop, each measurement in its own fresh process:

- **mmfw**: ``Trainer.fit`` of a recipe (scratch-vision, scratch-text, linear adapters,
  infonce, the engine's fused AdamW, its callbacks and metrics rows), its ``loader`` replaced
  by the batch source below.
- **open_clip**: ``open_clip_train.train.train_one_epoch`` with ``args`` from
  ``open_clip_train.params.parse_args``, the model from ``open_clip.create_model_and_transforms``
  (the config registered by ``open_clip.add_model_config``), ``open_clip.create_loss``,
  ``open_clip_train.scheduler.cosine_lr`` and ``open_clip_train.main``'s AdamW parameter groups,
  over a ``data['train'] = DataInfo(dataloader=...)`` of the same batches.

**Step time** is the time between consecutive batch requests of the training loop (the batch
source timestamps each request, after a device sync on CUDA): one step's forward, backward,
optimizer, scheduler and whatever logging the loop does at that step, on both sides alike.

Regimes (each its own ratio; mmfw/open_clip of samples/s, geometric mean of the per-pair
ratios with a bootstrap 95% CI over the pairs):

- **A, same work**: both fed identical token tensors padded to the context length; mmfw's
  ``scratch-text`` with ``unpad = false`` and both towers with ``attention_impl = "sdpa"``
  (mmfw's own attention kernel is not SDPA); the same SDPA kernel on both (on the CPU mmfw's
  backend picks the math kernel, ``backend.sdpa = "math"``, so open_clip's loop runs inside the
  same ``sdpa_kernel(MATH)``; the attention operators that ran are listed from torch.profiler);
  fused AdamW on both; the same threads.
- **B, each at its best**: open_clip with ``context_length`` = the longest caption of the data
  (exact with its causal mask and end-of-text pooling), fused AdamW, its faster block type
  (``--oc-block auto``: ``default`` and ``custom`` probed first); mmfw as shipped (unpadded,
  tokens padded to each batch's longest caption, as its tokenizer does).
- **C, out of the box**: open_clip at its configured context and open_clip_train's AdamW
  (torch's default implementation), its default block; mmfw as shipped.

Order: pairs of one mmfw and one open_clip process, alternating ABBA (mmfw first in even pairs,
open_clip first in odd ones), the regimes interleaved within each pair round so load drift
hits all of them. ``--mmfw-set key=value`` applies recipe settings to the mmfw side in every
regime (ablations), after the regime's own.

    python benchmarks/train_throughput.py --shape quickstart --threads 2
    python benchmarks/train_throughput.py --shape vit-b32 --threads 2
    python benchmarks/train_throughput.py --shape quickstart --threads 2 --precision bf16
    python benchmarks/train_throughput.py --device cuda --precision bf16 --shape vit-b32
    python benchmarks/train_throughput.py --quick            # smoke run, not protocol-grade
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import flops  # benchmarks/flops.py
import record  # benchmarks/record.py
import torch
import torch.nn.functional as F

from mmfw_backends.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

HERE = Path(__file__).resolve().parent
LR, WD, BETAS, EPS, WARMUP = 5e-4, 0.1, (0.9, 0.98), 1e-6, 100
OC_MODEL = "mmfw-bench-shape"  # the name the open_clip config is registered under


@dataclass(frozen=True)
class Shape:
    """The model both frameworks build."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_heads: int
    vision_depth: int
    text_width: int
    text_heads: int
    text_depth: int
    mlp_ratio: float
    context_length: int
    vocab_size: int
    embed_dim: int


SHAPES = {
    # recipes/quickstart.toml's towers
    "quickstart": Shape(48, 8, 128, 4, 4, 128, 4, 3, 2.0, 48, 2000, 128),
    # CLIP ViT-B/32 (Radford et al. 2021, table 20), random init
    "vit-b32": Shape(224, 32, 768, 12, 12, 512, 8, 12, 4.0, 77, 49408, 512),
}
#: per shape: batch on CPU, the protocol's minimum timed steps
SHAPE_DEFAULTS = {"quickstart": {"batch": 128, "steps": 100},
                  "vit-b32": {"batch": 32, "steps": 20}}
MIN_WARMUP, MIN_PAIRS = 20, 5

REGIMES = {"A": "same work", "B": "each at its best", "C": "out of the box"}


def regime_settings(regime: str, longest: int, oc_block: str) -> dict[str, Any]:
    """What each side does differently in a regime (see the module docstring)."""
    if regime == "A":
        # the same kernel: SDPA on both (mmfw's own packed-QKV attention is a B/C gain)
        return {"tokens": "context", "mmfw_sets": ["model.text.unpad=false",
                                                   "model.vision.attention_impl=sdpa",
                                                   "model.text.attention_impl=sdpa"],
                "oc_context": None, "oc_fused": True, "oc_block": "default", "same_sdpa": True}
    if regime == "B":
        return {"tokens": "longest", "mmfw_sets": [], "oc_context": longest,
                "oc_fused": True, "oc_block": oc_block, "same_sdpa": False}
    return {"tokens": "longest", "mmfw_sets": [], "oc_context": None, "oc_fused": False,
            "oc_block": "default", "same_sdpa": False}


# ------------------------------------------------------------------------------------------
# the two sides' configurations


def mmfw_recipe(s: Shape, *, batch: int, device: str, precision: str, threads: int,
                out_dir: str, train_images: int, max_steps: int = 0) -> dict[str, Any]:
    if device == "cpu":
        backend: dict[str, Any] = {"name": "cpu", "threads": threads, "precision": precision}
    else:
        backend = {"name": "cuda", "precision": precision}
    return {
        "run": {"name": "bench", "output_dir": out_dir, "seed": 0, "progress": False,
                "epochs": 1, "max_steps": max_steps},
        "backend": backend,
        "data": {"dataset": "synthetic", "train_images": train_images, "val_images": 0,
                 "test_images": 0, "captions_per_image": 5, "image_size": s.image_size},
        "sampler": {"name": "random", "batch_size": batch},
        "model": {
            "embed_dim": s.embed_dim,
            "vision": {"name": "scratch-vision", "image_size": s.image_size,
                       "patch_size": s.patch_size, "width": s.vision_width,
                       "depth": s.vision_depth, "heads": s.vision_heads,
                       "mlp_ratio": s.mlp_ratio, "pooling": "mean"},
            "text": {"name": "scratch-text", "vocab_size": s.vocab_size,
                     "max_length": s.context_length, "width": s.text_width,
                     "depth": s.text_depth, "heads": s.text_heads, "mlp_ratio": s.mlp_ratio,
                     "pooling": "mean"},
            "adapter": {"name": "linear"},
        },
        "loss": {"name": "infonce", "temperature": 0.07, "learn_temperature": True},
        "optim": {"lr": LR, "weight_decay": WD, "betas": list(BETAS), "eps": EPS},
        "schedule": {"name": "warmup-cosine", "warmup_steps": WARMUP},
        "eval": {"val_split": "", "split": ""},
    }


def open_clip_config(s: Shape, pad_id: int, eos_id: int, block: str) -> dict[str, Any]:
    """open_clip's model config of the shape: mean of patch tokens (mmfw's pooling = "mean"),
    end-of-text pooling at mmfw's [SEP] (``argmax`` would need CLIP's BPE ids)."""
    return {
        "embed_dim": s.embed_dim,
        "vision_cfg": {"image_size": s.image_size, "layers": s.vision_depth,
                       "width": s.vision_width, "head_width": s.vision_width // s.vision_heads,
                       "patch_size": s.patch_size, "mlp_ratio": s.mlp_ratio,
                       "pool_type": "avg", "block_type": block},
        "text_cfg": {"context_length": s.context_length, "vocab_size": s.vocab_size,
                     "width": s.text_width, "heads": s.text_heads, "layers": s.text_depth,
                     "mlp_ratio": s.mlp_ratio, "pad_id": pad_id, "eos_id": eos_id,
                     "pool_type": "eos", "block_type": block},
    }


def open_clip_argv(batch: int, precision: str, device: str, grad_clip: float) -> list[str]:
    """open_clip_train's command line for the run (its own parser turns it into ``args``)."""
    argv = ["--model", OC_MODEL, "--batch-size", str(batch),
            "--precision", "amp_bf16" if precision == "bf16" else "fp32", "--device", device,
            "--lr", str(LR), "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]),
            "--eps", str(EPS), "--wd", str(WD), "--warmup", str(WARMUP), "--workers", "0",
            "--seed", "0", "--report-to", ""]
    return argv + (["--grad-clip-norm", str(grad_clip)] if grad_clip else [])


def open_clip_optimizer(model: torch.nn.Module, args: Any, fused: bool) -> torch.optim.AdamW:
    """open_clip_train.main's AdamW: no decay on gains, biases and logit_scale (its lambda,
    copied: main() builds it inline); ``fused`` is the only change (regimes A and B)."""
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0},
                              {"params": rest, "weight_decay": args.wd}],
                             lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, **extra)


def register_open_clip(s: Shape, pad_id: int, eos_id: int, block: str, folder: Path) -> None:
    import open_clip

    config = folder / f"{OC_MODEL}.json"
    config.write_text(json.dumps(open_clip_config(s, pad_id, eos_id, block)))
    open_clip.add_model_config(config)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------
# data: one fixed set of batches, rendered once in the parent, loaded by every worker


def render(trainer: Any, s: Shape, n_batches: int, batch: int) -> dict[str, Any]:
    """``n_batches`` batches of ``batch`` distinct images with one random caption each (as
    open_clip's datasets give them), collated by mmfw's own ``Collate``. Plain tensors, so a
    worker reads them with ``torch.load``."""
    from mmfw.data.batching import Collate

    text = trainer.model.text
    tok = text.tokenizer
    pad_id, eos_id = tok.token_to_id("[PAD]"), tok.token_to_id("[SEP]")
    pairs = trainer.data.pairs
    collate = Collate(trainer.model.vision.preprocess, text.tokenize, pairs.items)
    rng = random.Random(0)
    first = {}  # pair index of each image's first caption
    for k, (i, _c) in enumerate(pairs.index):
        first.setdefault(i, k)
    out: dict[str, Any] = {k: [] for k in ("pixels", "ids_context", "mask_context",
                                           "ids_longest", "mask_longest", "image_ids",
                                           "text_ids")}
    for b in range(n_batches):
        rows = [pairs[first[i] + rng.randrange(5)] for i in range(b * batch, (b + 1) * batch)]
        bt = collate(rows)
        extra = s.context_length - bt.tokens["input_ids"].shape[1]
        out["pixels"].append(bt.pixels)
        out["ids_context"].append(F.pad(bt.tokens["input_ids"], (0, extra), value=pad_id))
        out["mask_context"].append(F.pad(bt.tokens["attention_mask"], (0, extra),
                                         value=False))
        out["ids_longest"].append(bt.tokens["input_ids"])
        out["mask_longest"].append(bt.tokens["attention_mask"])
        out["image_ids"].append(bt.image_ids)
        out["text_ids"].append(bt.text_ids)
    real = [int(m.sum(1).max()) for m in out["mask_longest"]]
    out.update(pad_id=pad_id, eos_id=eos_id, longest=max(real),
               mean_real_tokens=sum(int(m.sum()) for m in out["mask_longest"])
               / (n_batches * batch),
               mean_batch_longest=sum(real) / n_batches)
    return out


# ------------------------------------------------------------------------------------------
# worker: one side, one regime, in a fresh process


class Done(Exception):
    """Raised by the batch source after the last step: ends either loop at once (mmfw's
    ``fit`` would otherwise write its final checkpoint, outside any step but not wanted)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedBatches:
    """The loader both loops iterate: ``n`` batches from ``make(i)``, each request
    timestamped (after a device sync); ``times[i + 1] - times[i]`` is step ``i``. From
    request ``profile_from`` on, torch.profiler records. It has what ``train_one_epoch``
    reads of a dataloader (``num_batches``, ``num_samples``)."""

    def __init__(self, make: Callable[[int], Any], n: int, batch: int, device: torch.device,
                 profile_from: int) -> None:
        self.make, self.n, self.device, self.profile_from = make, n, device, profile_from
        self.num_batches, self.num_samples = n, n * batch
        self.times: list[float] = []
        self.prof: Any = None

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        from torch.profiler import ProfilerActivity, profile

        for i in range(self.n + 1):
            sync(self.device)
            self.times.append(time.perf_counter())
            if i == self.profile_from and i < self.n:
                acts = [ProfilerActivity.CPU] + (
                    [ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
                self.prof = profile(activities=acts, record_shapes=True)
                self.prof.start()
            if i == self.n:
                if self.prof is not None:
                    sync(self.device)
                    self.prof.stop()
                raise Done
            yield self.make(i)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(key + ":")).split()[1])


class PeakMemory:
    """Peak memory of the training: CUDA ``max_memory_allocated`` above what was allocated
    before it, or on CPU the growth of the peak RSS (VmHWM, reset through
    ``/proc/self/clear_refs`` first, as proc(5) documents) over the RSS before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.before = _status_kb("VmRSS") / 1024
            self.reset = True
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.reset = False
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.result = {"kind": "cuda_max_allocated", "before_mb": self.before,
                           "peak_mb": peak, "growth_mb": peak - self.before}
        else:
            peak = _status_kb("VmHWM") / 1024
            self.result = {"kind": "VmHWM", "hwm_reset": self.reset, "before_mb": self.before,
                           "peak_mb": peak, "growth_mb": peak - self.before}


ATTENTION_OP = re.compile(r"attention|flash|sdpa|cudnn_attn|_efficient_", re.I)


def profiled(prof: Any, device: torch.device, rows: int, shapes: bool) -> dict[str, Any]:
    """The attention operators that ran (name -> calls) and, if ``rows``, the top-ops table
    (one row per operator and input shapes if ``shapes``)."""
    ka = prof.key_averages()
    out: dict[str, Any] = {"attention_ops": {e.key: e.count for e in ka
                                             if ATTENTION_OP.search(e.key)}}
    if rows:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=True) if shapes else ka
        out["top_ops"] = table.table(sort_by=sort, row_limit=rows, max_name_column_width=52,
                                     max_shapes_column_width=70)
    return out


def run_mmfw(spec: dict[str, Any], data: dict[str, Any], total: int) -> dict[str, Any]:
    from mmfw.config.recipe import load_recipe
    from mmfw.data.batching import Batch
    from mmfw.train.loop import Trainer

    s, batch, device = Shape(**spec["shape"]), spec["batch"], torch.device(spec["device"])
    # one epoch longer than the run (5 captions an image): fit must not end an epoch
    images = max(math.ceil((total + 2) * batch / 5), batch)
    raw = mmfw_recipe(s, batch=batch, device=spec["device"], precision=spec["precision"],
                      threads=spec["threads"], out_dir=spec["workdir"], train_images=images,
                      max_steps=total + 1)
    if spec["grad_clip"]:
        raw["optim"]["grad_clip"] = spec["grad_clip"]
    recipe = load_recipe(raw, overrides=[*spec["settings"]["mmfw_sets"], *spec["mmfw_set"]])
    trainer = Trainer(recipe, overwrite=True, console=lambda _msg: None)
    key = spec["settings"]["tokens"]
    ids, masks = data[f"ids_{key}"], data[f"mask_{key}"]
    nb = len(ids)

    def make(i: int) -> Batch:
        k = i % nb
        return Batch(data["pixels"][k], {"input_ids": ids[k], "attention_mask": masks[k]},
                     data["image_ids"][k], data["text_ids"][k])

    unpad = bool(getattr(getattr(trainer.model.text, "options", None), "unpad", False))
    work = flops.TextWork(
        linear_tokens=sum(int(m.sum()) if unpad else m.numel() for m in masks) / nb,
        attention_sq=sum(m.shape[0] * m.shape[1] ** 2 for m in masks) / nb)
    loader = TimedBatches(make, total, batch, device, spec["warmup"] + spec["steps"])
    trainer.loader = loader  # fit iterates self.loader; the rest of fit is its own
    with PeakMemory(device) as mem, contextlib.suppress(Done):
        trainer.fit()
    trainer.release()
    check_steps(trainer.opt.optimizer, total, "mmfw")
    return {"loader": loader, "memory": mem.result, "text_work": work,
            "params": n_params(trainer.model) + n_params(trainer.opt.losses),
            "config": {"unpad": unpad, "tokens": key,
                       "backend": trainer.backend.describe(),
                       "optimizer": _optimizer_flavour(trainer.opt.optimizer)}}


def check_steps(opt: torch.optim.Optimizer, total: int, side: str) -> None:
    """Every batch the source handed out was one optimizer step (AdamW counts them)."""
    done = {int(st["step"]) for st in opt.state.values() if "step" in st}
    if done != {total}:
        raise RuntimeError(f"{side}: {total} batches handed out, optimizer steps {done}")


def _optimizer_flavour(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    flavour = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default"
    return f"{type(opt).__name__} ({flavour})"


def run_open_clip(spec: dict[str, Any], data: dict[str, Any], total: int) -> dict[str, Any]:
    import open_clip
    from open_clip_train.data import DataInfo
    from open_clip_train.distributed import init_distributed_device
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s, batch = Shape(**spec["shape"]), spec["batch"]
    st = spec["settings"]
    register_open_clip(s, data["pad_id"], data["eos_id"], st["oc_block"],
                       Path(spec["workdir"]))
    args = parse_args(open_clip_argv(batch, spec["precision"], spec["device"],
                                     spec["grad_clip"]))
    if torch.cuda.is_available():  # as open_clip_train.main does first
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device = init_distributed_device(args)
    # what main() derives from the parsed arguments before training
    args.wandb = "wandb" in args.report_to or "all" in args.report_to
    args.tensorboard = "tensorboard" in args.report_to or "all" in args.report_to
    args.distill = args.distill_model is not None and args.distill_pretrained is not None
    torch.manual_seed(args.seed)
    context = st["oc_context"] or s.context_length
    model, _, _ = open_clip.create_model_and_transforms(
        OC_MODEL, None, precision=args.precision, device=device, output_dict=True,
        force_context_length=st["oc_context"])
    optimizer = open_clip_optimizer(model, args, st["oc_fused"])
    loss = open_clip.create_loss(args)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, total)
    ids = [t[:, :context] for t in data["ids_context"]]  # B: exact, no real token cut
    nb = len(ids)

    def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return data["pixels"][i % nb], ids[i % nb]

    work = flops.TextWork(linear_tokens=batch * context, attention_sq=batch * context**2)
    loader = TimedBatches(make, total, batch, device, spec["warmup"] + spec["steps"])
    # regime A on CPU: the kernel mmfw's cpu backend enters (its sdpa = "math")
    kernel = sdpa_kernel(SDPBackend.MATH) if st["same_sdpa"] and spec["math_sdpa"] \
        else contextlib.nullcontext()
    with PeakMemory(device) as mem, kernel, contextlib.suppress(Done):
        train_one_epoch(model, {"train": DataInfo(dataloader=loader)}, loss, 0, optimizer,
                        None, scheduler, None, args)
    check_steps(optimizer, total, "open_clip")
    return {"loader": loader, "memory": mem.result, "text_work": work,
            "params": n_params(model),
            "config": {"context_length": context, "block_type": st["oc_block"],
                       "precision": args.precision, "sdpa_math": st["same_sdpa"]
                       and spec["math_sdpa"], "optimizer": _optimizer_flavour(optimizer)}}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec["side"] == "peak":
        dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        return flops.matmul_peak(spec["peak_n"], dtype, device)
    data = torch.load(spec["data_file"], weights_only=False)
    warm, steps = spec["warmup"], spec["steps"]
    total = warm + steps + spec["kernel_steps"]
    run = run_mmfw if spec["side"] == "mmfw" else run_open_clip
    out = run(spec, data, total)
    loader: TimedBatches = out.pop("loader")
    t = loader.times
    step_s = [b - a for a, b in zip(t[warm:warm + steps], t[warm + 1:warm + steps + 1],
                                    strict=True)]
    s = Shape(**spec["shape"])
    work: flops.TextWork = out.pop("text_work")
    per_step = flops.step_flops(
        flops.vision_forward(spec["batch"], s.image_size, s.patch_size, s.vision_width,
                             s.vision_depth, s.mlp_ratio, s.embed_dim),
        flops.text_forward(spec["batch"], work, s.text_width, s.text_depth, s.mlp_ratio,
                           s.embed_dim),
        spec["batch"], s.embed_dim)
    # the warm-up steps hold one-off costs (torch.compile's compilation, allocator growth):
    # reported on their own, never in the step times
    out.update(step_s=step_s, warmup_s=t[warm] - t[0], threads=torch.get_num_threads(),
               flops_per_step=per_step, text_work=asdict(work))
    if loader.prof is not None:
        out.update(profiled(loader.prof, device, spec["profile_rows"],
                            spec.get("profile_shapes", False)))
    return out


# ------------------------------------------------------------------------------------------
# parent: data, checks, the pairs, the summary


def run_worker(spec: dict[str, Any], folder: Path, tag: str) -> dict[str, Any]:
    spec_file, out_file = folder / f"{tag}.spec.json", folder / f"{tag}.out.json"
    spec_file.write_text(json.dumps({**spec, "result": str(out_file)}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    if spec.get("side") == "open_clip" and spec.get("open_clip_malloc_kept"):
        # glibc reads these at start-up: what mmfw's backend.keep_freed_memory sets by mallopt
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
                   MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           str(spec_file)], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"worker {tag} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def versions() -> dict[str, str]:
    """What record.machine() leaves out: timm's version and the mmfw commit measured (with
    '+dirty' when the working tree has changes)."""
    import timm

    out = {"timm": timm.__version__}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(HERE)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True,
                               text=True, check=True).stdout.strip()
        out["mmfw_commit"] = commit + ("+dirty" if dirty else "")
    return out


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    v = sorted(xs)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def geo_mean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def bootstrap_ci(ratios: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the geometric mean, resampling pairs."""
    rng = random.Random(seed)
    means = sorted(geo_mean(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def check_params(s: Shape, trainer: Any, data: dict[str, Any], folder: Path) -> dict[str, int]:
    """Both models' parameter counts; fail when they differ by more than the known
    structural differences (open_clip's ViT has ln_pre and no patch-embedding bias; mmfw's
    linear adapters have biases and timm's ViT a final norm of its own)."""
    import open_clip

    counts = {}
    for block in ("default", "custom"):
        register_open_clip(s, data["pad_id"], data["eos_id"], block, folder)
        model = open_clip.create_model(OC_MODEL)
        counts[f"open_clip ({block} block)"] = n_params(model)
        del model
    counts["mmfw"] = n_params(trainer.model) + n_params(trainer.opt.losses)
    allowed = 4 * (s.vision_width + s.text_width + s.embed_dim)
    for name, c in counts.items():
        print(f"params {name:<26} {c:>12,}")
    diff = max(abs(c - counts["mmfw"]) for c in counts.values())
    print(f"largest difference {diff:,} (allowed: {allowed:,}, ln_pre, biases, norms)")
    if diff > allowed:
        raise SystemExit(f"parameter counts differ by {diff:,} > {allowed:,}: the two models "
                         "are not the same shape")
    return counts


def summarise(a: argparse.Namespace, runs: dict[str, dict[str, list[dict[str, Any]]]],
              peak: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for regime, sides in runs.items():
        ratios = [o["step_s_p50"] / m["step_s_p50"]
                  for m, o in zip(sides["mmfw"], sides["open_clip"], strict=True)]
        lo, hi = bootstrap_ci(ratios)
        per_side = {}
        for side, results in sides.items():
            pooled = [x for r in results for x in r["step_s"]]
            p50 = percentile(pooled, 50)
            fl = results[0]["flops_per_step"]
            per_side[side] = {
                "step_ms_p50": 1e3 * p50, "step_ms_p90": 1e3 * percentile(pooled, 90),
                "samples_per_s": a.batch_size / p50,
                "peak_memory_growth_mb": percentile([r["memory"]["growth_mb"]
                                                     for r in results], 50),
                "memory_kind": results[0]["memory"]["kind"],
                "model_flops_per_step": fl, "model_flops_per_s": fl / p50,
                "mfu": fl / p50 / peak, "params": results[0]["params"],
                "warmup_s": percentile([r["warmup_s"] for r in results], 50),
                "config": results[0]["config"],
                "attention_ops": results[0].get("attention_ops", {}),
                "threads": results[0]["threads"]}
        out[regime] = {"label": REGIMES[regime], "ratio": geo_mean(ratios), "ci95": [lo, hi],
                       "pair_ratios": ratios, "sides": per_side}
    return out


def report(summary: dict[str, Any], peak: dict[str, Any], quick: bool) -> None:
    for regime, r in summary.items():
        print(f"\nregime {regime} ({r['label']}): per side, timed steps of all pairs pooled")
        print(f"{'side':<10} {'p50 ms':>9} {'p90 ms':>9} {'samples/s':>10} {'peak MiB':>9} "
              f"{'GFLOP/s':>9} {'MFU':>7} {'warm-up s':>9}  config")
        for side, v in r["sides"].items():
            print(f"{side:<10} {v['step_ms_p50']:>9.1f} {v['step_ms_p90']:>9.1f} "
                  f"{v['samples_per_s']:>10.1f} {v['peak_memory_growth_mb']:>9.0f} "
                  f"{v['model_flops_per_s'] / 1e9:>9.1f} {v['mfu']:>7.1%} "
                  f"{v['warmup_s']:>9.1f}  "
                  f"{json.dumps(v['config'])}")
        for side, v in r["sides"].items():
            print(f"  attention ops, {side}: {v['attention_ops'] or 'none recorded'}")
        print("  per-pair ratios: " + " ".join(f"{x:.3f}" for x in r["pair_ratios"]))
    print(f"\nmatmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s (torch.mm {peak['n']}^2 "
          f"{peak['dtype']}, {peak['threads']} threads)")
    if any(v["mfu"] > 1 for r in summary.values() for v in r["sides"].values()):
        print("warning: an MFU above 100%: the peak was measured under more load than the "
              "steps ran under (not a quiet machine); the MFU column is not meaningful")
    tag = "  [--quick: NOT protocol-grade]" if quick else ""
    print()
    for regime, r in summary.items():
        lo, hi = r["ci95"]
        print(f"regime {regime} ({r['label']}): mmfw/open_clip = {r['ratio']:.2f}x "
              f"[{lo:.2f}, {hi:.2f}]{tag}")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="quickstart")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="0: the shape's (quickstart 128, vit-b32 32)")
    ap.add_argument("--pairs", type=int, default=MIN_PAIRS, help="ABBA pairs per regime")
    ap.add_argument("--warmup", type=int, default=MIN_WARMUP, help="untimed steps per process")
    ap.add_argument("--steps", type=int, default=0,
                    help="timed steps per process (0: the shape's: quickstart 100, vit-b32 20)")
    ap.add_argument("--batches", type=int, default=8, help="distinct pre-built batches")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides "
                    "(0: torch's default)")
    ap.add_argument("--regimes", nargs="+", choices=tuple(REGIMES), default=list(REGIMES))
    ap.add_argument("--oc-block", choices=("auto", "default", "custom"), default="auto",
                    help="open_clip's block type in regime B (auto: the faster in a probe)")
    ap.add_argument("--probe-steps", type=int, default=10, help="timed steps of each block "
                    "type's probe (auto)")
    ap.add_argument("--probe-rounds", type=int, default=2, help="probe processes of each "
                    "block type, ABBA order (auto)")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="on both sides (0: off)")
    ap.add_argument("--mmfw-set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe setting for the mmfw side in every regime (repeatable)")
    ap.add_argument("--open-clip-malloc-kept", action="store_true",
                    help="give open_clip's processes the glibc thresholds of mmfw's "
                    "backend.keep_freed_memory (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_): "
                    "the same allocator policy on both sides")
    ap.add_argument("--kernel-steps", type=int, default=2, help="steps under torch.profiler "
                    "after the timed ones (attention kernels; not timed)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of "
                    "those steps, every side and regime (first pair)")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--profile-shapes", action="store_true", help="with --profile: one row "
                    "per operator and input shapes")
    ap.add_argument("--peak-n", type=int, default=0, help="matmul side of the peak "
                    "(0: 2048 on CPU, 8192 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pair, 2 warm-up and "
                    "3 timed steps (2 at vit-b32, batch 4): NOT protocol-grade")
    ap.add_argument("--json", default=None, help="result file (default: benchmarks/results/"
                    "train_throughput_<shape>_<device>_<precision>[_quick].json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    d = SHAPE_DEFAULTS[a.shape]
    if a.quick:
        a.pairs, a.warmup, a.probe_steps, a.probe_rounds, a.batches = 1, 2, 2, 1, 2
        a.steps = a.steps or (2 if a.shape == "vit-b32" else 3)
        a.batch_size = a.batch_size or (4 if a.shape == "vit-b32" else 32)
    a.batch_size = a.batch_size or d["batch"]
    a.steps = a.steps or d["steps"]
    a.peak_n = a.peak_n or (8192 if a.device == "cuda" else 2048)
    a.protocol_grade = (not a.quick and a.pairs >= MIN_PAIRS and a.warmup >= MIN_WARMUP
                        and a.steps >= d["steps"])
    return a


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        spec = json.loads(Path(argv[1]).read_text())
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return
    a = parse(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    try:
        import open_clip  # noqa: F401
        import open_clip_train  # noqa: F401
    except ImportError:
        raise SystemExit("the peer is not installed: pip install -e \".[bench]\" "
                         "(open-clip-torch, with open_clip and open_clip_train)") from None
    from mmfw.config.recipe import load_recipe
    from mmfw.train.loop import Trainer

    if a.threads:
        torch.set_num_threads(a.threads)
    s = SHAPES[a.shape]
    header = record.new_result()
    info = header["machine"]
    print(f"machine: {info['cpu']}, {info['nproc']} cores, torch {info['torch']}, open_clip "
          f"{info.get('open_clip')}, threads {a.threads or torch.get_num_threads()}, load "
          f"{' '.join(info.get('loadavg', []))}" + (f", {info['gpu']}" if "gpu" in info else ""))
    print(f"shape {a.shape}: {json.dumps(asdict(s))}")
    if not a.protocol_grade:
        print("NOT protocol-grade: " + ("--quick" if a.quick else
              f"needs >= {MIN_PAIRS} pairs, >= {MIN_WARMUP} warm-up and >= "
              f"{SHAPE_DEFAULTS[a.shape]['steps']} timed steps"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        recipe = load_recipe(mmfw_recipe(s, batch=a.batch_size, device=a.device,
                                         precision=a.precision, threads=a.threads,
                                         out_dir=str(folder / "parent"),
                                         train_images=a.batches * a.batch_size),
                             overrides=a.mmfw_set)
        trainer = Trainer(recipe, overwrite=True, console=lambda _msg: None)
        data = render(trainer, s, a.batches, a.batch_size)
        params = check_params(s, trainer, data, folder)
        backend = recipe.backend.options
        math_sdpa = a.device == "cpu" and getattr(backend, "sdpa", "auto") == "math"
        trainer.release()
        del trainer
        data_file = folder / "batches.pt"
        torch.save(data, data_file)
        print(f"batch {a.batch_size}, {a.precision}, {a.device}; {a.batches} pre-built "
              f"batches; tokens a caption: {data['mean_real_tokens']:.1f} real, "
              f"{data['mean_batch_longest']:.1f} padded to each batch's longest, "
              f"{s.context_length} context; longest caption {data['longest']} "
              f"(setup {time.perf_counter() - t0:.1f} s)")
        base = {"shape": asdict(s), "batch": a.batch_size, "device": a.device,
                "precision": a.precision, "threads": a.threads, "warmup": a.warmup,
                "steps": a.steps, "kernel_steps": a.kernel_steps, "grad_clip": a.grad_clip,
                "mmfw_set": a.mmfw_set, "math_sdpa": math_sdpa, "data_file": str(data_file),
                "profile_rows": 0, "profile_shapes": a.profile_shapes, "peak_n": a.peak_n,
                "open_clip_malloc_kept": a.open_clip_malloc_kept}

        def spec(side: str, regime: str, tag: str, **over: Any) -> dict[str, Any]:
            work = folder / tag
            work.mkdir(exist_ok=True)
            return {**base, "side": side, "regime": regime, "workdir": str(work),
                    "settings": regime_settings(regime, data["longest"], oc_block), **over}

        peaks = [run_worker({**base, "side": "peak"}, folder, "peak0")]
        oc_block, probe = a.oc_block, {}
        if "B" in a.regimes and oc_block == "auto":
            # ABBA too (default, custom, custom, default, ...): the mean of each one's p50s
            order = [("default", "custom")[(k + k // 2) % 2] for k in range(2 * a.probe_rounds)]
            times: dict[str, list[float]] = {"default": [], "custom": []}
            for k, block in enumerate(order):
                oc_block = block
                tag = f"probe-{block}-{k}"
                r = run_worker(spec("open_clip", "B", tag, steps=a.probe_steps, kernel_steps=0),
                               folder, tag)
                times[block].append(percentile(r["step_s"], 50))
            probe = {b: sum(v) / len(v) for b, v in times.items()}
            oc_block = min(probe, key=probe.get)
            print(f"open_clip block type for regime B: {oc_block} (probe p50 ms, mean of "
                  f"{a.probe_rounds}: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in
                                                    probe.items()) + ")")
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            r: {"mmfw": [], "open_clip": []} for r in a.regimes}
        for p in range(a.pairs):
            order = ("mmfw", "open_clip") if p % 2 == 0 else ("open_clip", "mmfw")
            for regime in a.regimes:
                for side in order:
                    tag = f"{regime}-{p}-{side}"
                    rows = a.profile_rows if (a.profile and p == 0) else 0
                    r = run_worker(spec(side, regime, tag, profile_rows=rows), folder, tag)
                    runs[regime][side].append(r)
                    if r.get("top_ops"):
                        print(f"\nregime {regime}, {side}: top operators over "
                              f"{a.kernel_steps} steps\n{r['top_ops']}")
                m, o = runs[regime]["mmfw"][-1], runs[regime]["open_clip"][-1]
                print(f"pair {p + 1}/{a.pairs} regime {regime} ({'-'.join(order)}): "
                      f"mmfw p50 {1e3 * percentile(m['step_s'], 50):.1f} ms, open_clip "
                      f"{1e3 * percentile(o['step_s'], 50):.1f} ms", flush=True)
        peaks.append(run_worker({**base, "side": "peak"}, folder, "peak1"))
    peak = max(peaks, key=lambda x: x["flops_per_s"])
    for res in runs.values():
        for results in res.values():
            for r in results:
                r["step_s_p50"] = percentile(r["step_s"], 50)
    summary = summarise(a, runs, peak["flops_per_s"])
    report(summary, peak, a.quick)
    header["machine_end"] = record.machine()  # the load average after the runs
    result = {**header, "versions": versions(), "protocol_grade": a.protocol_grade,
              "quick": a.quick,
              "args": {k: v for k, v in vars(a).items() if k != "worker"},
              "command": " ".join(["python", "benchmarks/train_throughput.py", *argv]),
              "shape": asdict(s), "params": params,
              "tokens_per_caption": {"real": data["mean_real_tokens"],
                                     "batch_longest": data["mean_batch_longest"],
                                     "context": s.context_length, "longest": data["longest"]},
              "step_time": "time between consecutive batch requests of each side's own "
                           "training loop (device-synced on CUDA)",
              "oc_block_b": oc_block, "oc_block_probe_p50_s": probe,
              "matmul_peak": peaks, "regimes": summary,
              "raw": {r: {side: [{k: v for k, v in x.items() if k != "top_ops"}
                                 for x in res] for side, res in sides.items()}
                      for r, sides in runs.items()}}
    record.write(a.json or HERE / "results" / (
        f"train_throughput_{a.shape}_{a.device}_{a.precision}{'_quick' if a.quick else ''}"
        ".json"), result)


if __name__ == "__main__":
    main()
