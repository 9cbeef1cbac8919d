"""A schedule that fits a wall-clock budget (``schedule.fit_budget`` with ``run.max_minutes``).

A schedule written in steps (warm-up, cosine decay, stage lengths in epochs) assumes the run
reaches its last step. Cut by a budget it never does: the LR is still high when time runs
out. With the clock, the scheduler is asked about a *schedule position* instead of the step
count: ``position = step * total / estimated_total``, where ``estimated_total`` is the number
of steps that fit the budget at the measured pace. The schedule then ends (the LR at its
floor, the last stage reached) when the budget does, whatever the machine's speed; a run the
budget does not bind (``estimated_total >= total``) follows its steps as without the clock.

The pace is re-estimated at every step: the recent training steps' seconds, plus the time
spent between steps so far (validation, checkpoints) spread over the steps. The budget also
keeps back the final evaluation's time (``reserve``): the seconds per image and caption of
the last evaluation times the final split's size, or before any evaluation a guess from the
training pace. The position never moves back, and it is saved in checkpoints, so a resumed
run continues the schedule where the killed one was.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class BudgetClock:
    """Schedule position from elapsed time over ``budget_s`` seconds.

    ``total``: the schedule's length in steps (``run.epochs`` x steps per epoch, or
    ``run.max_steps``). ``batch``: samples per step (the guess of evaluation cost before one
    is measured). ``final_items``: images plus captions of the final evaluation.
    """

    #: steps measured before the pace is trusted (start-up and the loader's first batches)
    WARM_STEPS = 10
    #: steps in the window the training pace is measured over
    WINDOW = 50
    #: the final evaluation's estimate is stretched by this much (plots, the metrics file)
    MARGIN = 1.25

    def __init__(self, budget_s: float, total: int, batch: int) -> None:
        self.budget, self.total, self.batch = float(budget_s), int(total), int(batch)
        self.position = 0.0
        self.final_items = 0
        self.eval_s_per_item: float | None = None
        self._times: deque[tuple[int, float]] = deque(maxlen=self.WINDOW)
        self._between = 0.0  # seconds outside steps (evaluation, checkpoints), this session
        self._session_steps = 0

    # what the trainer tells it ------------------------------------------------------------
    def step_done(self, step: int, elapsed: float) -> None:
        """Step ``step`` ended at ``elapsed`` seconds of the run (all sessions)."""
        self._session_steps += 1
        if self._session_steps > self.WARM_STEPS:  # the first steps' pace is start-up's
            # training time only: what went between steps is counted apart, spread evenly
            self._times.append((step, elapsed - self._between))
        if len(self._times) < 2:
            self.position = min(float(self.total), max(self.position, float(step)))
            return
        fits = step + max(self.budget - elapsed - self.reserve(), 0.0) / self.pace()
        scaled = step * self.total / fits if fits < self.total else float(step)
        self.position = min(float(self.total), max(self.position, scaled))

    def between_steps(self, seconds: float) -> None:
        """Time spent outside steps (validation, a checkpoint): part of the pace."""
        self._between += seconds

    def evaluated(self, items: int, seconds: float) -> None:
        """An evaluation embedded ``items`` images and captions in ``seconds``."""
        if items > 0:
            self.eval_s_per_item = seconds / items

    # what it tells the trainer ------------------------------------------------------------
    def pace(self) -> float:
        """Seconds per step: recent training steps plus the between-steps time spread over
        this session's steps."""
        (s0, t0), (s1, t1) = self._times[0], self._times[-1]
        train = (t1 - t0) / max(s1 - s0, 1)
        return train + self._between / max(self._session_steps, 1)

    def reserve(self) -> float:
        """Seconds kept back for the final evaluation."""
        if not self.final_items:
            return 0.0
        per_item = self.eval_s_per_item
        if per_item is None:  # an item as dear as half a training pair: embedding is a
            # forward pass only, but one item at a time through preprocessing and tokenizing
            per_item = self.pace() / (2 * self.batch) if len(self._times) >= 2 else 0.0
        return self.MARGIN * per_item * self.final_items

    def out_of_time(self, elapsed: float) -> bool:
        """Training must stop now for the final evaluation to end inside the budget."""
        return elapsed + self.reserve() >= self.budget

    def schedule_step(self, steps_per_epoch: int) -> tuple[int, int]:
        """The (step, epoch) the scheduler is asked about."""
        step = round(self.position)
        return step, step // max(steps_per_epoch, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "eval_s_per_item": self.eval_s_per_item}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = float(state.get("position", 0.0))
        self.eval_s_per_item = state.get("eval_s_per_item")


def evaluation_items(split: Any, max_images: int = 0) -> int:
    """Images plus captions an evaluation of ``split`` embeds (``eval.max_images`` caps the
    images)."""
    n = len(split) if not max_images else min(max_images, len(split))
    return n + sum(len(split.captions(i)) for i in range(n))


__all__ = ["BudgetClock", "evaluation_items"]
