"""How the SDPA path splits the in-projection into q, k, v: forward + backward time (not a test).

``scratch-text``'s SDPA path (``attention_impl = "sdpa"``, regime A of train_throughput.py)
takes ``q``, ``k``, ``v`` ``[B, H, L, d]`` as views of the packed in-projection's output
``[B, L, 3 H d]``. Two orders give the same views:

- ``permute``: ``view(B, L, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)`` (timm's and mmfw's
  earlier order): backwards, the gradients are stacked in ``[3, B, H, L, d]``, then copied
  to the in-projection's layout;
- ``split``: ``view(B, L, 3, H, d).unbind(2)``, then ``transpose(1, 2)`` (what
  ``mmfw_encoders.attention.head_views`` does): the stack writes the in-projection's layout
  directly.

Each round times both orders (in-projection, ``F.scaled_dot_product_attention`` on the math
kernel with a key-padding mask, backward to the input and the weights), alternating which
goes first; the table gives the median ms per call and the per-round ratio.

    python benchmarks/attention_layout.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import record  # benchmarks/record.py
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmfw_encoders.attention import head_views


def permute_views(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, n, w3 = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, w3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


Views = Callable[[Tensor, int], tuple[Tensor, ...]]


def step(views: Views, x: Tensor, w: Tensor, keep: Tensor, heads: int,
         grad: Tensor) -> tuple[Tensor, ...]:
    """In-projection, attention, backward: the output and the input's and weight's grads."""
    y = F.scaled_dot_product_attention(*views(F.linear(x, w), heads), attn_mask=keep)
    return (y, *torch.autograd.grad(y, (x, w), grad))


def timed(views: Views, x: Tensor, w: Tensor, keep: Tensor, heads: int, grad: Tensor,
          calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        step(views, x, w, keep, heads, grad)
    return (time.perf_counter() - t) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--length", type=int, default=48, help="padded length (the context)")
    ap.add_argument("--real", type=int, default=26, help="real tokens a row (keys kept)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--calls", type=int, default=20, help="timed calls a round and order")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    b, n, w = a.batch, a.length, a.width
    x = torch.randn(b, n, w, generator=g).requires_grad_()
    weight = (torch.randn(3 * w, w, generator=g) * w**-0.5).requires_grad_()
    keep = (torch.arange(n) < a.real)[None, None, None, :].expand(b, 1, 1, n)
    grad = torch.randn(b, a.heads, n, w // a.heads, generator=g)
    orders = {"permute": permute_views, "split": head_views}
    ms: dict[str, list[float]] = {k: [] for k in orders}
    with sdpa_kernel(SDPBackend.MATH):
        outs = {name: step(views, x, weight, keep, a.heads, grad)  # the same values, checked
                for name, views in orders.items()}
        for u, v in zip(outs["permute"], outs["split"], strict=True):
            torch.testing.assert_close(u, v)
        for views in orders.values():  # warm-up
            timed(views, x, weight, keep, a.heads, grad, 5)
        for r in range(a.rounds):
            for name in (list(orders) if r % 2 == 0 else list(orders)[::-1]):
                ms[name].append(timed(orders[name], x, weight, keep, a.heads, grad, a.calls))
    ratios = [p / s for p, s in zip(ms["permute"], ms["split"], strict=True)]
    print(f"batch {b}, length {n} ({a.real} real), width {w}, heads {a.heads}, "
          f"threads {torch.get_num_threads()}, fp32, math SDPA")
    for name in orders:
        print(f"{name:8} median {statistics.median(ms[name]):7.2f} ms  "
              f"(min {min(ms[name]):.2f}, max {max(ms[name]):.2f})")
    print(f"permute / split: median {statistics.median(ratios):.3f}x "
          f"(rounds {min(ratios):.3f}..{max(ratios):.3f})")
    record.write(a.json or Path(__file__).parent / "results" / "attention_layout.json",
                 record.new_result(args=vars(a), ms=ms, ratios=ratios,
                                   median_ms={k: statistics.median(v) for k, v in ms.items()}))


if __name__ == "__main__":
    main()
