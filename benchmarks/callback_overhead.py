"""What firing one lifecycle event costs per training step (not a test).

Builds the run's real callbacks, ``mmfw.train.callbacks.Callbacks.build(recipe)``, from a
recipe (default: the quickstart) and times ``Callbacks.fire`` for one event, the call the
training loop makes:

  (a) an event no callback implements: every event has a built-in implementer in a default
      recipe, so this is ``fire`` on the same class holding no callbacks (one dict lookup and
      an empty loop, what any unimplemented event costs);
  (a2) ``on_batch_start`` with the built-in callbacks: only the distillation teacher has it,
      and returns at once without ``[distill] teacher`` (an inert implementer);
  (b) ``on_step_end`` with the built-in callbacks of the recipe, on a step that is not a
      diagnostics step (``diagnostics.every`` divides none of them: the common case);
  (c) the same with 10 third-party callbacks added, each implementing ``on_step_end`` as a
      no-op (registered as a plugin and listed in ``run.callbacks``, as a user would).

The context is a stand-in holding what those events read on such steps (``step``,
``is_main``): no trainer, model or data is built. Each figure is the median of 5
``timeit`` repetitions of many calls, in microseconds per call.

    python benchmarks/callback_overhead.py
    python benchmarks/callback_overhead.py --number 500000 --out /tmp/callbacks.json
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from pathlib import Path
from typing import Any

import record  # benchmarks/record.py
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "callback_overhead.json"
THIRD_PARTY = 10


class StepContext:
    """What the built-in ``on_step_end`` methods read on a step that does no work."""

    def __init__(self, step: int) -> None:
        self.step, self.is_main, self.world_size, self.rank = step, True, 1, 0


class NoOp:
    """A third-party callback implementing one event, doing nothing."""

    def on_step_end(self, ctx: Any, step: Any) -> None:
        pass


class NoOpPlugin:
    """Registers ``noop-0`` ... ``noop-9`` through the ``mmfw_callbacks`` hook."""

    def __init__(self, hookimpl: Any, n: int) -> None:
        names = [f"noop-{i}" for i in range(n)]
        self.names = names

        @hookimpl
        def mmfw_callbacks() -> dict:
            return {name: (lambda options: NoOp()) for name in names}

        self.mmfw_callbacks = mmfw_callbacks


def per_call_us(fire: Any, event: str, args: tuple, number: int, repeat: int) -> float:
    timer = timeit.Timer("fire(event, *args)",
                         globals={"fire": fire, "event": event, "args": args})
    return statistics.median(t / number * 1e6 for t in timer.repeat(repeat, number))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.toml"))
    ap.add_argument("--number", type=int, default=200_000, help="calls per repetition")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions (the median is kept)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(OUT), help="write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import mmfw
    from mmfw.spi import LossOutput, StepEnd, hookimpl
    from mmfw.train.callbacks import Callbacks

    builtin = Callbacks.build(mmfw.load_recipe(args.recipe, args.overrides))
    plugin = NoOpPlugin(hookimpl, THIRD_PARTY)
    mmfw.register(plugin, name="callback-overhead-noops")
    try:
        listed = "[" + ", ".join(f'"{n}"' for n in plugin.names) + "]"
        extended = Callbacks.build(mmfw.load_recipe(
            args.recipe, [*args.overrides, f"run.callbacks={listed}"]))
    finally:
        mmfw.registry.unregister(plugin)

    every = getattr(builtin.items.get("diagnostics"), "every", 0) or 0
    if every == 1:
        raise SystemExit("diagnostics.every = 1: every step is a diagnostics step")
    step_no = 1  # not a diagnostics step: 1 % every != 0 for every > 1 (0: diagnostics off)
    ctx = StepContext(step_no)
    zero = torch.zeros(())
    step = StepEnd(LossOutput(zero, {}), torch.zeros(1, 1), torch.zeros(1, 1), None, 1e-3, None)
    empty = Callbacks({})

    def named(cbs: Callbacks, event: str) -> list[str]:
        """The callbacks whose methods ``event`` calls (bound methods know their object)."""
        selves = {id(getattr(m, "__self__", None)) for m in cbs.calls[event]}
        return [n for n, cb in cbs.items.items() if id(cb) in selves]

    cases = [
        ("a", "on_step_end: implemented by no callback", empty, "on_step_end", (ctx, step)),
        ("a2", "on_batch_start: built-in callbacks (teacher, inert)", builtin,
         "on_batch_start", (ctx, None, {})),
        ("b", "on_step_end: built-in callbacks (non-diagnostics step)", builtin,
         "on_step_end", (ctx, step)),
        ("c", f"on_step_end: built-in + {THIRD_PARTY} no-op third-party", extended,
         "on_step_end", (ctx, step)),
    ]
    rows = []
    for key, label, cbs, event, call_args in cases:
        us = per_call_us(cbs.fire, event, call_args, args.number, args.repeat)
        rows.append({"case": key, "what": label, "event": event,
                     "callbacks_in_run": len(cbs.items), "implementers": named(cbs, event),
                     "us_per_call": us})
    by = {r["case"]: r for r in rows}
    per_extra = (by["c"]["us_per_call"] - by["b"]["us_per_call"]) / THIRD_PARTY

    print(f"recipe {Path(args.recipe).name}; {args.number} calls x {args.repeat} repetitions, "
          "median; microseconds per fire()")
    print(f"{'':4}{'case':58}{'methods':>8}{'us/call':>10}")
    for r in rows:
        print(f"{r['case']:4}{r['what']:58}{len(r['implementers']):>8}{r['us_per_call']:>10.3f}")
    print(f"    per added no-op callback: {per_extra:.3f} us")
    print("    on_step_end of the run: " + ", ".join(by["b"]["implementers"]))

    result = {**record.new_result(), "recipe": Path(args.recipe).name,
              "number": args.number, "repeat": args.repeat, "diagnostics_every": every,
              "step": step_no, "cases": rows, "us_per_added_noop_callback": per_extra}
    if args.out:
        record.write(args.out, result)


if __name__ == "__main__":
    main()
