"""The train row of ``metrics.jsonl``: what a log step measured (losses by term, LR,
samples/s, temperature, the batch's similarity gap, the optimisation's own figures)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..parallel import distributed
from ..spi.contracts import LossOutput


@torch.no_grad()
def similarity_stats(image: Tensor, text: Tensor, image_ids: Tensor, text_ids: Tensor
                     ) -> dict[str, Tensor]:
    """Cosine similarity of positives vs negatives in the batch (the collapse signal of every
    log row: a gap near 0 means the model does not tell pairs apart)."""
    v = torch.nn.functional.normalize(image.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    sim = v @ t.T
    pos = image_ids[:, None] == text_ids[None, :]
    pos_mean = (sim * pos).sum() / pos.sum().clamp_min(1)
    neg_mean = (sim * ~pos).sum() / (~pos).sum().clamp_min(1)
    return {"sim/pos_mean": pos_mean, "sim/neg_mean": neg_mean, "sim/gap": pos_mean - neg_mean,
            "sim/std": sim.std()}


class Throughput:
    """Samples per second between log rows (evaluation time excluded by ``reset``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t, self.n = time.perf_counter(), 0

    def add(self, samples: int) -> None:
        self.n += samples

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return rate


def train_row(*, step: int, epoch: int, output: LossOutput, image: Tensor, text: Tensor,
              batch: Any, lr: float, samples_per_s: float, temperature: float | None,
              stats: dict[str, Any], stage: int | None, accumulate: int,
              local_loss: bool) -> dict[str, Any]:
    sim = similarity_stats(image, text, batch.image_ids.to(image.device),
                           batch.text_ids.to(image.device))
    loss, terms = output.loss.detach(), dict(output.terms)
    if local_loss:  # each rank's loss covers its own rows: the batch's loss is their mean
        both = distributed.average(torch.stack([loss.float(), *(
            torch.as_tensor(v, dtype=torch.float32, device=loss.device)
            for v in terms.values())]))
        loss, terms = both[0], dict(zip(terms, both[1:], strict=True))
    row: dict[str, Any] = {"type": "train", "step": step, "epoch": epoch, "loss": float(loss)}
    row.update({f"loss/{k}": float(v) for k, v in terms.items()})
    row.update({"lr": lr, "samples_per_s": samples_per_s})
    if temperature is not None:
        row["temperature"] = temperature
    row.update({k: float(v) for k, v in sim.items()})
    row.update({k: float(v) for k, v in stats.items()})
    if stage is not None:
        row["stage"] = stage
    if accumulate > 1:
        row["accumulate"] = accumulate
    return row
