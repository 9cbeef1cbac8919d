"""The training engine: one recipe in, one run directory out."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .batching import Collate, Pairs
from .errors import MmfwError, ResumeError
from .evaluation import evaluate_split
from .model import DualEncoder, build_model
from .plots import training_plot
from .recipe import Recipe, load_recipe
from .registry import create

#: recipe keys that may change between a run and its resumption (run length only)
RESUMABLE_CHANGES = ("run.epochs", "run.max_steps", "run.max_minutes", "run.progress",
                     "run.log_every")

RECIPE_FILE = "recipe.toml"
METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
CHECKPOINTS = "checkpoints"


@attrs.frozen
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    steps: int
    seconds: float
    stopped_by: str  # "epochs", "max_steps" or "max_minutes"


def run_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.run.output_dir) / recipe.run.name


def _param_groups(model: nn.Module, loss: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on gains, biases, scalars (open_clip's rule: ndim < 2)."""
    decay, no_decay = [], []
    for module in (model, loss):
        for _, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _optimizer(params: list[dict], recipe: Recipe, device: torch.device) -> torch.optim.AdamW:
    o = recipe.optim
    kwargs = dict(lr=o.lr, betas=o.betas, eps=o.eps)
    try:  # fused AdamW: one kernel for all parameters, on CPU and CUDA alike
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


class _Console:
    def __init__(self, out: Callable[[str], None] | None) -> None:
        self.out = out if out is not None else (lambda s: print(s, flush=True))

    def __call__(self, msg: str) -> None:
        self.out(msg)


