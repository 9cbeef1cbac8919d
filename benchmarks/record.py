"""What every benchmark writes beside its figures: the machine it ran on, and one JSON file.

Imported by the scripts next to it (``python benchmarks/<script>.py`` puts this folder on
``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """CPU model, cores, versions, torch threads, GPU and the 1/5/15-minute load average: what
    a reader needs to compare a figure with one taken elsewhere (or under load)."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    info: dict[str, Any] = {"cpu": cpu, "nproc": os.cpu_count(), "torch": torch.__version__,
                            "python": platform.python_version(),
                            "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(Exception):
        import open_clip

        info["open_clip"] = open_clip.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        info["loadavg"] = f.read().split()[:3]
    return info


def new_result(**fields: Any) -> dict[str, Any]:
    """The top of a result file: the date and the machine, then ``fields``."""
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **fields}


def write(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` as indented JSON (folders made as needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return path
