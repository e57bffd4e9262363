"""Provenance that stores, reports and benchmarks record next to their numbers: installed package versions and the
hardware they ran on. One helper per fact, so a training session, an eval report and a benchmark describe the same
machine the same way.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Iterable
from typing import Any, TypeVar

M = TypeVar("M")


def package_versions(packages: Iterable[str], missing: M = "not installed") -> dict[str, str | M]:
    """{distribution name: installed version, or `missing` when it is not installed}."""
    out: dict[str, str | M] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = missing
    return out


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux; `platform.processor()` or the machine type elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def hardware_description(device: Any = "cpu") -> dict[str, Any]:
    """What a measurement ran on: platform, CPU model, core counts, torch threads, device and, on CUDA, the GPU name.

    torch is imported here, not at module level, so reading versions never pays for it.
    """
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(), "torch_threads": torch.get_num_threads(), "device": str(device),
    }
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(dev)
    return hw


def hardware_summary(device: Any = "cpu") -> str:
    """One line for a results page or a training session: the GPU name on CUDA, else "<CPU model>, <N> cores"."""
    hw = hardware_description(device)
    return hw.get("gpu") or f"{hw['cpu']}, {hw['cpu_count']} cores"
