"""Device backends: where tensors live, at what precision, and how runs are seeded.

Every backend also takes ``channels_last`` (NHWC memory format for the vision tower and image
batches: faster convolutions on tensor cores) and ``compile`` (``torch.compile`` of the encoders
and adapters in place, so checkpoints keep their parameter names).
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
from collections.abc import Iterator
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmfw.spi import option

from . import allocator, cpufeatures

Precision = Literal["fp32", "bf16", "fp16"]
#: a precision, or ``auto``: the backend chooses for its device
AutoPrecision = Literal["auto", "fp32", "bf16", "fp16"]

#: PYTORCH_ENABLE_MPS_FALLBACK as it was when this process started (torch reads it at import)
MPS_FALLBACK_ENV = "PYTORCH_ENABLE_MPS_FALLBACK"
_MPS_FALLBACK_AT_START = os.environ.get(MPS_FALLBACK_ENV, "") not in ("", "0")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _compile_doc() -> str:
    return "torch.compile the encoders and adapters (first steps are slow while it compiles)"


class _Prepare:
    """``prepare(model)`` and ``memory_format`` shared by all backends."""

    options: Any

    @property
    def memory_format(self) -> torch.memory_format | None:
        return torch.channels_last if self.options.channels_last else None

    def prepare(self, model: nn.Module) -> None:
        o = self.options
        if o.channels_last and hasattr(model, "vision"):
            model.vision.to(memory_format=torch.channels_last)
        if o.compile:
            for name in ("vision", "text", "vision_adapter", "text_adapter"):
                part = getattr(model, name, None)
                if isinstance(part, nn.Module):
                    part.compile(backend=o.compile_backend, mode=o.compile_mode or None,
                                 dynamic=None)

    def _flags(self) -> str:
        o = self.options
        flags = [f for f, on in (("channels_last", o.channels_last),
                                 (f"compile:{o.compile_backend}", o.compile)) if on]
        return ", " + ", ".join(flags) if flags else ""


@attrs.frozen
class CPUOptions:
    threads: int = option(0, doc="torch intra-op threads (0: torch's default, one per core)",
                          validator=attrs.validators.ge(0))
    precision: AutoPrecision = option(
        "auto", doc="bf16: autocast, fast on CPUs with bf16 matrix instructions (AMX-BF16, "
        "AVX512-BF16, Arm BF16) and far slower than fp32 on the others; auto: bf16 where the "
        "CPU has them, else fp32; fp16: autocast with a GradScaler (slow on most CPUs; "
        "exercises the GPU's fp16 path)")
    sdpa: Literal["math", "auto"] = option(
        "math", doc="attention kernel: math (on this CPU faster than torch's flash kernel "
        "for sequences up to about 100 tokens in fp32 and at every length tried in bf16, "
        "whose flash backward made steps 2.2x slower; it holds the L x L weights; "
        "benchmarks/README.md) or auto (torch's choice: faster in fp32 from about 128 "
        "tokens, e.g. ViT-B/16 at 224 px)")
    channels_last: bool = option(False, doc="NHWC memory format for the vision tower")
    keep_freed_memory: bool = option(
        True, doc="glibc: keep the memory a step frees for the next step (mallopt's mmap and "
        "trim thresholds fixed high) instead of mapping it again, page fault by page fault, "
        "every step; no effect on other C libraries")
    compile: bool = option(False, doc=_compile_doc())
    compile_backend: str = option("inductor", doc="torch.compile backend (inductor needs a "
                                  "C++ compiler on CPU; aot_eager traces without one)")
    compile_mode: str = option("", doc="torch.compile mode ('' default, 'max-autotune', ...)")


@contextlib.contextmanager
def _cpu_autocast(dtype: torch.dtype | None, math_sdpa: bool) -> Iterator[None]:
    """CPU autocast to ``dtype`` (none: fp32), with SDPA's math kernel if ``math_sdpa``
    (entered on ``with``)."""
    with contextlib.ExitStack() as stack:
        if dtype is not None:
            stack.enter_context(torch.autocast("cpu", dtype=dtype))
        if math_sdpa:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


class CPUBackend(_Prepare):
    name = "cpu"
    Options = CPUOptions

    def __init__(self, options: CPUOptions | None = None) -> None:
        self.options = options or CPUOptions()
        self.device = torch.device("cpu")
        #: what runs: ``options.precision`` with ``auto`` resolved for this CPU
        self.precision = (cpufeatures.auto_cpu_precision() if self.options.precision == "auto"
                          else self.options.precision)
        #: whether glibc keeps freed memory for the next step (set by ``prepare``)
        self.kept = False
        if self.options.threads:
            torch.set_num_threads(self.options.threads)

    def available(self) -> bool:
        return True

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.kept = self.options.keep_freed_memory and allocator.keep_freed_memory()

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return _cpu_autocast(dtype, math_sdpa=self.options.sdpa == "math")

    def step_context(self) -> contextlib.AbstractContextManager:
        """The math kernel for backward passes too: a checkpointed layer recomputed there
        must save what its forward saved (torch.utils.checkpoint checks the metadata)."""
        if self.options.sdpa == "math":
            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler("cpu") if self.precision == "fp16" else None

    def seed(self, seed: int) -> None:
        seed_everything(seed)

    def memory_stats(self) -> dict[str, float]:
        return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def describe(self) -> str:
        o = self.options
        sdpa = ", math sdpa" if o.sdpa == "math" else ""
        precision = self.precision
        if o.precision == "auto":
            precision += f" (auto: {cpufeatures.native_bf16() or 'no bf16 matrix instructions'})"
        kept = ", freed memory kept" if self.kept else ""
        return f"cpu ({torch.get_num_threads()} threads, {precision}{sdpa}{self._flags()}{kept})"


@attrs.frozen
class CUDAOptions:
    index: int = option(0, doc="GPU index", validator=attrs.validators.ge(0))
    precision: Precision = option("bf16", doc="autocast dtype; fp16 uses a GradScaler; bf16 "
                                  "falls back to fp16 on GPUs without bf16")
    tf32: bool = option(True, doc="allow TF32 matmuls and convolutions (fp32 math)")
    channels_last: bool = option(False, doc="NHWC memory format for the vision tower")
    compile: bool = option(False, doc=_compile_doc())
    compile_backend: str = option("inductor", doc="torch.compile backend")
    compile_mode: str = option("", doc="torch.compile mode ('' default, 'max-autotune', ...)")


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (torch's newer per-backend precision API
    where it exists, else the ``allow_tf32`` flags)."""
    matmul = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        conv.fp32_precision = "tf32" if enabled else "ieee"
    else:  # pragma: no cover - older torch
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


