"""Device backends: where tensors live, at what precision, and how runs are seeded."""

from __future__ import annotations

import contextlib
import os
import random
import resource
from typing import Literal

import attrs
import numpy as np
import torch

from mmfw.options import option

Precision = Literal["fp32", "bf16", "fp16"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@attrs.frozen
class CPUOptions:
    threads: int = option(0, doc="torch intra-op threads (0: torch's default, one per core)",
                          validator=attrs.validators.ge(0))
    precision: Literal["fp32", "bf16"] = option("fp32", doc="bf16 autocast on CPUs that have it")


class CPUBackend:
    name = "cpu"
    Options = CPUOptions

    def __init__(self, options: CPUOptions | None = None) -> None:
        self.options = options or CPUOptions()
        self.device = torch.device("cpu")
        if self.options.threads:
            torch.set_num_threads(self.options.threads)

    def available(self) -> bool:
        return True

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.options.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def grad_scaler(self) -> None:
        return None

    def seed(self, seed: int) -> None:
        seed_everything(seed)

    def memory_stats(self) -> dict[str, float]:
        return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def describe(self) -> str:
        return f"cpu ({torch.get_num_threads()} threads, {self.options.precision})"


@attrs.frozen
class CUDAOptions:
    index: int = option(0, doc="GPU index", validator=attrs.validators.ge(0))
    precision: Precision = option("bf16", doc="autocast dtype; fp16 uses a GradScaler")
    tf32: bool = option(True, doc="allow TF32 matmuls and convolutions")


class CUDABackend:
    name = "cuda"
    Options = CUDAOptions

    def __init__(self, options: CUDAOptions | None = None) -> None:
        self.options = options or CUDAOptions()
        self.device = torch.device("cuda", self.options.index)
        if self.available():
            torch.backends.cuda.matmul.allow_tf32 = self.options.tf32
            torch.backends.cudnn.allow_tf32 = self.options.tf32
            torch.backends.cudnn.benchmark = True

    def available(self) -> bool:
        return torch.cuda.is_available() and self.options.index < torch.cuda.device_count()

    def _dtype(self) -> torch.dtype | None:
        p = self.options.precision
        if p == "bf16" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self._dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler("cuda") if self._dtype() is torch.float16 else None

    def seed(self, seed: int) -> None:
        seed_everything(seed)
        torch.cuda.manual_seed_all(seed)

    def memory_stats(self) -> dict[str, float]:
        if not self.available():
            return {}
        return {"max_allocated_mb": torch.cuda.max_memory_allocated(self.device) / 2**20}

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.available() else "unavailable"
        return f"cuda:{self.options.index} ({name}, {self.options.precision})"


@attrs.frozen
class MPSOptions:
    fallback: bool = option(True, doc="run ops MPS lacks on the CPU (PYTORCH_ENABLE_MPS_FALLBACK)")


class MPSBackend:
    name = "mps"
    Options = MPSOptions

    def __init__(self, options: MPSOptions | None = None) -> None:
        self.options = options or MPSOptions()
        if self.options.fallback:
            os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
        self.device = torch.device("mps")

    def available(self) -> bool:
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def grad_scaler(self) -> None:
        return None

    def seed(self, seed: int) -> None:
        seed_everything(seed)

    def memory_stats(self) -> dict[str, float]:
        if not self.available():
            return {}
        return {"allocated_mb": torch.mps.current_allocated_memory() / 2**20}

    def describe(self) -> str:
        return f"mps (cpu fallback {'on' if self.options.fallback else 'off'})"


@attrs.frozen
class AutoOptions:
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", doc="auto: bf16 on CUDA, fp32 elsewhere"
    )
    threads: int = option(0, doc="CPU threads when it falls back to the CPU",
                          validator=attrs.validators.ge(0))


def auto_backend(options: AutoOptions | None = None):
    """The best available backend: CUDA, then MPS, then CPU."""
    o = options or AutoOptions()
    prec = o.precision
    cuda = CUDABackend(CUDAOptions(precision="bf16" if prec == "auto" else prec))
    if cuda.available():
        return cuda
    mps = MPSBackend()
    if mps.available():
        return mps
    return CPUBackend(CPUOptions(threads=o.threads, precision="bf16" if prec == "bf16" else "fp32"))


auto_backend.Options = AutoOptions  # type: ignore[attr-defined]
