"""The train row of ``metrics.jsonl``: what a log step measured (losses by term, LR,
samples/s, temperature, the batch's similarity gap, the optimisation's own figures, where the
steps' time went and the process's resources)."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Mapping
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
    """Samples per second between log rows (evaluation time excluded by ``reset``), and where
    the steps' wall time went: waiting for the loader, the step itself, the rest."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t, self.n, self.steps = time.perf_counter(), 0, 0
        self.data = self.compute = 0.0

    def add(self, samples: int, data_s: float = 0.0, compute_s: float = 0.0) -> None:
        """One step of ``samples`` that waited ``data_s`` for its batch and took
        ``compute_s`` (forward, backward, update)."""
        self.n += samples
        self.steps += 1
        self.data += data_s
        self.compute += compute_s

    def take(self) -> float:
        return self.take_all()["samples_per_s"]

    def take_all(self) -> dict[str, float]:
        """``samples_per_s`` and the ``time/*`` keys of a train row, since the last take:
        seconds per step of wall time (``step_s``), of waiting for the loader (``data_s``)
        and of the step itself (``compute_s``: host time; on CUDA the GPU may still be busy);
        ``data_frac`` is the share of wall time spent waiting for data."""
        now = time.perf_counter()
        wall, steps = max(now - self.t, 1e-9), max(self.steps, 1)
        out = {"samples_per_s": self.n / wall, "time/step_s": wall / steps,
               "time/data_s": self.data / steps, "time/compute_s": self.compute / steps,
               "time/data_frac": min(self.data / wall, 1.0)}
        self.t, self.n, self.steps, self.data, self.compute = now, 0, 0, 0.0, 0.0
        return out


def _rss_mb() -> float:
    """The process's resident memory (Linux: now; elsewhere: its peak)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB else
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class SystemStats:
    """The ``sys/*`` keys of a train row: resident memory, CPU threads and use, and on CUDA
    the allocated and peak memory and (with nvidia-ml-py installed) the GPU's utilisation.
    Cheap: a file read and a few counters, once per log row."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu, self.t = self._cpu(), time.perf_counter()
        self.utilisation = device.type == "cuda"  # until torch.cuda.utilization() fails

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def take(self) -> dict[str, float]:
        cpu, now = self._cpu(), time.perf_counter()
        out = {"sys/rss_mb": _rss_mb(), "sys/threads": torch.get_num_threads(),
               "sys/cpu_util": (cpu - self.cpu) / max(now - self.t, 1e-9)}
        self.cpu, self.t = cpu, now
        d = self.device
        if d.type == "cuda":
            out["sys/cuda_alloc_mb"] = torch.cuda.memory_allocated(d) / 2**20
            out["sys/cuda_peak_mb"] = torch.cuda.max_memory_allocated(d) / 2**20
            if self.utilisation:
                try:
                    out["sys/gpu_util"] = float(torch.cuda.utilization(d))
                except Exception:  # no pynvml (nvidia-ml-py) or no NVML: said by its absence
                    self.utilisation = False
        elif d.type == "mps":
            out["sys/mps_alloc_mb"] = torch.mps.current_allocated_memory() / 2**20
        return out


def train_row(*, step: int, epoch: int, output: LossOutput, image: Tensor, text: Tensor,
              batch: Any, lr: float, samples_per_s: float, temperature: float | None,
              stats: dict[str, Any], stage: int | None, accumulate: int,
              local_loss: bool, system: Mapping[str, float] | None = None) -> dict[str, Any]:
    sim = similarity_stats(image, text, batch.image_ids.to(image.device),
                           batch.text_ids.to(image.device))
    loss, terms = output.loss, dict(output.terms)  # the step hands them on detached
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
    row.update(system or {})
    return row
