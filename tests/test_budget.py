"""``schedule.fit_budget``: a schedule that ends when the wall-clock budget does."""

from __future__ import annotations

import itertools
import json
import math

import pytest

import mmfw
from helpers import tiny_recipe
from mmfw.train.budget import BudgetClock


def simulate(clock: BudgetClock, step_s: float, *, eval_every: int = 0, eval_s: float = 0.0,
             limit: int = 100_000) -> list[float]:
    """Drive the clock as the trainer does, with steps of ``step_s`` seconds (and an
    evaluation of ``eval_s`` every ``eval_every`` steps); the positions, until it stops."""
    elapsed, positions = 0.0, []
    for step in range(1, limit):
        elapsed += step_s
        clock.step_done(step, elapsed)
        positions.append(clock.position)
        if clock.out_of_time(elapsed) or clock.position >= clock.total:
            break
        if eval_every and step % eval_every == 0:
            elapsed += eval_s
            clock.between_steps(eval_s)
            clock.evaluated(100, eval_s)
    return positions


def test_a_binding_budget_ends_the_schedule_when_it_ends() -> None:
    clock = BudgetClock(budget_s=60, total=1000, batch=32)  # 0.1 s steps: ~600 fit
    clock.final_items = 200
    positions = simulate(clock, 0.1, eval_every=100, eval_s=1.0)
    steps = len(positions)
    assert all(b >= a for a, b in itertools.pairwise(positions))  # never moves back
    assert positions[-1] == pytest.approx(1000, abs=15)  # the schedule's end, at the budget's
    # the evaluations' time and the final evaluation's reserve (2 s: 200 items at the pace of
    # the last evaluation, 10 ms each, stretched by 1.25) are kept out of training
    assert 500 <= steps <= 560, steps
    assert clock.reserve() == pytest.approx(1.25 * 200 * 0.01)


def test_a_budget_that_does_not_bind_follows_the_steps() -> None:
    clock = BudgetClock(budget_s=600, total=300, batch=32)
    positions = simulate(clock, 0.1)
    assert positions == [float(s) for s in range(1, 301)]


def test_evaluations_and_a_slow_start_do_not_rush_a_budget_that_does_not_bind() -> None:
    clock = BudgetClock(budget_s=300, total=780, batch=128)  # ~160 s of steps and evaluations
    clock.final_items = 6000
    elapsed, positions = 0.0, []
    for step in range(1, 781):
        elapsed += 2.0 if step <= 5 else 0.2  # the loader's workers starting up
        clock.step_done(step, elapsed)
        positions.append(clock.position)
        if step % 390 == 0:  # a validation of 8 s at each epoch's end
            elapsed += 8.0
            clock.between_steps(8.0)
            clock.evaluated(3000, 8.0)
        assert not clock.out_of_time(elapsed)
    assert positions == [float(s) for s in range(1, 781)]


def test_position_is_saved_and_restored() -> None:
    clock = BudgetClock(budget_s=60, total=1000, batch=32)
    simulate(clock, 0.1, limit=200)
    again = BudgetClock(budget_s=60, total=1000, batch=32)
    again.load_state_dict(json.loads(json.dumps(clock.state_dict())))
    assert again.position == clock.position > 199
    assert again.schedule_step(100) == (round(clock.position), round(clock.position) // 100)


def test_a_budget_cut_run_decays_its_lr_and_fits_its_final_evaluation(tmp_path) -> None:
    budget_s = 5.0
    data = tiny_recipe(tmp_path / "runs", "fitted",
                       run={"epochs": 100, "max_minutes": budget_s / 60, "log_every": 1},
                       data={"train_images": 128},
                       eval={"val_split": ""}, diagnostics={"every": 0, "map_points": 0},
                       schedule={"warmup_steps": 5})
    recipe = mmfw.load_recipe(data)
    assert recipe.schedule.fit_budget  # the default
    result = mmfw.train(recipe, console=lambda s: None)
    assert result.stopped_by == "max_minutes"
    assert math.isfinite(result.metrics["rsum"])
    rows = [json.loads(ln) for ln in
            (tmp_path / "runs" / "fitted" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert len(train) >= 15
    positions = [r["schedule/position"] for r in train]
    assert positions == sorted(positions) and positions[-1] > 0.9
    peak = max(r["lr"] for r in train)
    # the cosine near its floor (the last step ran at the position of the one before: on a
    # loaded machine a step of this tiny budget is a few per cent of it)
    assert train[-1]["lr"] < 0.25 * peak
    from mmfw.train.loop import Trainer

    resumed = Trainer(recipe, resume=True, console=lambda s: None)
    try:  # a resumed run continues the schedule where this one ended
        assert resumed.opt.clock.position / resumed.total_steps == pytest.approx(
            positions[-1], abs=1e-4)
        # with the training seconds spent: each checkpoint's own, never added up again
        assert resumed.progress.epoch >= 2  # several checkpoints were written
        assert 0 < resumed.progress.seconds <= result.seconds
    finally:
        resumed.release()


def test_fit_budget_off_keeps_counting_steps(tmp_path) -> None:
    data = tiny_recipe(tmp_path / "runs", "cut", run={"epochs": 1000, "max_minutes": 0.02,
                                                       "log_every": 1},
                       eval={"val_split": ""}, diagnostics={"every": 0, "map_points": 0},
                       schedule={"fit_budget": False, "warmup_steps": 5})
    result = mmfw.train(mmfw.load_recipe(data), console=lambda s: None)
    rows = [json.loads(ln) for ln in
            (tmp_path / "runs" / "cut" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert result.stopped_by == "max_minutes" and "schedule/position" not in train[-1]
    assert train[-1]["lr"] > 0.9 * max(r["lr"] for r in train)  # cut at its peak
