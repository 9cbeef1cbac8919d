"""Training samples/s of mmfw and open_clip on the same model, data and precision (not a test).

Both sides train the same ViT + text transformer (width, depth, heads, MLP ratio, patch size,
image size, context length, vocabulary, embedding width) on the same pre-rendered batches of
mmfw's ``synthetic`` dataset, in one process, measured in alternating rounds after a warm-up so
background load hits both alike. Peak memory is measured per side in a fresh subprocess.

mmfw side: the model comes from a recipe dict through ``mmfw.train.loop.Trainer`` (scratch-vision,
scratch-text, linear adapters, infonce, the engine's AdamW) and each step is the engine's own
``Trainer.run_step``. open_clip side: ``open_clip.CLIP`` with matching
``CLIPVisionCfg`` / ``CLIPTextCfg``, ``open_clip.loss.ClipLoss``, AdamW with open_clip_train's
parameter groups, and open_clip_train's step (``train_one_epoch``, accum_freq 1): scheduler,
zero_grad, autocast forward + loss, backward, optimizer step, logit-scale clamp.

``--variant`` adds a third side in the same rounds: mmfw with a change applied on top of the
shipped plugins (a recipe setting, a module transform or different inputs), so a change's gain
is measured against shipped mmfw under the same load.

    python benchmarks/train_throughput.py --threads 1
    python benchmarks/train_throughput.py --threads 1 --precision bf16
    python benchmarks/train_throughput.py --threads 1 --variant longest
    python benchmarks/train_throughput.py --threads 1 --profile --precision bf16 --variant sdpa-auto
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import record  # benchmarks/record.py
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
LR, WD, BETAS, EPS, WARMUP = 5e-4, 0.1, (0.9, 0.98), 1e-6, 100


@dataclass(frozen=True)
class Shape:
    """The model both frameworks build."""

    image_size: int
    patch_size: int
    width: int
    heads: int
    mlp_ratio: float
    vision_depth: int
    text_depth: int
    context_length: int
    vocab_size: int
    embed_dim: int


def shape_of(a: argparse.Namespace) -> Shape:
    return Shape(a.image_size, a.patch_size, a.width, a.heads, a.mlp_ratio, a.vision_depth,
                 a.text_depth, a.context_length, a.vocab_size, a.embed_dim)


# ------------------------------------------------------------------------------------------
# mmfw side

VARIANTS = {
    "longest": "tokens padded to the batch's longest caption: what mmfw's tokenizer does in a "
               "real run (identical inputs otherwise)",
    "compile": "torch.compile of the DualEncoder (nn.Module.compile)",
    "channels-last": "patch-embedding conv and pixels in channels_last",
    "sdpa-auto": "the cpu backend's sdpa = \"auto\": torch's own attention kernel under bf16 "
                 "(flash), as before the backend chose the math kernel (bf16 only)",
    "padded": "scratch-text's unpad = false: norms, projections and MLP on every position, "
              "padding included (as open_clip and mmfw before unpadding compute them)",
}
# Measured here, now in the plugins: text-attn (scratch-text's layers with timm's attention
# layout, mmfw_encoders/attention.py) and math-sdpa (SDPA's math kernel in the cpu backend's
# bf16 autocast, its sdpa = "math" default).


def mmfw_recipe(a: argparse.Namespace, out_dir: str, variants: tuple[str, ...] = ()
                ) -> dict[str, Any]:
    s = shape_of(a)
    if a.device == "cpu":
        backend = {"name": "cpu", "threads": a.threads, "precision": a.precision}
        if "sdpa-auto" in variants:
            backend["sdpa"] = "auto"
    else:
        backend = {"name": "cuda", "precision": a.precision}
    return {
        "run": {"name": "bench", "output_dir": out_dir, "seed": 0, "progress": False},
        "backend": backend,
        "data": {"dataset": "synthetic", "train_images": a.batches * a.batch_size,
                 "val_images": 0, "test_images": 0, "captions_per_image": 5,
                 "image_size": s.image_size},
        "sampler": {"name": "random", "batch_size": a.batch_size},
        "model": {
            "embed_dim": s.embed_dim,
            "vision": {"name": "scratch-vision", "image_size": s.image_size,
                       "patch_size": s.patch_size, "width": s.width, "depth": s.vision_depth,
                       "heads": s.heads, "mlp_ratio": s.mlp_ratio, "pooling": "mean"},
            "text": {"name": "scratch-text", "vocab_size": s.vocab_size,
                     "max_length": s.context_length, "width": s.width, "depth": s.text_depth,
                     "heads": s.heads, "mlp_ratio": s.mlp_ratio, "pooling": "mean",
                     "unpad": "padded" not in variants},
            "adapter": {"name": "linear"},
        },
        "loss": {"name": "infonce", "temperature": 0.07, "learn_temperature": True},
        "optim": {"lr": LR, "weight_decay": WD, "betas": list(BETAS), "eps": EPS,
                  "grad_clip": a.grad_clip},
        "schedule": {"name": "warmup-cosine", "warmup_steps": WARMUP},
        "eval": {"val_split": ""},
    }


def make_trainer(a: argparse.Namespace, out_dir: str, variants: tuple[str, ...] = ()) -> Any:
    from mmfw.config.recipe import load_recipe
    from mmfw.train.loop import Trainer

    trainer = Trainer(load_recipe(mmfw_recipe(a, out_dir, variants)), overwrite=True,
                      console=lambda _msg: None)
    if "channels-last" in variants:
        trainer.model.vision.to(memory_format=torch.channels_last)
    if "compile" in variants:
        trainer.model.compile()
    trainer.model.train()
    trainer.opt.losses.train()  # as Trainer.fit does
    return trainer


class MmfwSide:
    """A Trainer stepped the way ``Trainer.fit`` steps it (its logging rows aside)."""

    def __init__(self, a: argparse.Namespace, out_dir: str, variants: tuple[str, ...] = ()
                 ) -> None:
        self.variants = variants
        self.name = "mmfw" + "".join(f"+{v}" for v in variants)
        self.trainer = make_trainer(a, out_dir, variants)
        self.batches: list[Any] = []

    def feed(self, r: Rendered) -> None:
        from mmfw.data.batching import Batch

        fmt = torch.channels_last if "channels-last" in self.variants else torch.contiguous_format
        tokens = r.tokens_longest if "longest" in self.variants else r.tokens_context
        self.batches = [Batch(p.contiguous(memory_format=fmt), t, i, j) for p, t, i, j in
                        zip(r.pixels, tokens, r.image_ids, r.text_ids, strict=True)]

    def run_step(self, k: int, clock: PhaseClock | None = None) -> None:
        self.trainer.run_step(self.batches[k])

    def param_counts(self) -> dict[str, int]:
        m = self.trainer.model
        return {"vision": _n(m.vision) + _n(m.vision_adapter),
                "text": _n(m.text) + _n(m.text_adapter),
                "loss": _n(self.trainer.opt.losses),
                "total": _n(m) + _n(self.trainer.opt.losses)}

    def instrument(self, clock: PhaseClock) -> None:
        """Marks on the engine's real step: hooks on its modules and optimizer, a
        pass-through wrapper of ``optimizer.zero_grad``, and a callback on the
        after-backward event (the run's own callbacks, diagnostics among them, still run)."""
        t = self.trainer
        m = t.model
        self._handles = [
            m.register_forward_pre_hook(lambda *_: clock.mark("to device")),
            m.vision_adapter.register_forward_hook(lambda *_: clock.mark("forward vision")),
            m.register_forward_hook(lambda *_: clock.mark("forward text")),
            t.opt.loss.register_forward_hook(lambda *_: clock.mark("loss")),
        ]
        opt = t.opt.optimizer
        zero_grad = opt.zero_grad

        def zero_grad_marked(set_to_none: bool = True) -> None:
            zero_grad(set_to_none)
            clock.mark("zero_grad")

        opt.zero_grad = zero_grad_marked

        class Marker:
            order = -1000  # before every other callback: the backward just ended

            def on_after_backward(self, ctx: Any, step: int) -> None:
                clock.mark("backward")

        t.callbacks.add("benchmark-marker", Marker())
        self._handles += [
            opt.register_step_pre_hook(lambda *_: clock.mark("diagnostics+clip")),
            opt.register_step_post_hook(lambda *_: clock.mark("optimizer")),
        ]

    def uninstrument(self) -> None:
        for h in self._handles:
            h.remove()
        del self.trainer.opt.optimizer.zero_grad  # back to the class's
        self.trainer.callbacks.remove("benchmark-marker")


def _n(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


class OpenClipSide:
    """open_clip's CLIP, loss, optimizer and step, configured as open_clip_train does."""

    name = "open_clip"

    def __init__(self, a: argparse.Namespace, pad_id: int, eos_id: int) -> None:
        import open_clip
        from open_clip.loss import ClipLoss
        from open_clip_train.precision import get_autocast
        from open_clip_train.scheduler import cosine_lr

        s = shape_of(a)
        self.device = torch.device(a.device)
        vision = open_clip.CLIPVisionCfg(
            layers=s.vision_depth, width=s.width, head_width=s.width // s.heads,
            mlp_ratio=s.mlp_ratio, patch_size=s.patch_size, image_size=s.image_size,
            pool_type="avg")  # mean of patch tokens, as mmfw's pooling = "mean"
        text = open_clip.CLIPTextCfg(
            context_length=s.context_length, vocab_size=s.vocab_size, width=s.width,
            heads=s.heads, layers=s.text_depth, mlp_ratio=s.mlp_ratio, pad_id=pad_id,
            eos_id=eos_id, pool_type="eos")  # the [SEP] token: argmax needs CLIP's BPE ids
        # open_clip_train: create_model_and_transforms(..., output_dict=True); amp keeps fp32
        # weights (cast_dtype None), as does mmfw.
        self.model = open_clip.CLIP(s.embed_dim, vision, text, output_dict=True).to(self.device)
        self.model.train()
        self.loss = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True,
                             rank=0, world_size=1)
        # open_clip_train/main.py: parameter groups and AdamW (default implementation)
        def exclude(n: str, p: torch.Tensor) -> bool:
            return (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                    or "logit_scale" in n)

        named = list(self.model.named_parameters())
        gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
        rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": gain_or_bias, "weight_decay": 0.0},
             {"params": rest, "weight_decay": WD}], lr=LR, betas=BETAS, eps=EPS)
        self.autocast = get_autocast("amp_bf16" if a.precision == "bf16" else "fp32",
                                     device_type=self.device.type)
        self.scaler = None  # open_clip_train uses a GradScaler only for fp16 "amp"
        self.grad_clip = a.grad_clip or None
        total = a.warmup + a.rounds * a.steps
        self.scheduler = cosine_lr(self.optimizer, LR, WARMUP, max(total, WARMUP + 1))
        self.step = 0
        self.marks: Callable[[str], None] | None = None  # phase clock (--profile)
        self.data: Rendered | None = None

    def feed(self, r: Rendered) -> None:
        self.data = r

    def run_step(self, k: int, clock: PhaseClock | None = None) -> None:
        self.train_step(self.data.pixels[k], self.data.input_ids[k])

    def param_counts(self) -> dict[str, int]:
        m = self.model
        return {"vision": _n(m.visual), "text": _n(m) - _n(m.visual) - m.logit_scale.numel(),
                "loss": m.logit_scale.numel(), "total": _n(m)}

    def instrument(self, clock: PhaseClock) -> None:
        self.marks = clock.mark
        self._hook = self.model.visual.register_forward_hook(
            lambda *_: clock.mark("forward vision"))

    def uninstrument(self) -> None:
        self.marks = None
        self._hook.remove()

    def _mark(self, name: str) -> None:
        if self.marks is not None:
            self.marks(name)

    def train_step(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """open_clip_train/train.py ``train_one_epoch`` for accum_freq == 1, logging aside."""
        self.scheduler(self.step)
        images = images.to(device=self.device, dtype=None, non_blocking=True)
        texts = texts.to(device=self.device, non_blocking=True)
        self._mark("to device")
        self.optimizer.zero_grad()
        self._mark("zero_grad")
        with self.autocast():
            model_out = self.model(images, texts)
            self._mark("forward text")  # the vision hook marks "forward vision" before it
            losses = self.loss(**model_out, output_dict=True)
            total_loss = sum(losses.values())
            losses["loss"] = total_loss
        self._mark("loss")
        total_loss.backward()
        self._mark("backward")
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, norm_type=2.0)
        self.optimizer.step()
        self._mark("optimizer")
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        self._mark("logit clamp")
        self.step += 1


