"""Training step time of two mmfw source trees, measured in one invocation (not a test).

For a change that must not slow training (a refactor), this runs the same steps with each tree
in its own fresh process, alternating ABBA so background load hits both alike: the quickstart
model shape, its recipe's precision and batch, each step the trainer's own ``run_step`` on the
same pre-collated batches (the data pipeline is not timed). Each tree is run by the Python
interpreter of an environment where it is installed.

    python benchmarks/revisions.py --a /tmp/oldvenv/bin/python --b /work/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import record  # benchmarks/record.py

HERE = Path(__file__).resolve().parent

CHILD = r'''
import json, sys, tempfile, time
import torch
import mmfw
try:
    from mmfw.train.loop import Trainer
except ImportError:  # mmfw 0.1's layout
    from mmfw.engine import Trainer
recipe, steps, warmup, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
with tempfile.TemporaryDirectory() as tmp:
    r = mmfw.load_recipe(recipe, [f"run.output_dir={tmp}", "run.progress=false",
                                  f"backend.threads={threads}", "data.train_images=2000"])
    t = Trainer(r, console=lambda s: None)
    it = iter(t.loader)
    batches = [next(it) for _ in range(8)]
    t.model.train()
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        t.run_step(batches[k % len(batches)])
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"mmfw": mmfw.__file__, "times": times,
                      "batch": r.sampler.batch_size}))
'''


def run(python: str, recipe: str, steps: int, warmup: int, threads: int) -> dict:
    out = subprocess.run([python, "-c", CHILD, recipe, str(steps), str(warmup), str(threads)],
                         capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    # (not the checkout: its build metadata would shadow tree A's entry points)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="python of the environment with tree A")
    ap.add_argument("--b", required=True, help="python of the environment with tree B")
    ap.add_argument("--recipe", default=str(HERE.parent / "recipes" / "quickstart.toml"))
    ap.add_argument("--pairs", type=int, default=3, help="ABBA pairs")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(HERE / "results" / "revisions.json"))
    a = ap.parse_args()
    per: dict[str, list[float]] = {"A": [], "B": []}
    where: dict[str, str] = {}
    for i in range(a.pairs):
        for side in ("AB" if i % 2 == 0 else "BA"):
            res = run(a.a if side == "A" else a.b, a.recipe, a.steps, a.warmup, a.threads)
            where[side] = res["mmfw"]
            per[side].append(statistics.median(res["times"]))
            print(f"pair {i + 1} {side}: median step {per[side][-1] * 1e3:.1f} ms",
                  flush=True)
    ratios = [b / x for x, b in zip(per["A"], per["B"], strict=True)]
    result = record.new_result(args=vars(a),
                               A={"mmfw": where["A"], "median_step_s": per["A"]},
                               B={"mmfw": where["B"], "median_step_s": per["B"]},
                               step_time_ratio_b_over_a=ratios)
    record.write(a.json, result)
    print(f"A {where['A']}\nB {where['B']}")
    print(f"step time B/A: median {statistics.median(ratios):.3f} "
          f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)}); below 1: B is faster")


if __name__ == "__main__":
    sys.exit(main())