@torch.no_grad()
def similarity_stats(image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor,
                     text_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cosine similarity of positives vs negatives in the batch (the seeds' collapse signal)."""
    v = torch.nn.functional.normalize(image.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    sim = v @ t.T
    pos = image_ids[:, None] == text_ids[None, :]
    pos_mean = (sim * pos).sum() / pos.sum().clamp_min(1)
    neg_mean = (sim * ~pos).sum() / (~pos).sum().clamp_min(1)
    return {"sim/pos_mean": pos_mean, "sim/neg_mean": neg_mean, "sim/gap": pos_mean - neg_mean,
            "sim/std": sim.std()}


class Trainer:
    """Holds everything a run needs; ``fit`` trains, ``final_eval`` writes metrics.json."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                 console: Callable[[str], None] | None = None) -> None:
        self.recipe, self.say = recipe, _Console(console)
        self.run_dir = run_dir_of(recipe)
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        self._prepare_run_dir(resume, overwrite)

        r = recipe
        self.backend = create("backend", r.backend.name, options=r.backend.options)
        if not self.backend.available():
            raise MmfwError(f"backend '{r.backend.name}' is not available on this machine "
                            "(set backend.name = \"auto\" to pick what is)")
        self.device = self.backend.device
        self.backend.seed(r.run.seed)

        t0 = time.perf_counter()
        self.source = create("dataset", r.data.dataset.name, options=r.data.dataset.options)
        self.train_split = self.source.split(r.data.train_split)
        self.pairs = Pairs(self.train_split)
        self.say(f"data: {r.data.dataset.name} '{r.data.train_split}' split, "
                 f"{len(self.train_split)} images, {len(self.pairs)} pairs "
                 f"({time.perf_counter() - t0:.1f}s)")

        self.model: DualEncoder = build_model(r.model)
        if resume and self.start_step:
            self.model.load_assets(self.run_dir)
        else:
            for enc in (self.model.vision, self.model.text):
                if callable(getattr(enc, "prepare", None)):
                    enc.prepare(self.pairs.texts())
            self.model.save_assets(self.run_dir)
        self.loss: nn.Module = create("loss", r.loss.name, options=r.loss.options)
        self.model.to(self.device)
        self.loss.to(self.device)

        self.sampler = create("sampler", r.sampler.plugin.name, options=r.sampler.plugin.options,
                              match_ids=self.pairs.items, batch_size=r.sampler.batch_size,
                              seed=r.run.seed, drop_last=r.sampler.drop_last)
        if len(self.sampler) == 0:
            raise MmfwError(f"the training split has {len(self.pairs)} pairs, fewer than one "
                            f"batch of {r.sampler.batch_size}: lower sampler.batch_size or set "
                            "sampler.drop_last = false")
        self.loader = DataLoader(
            self.pairs, batch_sampler=self.sampler,
            collate_fn=Collate(self.model.vision.preprocess, self.model.text.tokenize,
                               self.sampler.match_ids),
            num_workers=r.data.num_workers, persistent_workers=r.data.num_workers > 0,
            pin_memory=self.device.type == "cuda",
        )
        self.steps_per_epoch = len(self.sampler)
        total = r.run.epochs * self.steps_per_epoch
        self.total_steps = min(total, r.run.max_steps) if r.run.max_steps else total
        self.scheduler = create("scheduler", r.schedule.name, options=r.schedule.options,
                                total_steps=self.total_steps)
        self.optimizer = _optimizer(_param_groups(self.model, self.loss, r.optim.weight_decay),
                                    r, self.device)
        self.scaler = self.backend.grad_scaler()
        self.step, self.epoch = 0, 0
        self.eval_history: list[dict[str, Any]] = []
        if resume and self.start_step:
            self._restore(self.start_step)

    # run directory -------------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        d, r = self.run_dir, self.recipe
        self.start_step = None
        existing = d.is_dir() and any(d.iterdir())
        if resume:
            self.start_step = ckpt.latest(self.ckpt_dir)
            if self.start_step is None:
                raise ResumeError(f"nothing to resume in {d}: no checkpoint found "
                                  f"(run without --resume to start it)")
            old = load_recipe(d / RECIPE_FILE)
            if old.digest(RESUMABLE_CHANGES) != r.digest(RESUMABLE_CHANGES):
                diff = _diff(old.to_dict(), r.to_dict())
                raise ResumeError(
                    f"the recipe differs from the one {d} was started with, in more than run "
                    f"length:\n  " + "\n  ".join(diff[:10]) +
                    "\nResume with the original recipe, or start a new run (--set run.name=...)"
                )
        elif existing:
            if not overwrite:
                raise MmfwError(
                    f"run directory {d} already exists. Use --resume to continue it, "
                    f"--overwrite to start it again, or --set run.name=<new name>"
                )
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_text(d / RECIPE_FILE, r.to_toml())

    def _log(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop rows a killed run logged after the checkpoint it resumes from."""
        path = self.run_dir / METRICS_JSONL
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
            ckpt.atomic_text(path, "".join(ln + "\n" for ln in keep))

    # checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        if ckpt.latest(self.ckpt_dir) == self.step:
            return
        state = {"epoch": self.epoch, "sampler": self._sampler_state(),
                 "eval_history": self.eval_history, "recipe": self.recipe.digest()}
        ckpt.save(self.ckpt_dir, self.step, model=self.model, loss=self.loss,
                  optimizer=self.optimizer, state=state)

    def _sampler_state(self) -> dict[str, Any] | None:
        fn = getattr(self.sampler, "state_dict", None)
        if not callable(fn):
            return None
        # DataLoader workers draw batches ahead of training: the position that counts is the
        # number of batches trained on in this epoch, not how far the sampler has been read.
        return {**fn(), "epoch": self.epoch,
                "position": self.step - self.epoch * self.steps_per_epoch}

    def _restore(self, step: int) -> None:
        ckpt.load_weights(self.ckpt_dir, step, self.model, self.loss)
        state = ckpt.load_state(self.ckpt_dir, step)
        ckpt.load_training(self.ckpt_dir, step, self.optimizer, state)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.eval_history = list(state.get("eval_history", []))
        self._truncate_log(self.step)
        if state.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])
        self.say(f"resumed {self.run_dir} at step {self.step} (epoch {self.epoch})")

    # training ------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = self.recipe.optim.lr * self.scheduler.lr_factor(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr

    def _temperature(self) -> float | None:
        t = getattr(self.loss, "temperature", None)
        v = getattr(t, "value", None)
        return float(v) if isinstance(v, (int, float)) else None

    def train_step(self, batch: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        batch = batch.to(self.device)
        with self.backend.autocast():
            img, txt = self.model(batch.pixels, batch.tokens)
            out = self.loss(img, txt, image_ids=batch.image_ids, text_ids=batch.text_ids,
                            step=self.step, epoch=self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.recipe.optim.grad_clip
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._after_backward()
            if clip:
                nn.utils.clip_grad_norm_(self._params(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            out.loss.backward()
            self._after_backward()
            if clip:
                nn.utils.clip_grad_norm_(self._params(), clip)
            self.optimizer.step()
        return out, img.detach(), txt.detach()

    def _after_backward(self) -> None:
        """Gradients are final and unscaled here, not yet clipped: diagnostics read them."""

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def fit(self) -> str:
        """Train until epochs, max_steps or max_minutes; returns which one stopped it."""
        r = self.recipe.run
        bar = _progress(self.total_steps, self.step, r.progress)
        deadline = time.perf_counter() + r.max_minutes * 60 if r.max_minutes else math.inf
        t_log, n_log = time.perf_counter(), 0
        self.say(f"training: {self.total_steps} steps ({r.epochs} epochs x "
                 f"{self.steps_per_epoch}), batch {self.recipe.sampler.batch_size}, "
                 f"{self.backend.describe()}")
        self.model.train()
        self.loss.train()
        stop = None
        while stop is None and self.epoch < r.epochs:
            self.sampler.set_epoch(self.epoch)
            for batch in self.loader:
                lr = self._set_lr()
                out, img, txt = self.train_step(batch)
                self.step += 1
                n_log += len(batch)
                if self.step % r.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    row = self._train_row(out, img, txt, batch, lr, n_log / (now - t_log))
                    t_log, n_log = now, 0
                    self._log(row)
                    self._show(bar, row)
                if bar is not None:
                    bar.update(1)
                if self.step >= self.total_steps:
                    stop = "max_steps"
                elif time.perf_counter() > deadline:
                    stop = "max_minutes"
                if stop:
                    break
            if self.step >= (self.epoch + 1) * self.steps_per_epoch:
                self.epoch += 1
                self._end_of_epoch()
                t_log, n_log = time.perf_counter(), 0  # evaluation time is not training speed
        if bar is not None:
            bar.close()
        self.save()
        return "epochs" if self.epoch >= r.epochs else stop or "epochs"

    def _end_of_epoch(self) -> None:
        e = self.recipe.eval
        if e.val_split and self.epoch % e.every_epochs == 0 and e.val_split in self.source.splits:
            self.validate()
        self.save()

    def validate(self) -> dict[str, float]:
        e = self.recipe.eval
        metrics = self.evaluate(e.val_split)
        row = {"type": "eval", "split": e.val_split, "step": self.step, "epoch": self.epoch,
               **metrics}
        self.eval_history.append(row)
        self._log(row)
        self.say(f"eval {e.val_split} @ epoch {self.epoch}: " + _fmt(metrics))
        self.model.train()
        return metrics

    def evaluate(self, split: str) -> dict[str, float]:
        e = self.recipe.eval
        return evaluate_split(self.model, self.source.split(split), batch_size=e.batch_size,
                              device=self.device, autocast=self.backend.autocast,
                              max_images=e.max_images)

    def _train_row(self, out: Any, img: torch.Tensor, txt: torch.Tensor, batch: Any, lr: float,
                   samples_per_s: float) -> dict[str, Any]:
        stats = similarity_stats(img, txt, batch.image_ids.to(img.device),
                                 batch.text_ids.to(img.device))
        row: dict[str, Any] = {"type": "train", "step": self.step, "epoch": self.epoch,
                               "loss": float(out.loss.detach())}
        row.update({f"loss/{k}": float(v) for k, v in out.terms.items()})
        row.update({"lr": lr, "samples_per_s": samples_per_s})
        t = self._temperature()
        if t is not None:
            row["temperature"] = t
        row.update({k: float(v) for k, v in stats.items()})
        return row

    def _show(self, bar: Any, row: dict[str, Any]) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                            sps=f"{row['samples_per_s']:.0f}", refresh=False)
        else:
            self.say(f"step {row['step']}/{self.total_steps} loss {row['loss']:.4f} "
                     f"lr {row['lr']:.2e} {row['samples_per_s']:.0f} samples/s "
                     f"sim gap {row['sim/gap']:.3f}")

    def final_eval(self) -> dict[str, float]:
        split = self.recipe.eval.split
        metrics = self.evaluate(split)
        ckpt.atomic_text(self.run_dir / METRICS_JSON, json.dumps(metrics, indent=2))
        self._log({"type": "eval", "split": split, "step": self.step, "epoch": self.epoch,
                   "final": True, **metrics})
        training_plot(self.run_dir / METRICS_JSONL, self.run_dir / "plots" / "training.png")
        return metrics


def _progress(total: int, start: int, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1f}" for k, v in metrics.items())


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(_diff(va, vb, key + "."))
        elif va != vb and key not in RESUMABLE_CHANGES:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def train(recipe: Recipe | str | Path, *, resume: bool = False, overwrite: bool = False,
          console: Callable[[str], None] | None = None) -> RunResult:
    """Train a recipe into its run directory and evaluate it; see DESIGN.md for the layout."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    t0 = time.perf_counter()
    trainer = Trainer(recipe, resume=resume, overwrite=overwrite, console=console)
    stopped_by = trainer.fit()
    metrics = trainer.final_eval()
    seconds = time.perf_counter() - t0
    trainer.say(f"final {recipe.eval.split}: " + _fmt(metrics))
    trainer.say(f"run directory: {trainer.run_dir} ({seconds:.0f}s, {trainer.step} steps, "
                f"stopped by {stopped_by})")
    return RunResult(trainer.run_dir, metrics, trainer.step, seconds, stopped_by)
