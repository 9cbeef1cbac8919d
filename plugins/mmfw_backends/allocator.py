"""glibc's malloc set for a training loop: memory a step frees is kept for the next step.

PyTorch's CPU tensors come from the C library's ``malloc``. Each training step frees and
allocates again the same activation and gradient buffers, from kilobytes to tens of megabytes.
glibc serves a request above ``M_MMAP_THRESHOLD`` with fresh pages from ``mmap`` and unmaps
them on ``free``; it returns the free top of its heap to the system once that exceeds
``M_TRIM_THRESHOLD``. Both thresholds adapt upwards by themselves only partly (the dynamic
threshold follows freed mmap chunks), so a step keeps asking the kernel for pages it has just
given back, and every first touch of such a page is a page fault that zero-fills it: about
14,000 minor faults (55 MB) a step at the quickstart's shape, against about 540 with the
thresholds fixed high (``/usr/bin/time`` over 20 and 60 steps; benchmarks/README.md). Setting
them (``mallopt(3)``, the same as the ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
environment variables, which take effect only at start-up) keeps the freed memory in the
heap, where the next step reuses it, as PyTorch's CUDA caching allocator does on the GPU. The
cost: the process holds its peak heap instead of handing the free part back between steps.

Elsewhere than glibc (macOS, musl) :func:`keep_freed_memory` changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest M_MMAP_THRESHOLD on 64-bit systems (``HEAP_MAX_SIZE / 2``, 32 MiB): larger
#: requests (rare at the shapes trained on a CPU) still get their own mapping
MMAP_THRESHOLD = 32 * 1024 * 1024
#: the free heap top kept before trimming: mallopt's largest (an int), more than a step frees
TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") \
        else None


@functools.cache
def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds high for the rest of the process (once); whether
    glibc took both."""
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "glibc", "keep_freed_memory"]