class CUDABackend(_Prepare):
    name = "cuda"
    Options = CUDAOptions

    def __init__(self, options: CUDAOptions | None = None) -> None:
        self.options = options or CUDAOptions()
        self.device = torch.device("cuda", self.options.index)
        if self.available():
            set_tf32(self.options.tf32)
            torch.backends.cudnn.benchmark = True

    def available(self) -> bool:
        return torch.cuda.is_available() and self.options.index < torch.cuda.device_count()

    def why_unavailable(self) -> str:
        if not torch.cuda.is_available():
            build = torch.version.cuda
            return (f"torch {torch.__version__} sees no CUDA GPU" +
                    (" (it is a CPU-only build)" if build is None else
                     f" (built for CUDA {build}: check the driver and CUDA_VISIBLE_DEVICES)"))
        return (f"GPU index {self.options.index} requested, {torch.cuda.device_count()} "
                "visible")

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
        dtype = self._dtype() if self.available() else None
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        tf32 = ", tf32" if self.options.tf32 else ""
        return f"cuda:{self.options.index} ({name}, {precision}{tf32}{self._flags()})"


@attrs.frozen
class MPSOptions:
    fallback: bool = option(True, doc="run ops MPS lacks on the CPU (needs "
                            "PYTORCH_ENABLE_MPS_FALLBACK=1 when the process starts)")
    channels_last: bool = option(False, doc="NHWC memory format for the vision tower")
    compile: bool = option(False, doc=_compile_doc())
    compile_backend: str = option("inductor", doc="torch.compile backend")
    compile_mode: str = option("", doc="torch.compile mode ('' default, 'max-autotune', ...)")


