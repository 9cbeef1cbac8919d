"""Test rsum of the seed-catalogue techniques against InfoNCE on the quickstart data, at the same
budget (not a test).

Each variant is the quickstart recipe (``recipes/quickstart.toml``) with the ``--set`` overrides
below, trained through ``mmfw run`` in its own process for the same number of optimizer steps
(``run.max_steps``; the wall-clock budget is turned off, so the figures do not depend on how
loaded the machine is), and the final test metrics and any collapse warning are read back from
its run directory. Equal steps is the fair budget between losses whose step costs about the same
(their wall-clock seconds are printed beside them); a loss that costs more per step would get
fewer steps at an equal wall-clock budget.

    python benchmarks/catalogue_quality.py --steps 300 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import record  # benchmarks/record.py
import tomli_w

from mmfw.config.recipe import read_toml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.toml"

#: variant -> overrides of the quickstart recipe; ``LOSS_TABLES`` replace its whole [loss]
VARIANTS: dict[str, list[str]] = {
    "infonce (quickstart)": [],
    "prototypical": ["loss.name=prototypical", "loss.warmup_epochs=1"],
    "spectral": [],
    "alignment alone": ["diagnostics.grace_steps=50"],
    "infonce + global negatives": ["loss.name=memory_queue", "loss.mode=global"],
    "infonce + pca adapter": ["model.adapter.name=pca"],
    "infonce, CLIP-exact scratch towers": [
        "model.text.attention=causal", "model.text.pooling=eot", "model.text.init=clip",
        "model.vision.ln_pre=true", "model.vision.pooling=cls", "model.vision.init=clip"],
}
#: losses without a temperature: the quickstart's [loss] table (temperature 0.07) replaced
LOSS_TABLES: dict[str, dict[str, object]] = {
    "spectral": {"name": "spectral"},
    "alignment alone": {"name": "alignment", "metric": "cosine"},
}


def recipe_for(name: str, out: Path) -> Path:
    """The quickstart recipe, with the variant's own [loss] table where it has one."""
    if name not in LOSS_TABLES:
        return RECIPE
    data = read_toml(RECIPE)
    data["loss"] = dict(LOSS_TABLES[name])
    path = out / f"{name.replace(' ', '-')}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def run_variant(name: str, sets: list[str], steps: int, threads: int, out: Path
                ) -> dict[str, object]:
    run_name = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    args = [f"run.name={run_name}", f"run.output_dir={out}", "run.max_minutes=0",
            f"run.max_steps={steps}", "run.epochs=100", "run.progress=false",
            f"backend.threads={threads}", *sets]
    cmd = [sys.executable, "-m", "mmfw", "run", str(recipe_for(name, out)),
           *[a for s in args for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    d = out / run_name
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr[-2000:], "seconds": seconds}
    metrics = json.loads((d / "metrics.json").read_text())
    rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln]
    warnings = sorted({r.get("symptom", r.get("message", ""))[:60] for r in rows
                       if r.get("type") == "warning"})
    return {"variant": name, "overrides": sets, "test_rsum": metrics["rsum"],
            "metrics": metrics, "seconds": round(seconds, 1), "warnings": warnings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                    / "catalogue_quality.json")
    a = ap.parse_args()
    previous = {}
    if a.only is not None and a.out.is_file():  # a partial rerun keeps the other rows
        previous = {r["variant"]: r for r in json.loads(a.out.read_text())["results"]}
    chosen = {k: v for k, v in VARIANTS.items() if a.only is None or k in a.only}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda kv: run_variant(kv[0], kv[1], a.steps, a.threads,
                                                       Path(tmp)), chosen.items()))
    done = {r["variant"]: r for r in results}
    results = [done.get(k) or previous[k] for k in VARIANTS if k in done or k in previous]
    base = next((r.get("test_rsum") for r in results if r["variant"].startswith("infonce (")),
                None)
    print(f"\n{a.steps} steps each, quickstart data and model ({a.jobs} at once, "
          f"{a.threads} thread each)")
    print("| variant | test rsum | vs infonce | seconds | collapse warnings |")
    print("|---|---:|---:|---:|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | failed | | {r['seconds']:.0f} | {r['error'][-200:]!r} |")
            continue
        ratio = f"{r['test_rsum'] / base:.2f}x" if base else ""
        print(f"| {r['variant']} | {r['test_rsum']:.1f} | {ratio} | {r['seconds']:.0f} | "
              f"{'; '.join(r['warnings']) or '-'} |")
    record.write(a.out, record.new_result(steps=a.steps, jobs=a.jobs, threads=a.threads,
                                          recipe=str(RECIPE.relative_to(ROOT)),
                                          results=results))


if __name__ == "__main__":
    main()