# ------------------------------------------------------------------------------------------
# data: one fixed set of batches, rendered once, fed to every side


@dataclass
class Rendered:
    """Batches as plain tensors (they travel to the memory subprocesses through torch.save)."""

    pixels: list[torch.Tensor]
    input_ids: list[torch.Tensor]  # padded to context_length: what open_clip gets
    tokens_context: list[dict[str, torch.Tensor]]  # the same ids with their mask: mmfw's
    tokens_longest: list[dict[str, torch.Tensor]]  # as mmfw's tokenizer pads (variant)
    image_ids: list[torch.Tensor]
    text_ids: list[torch.Tensor]
    pad_id: int
    eos_id: int
    mean_tokens: float  # real (non-pad) tokens per caption
    mean_longest: float  # tokens per caption when padded to the batch's longest


def render(trainer: Any, a: argparse.Namespace) -> Rendered:
    """``a.batches`` batches of ``a.batch_size`` distinct images with one random caption each
    (as open_clip's datasets give them), collated by mmfw's own ``Collate``."""
    from mmfw.data.batching import Collate

    text = trainer.model.text
    tok = text.tokenizer
    pad_id, eos_id = tok.token_to_id("[PAD]"), tok.token_to_id("[SEP]")

    def to_context(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        extra = a.context_length - tokens["input_ids"].shape[1]
        return {"input_ids": F.pad(tokens["input_ids"], (0, extra), value=pad_id),
                "attention_mask": F.pad(tokens["attention_mask"], (0, extra), value=False)}

    collate = Collate(trainer.model.vision.preprocess, text.tokenize, trainer.pairs.items)
    pairs, cpi = trainer.pairs, 5
    rng = random.Random(0)
    out = Rendered([], [], [], [], [], [], pad_id, eos_id, 0.0, 0.0)
    n_tokens = n_longest = 0
    for b in range(a.batches):
        rows = []
        for i in range(b * a.batch_size, (b + 1) * a.batch_size):
            k = i * cpi + rng.randrange(cpi)
            assert pairs.index[k][0] == i
            rows.append(pairs[k])
        batch = collate(rows)
        padded = to_context(batch.tokens)
        out.pixels.append(batch.pixels)
        out.input_ids.append(padded["input_ids"])
        out.tokens_context.append(padded)
        out.tokens_longest.append(batch.tokens)
        out.image_ids.append(batch.image_ids)
        out.text_ids.append(batch.text_ids)
        n_tokens += int(batch.tokens["attention_mask"].sum())
        n_longest += batch.tokens["input_ids"].numel()
    out.mean_tokens = n_tokens / (a.batches * a.batch_size)
    out.mean_longest = n_longest / (a.batches * a.batch_size)
    return out


# ------------------------------------------------------------------------------------------
# measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """Steps one side through the batch list, cycling."""

    def __init__(self, side: Any, n_batches: int) -> None:
        self.side, self.n, self.k = side, n_batches, 0

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.side.run_step(self.k % self.n)
            self.k += 1


def interleaved(runners: dict[str, Runner], a: argparse.Namespace,
                device: torch.device) -> dict[str, list[float]]:
    """Samples/s per round and side; the order rotates every round (A B C, B C A, ...)."""
    for runner in runners.values():
        runner.run(a.warmup)
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for rnd in range(a.rounds):
        r = rnd % len(names)
        for name in names[r:] + names[:r]:
            sync(device)
            t0 = time.perf_counter()
            runners[name].run(a.steps)
            sync(device)
            rates[name].append(a.steps * a.batch_size / (time.perf_counter() - t0))
    return rates


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # kB


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ``getrusage().ru_maxrss``: on Linux that
    keeps the parent's peak across fork + exec, so every probe would report the parent's."""
    return _status_mb("VmHWM")


def build_side(a: argparse.Namespace, name: str, out_dir: str, r: Rendered | None) -> Any:
    if name == "open_clip":
        torch.manual_seed(0)
        side = OpenClipSide(a, r.pad_id, r.eos_id)
    else:
        variants = tuple(name.split("+")[1:])
        side = MmfwSide(a, out_dir, variants)
    if r is not None:
        side.feed(r)
    return side


def memory_probe(a: argparse.Namespace, name: str, data_file: str) -> dict[str, float]:
    """In a fresh process: build one side, train warm-up + steps, report peak memory."""
    r: Rendered = torch.load(data_file, weights_only=False)
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(build_side(a, name, tmp, r), len(r.pixels))
        sync(device)
        before = _status_mb("VmRSS")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            cuda_before = torch.cuda.memory_allocated(device) / 2**20
        runner.run(a.warmup + a.steps)
        sync(device)
        peak = peak_rss_mb()
        out = {"rss_before_training_mb": before, "peak_rss_mb": peak,
               "peak_rss_increase_mb": peak - before}
        if device.type == "cuda":
            out["cuda_allocated_before_mb"] = cuda_before
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure_memory(argv: list[str], names: list[str], data_file: str) -> dict[str, Any]:
    out = {}
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", name,
               "--data-file", data_file]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"memory probe for {name} failed:\n{proc.stderr[-3000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------------------
# profile: where one step's time goes


class PhaseClock:
    """Named time marks within a step; a phase is the time since the previous mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[list[tuple[str, float]]] = []
        self.current: list[tuple[str, float]] = []

    def start(self) -> None:
        sync(self.device)
        self.current = [("start", time.perf_counter())]

    def mark(self, name: str) -> None:
        sync(self.device)
        self.current.append((name, time.perf_counter()))

    def end(self) -> None:
        self.mark("rest")
        self.steps.append([(n, t - t0) for (n, t), (_, t0) in
                           zip(self.current[1:], self.current[:-1], strict=True)])

    def medians_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (name, _) in enumerate(self.steps[0]):
            out[name] = out.get(name, 0.0) + 1e3 * statistics.median(s[i][1] for s in self.steps)
        return out


def profile(a: argparse.Namespace, sides: dict[str, Any]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from mmfw.data.batching import Collate
    from mmfw.train.rows import train_row

    device = torch.device(a.device)
    mm = sides["mmfw"]
    n_batches = len(mm.batches)
    result: dict[str, Any] = {}

    # 1. outside the step: data (Collate in the main process, num_workers = 0) and the
    #    metrics row Trainer.fit writes every run.log_every steps
    t = mm.trainer
    collate = Collate(t.model.vision.preprocess, t.model.text.tokenize, t.data.pairs.items)
    rows = [t.data.pairs[k * 5] for k in range(a.batch_size)]
    collate_ms = 1e3 * statistics.median(_times(lambda: collate(rows), 5))
    out, img, txt, _ = t.run_step(mm.batches[0])
    log_ms = 1e3 * statistics.median(_times(lambda: train_row(
        step=1, epoch=0, output=out, image=img, text=txt, batch=mm.batches[0], lr=LR,
        samples_per_s=0.0, temperature=t.ctx.temperature(), stats=t.opt.stats, stage=None,
        accumulate=1, local_loss=False), 5))
    log_every = t.recipe.run.log_every

    # 2. phases by time marks, sides alternating step by step (no profiler: its per-op
    #    overhead would distort them)
    clocks = {name: PhaseClock(device) for name in sides}
    for name, side in sides.items():
        side.instrument(clocks[name])
    n_phase = 2 * a.profile_steps
    for k in range(a.warmup + n_phase):
        for name, side in sides.items():
            c = clocks[name]
            c.start()
            side.run_step(k % n_batches, c)
            c.end()
        if k == a.warmup - 1:
            for c in clocks.values():
                c.steps.clear()
    phases = {name: c.medians_ms() for name, c in clocks.items()}
    for side in sides.values():
        side.uninstrument()
    names = list(dict.fromkeys(n for p in phases.values() for n in p))
    print(f"\nwhere a step's time goes: median of {n_phase} steps, ms (batches pre-rendered)")
    print(f"{'phase':<18}" + "".join(f"{s:>{max(12, len(s) + 2)}}" for s in sides))
    for n in names:
        print(f"{n:<18}" + "".join(f"{_fmt_ms(phases[s].get(n)):>{max(12, len(s) + 2)}}"
                                   for s in sides))
    totals = {s: sum(p.values()) for s, p in phases.items()}
    print(f"{'step total':<18}" + "".join(f"{totals[s]:>{max(12, len(s) + 2)}.2f}"
                                          for s in sides))
    print(f"\noutside the step (Trainer.fit adds them):\n"
          f"  data: mmfw Collate of one batch in the main process (num_workers=0): "
          f"{collate_ms:.2f} ms\n"
          f"  metrics row every {log_every} steps (mmfw.train.rows.train_row): {log_ms:.2f} ms "
          f"= {log_ms / log_every:.2f} ms/step")
    result.update(phases_ms=phases, step_ms=totals, collate_ms=collate_ms, log_row_ms=log_ms,
                  log_every=log_every)

    # 3. operators (torch.profiler), each side on its own
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    result["top_ops"] = {}
    for name, side in sides.items():
        with torch_profile(activities=acts) as prof:
            for k in range(a.profile_steps):
                side.run_step(k % n_batches)
            sync(device)
        ka = prof.key_averages()
        print(f"\n{name}: top operators by self time over {a.profile_steps} steps")
        print(ka.table(sort_by=sort, row_limit=a.profile_rows, max_name_column_width=48))
        ranked = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:a.profile_rows]
        result["top_ops"][name] = [
            {"op": e.key, "calls": e.count,
             "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / a.profile_steps}
            for e in ranked]
    return result


def _times(fn: Callable[[], Any], n: int) -> list[float]:
    fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# ------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=16, help="rounds, the side order rotating")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps per side first (one "
                    "pass over the batches: torch.compile sees every shape before timing)")
    ap.add_argument("--batches", type=int, default=8, help="distinct pre-rendered batches")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="on every side (0: off)")
    g = ap.add_argument_group("model (every side; defaults: recipes/quickstart.toml)")
    g.add_argument("--image-size", type=int, default=48)
    g.add_argument("--patch-size", type=int, default=8)
    g.add_argument("--width", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--mlp-ratio", type=float, default=2.0)
    g.add_argument("--vision-depth", type=int, default=4)
    g.add_argument("--text-depth", type=int, default=3)
    g.add_argument("--context-length", type=int, default=48)
    g.add_argument("--vocab-size", type=int, default=2000)
    g.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--variant", nargs="+", default=[], choices=tuple(VARIANTS),
                    help="also measure, in the same rounds, an mmfw side with these changes "
                         "combined: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--profile", action="store_true",
                    help="profile instead: phases of a step and top operators, every side")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--json", default=None, help="result file (default: benchmarks/results/"
                    "train_throughput_<device>_<precision>[_profile][_<variant>...].json)")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.profile and "compile" in a.variant:
        ap.error("--profile with the compile variant: the phase marks would break its graph")
    if "sdpa-auto" in a.variant and (a.device, a.precision) != ("cpu", "bf16"):
        ap.error("the sdpa-auto variant is the cpu backend's bf16 setting: --precision bf16 on cpu")
    return a


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_probe:
        print(json.dumps(memory_probe(a, a.memory_probe, a.data_file)))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if importlib.util.find_spec("open_clip") is None or \
            importlib.util.find_spec("open_clip_train") is None:
        raise SystemExit("the peer is not installed: pip install -e \".[bench]\" "
                         "(open-clip-torch, with open_clip and open_clip_train)")
    device = torch.device(a.device)
    names = ["mmfw", "open_clip"] + (["mmfw+" + "+".join(a.variant)] if a.variant else [])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        first = MmfwSide(a, str(Path(tmp) / "mmfw"))
        r = render(first.trainer, a)
        first.feed(r)
        sides = {"mmfw": first}
        for name in names[1:]:
            sides[name] = build_side(a, name, str(Path(tmp) / name.replace("+", "_")), r)
        setup_s = time.perf_counter() - t0
        header = record.new_result()  # the date and the machine, read once
        info = header["machine"]
        params = {name: side.param_counts() for name, side in sides.items()}
        print(f"machine: {info['cpu']}, {info['nproc']} cores, torch {info['torch']}, "
              f"open_clip {info.get('open_clip')}, threads {torch.get_num_threads()}, "
              f"load {' '.join(info.get('loadavg', []))}")
        print(f"model: {json.dumps(asdict(shape_of(a)))}")
        for name, p in params.items():
            print(f"params {name:<10} {p}")
        print(f"batch {a.batch_size}, {a.precision}, {a.device}; {a.batches} pre-rendered "
              f"batches; tokens per caption: {r.mean_tokens:.1f} real, {a.context_length} as "
              f"fed (context length), {r.mean_longest:.1f} padded to each batch's longest "
              f"(setup {setup_s:.1f}s)")
        for v in a.variant:
            print(f"variant {v}: {VARIANTS[v]}")
        result: dict[str, Any] = {
            **header, "args": vars(a),
            "model": asdict(shape_of(a)), "params": params,
            "tokens_per_caption": {"real": r.mean_tokens, "context": a.context_length,
                                   "longest_in_batch": r.mean_longest},
            "command": " ".join(["python", "benchmarks/train_throughput.py", *argv])}
        if a.profile:
            result["profile"] = profile(a, sides)
        else:
            runners = {name: Runner(side, a.batches) for name, side in sides.items()}
            rates = interleaved(runners, a, device)
            result.update(summarise(rates))
            if not a.no_memory:
                data_file = str(Path(tmp) / "batches.pt")
                torch.save(r, data_file)
                result["memory"] = measure_memory(argv, names, data_file)
            report(a, result)
    record.write(a.json or HERE / "results" / (
        f"train_throughput_{a.device}_{a.precision}{'_profile' if a.profile else ''}"
        f"{''.join('_' + v for v in a.variant)}.json"), result)


