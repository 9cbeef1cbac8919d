"""The training loop: one recipe in, one run directory out.

:class:`Trainer` builds a run's parts (strategy, data, model, optimisation, contrastive step,
callbacks, checkpointer) and :meth:`Trainer.fit` runs them: for each batch the stage plan and
LR, the step, the update, then the events callbacks act on (logging, diagnostics,
evaluation, early stopping, plots: all of them callbacks).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import torch

from ..config.recipe import Recipe
from ..data.augment import Mixer
from ..data.datasource import TrainingData
from ..model import DualEncoder, build_model
from ..parallel import distributed
from ..parallel.strategy import strategy_for
from ..registry import create
from ..run.rundir import RunDir
from ..spi.context import StepEnd
from ..spi.contracts import LossOutput
from ..spi.errors import MmfwError, RecipeError
from .budget import BudgetClock, evaluation_items
from .callbacks import Callbacks
from .checkpointer import Checkpointer, Progress
from .context import TrainerContext
from .optimisation import Optimisation
from .rows import SystemStats, Throughput, train_row
from .setup import check_parts, claim, loss_start, prepare_assets, record_recipe
from .step import ContrastiveStep


class Step(NamedTuple):
    """What :meth:`Trainer.run_step` gives back: the loss output, the batch's embeddings
    (detached) and the learning rate the step ran at."""

    output: LossOutput
    image: torch.Tensor
    text: torch.Tensor
    lr: float


class Preempted(MmfwError):
    """SIGTERM (a preemption): the run checkpointed and stopped; ``--resume`` continues it."""


class Trainer:
    """Everything a run needs; ``fit`` trains, its callbacks log, evaluate and plot.

    Under torchrun every rank builds a Trainer; ``sampler.batch_size`` is the global batch
    and the strategy hides how ranks share it (see :mod:`mmfw.parallel.strategy`).
    """

    def __init__(self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                 console: Callable[[str], None] | None = None) -> None:
        r, self.recipe = recipe, recipe
        self.backend = create("backend", r.backend.name, options=r.backend.options)
        if not self.backend.available():
            why = getattr(self.backend, "why_unavailable", None)
            raise MmfwError(f"backend '{r.backend.name}' is not available on this machine"
                            f"{f': {why()}' if callable(why) else ''} (set backend.name = "
                            '"auto" to pick what is)')
        self.world = distributed.init(self.backend.device, r.distributed.timeout_minutes)
        self.device = self.backend.device
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)  # one GPU per process
            if hasattr(self.backend, "device"):
                self.backend.device = self.device
        out = console if console is not None else (lambda s: print(s, flush=True))
        self.say = out if self.world.is_main else (lambda s: None)
        self.strategy = strategy_for(self.world, self.device, r.distributed)
        self.run_dir = RunDir.of(r)
        try:
            self._build(resume, overwrite)
        except BaseException:
            self.release()  # a run that never started holds no lock
            raise

    def _build(self, resume: bool, overwrite: bool) -> None:
        start = claim(self.run_dir, self.world, self.say, resume=resume, overwrite=overwrite)
        self.backend.seed(self.recipe.run.seed)
        # the model before the recipe is recorded: its encoders may set where the loss starts
        # (a pretrained CLIP's temperature), which the run directory's recipe then holds
        self.model: DualEncoder = build_model(self.recipe.model)
        r = self.recipe = loss_start(self.recipe, self.model, self.say)
        record_recipe(self.run_dir, r, self.world, self.strategy, resume=bool(resume))

        w = self.world.world_size  # each rank's sampler makes batch_size / w of a step
        if r.sampler.batch_size % w:
            raise RecipeError(f"sampler.batch_size is the global batch of all {w} processes "
                              "and must divide evenly among them", key="sampler.batch_size",
                              expected=f"a multiple of {w}", given=r.sampler.batch_size)
        local = attrs.evolve(r, sampler=attrs.evolve(r.sampler, batch_size=r.sampler.batch_size
                                                     // w))
        self.data = TrainingData(local, self.run_dir.path, self.say, rank=self.world.rank,
                                 world_size=w)
        prepare_assets(self.model, self.run_dir, self.data.pairs, self.world, self.strategy,
                       resumed=bool(start))
        loss = create("loss", r.loss.name, options=r.loss.options).to(self.device)
        self.model.to(self.device)
        self.strategy.setup(self.model, self.say)
        self.sampler = self.data.sampler()
        if len(self.sampler) == 0:
            raise MmfwError(f"the training split has {len(self.data.pairs)} pairs, fewer than "
                            f"one batch of {r.sampler.batch_size}: lower sampler.batch_size "
                            "or set sampler.drop_last = false")
        self.loader = self.data.loader(self.model, self.sampler,
                                       pin_memory=self.device.type == "cuda")
        self.mixer = Mixer(r.data.augment, r.run.seed)
        self.steps_per_epoch = len(self.sampler)
        total = r.run.epochs * self.steps_per_epoch
        self.total_steps = min(total, r.run.max_steps) if r.run.max_steps else total
        self.progress = Progress()
        self.data.policy.step = lambda: self.progress.step  # skipped.jsonl rows carry it
        self.opt = Optimisation(r, self.model, loss, self.backend, self.device,
                                total_steps=self.total_steps,
                                steps_per_epoch=self.steps_per_epoch, say=self.say)
        if r.schedule.fit_budget and r.run.max_minutes:
            self.opt.clock = BudgetClock(r.run.max_minutes * 60, self.total_steps,
                                         r.sampler.batch_size)
        self.callbacks = Callbacks.build(r)
        check_parts(r, self.opt, self.callbacks, self.strategy)
        if callable(getattr(self.backend, "prepare", None)):
            self.backend.prepare(self.model)  # memory format, torch.compile
        self.step_fn = ContrastiveStep(self.model, self.opt.losses, self.strategy,
                                       self.backend, accumulate=r.optim.accumulate,
                                       mode=r.optim.accumulate_mode,
                                       local_loss=r.distributed.local_loss)
        self.checkpointer = Checkpointer(
            self.run_dir, r, progress=self.progress, model=self.model, losses=self.opt.losses,
            optimisation=self.opt, strategy=self.strategy, sampler=self.sampler,
            steps_per_epoch=self.steps_per_epoch, callbacks=self.callbacks)
        self.ctx = TrainerContext(self)
        if start:
            self.checkpointer.restore(start, self.say)
            if self.world.is_main:
                self.run_dir.truncate(self.progress.step, self.say)
                self.data.policy.truncate(self.progress.step)
            self.say(f"resumed {self.run_dir} at step {self.progress.step} "
                     f"(epoch {self.progress.epoch})")
            self.callbacks.fire("on_checkpoint_restore", self.ctx, start)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    def fit(self) -> str:
        """Train until epochs, max_steps or max_minutes (or a callback's stop); returns why."""
        r, p, ctx, fire = self.recipe.run, self.progress, self.ctx, self.callbacks.fire
        # the training seconds of earlier sessions (a resumed run); p.seconds itself is
        # updated at every checkpoint, so this session's clock adds to this, not to it
        before = p.seconds
        budget = r.max_minutes * 60 - before if r.max_minutes else math.inf
        t0 = time.perf_counter()
        preempted: list[int] = []
        try:  # every rank (torchrun forwards SIGTERM to all); rank 0's flag decides
            old = signal.signal(signal.SIGTERM, lambda *_: preempted.append(1))
        except ValueError:  # not the main thread: no signal handlers to set there
            old = None
        self.model.train()
        self.opt.losses.train()
        fire("on_run_start", ctx)
        speed, stop = Throughput(), None
        self.system = SystemStats(self.device)
        clock = self.opt.clock
        if clock is not None and self.recipe.eval.split in self.data.source.splits:
            clock.final_items = evaluation_items(self.data.source.split(self.recipe.eval.split),
                                                 self.recipe.eval.max_images)
        try:
            while stop is None and p.epoch < r.epochs:
                self.sampler.set_epoch(p.epoch)
                waited = time.perf_counter()  # the loader's time: from here to its batch
                for batch in self.loader:
                    began = time.perf_counter()
                    out, img, txt, lr = self.run_step(batch)
                    done = time.perf_counter()
                    elapsed = done - t0
                    if clock is not None:
                        clock.step_done(p.step, before + elapsed)
                    speed.add(len(batch) * self.world.world_size,  # the global batch
                              data_s=began - waited, compute_s=done - began)
                    row = self._row(out, img, txt, batch, lr, speed) \
                        if p.step % r.log_every == 0 or p.step == self.total_steps else None
                    fire("on_step_end", ctx, StepEnd(out, img, txt, batch, lr, row))
                    if r.checkpoint_every and p.step % r.checkpoint_every == 0 \
                            and p.step % self.steps_per_epoch and p.step < self.total_steps:
                        self._save(before + elapsed)
                        if clock is not None:
                            clock.between_steps(time.perf_counter() - done)
                    out_of_time = clock.out_of_time(before + elapsed) if clock is not None \
                        else elapsed > budget
                    stop = ctx.stop_reason or ("max_steps" if p.step >= self.total_steps else
                                               "max_minutes" if out_of_time else
                                               "preempted" if preempted else None)
                    if self.world.distributed:  # rank 0 decides for all, and its schedule
                        if clock is None:  # clock sets every rank's position
                            stop = self.strategy.agree(stop)
                        else:
                            stop, clock.position = self.strategy.agree((stop, clock.position))
                    if stop:
                        break
                    waited = time.perf_counter()
                if p.step >= (p.epoch + 1) * self.steps_per_epoch:
                    p.epoch += 1
                    ended = time.perf_counter()
                    fire("on_epoch_end", ctx, p.epoch)
                    self._save(before + time.perf_counter() - t0)
                    if clock is not None:
                        clock.between_steps(time.perf_counter() - ended)
                    stop = self.strategy.agree(stop or ctx.stop_reason)
                    speed.reset()  # evaluation time is not training speed
            self._save(before + time.perf_counter() - t0)
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        if stop == "preempted":
            raise Preempted(f"stopped by SIGTERM at step {p.step}: checkpoint written; "
                            f"continue with `mmfw run ... --resume`")
        stopped_by = "epochs" if p.epoch >= r.epochs else stop or "epochs"
        fire("on_run_end", ctx, stopped_by)
        return stopped_by

    def _row(self, out: LossOutput, img: torch.Tensor, txt: torch.Tensor, batch: Any,
             lr: float, speed: Throughput) -> dict[str, Any]:
        """The train row of this log step, logged (every rank computes it: under
        ``local_loss`` its loss is averaged across them)."""
        opt = self.opt
        times = speed.take_all()
        row = train_row(step=self.progress.step, epoch=self.progress.epoch, output=out,
                        image=img, text=txt, batch=batch, lr=lr,
                        samples_per_s=times.pop("samples_per_s"),
                        system={**times, **self.system.take()},
                        temperature=self.ctx.temperature(), stats=opt.stats,
                        stage=opt.plan.index if opt.staged and opt.plan else None,
                        accumulate=self.recipe.optim.accumulate,
                        local_loss=self.world.distributed and self.recipe.distributed.local_loss)
        precision = getattr(self.backend, "precision", None)  # ``auto`` resolved
        if isinstance(precision, str):
            row["precision"] = precision
        if opt.clock is not None:  # how far the budget-fitted schedule is
            row["schedule/position"] = round(opt.clock.position / max(self.total_steps, 1), 4)
        self.ctx.log(row)
        return row

    def _save(self, seconds: float) -> None:
        self.progress.seconds = seconds
        if self.checkpointer.save():
            self.callbacks.fire("on_checkpoint_save", self.ctx, self.progress.step)

    def run_step(self, batch: Any) -> Step:
        """One optimizer step on ``batch`` as ``fit`` takes it: stage plan and LR, forward,
        backward, update; then ``step`` advances. For loops driven from outside (benchmarks,
        notebooks); logging, evaluation and the other callbacks' work stay in ``fit``."""
        p, fire = self.progress, self.callbacks.fire
        lr = self.opt.begin(p.step, p.epoch)
        batch = batch.to(self.device)
        batch.pixels = self.model.prepare_pixels(batch.pixels)  # uint8 from the loader
        batch = self.mixer(batch, p.step)  # MixUp/CutMix (data.augment)
        context: dict[str, Any] = {"step": p.step, "epoch": p.epoch}
        fire("on_batch_start", self.ctx, batch, context)
        try:
            out, img, txt = self.step_fn(batch, self.opt.loss, context, self.opt.scale)
        except NotImplementedError as err:  # e.g. an operator MPS lacks: the backend explains
            explain = getattr(self.backend, "explain", None)
            hint = explain(err) if callable(explain) else None
            if hint:
                raise MmfwError(hint) from err
            raise
        self.opt.finish(p.step + 1, out, clip=self.strategy.clip,
                        after_backward=lambda: fire("on_after_backward", self.ctx, p.step + 1))
        p.step += 1
        return Step(out, img.detach(), txt.detach(), lr)

    def release(self) -> None:
        """Let go of the process group's users and of the run directory's lock."""
        self.strategy.release()
        self.run_dir.unlock()
