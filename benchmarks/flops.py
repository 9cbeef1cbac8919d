"""Model FLOPs of a CLIP-style training step, and a measured dense-matmul peak (not a test).

Used by ``train_throughput.py`` for its MFU column: achieved model FLOP/s (the FLOPs the model's
math needs, divided by the step time) as a fraction of what ``torch.mm`` reaches on the same
machine, precision and thread count. The counting follows Kaplan et al. 2020 ("Scaling laws
for neural language models", sec. 2.1) and PaLM's MFU (Chowdhery et al. 2022, appendix B):

- a linear layer costs 2 FLOPs per weight per token it is applied to (one multiply-add);
- self-attention adds ``4 * L^2 * d`` per layer and sequence (``Q K^T`` and ``A V``, each
  ``2 * L^2 * d``), with ``L`` the length the kernel runs on (padding included: the dense
  kernels compute it, masked or not; a causal mask is counted dense too);
- the backward pass costs twice the forward, so a training step is 3x the forward.

Norms, activations, softmax, embeddings and the optimizer are left out (not matmuls), as in
those papers. ``python benchmarks/flops.py`` prints the matmul peak of this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextWork:
    """What the text tower computes per step, averaged over the batches a run cycles through.

    ``linear_tokens``: tokens the per-token layers (projections, MLP) run on, per step (all
    positions for a padded tower; the real tokens for mmfw's unpadded one). ``attention_sq``:
    the sum over the batch's sequences of the attention length squared."""

    linear_tokens: float
    attention_sq: float


def layer_linear_params(width: int, mlp_ratio: float) -> int:
    """Weights of one pre-norm transformer block's matmuls: in-projection (3 d^2),
    out-projection (d^2) and the two MLP layers (2 d * hidden)."""
    return 4 * width * width + 2 * width * int(width * mlp_ratio)


def vision_forward(batch: int, image_size: int, patch_size: int, width: int, depth: int,
                   mlp_ratio: float, embed_dim: int) -> float:
    """Forward FLOPs of the ViT (class token included) and its projection, per step."""
    patches = (image_size // patch_size) ** 2
    tokens = patches + 1
    patch_embed = 2 * (3 * patch_size * patch_size * width) * patches
    blocks = depth * (2 * layer_linear_params(width, mlp_ratio) * tokens
                      + 4 * tokens * tokens * width)
    return float(batch * (patch_embed + blocks + 2 * width * embed_dim))


def text_forward(batch: int, work: TextWork, width: int, depth: int, mlp_ratio: float,
                 embed_dim: int) -> float:
    """Forward FLOPs of the text transformer and its projection, per step."""
    blocks = depth * (2 * layer_linear_params(width, mlp_ratio) * work.linear_tokens
                      + 4 * work.attention_sq * width)
    return float(blocks + batch * 2 * width * embed_dim)


def step_flops(vision: float, text: float, batch: int, embed_dim: int) -> float:
    """A training step: 3x the forward of both towers and the logits (``B x E x B``)."""
    return 3.0 * (vision + text + 2.0 * batch * batch * embed_dim)


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 10
                ) -> dict[str, float]:
    """FLOP/s of ``torch.mm`` of two ``n x n`` matrices (median of ``repeats`` after two
    warm-up calls) at the current ``torch.get_num_threads()``: the dense-matmul ceiling the
    MFU is a fraction of."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for k in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= 2:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "median_s": t, "flops_per_s": 2.0 * n**3 / t}


def main() -> None:
    ap = argparse.ArgumentParser(description="dense-matmul peak of this machine")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    for dtype in (torch.float32, torch.bfloat16):
        p = matmul_peak(a.n, dtype, torch.device(a.device))
        print(f"torch.mm {a.n}x{a.n} {p['dtype']}, {p['threads']} threads: "
              f"{p['flops_per_s'] / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
