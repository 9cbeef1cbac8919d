"""The training engine: one recipe in, one run directory out."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed, sharding
from .augment import Mixer, mix_targets
from .batching import Batch
from .contracts import StagePlan
from .datasource import TrainingData
from .diagnostics import Diagnostics
from .errors import MmfwError, RecipeError, ResumeError
from .evaluation import evaluate_split
from .gradcache import gradcache_step, naive_step
from .model import DualEncoder, Match, build_model, fused_forward, fusion_of
from .params import ParamTable, balance_towers, lr_multipliers
from .plots import run_plots
from .recipe import Recipe, load_recipe
from .registry import create

#: recipe keys that may change between a run and its resumption (run length only)
RESUMABLE_CHANGES = ("run.epochs", "run.max_steps", "run.max_minutes", "run.progress",
                     "run.log_every", "run.keep_last", "run.checkpoint_every",
                     # how the work is shared never changes the checkpoint format
                     "distributed.strategy", "distributed.local_loss", "distributed.fsdp_units",
                     "distributed.reshard_after_forward", "distributed.timeout_minutes")

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
    stopped_by: str  # "epochs", "max_steps", "max_minutes", "collapse", "early_stopping",
    #                  or "ensemble" (then ``members`` holds each seed's result)
    members: tuple[RunResult, ...] = ()


class Step(NamedTuple):
    """What :meth:`Trainer.run_step` gives back: the loss output, the batch's embeddings
    (detached) and the learning rate the step ran at."""

    output: Any
    image: torch.Tensor
    text: torch.Tensor
    lr: float


def run_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.run.output_dir) / recipe.run.name


class LossBank(nn.Module):
    """The recipe's ``[loss]`` and the losses a staged schedule names, built before training so
    all their parameters are in the optimizer and all their state in the checkpoint."""

    def __init__(self, default: nn.Module, stages: dict[str, nn.Module]) -> None:
        super().__init__()
        self.default = default
        self.stages = nn.ModuleDict(stages)


def _stage_losses(scheduler: Any, device: torch.device) -> dict[str, nn.Module]:
    fn = getattr(scheduler, "losses", None)
    specs = fn() if callable(fn) else {}
    return {label: create("loss", name, **opts).to(device)
            for label, (name, opts) in specs.items()}


def _optimizer(params: list[dict], recipe: Recipe, device: torch.device) -> torch.optim.AdamW:
    o = recipe.optim
    kwargs = dict(lr=o.lr, betas=o.betas, eps=o.eps)
    try:  # fused AdamW: one kernel for all parameters, on CPU and CUDA alike
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


class _Console:
    def __init__(self, out: Callable[[str], None] | None, *, main: bool = True) -> None:
        self.out = out if out is not None else (lambda s: print(s, flush=True))
        if not main:  # under torchrun only rank 0 talks
            self.out = lambda s: None

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


class _GlobalBatch(nn.Module):
    """The loss on the global batch under torchrun: every rank's embeddings, gathered with
    their graphs (rank order), and ids and per-row context (teacher embeddings) without.
    Every rank computes the same loss; DDP's averaging then gives each parameter the
    single-process gradient of the concatenated batch (see distributed.py)."""

    def __init__(self, loss: nn.Module, local: bool = False) -> None:
        super().__init__()
        self.inner, self.local = loss, local

    def forward(self, image: torch.Tensor, text: torch.Tensor, *,
                image_ids: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                **context: Any) -> Any:
        for key, n in (("teacher_image", image.shape[0]), ("teacher_text", text.shape[0])):
            v = context.get(key)
            if torch.is_tensor(v) and v.shape[0] == n:
                context[key] = distributed.gather(v)
        image, image_rows = distributed.gather_rows(image)
        text, text_rows = distributed.gather_rows(text)
        if self.local:  # distributed.local_loss: this rank's rows against the global batch
            context.update(image_rows=image_rows, text_rows=text_rows,
                           shards=torch.distributed.get_world_size())
        if isinstance(context.get("match"), Match):  # [model.fusion]: tokens stay local
            context["match"] = context["match"].within(image_rows, text_rows)
        return self.inner(image, text,
                          image_ids=None if image_ids is None else distributed.gather(image_ids),
                          text_ids=None if text_ids is None else distributed.gather(text_ids),
                          **context)


def _average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """All-reduce-average the gradients of ``params`` (one flat buffer, one collective)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world_size < 2:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class Trainer:
    """Holds everything a run needs; ``fit`` trains, ``final_eval`` writes metrics.json.

    Under torchrun (``WORLD_SIZE`` > 1) every rank builds a Trainer: ``sampler.batch_size`` is
    the global contrastive batch, each rank embeds ``batch_size / world_size`` of it, the loss
    sees all of it (gathered); rank 0 alone writes the run directory, logs and evaluates, and
    its stop decisions are broadcast so that all ranks stop together.
    """

    def __init__(self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                 console: Callable[[str], None] | None = None) -> None:
        r = recipe
        self.backend = create("backend", r.backend.name, options=r.backend.options)
        if not self.backend.available():
            why = getattr(self.backend, "why_unavailable", None)
            reason = f": {why()}" if callable(why) else ""
            raise MmfwError(f"backend '{r.backend.name}' is not available on this machine"
                            f"{reason} (set backend.name = \"auto\" to pick what is)")
        self.world = distributed.init(self.backend.device, r.distributed.timeout_minutes)
        self.device = self.backend.device
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)  # one GPU per process
            with contextlib.suppress(AttributeError):  # a backend with a fixed device
                self.backend.device = self.device
        self.recipe, self.say = recipe, _Console(console, main=self.world.is_main)
        self.run_dir = run_dir_of(recipe)
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        self._prepare_run_dir(resume, overwrite)
        self.backend.seed(r.run.seed)

        # dataset, bad-data scan (data.on_bad) before training, train pairs or stream;
        # each rank's sampler makes batches of batch_size / world_size (its share of a step)
        w = self.world.world_size
        if r.sampler.batch_size % w:
            raise RecipeError(f"sampler.batch_size is the global batch of all {w} processes "
                              "and must divide evenly among them", key="sampler.batch_size",
                              expected=f"a multiple of {w}", given=r.sampler.batch_size)
        local = attrs.evolve(r, sampler=attrs.evolve(r.sampler,
                                                     batch_size=r.sampler.batch_size // w))
        self.data = TrainingData(local if w > 1 else r, self.run_dir, self.say,
                                 rank=self.world.rank, world_size=w)
        self.source, self.train_split, self.pairs = (self.data.source, self.data.split,
                                                     self.data.pairs)

        self.model: DualEncoder = build_model(r.model)
        if resume and self.start_step:
            self.model.load_assets(self.run_dir)
        else:
            if self.world.is_main:
                for enc in (self.model.vision, self.model.text):
                    if callable(getattr(enc, "prepare", None)):
                        enc.prepare(self.pairs.texts())
                self.model.save_assets(self.run_dir)
            distributed.barrier()
            if not self.world.is_main:  # the same tokenizer on every rank: rank 0's
                self.model.load_assets(self.run_dir)
        self.loss: nn.Module = create("loss", r.loss.name, options=r.loss.options)
        self.model.to(self.device)
        self.loss.to(self.device)
        self.sharded = self.world.distributed and r.distributed.strategy == "fsdp"
        self._whole: nn.Module | None = None  # FSDP: rank 0's unsharded copy (CPU)
        self._saved: int | None = self.start_step
        if self.sharded:
            self._shard()

        self.sampler = self.data.sampler()  # context: match_ids, texts, groups, rank, ...
        if len(self.sampler) == 0:
            raise MmfwError(f"the training split has {len(self.pairs)} pairs, fewer than one "
                            f"batch of {r.sampler.batch_size}: lower sampler.batch_size or set "
                            "sampler.drop_last = false")
        self.loader = self.data.loader(self.model, self.sampler,
                                       pin_memory=self.device.type == "cuda")
        self.mixer = Mixer(r.data.augment, r.run.seed)
        self.steps_per_epoch = len(self.sampler)
        total = r.run.epochs * self.steps_per_epoch
        self.total_steps = min(total, r.run.max_steps) if r.run.max_steps else total
        self.step, self.epoch = 0, 0
        self._setup_training()
        self.eval_history: list[dict[str, Any]] = []
        if resume and self.start_step:
            self._restore(self.start_step)
        self.diagnostics = Diagnostics(self)

    # FSDP ------------------------------------------------------------------------------------
    def _shard(self) -> None:
        """distributed.strategy = "fsdp": shard the model before the optimizer sees it."""
        r = self.recipe
        if fusion_of(self.model) is not None:
            raise RecipeError("[model.fusion] is not supported with FSDP yet",
                              key="distributed.strategy", expected='"ddp"', given="fsdp")
        if self.world.is_main:
            self._whole = sharding.unsharded_copy(self.model)
        units = sharding.shard(self.model, self.device, self.world.world_size,
                               r.distributed.fsdp_units, r.distributed.reshard_after_forward)
        self.say(f"fsdp: {len(units)} units over {self.world.world_size} ranks"
                 + (f" ({units[-1]}, ...)" if units else
                    " (no group matches distributed.fsdp_units: one unit, the whole model)"))

    @contextlib.contextmanager
    def _whole_model(self) -> Any:
        """Rank 0's own work (validation, probe diagnostics, final evaluation, plots) on the
        whole model. Under FSDP every rank joins the gather of the weights and rank 0 runs
        the block with its unsharded copy as ``self.model``; otherwise nothing changes."""
        if not self.sharded:
            yield
            return
        state = sharding.whole_state(self.model, self.world.is_main)
        if not self.world.is_main:
            yield
            return
        sharded, whole = self.model, self._whole
        whole.load_state_dict(state)
        whole.to(self.device).train(sharded.training)
        self.model = whole
        try:
            yield
        finally:
            self.model = sharded
            if self.device.type != "cpu":
                whole.to("cpu")  # the copy holds no accelerator memory while training

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
        elif existing and not overwrite:
            raise MmfwError(
                f"run directory {d} already exists. Use --resume to continue it, "
                f"--overwrite to start it again, or --set run.name=<new name>"
            )
        distributed.barrier()  # every rank has looked before rank 0 changes anything
        if self.world.is_main:
            if existing and not resume:
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_text(d / RECIPE_FILE, r.to_toml())
        distributed.barrier()

    def _log(self, row: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        with open(self.run_dir / METRICS_JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop rows a killed run logged after the checkpoint it resumes from."""
        path = self.run_dir / METRICS_JSONL
        if path.is_file() and self.world.is_main:
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
            ckpt.atomic_text(path, "".join(ln + "\n" for ln in keep))

    # checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint this step (once). Under FSDP every rank joins the gathers."""
        if self._saved == self.step:
            return
        self._saved = self.step
        model_state = optimizer_state = None
        if self.sharded:
            model_state = sharding.whole_state(self.model, self.world.is_main)
            optimizer_state = sharding.whole_optimizer_state(self.optimizer, self.world.is_main)
        if not self.world.is_main:
            return
        state = {"epoch": self.epoch, "sampler": self._sampler_state(),
                 "eval_history": self.eval_history, "recipe": self.recipe.digest()}
        scheduler_state = getattr(self.scheduler, "state_dict", None)
        if callable(scheduler_state):
            state["scheduler"] = scheduler_state()
        ckpt.save(self.ckpt_dir, self.step, model=self.model, loss=self.loss_module,
                  optimizer=self.optimizer, state=state, keep=self.recipe.run.keep_last,
                  scaler=self.scaler, model_state=model_state,
                  optimizer_state=optimizer_state)

    def _sampler_state(self) -> dict[str, Any] | None:
        fn = getattr(self.sampler, "state_dict", None)
        if not callable(fn):
            return None
        # DataLoader workers draw batches ahead of training: the position that counts is the
        # number of batches trained on in this epoch, not how far the sampler has been read.
        return {**fn(), "epoch": self.epoch,
                "position": self.step - self.epoch * self.steps_per_epoch}

    def _restore(self, step: int) -> None:
        model_state, loss_state = ckpt.read_weights(self.ckpt_dir, step)
        sharding.load_whole(self.model, model_state)  # every rank cuts its own shards
        self.loss_module.load_state_dict(loss_state)
        state = ckpt.load_state(self.ckpt_dir, step)
        ckpt.load_training(self.ckpt_dir, step, self.optimizer, state, self.scaler,
                           prepare=partial(sharding.shard_optimizer_state, self.optimizer)
                           if self.sharded else None)
        if state.get("scheduler") is not None and hasattr(self.scheduler, "load_state_dict"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.eval_history = list(state.get("eval_history", []))
        self._truncate_log(self.step)
        best_step, _, _ = self._best()
        if best_step is not None and best_step in ckpt.list_steps(self.ckpt_dir) \
                and self.world.is_main:
            ckpt.mark_best(self.ckpt_dir, best_step, self._eval_at(best_step))
        self._apply_plan(self._current_plan())
        if state.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])
        self.say(f"resumed {self.run_dir} at step {self.step} (epoch {self.epoch})")

    # training ------------------------------------------------------------------------------
    def _setup_training(self) -> None:
        """Named parameter groups, the scheduler, stage losses, AdamW, the GradScaler, the
        teacher and the backend's model preparation (compile, memory format)."""
        r = self.recipe
        groups = (*ParamTable(self.model, {}).groups, "loss")
        self.scheduler = create("scheduler", r.schedule.name, options=r.schedule.options,
                                total_steps=self.total_steps,
                                steps_per_epoch=self.steps_per_epoch, groups=groups)
        self.default_loss = self.loss
        self.stage_losses = _stage_losses(self.scheduler, self.device)
        self.loss_module: nn.Module = (LossBank(self.loss, self.stage_losses)
                                       if self.stage_losses else self.loss)
        self.params = ParamTable(self.model, {"loss": self.loss_module})
        self._towers = (self.params.tower("vision"), self.params.tower("text"))
        self.optimizer = _optimizer(self.params.optimizer_groups(r.optim.weight_decay), r,
                                    self.device)
        self.scaler = self.backend.grad_scaler()
        self._layer_mult = self.params.layer_decay(r.optim.layer_decay)
        self._plan: StagePlan | None = None
        self._unmatched: set[str] = set()
        self._announced: str | None = None
        self.step_stats: dict[str, Any] = {}
        self._apply_plan(self._current_plan())
        self._ddp: nn.Module | None = None
        self._ddp_key: tuple[bool, ...] = ()
        self.teacher = None
        distilling = "distillation" in self._loss_names()
        if distilling and not r.distill.teacher:
            raise RecipeError("the distillation loss needs a teacher", key="distill.teacher",
                              expected="the run (or ensemble) directory of a trained model",
                              given=r.distill.teacher)
        if r.distill.teacher:
            if not distilling:
                self.say("note: distill.teacher is set but no loss is 'distillation': the "
                         "teacher's embeddings reach the loss as context only")
            from .distill import Teacher

            self.teacher = Teacher.load(r.distill.teacher, device=self.device,
                                        autocast=self.backend.autocast)
            self.teacher.attach(self.loader, self.model, self.pairs, say=self.say)
        prepare = getattr(self.backend, "prepare", None)
        if callable(prepare):
            prepare(self.model)
        if self.world.distributed:
            self._check_distributed()

    def _check_distributed(self) -> None:
        """What the [distributed] options need of the losses and the backend."""
        d = self.recipe.distributed
        if d.local_loss:
            losses = {self.recipe.loss.name: self.default_loss}
            losses.update(self.stage_losses)
            bad = [n for n, m in losses.items() if not getattr(m, "supports_local_loss", False)]
            if bad:
                raise RecipeError(
                    f"loss {', '.join(repr(b) for b in bad)} needs the whole batch (its terms "
                    "do not split by rows), so each rank cannot compute only its own rows",
                    key="distributed.local_loss", expected="false, or losses that split by "
                    "rows (infonce, siglip, ...: see docs/losses.md)", given=True)
        if self.sharded and self.scaler is not None:
            raise RecipeError("FSDP runs take bf16 or fp32, not fp16 with a GradScaler",
                              key="backend.precision", expected='"bf16" or "fp32"',
                              given="fp16")

    def _loss_names(self) -> set[str]:
        """Every loss plugin the run uses: [loss], its mixture terms, the stages' losses."""
        names = {self.recipe.loss.name}
        for term in getattr(self.recipe.loss.options, "terms", None) or ():
            if isinstance(term, dict) and isinstance(term.get("name"), str):
                names.add(term["name"])
        fn = getattr(self.scheduler, "losses", None)
        names.update(name for name, _ in (fn() if callable(fn) else {}).values())
        return names

    def _current_plan(self) -> StagePlan:
        fn = getattr(self.scheduler, "plan", None)
        return fn(self.step, self.epoch) if callable(fn) else StagePlan()

    def _apply_plan(self, plan: StagePlan) -> None:
        """Freeze, set each group's LR multiplier and pick the active loss for ``plan``."""
        o = self.recipe.optim
        for pattern in self.params.freeze((*o.freeze, *plan.frozen)):
            if pattern not in self._unmatched:
                self._unmatched.add(pattern)
                self.say(f"note: freeze pattern '{pattern}' matches no parameter "
                         f"(groups: {', '.join(self.params.groups)})")
        mults = lr_multipliers(self.params, tuple(o.lr_mult.items()), plan.lr_mult,
                               base=self._layer_mult)
        for g in self.optimizer.param_groups:
            g["lr_mult"] = mults[g["group"]]
        if plan.loss is not None and plan.loss not in self.stage_losses:
            raise MmfwError(f"scheduler '{self.recipe.schedule.name}' names loss "
                            f"'{plan.loss}' for stage '{plan.stage}', which its losses() "
                            f"does not build ({', '.join(self.stage_losses) or 'none'})")
        self.loss = self.default_loss if plan.loss is None else self.stage_losses[plan.loss]
        self._plan = plan

    def _announce(self, plan: StagePlan) -> None:
        frozen = self.params.frozen()
        mults = sorted({(g["group"], g["lr_mult"]) for g in self.optimizer.param_groups
                        if g["lr_mult"] != 1.0})
        self.say(f"stage '{plan.stage}' from step {self.step}: {len(frozen)}/{len(self.params)} "
                 f"parameter tensors frozen, loss {plan.loss or self.recipe.loss.name}"
                 + (", lr x " + ", ".join(f"{g} {m:.3g}" for g, m in mults[:8])
                    + (f" (+{len(mults) - 8} more)" if len(mults) > 8 else "") if mults else ""))

    def _set_lr(self) -> float:
        plan = self._current_plan()
        if plan != self._plan:
            self._apply_plan(plan)
        if plan.stage and plan.stage != self._announced:
            self._announced = plan.stage
            self._announce(plan)
        lr = self.recipe.optim.lr * self.scheduler.lr_factor(self.step)
        momentum = getattr(self.scheduler, "momentum", None)
        beta1 = momentum(self.step) if callable(momentum) else None
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            if beta1 is not None:
                g["betas"] = (beta1, g["betas"][1])
        return lr

    def _temperature(self) -> float | None:
        t = getattr(self.loss, "temperature", None)
        v = getattr(t, "value", None)
        return float(v) if isinstance(v, (int, float)) else None

    def train_step(self, batch: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        batch = batch.to(self.device)
        batch.pixels = self.model.prepare_pixels(batch.pixels)  # uint8 from the loader
        teacher_inputs = getattr(batch, "teacher", None)  # the teacher's own view, pre-mixing
        batch = self.mixer(batch, self.step)  # MixUp/CutMix (data.augment)
        context = self._loss_context(batch, teacher_inputs)
        self.optimizer.zero_grad(set_to_none=True)
        out, img, txt = self._forward_backward(batch, context)
        self._optimizer_step()
        return out, img.detach(), txt.detach()

    def _loss_context(self, batch: Any, teacher_inputs: Any = None) -> dict[str, Any]:
        """What the loss gets besides embeddings and ids: step, epoch, the teacher's view (its
        own images mixed exactly as the student's, the Mixer being seeded by the step)."""
        context: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        if self.teacher is not None:
            def mix(pixels: torch.Tensor) -> torch.Tensor:
                return self.mixer(Batch(pixels, {}, batch.image_ids, batch.text_ids),
                                  self.step).pixels

            context["teacher_image"], context["teacher_text"] = self.teacher.embed(
                batch, teacher_inputs, mix=mix if batch.mix is not None else None)
        return context

    def _forward_backward(self, batch: Any, context: dict[str, Any]
                          ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Loss and gradients of one batch: whole, or in ``optim.accumulate`` micro-batches
        (GradCache keeps the loss on the whole batch; ``naive`` averages micro-batch losses)."""
        o = self.recipe.optim
        dist_on = self.world.distributed
        # soft targets when the images were mixed; the global batch under torchrun
        loss = (_GlobalBatch(self.loss, local=self.recipe.distributed.local_loss) if dist_on
                else self.loss)
        loss = mix_targets(loss, batch)
        scale = self.scaler.scale if self.scaler is not None else _unscaled
        fmt = getattr(self.backend, "memory_format", None)
        if fmt is not None and batch.pixels.dim() == 4:
            batch.pixels = batch.pixels.contiguous(memory_format=fmt)
        if fusion_of(self.model) is not None:  # [model.fusion]: the ITM scorer in the context
            return self._fused_forward_backward(batch, loss, scale, context)
        if o.accumulate > 1:
            run = gradcache_step if o.accumulate_mode == "gradcache" else naive_step
            result = run(self.model, loss, batch, o.accumulate,
                         autocast=self.backend.autocast, scale=scale, context=context)
            if dist_on:  # micro-batches bypass DDP's forward: average every gradient here
                # (FSDP reduce-scatters the model's own in each backward)
                _average_gradients(list(self.loss_module.parameters()) if self.sharded
                                   else self._params(), self.world.world_size)
            return result
        with self.backend.autocast():
            img, txt = (self._ddp_model() if dist_on else self.model)(batch.pixels,
                                                                       batch.tokens)
            out = loss(img, txt, image_ids=batch.image_ids, text_ids=batch.text_ids,
                       **context)
        scale(out.loss).backward()
        if dist_on:  # the loss's own parameters (temperature): equal already, kept so
            _average_gradients(list(self.loss_module.parameters()), self.world.world_size)
        return out, img, txt

    def release(self) -> None:
        """Drop the DDP wrapper before the process group is destroyed: its reducer holds the
        group, whose gloo threads would otherwise outlive it and abort the interpreter's exit."""
        self._ddp = None
        gc.collect()

    def _ddp_model(self) -> nn.Module:
        """The model in DistributedDataParallel, rebuilt when a stage freezes or unfreezes
        parameters (DDP reduces only what was trainable when it was built)."""
        if self.sharded:  # FSDP2 shards in place: the model is its own wrapper
            return self.model
        key = tuple(p.requires_grad for p in self.model.parameters())
        if self._ddp is None or key != self._ddp_key:
            ids = [self.device.index] if self.device.type == "cuda" else None
            head = fusion_of(self.model)
            if head is not None:  # scored outside forward: DDP would mark it ready twice
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.model, [f"fusion.{n}" for n, _ in (*head.named_parameters(),
                                                            *head.named_buffers())])
                for t in head.state_dict().values():  # DDP's start-up broadcast, for it
                    torch.distributed.broadcast(t, 0)
            self._ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=True)
            self._ddp_key = key
        return self._ddp

    def _fused_forward_backward(self, batch: Any, loss: Any, scale: Callable, context: dict
                                ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One whole batch with [model.fusion]: token features from the same forward pass,
        and ``match(image_rows, text_rows)`` (ITM logits of in-batch pairs) in the context."""
        if self.recipe.optim.accumulate > 1:
            raise MmfwError("[model.fusion] is not supported yet with optim.accumulate > 1: "
                            "set optim.accumulate = 1, or remove [model.fusion]")
        dist_on = self.world.distributed
        with self.backend.autocast():
            img, txt, context = fused_forward(self._ddp_model() if dist_on else self.model,
                                              batch.pixels, batch.tokens, context)
            out = loss(img, txt, image_ids=batch.image_ids, text_ids=batch.text_ids,
                       **context)
        scale(out.loss).backward()
        if dist_on:  # the head runs after DDP's forward, so DDP leaves it alone: average here
            _average_gradients([*fusion_of(self.model).parameters(),
                                *self.loss_module.parameters()], self.world.world_size)
        return out, img, txt

    def _optimizer_step(self) -> None:
        """Unscale, balance the towers, let diagnostics read the gradients, clip, step."""
        o = self.recipe.optim
        self.step_stats = {}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if o.modality_balance:
            self.step_stats.update(balance_towers(*self._towers, ratio=o.modality_ratio,
                                                  strength=o.modality_balance))
        self._after_backward()
        if o.grad_clip:
            clip = sharding.clip_grad_norm_ if self.sharded else nn.utils.clip_grad_norm_
            self.step_stats["optim/grad_norm"] = clip(self._params(), o.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _after_backward(self) -> None:
        """Gradients are final and unscaled here, not yet clipped: diagnostics read them."""
        if self.diagnostics.due(self.step + 1):
            self.diagnostics.record_gradients()

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
        self.loss_module.train()
        stop = None
        while stop is None and self.epoch < r.epochs:
            self.sampler.set_epoch(self.epoch)
            for batch in self.loader:
                out, img, txt, lr = self.run_step(batch)
                n_log += len(batch) * self.world.world_size  # samples/s of the global batch
                if self.step % r.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    row = self._train_row(out, img, txt, batch, lr, n_log / (now - t_log))
                    row.update(self._step_row())
                    t_log, n_log = now, 0
                    self._log(row)
                    self._show(bar, row)
                if bar is not None:
                    bar.update(1)
                if self.diagnostics.due(self.step):
                    with self._whole_model():
                        fired = self.world.is_main and bool(
                            self.diagnostics.check(batch, img, txt))
                    if self.world.distributed:
                        fired = bool(distributed.broadcast_object(fired))
                    if fired and self.recipe.diagnostics.stop_on_collapse:
                        stop = "collapse"
                if r.checkpoint_every and self.step % r.checkpoint_every == 0 \
                        and self.step % self.steps_per_epoch and self.step < self.total_steps:
                    self.save()  # after this step's rows; epoch ends and the last step save anyway
                if self.step >= self.total_steps:
                    stop = "max_steps"
                elif time.perf_counter() > deadline:
                    stop = "max_minutes"
                if r.max_minutes and self.world.distributed:  # rank 0's clock decides
                    stop = distributed.broadcast_object(stop)  # type: ignore[assignment]
                if stop:
                    break
            if self.step >= (self.epoch + 1) * self.steps_per_epoch:
                self.epoch += 1
                if self._end_of_epoch() and self.epoch < r.epochs:
                    stop = "early_stopping"
                t_log, n_log = time.perf_counter(), 0  # evaluation time is not training speed
        if bar is not None:
            bar.close()
        self.save()
        return "epochs" if self.epoch >= r.epochs else stop or "epochs"

    def run_step(self, batch: Any) -> Step:
        """One optimizer step on ``batch`` as ``fit`` takes it: the current step's stage plan
        and LR, forward, backward, update; then ``step`` advances. For code that drives the
        training loop itself (benchmarks, notebooks); logging and evaluation stay in ``fit``."""
        lr = self._set_lr()
        out, img, txt = self._guarded_step(batch)
        self.step += 1
        return Step(out, img, txt, lr)

    def _guarded_step(self, batch: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        try:
            return self.train_step(batch)
        except NotImplementedError as err:  # e.g. an operator MPS lacks: the backend explains
            explain = getattr(self.backend, "explain", None)
            hint = explain(err) if callable(explain) else None
            if hint:
                raise MmfwError(hint) from err
            raise

    def _step_row(self) -> dict[str, Any]:
        """This step's engine figures for metrics.jsonl: stage, balancing, gradient norm."""
        row: dict[str, Any] = {k: float(v) for k, v in self.step_stats.items()}
        if callable(getattr(self.scheduler, "plan", None)) and self._plan is not None:
            row["stage"] = self._plan.index
        if self.recipe.optim.accumulate > 1:
            row["accumulate"] = self.recipe.optim.accumulate
        return row

    def _end_of_epoch(self) -> bool:
        """Validate (when due), checkpoint, track the best; True when early stopping says stop.
        Under torchrun rank 0 validates and decides while the others wait."""
        e = self.recipe.eval
        validated = bool(e.val_split and self.epoch % e.every_epochs == 0
                         and e.val_split in self.source.splits)
        if validated:
            with self._whole_model():
                if self.world.is_main:
                    self.validate()
        self.save()
        stop = self._early_stop(validated) if self.world.is_main else False
        return bool(distributed.broadcast_object(stop))

    def _early_stop(self, validated: bool) -> bool:
        e = self.recipe.eval
        if not validated:
            return False
        best_step, best, since = self._best()
        if best_step == self.step:
            ckpt.mark_best(self.ckpt_dir, self.step, self._eval_at(self.step))
        if e.patience and since >= e.patience:
            self.say(f"early stopping: val rsum has not beaten {best:.2f} (step {best_step}) "
                     f"for {since} evaluations (eval.patience = {e.patience})")
            return True
        return False

    def _best(self) -> tuple[int | None, float, int]:
        """(step of the best val rsum, that rsum, evaluations since) from the eval history."""
        e = self.recipe.eval
        best_step, best, since = None, -math.inf, 0
        for row in self.eval_history:
            if row.get("split") != e.val_split or "rsum" not in row:
                continue
            if row["rsum"] > best + e.min_delta:
                best_step, best, since = int(row["step"]), float(row["rsum"]), 0
            else:
                since += 1
        return best_step, best, since

    def _eval_at(self, step: int) -> dict[str, Any]:
        rows = [r for r in self.eval_history if r.get("step") == step]
        return {k: v for k, v in rows[-1].items() if k not in ("type", "step")} if rows else {}

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
                              max_images=e.max_images, rerank_top_k=e.rerank_top_k)

    def _train_row(self, out: Any, img: torch.Tensor, txt: torch.Tensor, batch: Any, lr: float,
                   samples_per_s: float) -> dict[str, Any]:
        stats = similarity_stats(img, txt, batch.image_ids.to(img.device),
                                 batch.text_ids.to(img.device))
        loss, terms = out.loss.detach(), dict(out.terms)
        if self.world.distributed and self.recipe.distributed.local_loss:
            # each rank's loss covers its own rows: the batch's loss is their mean
            both = distributed.average(torch.stack([loss.float(), *(
                torch.as_tensor(v, dtype=torch.float32, device=loss.device)
                for v in terms.values())]))
            loss, terms = both[0], dict(zip(terms, both[1:], strict=True))
        row: dict[str, Any] = {"type": "train", "step": self.step, "epoch": self.epoch,
                               "loss": float(loss)}
        row.update({f"loss/{k}": float(v) for k, v in terms.items()})
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
        """On rank 0 (the others receive its metrics)."""
        with self._whole_model():
            metrics = self._final_eval() if self.world.is_main else None
        return distributed.broadcast_object(metrics)  # type: ignore[return-value]

    def _final_eval(self) -> dict[str, float]:
        split = self.recipe.eval.split
        best = ckpt.best(self.ckpt_dir) if self.recipe.eval.restore_best else None
        if best is not None and best != self.step:
            ckpt.load_weights(self.ckpt_dir, best, self.model, None)
            self.say(f"final evaluation with the best checkpoint, step {best} "
                     f"(eval.restore_best)")
        metrics = self.evaluate(split)
        ckpt.atomic_text(self.run_dir / METRICS_JSON, json.dumps(metrics, indent=2))
        self._log({"type": "eval", "split": split, "step": self.step, "epoch": self.epoch,
                   "final": True, **metrics})
        run_plots(self, split)  # after metrics.json: a failing plot never loses the metrics
        return metrics


def _unscaled(loss: torch.Tensor) -> torch.Tensor:
    return loss


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
    if recipe.ensemble.seeds:
        from .ensemble import train_ensemble

        return train_ensemble(recipe, resume=resume, overwrite=overwrite, console=console)
    t0 = time.perf_counter()
    trainer = None
    owner = not distributed.active()  # an ensemble keeps one group open for its members
    try:
        trainer = Trainer(recipe, resume=resume, overwrite=overwrite, console=console)
        stopped_by = trainer.fit()
        metrics = trainer.final_eval()
        distributed.barrier()  # no rank leaves while another still talks to it
    finally:
        if trainer is not None:
            trainer.release()
        if owner:
            distributed.shutdown()  # a no-op without torchrun
    seconds = time.perf_counter() - t0
    trainer.say(f"final {recipe.eval.split}: " + _fmt(metrics))
    trainer.say(f"run directory: {trainer.run_dir} ({seconds:.0f}s, {trainer.step} steps, "
                f"stopped by {stopped_by})")
    return RunResult(trainer.run_dir, metrics, trainer.step, seconds, stopped_by)
