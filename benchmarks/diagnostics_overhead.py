"""What the collapse diagnostics cost per training step (not a test).

Builds the engine's ``Trainer`` from a recipe (default: the quickstart) and, in one process,
times the engine's own step (``Trainer.run_step``) and the two diagnostics calls a
diagnostics step adds (``record_gradients`` after backward, ``check``: batch statistics, the
probe batch embedded in eval mode, one metrics row). The overhead at ``diagnostics.every`` is

    (record_gradients + check) / every / step

Steps and checks are interleaved after a warm-up, so background load hits both alike; medians.

    python benchmarks/diagnostics_overhead.py                       # quickstart, 1 thread
    python benchmarks/diagnostics_overhead.py --threads 2 --steps 120
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import record  # benchmarks/record.py
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.toml"))
    ap.add_argument("--steps", type=int, default=60, help="timed training steps")
    ap.add_argument("--checks", type=int, default=12, help="timed diagnostics calls")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mmfw
    from mmfw.train.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        recipe = mmfw.load_recipe(args.recipe, [*args.overrides, f"run.output_dir={tmp}",
                                                "run.progress=false", "backend.name=cpu",
                                                f"backend.threads={args.threads}"])
        every = recipe.diagnostics.every or 50
        trainer = Trainer(recipe, overwrite=True, console=lambda _: None)
        trainer.model.train()
        diag = trainer.callbacks.items["diagnostics"]
        diag.on_run_start(trainer.ctx)  # the probe batch, as fit() builds it
        if not diag.every:
            sys.exit("diagnostics.every is 0 in this recipe: nothing to measure")
        step_s, grad_s, check_s = [], [], []
        batches = iter(trainer.loader)
        warmup = 5
        for i in range(warmup + args.steps):
            batch = next(batches)
            t0 = time.perf_counter()
            _, img, txt, _ = trainer.run_step(batch)
            t1 = time.perf_counter()
            if i >= warmup:
                step_s.append(t1 - t0)
            if i >= warmup and (i - warmup) % max(1, args.steps // args.checks) == 0:
                t0 = time.perf_counter()
                diag.on_after_backward(trainer.ctx, diag.every)  # this step's .grad
                t1 = time.perf_counter()
                diag.check(trainer.ctx, trainer.model, batch, img, txt)
                t2 = time.perf_counter()
                grad_s.append(t1 - t0)
                check_s.append(t2 - t1)
                trainer.model.train()
    step, grad, check = (statistics.median(x) for x in (step_s, grad_s, check_s))
    result = {
        **record.new_result(), "recipe": Path(args.recipe).name, "threads": args.threads,
        "batch_size": recipe.sampler.batch_size, "embed_dim": recipe.model.embed_dim,
        "probe_size": int(diag.probe.image_ids.shape[0]) if diag.probe is not None else 0,
        "every": every, "step_ms": 1e3 * step, "record_gradients_ms": 1e3 * grad,
        "check_ms": 1e3 * check, "overhead_pct": 100 * (grad + check) / every / step,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        record.write(args.out, result)


if __name__ == "__main__":
    main()
