"""The checkpointer: every stateful part of a run into one checkpoint, and back.

What a checkpoint holds (see :mod:`mmfw.run.checkpoint` for the files): the model and every
loss (weights, a memory queue), the optimizer, the GradScaler and the RNGs; and, as JSON, the
run's progress (step, epoch, training seconds spent), the world size, the optimisation's
state (scheduler, skipped-step counters), the sampler's position and each stateful
callback's ``state_dict()``; callbacks' tensors (``tensor_state_dict()``: an EMA) in a part of
their own, with the name of the callback whose tensors are the evaluated weights.
Restoring puts each back, so the resumed run is the unbroken one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from safetensors import SafetensorError

from ..run import checkpoint as ckpt
from ..run.rundir import RunDir, RunDirError
from ..spi.capabilities import Stateful
from ..spi.errors import ResumeError


class Progress:
    """How far a run got: optimizer steps, epochs and the seconds spent training."""

    def __init__(self) -> None:
        self.step = self.epoch = 0
        self.seconds = 0.0


class Checkpointer:
    """Saves and restores one run's parts; rank 0 writes, every rank joins FSDP gathers."""

    def __init__(self, run_dir: RunDir, recipe: Any, *, progress: Progress, model: Any,
                 losses: Any, optimisation: Any, strategy: Any, sampler: Any,
                 steps_per_epoch: int, callbacks: Any) -> None:
        self.dir, self.recipe = run_dir.checkpoints, recipe
        self.progress, self.model, self.losses = progress, model, losses
        self.opt, self.strategy, self.sampler = optimisation, strategy, sampler
        self.steps_per_epoch, self.callbacks = steps_per_epoch, callbacks
        self.saved: int | None = None

    def _sampler_state(self) -> dict[str, Any] | None:
        if not isinstance(self.sampler, Stateful):
            return None
        # DataLoader workers draw batches ahead of training: the position that counts is the
        # number of batches trained on in this epoch, not how far the sampler has been read.
        p = self.progress
        return {**self.sampler.state_dict(), "epoch": p.epoch,
                "position": p.step - p.epoch * self.steps_per_epoch}

    def save(self) -> bool:
        """Checkpoint the current step (once); True when one was written."""
        step = self.progress.step
        if self.saved == step:
            return False
        self.saved = step
        s = self.strategy
        model_state = s.model_state()
        optimizer_state = s.optimizer_state(self.opt.optimizer)
        if not s.is_main:
            return True
        p = self.progress
        state = {"epoch": p.epoch, "seconds": p.seconds, "world_size": s.world.world_size,
                 "sampler": self._sampler_state(), "optimisation": self.opt.state_dict(),
                 "callbacks": self.callbacks.state_dict(), "recipe": self.recipe.digest()}
        if (evaluated := self.callbacks.eval_weights()) is not None:
            state["eval_weights"] = evaluated
        try:
            ckpt.save(self.dir, step, model=self.model, loss=self.losses,
                      optimizer=self.opt.optimizer, state=state,
                      keep=self.recipe.run.keep_last, scaler=self.opt.scaler,
                      model_state=model_state, optimizer_state=optimizer_state,
                      callback_tensors=self.callbacks.tensor_state_dict())
        except (OSError, SafetensorError) as err:  # a full disk, a quota, a vanished mount
            raise RunDirError(f"cannot write checkpoint step {step} into {self.dir}: {err} "
                              "(is the disk full?). The previous checkpoint is intact; free "
                              "space and continue with --resume") from None
        return True

    def restore(self, step: int, say: Callable[[str], None]) -> None:
        """Load checkpoint ``step`` into every part."""
        model_state, loss_state = ckpt.read_weights(self.dir, step)
        self.strategy.load_model_state(model_state)
        self.losses.load_state_dict(loss_state)
        state = ckpt.load_state(self.dir, step)
        saved_world = int(state.get("world_size", self.strategy.world.world_size))
        if saved_world != self.strategy.world.world_size:
            raise ResumeError(
                f"checkpoint step {step} was written by a job of {saved_world} process(es); "
                f"this one has {self.strategy.world.world_size}. The sampler's shares and the "
                "data order depend on it: resume with the same torchrun --nproc_per_node")
        ckpt.load_training(self.dir, step, self.opt.optimizer, state, self.opt.scaler,
                           prepare=self.strategy.optimizer_loader(self.opt.optimizer))
        self.opt.load_state_dict(state.get("optimisation", {}))
        if "scheduler" in state:  # checkpoints of mmfw 0.1
            self.opt.load_state_dict({"scheduler": state["scheduler"]})
        p = self.progress
        p.step, p.epoch = int(state["step"]), int(state["epoch"])
        p.seconds = float(state.get("seconds", 0.0))
        self.opt.apply(self.opt.current_plan(p.step, p.epoch), p.step)
        if state.get("sampler") is not None and isinstance(self.sampler, Stateful):
            self.sampler.load_state_dict(state["sampler"])
        self.callbacks.load_state_dict(state.get("callbacks", {}))
        self.callbacks.load_tensor_state_dict(ckpt.read_callback_tensors(self.dir, step))
        self.saved = step