class MPSBackend(_Prepare):
    """Apple-silicon GPUs. Operators MPS lacks can run on the CPU, but only if
    ``PYTORCH_ENABLE_MPS_FALLBACK=1`` was in the environment when torch was imported (torch
    registers the fallback at import), so the backend can only check it and say how to set it.
    It is also exported for child processes (DataLoader workers, torchrun)."""

    name = "mps"
    Options = MPSOptions

    def __init__(self, options: MPSOptions | None = None) -> None:
        self.options = options or MPSOptions()
        self.fallback_active = _MPS_FALLBACK_AT_START
        self.device = torch.device("mps")
        if self.options.fallback and self.available():
            os.environ.setdefault(MPS_FALLBACK_ENV, "1")

    def available(self) -> bool:
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())

    def why_unavailable(self) -> str:
        if not torch.backends.mps.is_built():
            return f"torch {torch.__version__} was built without MPS (Apple silicon, macOS only)"
        return "MPS is built in but not usable here (it needs macOS 12.3+ on Apple silicon)"

    def fallback_hint(self) -> str:
        return (f"start mmfw with {MPS_FALLBACK_ENV}=1 in the environment (e.g. "
                f"`{MPS_FALLBACK_ENV}=1 mmfw run recipe.toml`): torch reads it at import, so "
                "setting it later has no effect")

    def explain(self, error: BaseException) -> str | None:
        text = str(error)
        if "MPS" not in text and "mps" not in text:
            return None
        if self.fallback_active:
            return f"an operator failed on MPS even with the CPU fallback on: {text}"
        return (f"an operator is not implemented on MPS: {text.splitlines()[0]}\n"
                f"  {self.fallback_hint()}; or use backend.name = \"cpu\"")

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
        if self.fallback_active:
            state = "cpu fallback on"
        elif self.options.fallback:
            state = f"cpu fallback OFF: {self.fallback_hint()}"
        else:
            state = "cpu fallback off"
        return f"mps ({state}{self._flags()})"


@attrs.frozen
class AutoOptions:
    precision: AutoPrecision = option(
        "auto", doc="auto: bf16 on CUDA and on CPUs with bf16 matrix instructions (AMX-BF16, "
        "AVX512-BF16, Arm BF16), fp32 elsewhere (MPS, other CPUs)"
    )
    threads: int = option(0, doc="CPU threads when it falls back to the CPU",
                          validator=attrs.validators.ge(0))
    tf32: bool = option(True, doc="on CUDA: allow TF32 matmuls and convolutions")
    channels_last: bool = option(False, doc="NHWC memory format for the vision tower")
    compile: bool = option(False, doc=_compile_doc())
    compile_backend: str = option("inductor", doc="torch.compile backend")
    compile_mode: str = option("", doc="torch.compile mode ('' default, 'max-autotune', ...)")


def auto_backend(options: AutoOptions | None = None) -> CUDABackend | MPSBackend | CPUBackend:
    """The best available backend: CUDA, then MPS, then CPU."""
    o = options or AutoOptions()
    prec = o.precision
    shared = dict(channels_last=o.channels_last, compile=o.compile,
                  compile_backend=o.compile_backend, compile_mode=o.compile_mode)
    if torch.cuda.is_available():
        return CUDABackend(CUDAOptions(precision="bf16" if prec == "auto" else prec, tf32=o.tf32,
                                       **shared))
    mps = MPSBackend(MPSOptions(**shared))
    if mps.available():
        return mps
    # fp16 asks for the GPU's fp16 path: a CPU fallback runs fp32 instead
    return CPUBackend(CPUOptions(threads=o.threads, precision="fp32" if prec == "fp16" else prec,
                                 **shared))


auto_backend.Options = AutoOptions  # type: ignore[attr-defined]