def summarise(rates: dict[str, list[float]]) -> dict[str, Any]:
    """Medians, and ratios two ways: of the medians, and the median of per-round ratios (the
    sides of one round ran back to back, so a round's ratio is least touched by load drift)."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = {}
    for num, den in [(n, "open_clip") for n in rates if n != "open_clip"] + [
            (n, "mmfw") for n in rates if n.startswith("mmfw+")]:
        paired = [x / y for x, y in zip(rates[num], rates[den], strict=True)]
        ratios[f"{num} / {den}"] = {"ratio_of_medians": med[num] / med[den],
                                    "median_paired_ratio": statistics.median(paired),
                                    "paired_min": min(paired), "paired_max": max(paired)}
    return {"samples_per_s": rates, "median_samples_per_s": med, "ratios": ratios}


def report(a: argparse.Namespace, res: dict[str, Any]) -> None:
    rates, med = res["samples_per_s"], res["median_samples_per_s"]
    print(f"\n{a.rounds} rounds x {a.steps} steps per side, order rotating, after {a.warmup} "
          f"warm-up steps (samples/s)")
    w = max(10, *(len(n) for n in rates))
    print(f"{'side':<{w}} {'median':>8} {'min':>8} {'max':>8}   per round")
    for name, v in rates.items():
        print(f"{name:<{w}} {med[name]:>8.1f} {min(v):>8.1f} {max(v):>8.1f}   "
              + " ".join(f"{x:.0f}" for x in v))
    print(f"\n{'ratio':<{w + 13}} {'per-round median':>16} {'(min..max)':>14} "
          f"{'of medians':>11}")
    for key, r in res["ratios"].items():
        spread = f"({r['paired_min']:.2f}..{r['paired_max']:.2f})"
        print(f"{key:<{w + 13}} {r['median_paired_ratio']:>16.3f} {spread:>14} "
              f"{r['ratio_of_medians']:>11.3f}")
    mem = res.get("memory")
    if mem:
        cuda = "cuda_max_allocated_mb" in next(iter(mem.values()))
        print("\npeak memory, one fresh process per side, MiB" +
              (" (CUDA max allocated)" if cuda else " (RSS: VmHWM)"))
        print(f"{'side':<{w}} {'before':>9} {'peak':>9} {'increase':>9}")
        for name, m in mem.items():
            if cuda:
                b, p = m["cuda_allocated_before_mb"], m["cuda_max_allocated_mb"]
            else:
                b, p = m["rss_before_training_mb"], m["peak_rss_mb"]
            print(f"{name:<{w}} {b:>9.1f} {p:>9.1f} {p - b:>9.1f}")


if __name__ == "__main__":
    main()
