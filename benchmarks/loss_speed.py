"""Forward + backward time of every installed loss on CPU (not a test).

    python benchmarks/loss_speed.py --batch 4096 --dim 512 --repeat 3
"""

from __future__ import annotations

import argparse
import time

import torch

import mmfw

TEACHER_DIM = 64


def options(name: str) -> dict:
    if name == "mixture":
        return {"terms": [{"name": "infonce"}, {"name": "decorrelation", "weight": 0.2}]}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--losses", nargs="*", help="names (default: every installed loss)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, d = args.batch, args.dim
    image, text = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    ids = torch.randint(0, b // 2, (b,), generator=g)  # repeated ids: multi-positive masks
    context = {"teacher_image": torch.randn(b, TEACHER_DIM, generator=g),
               "teacher_text": torch.randn(b, TEACHER_DIM, generator=g)}
    names = args.losses or mmfw.available("loss")
    print(f"B={b} D={d} threads={torch.get_num_threads()} repeat={args.repeat}")
    print(f"{'loss':<20} {'mean ms':>10} {'min ms':>10}")
    for name in names:
        loss = mmfw.create("loss", name, **options(name))
        times = []
        for k in range(args.repeat + 1):
            v, t = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
            start = time.perf_counter()
            out = loss(v, t, image_ids=ids, text_ids=ids, **context)
            out.loss.backward()
            if k:  # the first run warms up (and fills a memory queue)
                times.append(time.perf_counter() - start)
        print(f"{name:<20} {1e3 * sum(times) / len(times):>10.1f} {1e3 * min(times):>10.1f}")


if __name__ == "__main__":
    main()
