"""The cpu backend's ``keep_freed_memory``: glibc's malloc keeps what a step frees for the next
step, so steps stop page-faulting their buffers in again (``mmfw_backends.allocator``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from torch import nn

from helpers import SUBPROCESS_ENV
from mmfw_backends.allocator import glibc
from mmfw_backends.devices import CPUBackend, CPUOptions

pytestmark = pytest.mark.skipif(glibc() is None, reason="mallopt is glibc's")

#: minor page faults per training step of a small transformer, in a fresh interpreter
PROBE = textwrap.dedent("""
    import resource, sys, torch
    from mmfw_backends.devices import CPUBackend, CPUOptions
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(
        128, 4, 256, batch_first=True, dropout=0.0), 2)
    CPUBackend(CPUOptions(keep_freed_memory=sys.argv[1] == "keep")).prepare(model)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, 48, 128)
    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
""")


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=SUBPROCESS_ENV,
                         capture_output=True, text=True, timeout=120, check=True)
    return float(out.stdout.split()[-1])


def test_kept_memory_stops_the_page_faults_of_every_step() -> None:
    default, kept = faults_per_step("default"), faults_per_step("keep")
    # glibc's own thresholds: thousands a step here (megabyte buffers mapped anew); kept:
    # the heap's pages are reused, the few faults left are the interpreter's own
    assert kept < max(100.0, default / 4), (kept, default)


def test_the_backend_line_says_whether_memory_is_kept() -> None:
    on = CPUBackend(CPUOptions())
    on.prepare(nn.Linear(2, 2))
    assert on.kept and "freed memory kept" in on.describe()
    off = CPUBackend(CPUOptions(keep_freed_memory=False))
    off.prepare(nn.Linear(2, 2))
    assert not off.kept and "freed memory kept" not in off.describe()
