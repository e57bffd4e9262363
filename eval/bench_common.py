"""What every benchmark script shares: naming the hardware and writing its JSON + Markdown results."""

from __future__ import annotations

import json
import os
import platform
from typing import Any


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), for the hardware line of every reported figure."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_results(result: dict[str, Any], json_path: str | None, md_path: str | None, markdown: str) -> None:
    """Write the raw result as JSON and its Markdown rendering (folders created as needed)."""
    for path, text in ((json_path, json.dumps(result, indent=2, default=str)), (md_path, markdown)):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(text if text.endswith("\n") else text + "\n")
