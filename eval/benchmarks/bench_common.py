"""What every benchmark script shares: writing its JSON + Markdown results. (The hardware and package versions
every figure is reported with come from `fm_policy.versions`, the one helper the library uses too.)"""

from __future__ import annotations

import json
import os
from typing import Any


def write_results(result: dict[str, Any], json_path: str | None, md_path: str | None, markdown: str) -> None:
    """Write the raw result as JSON and its Markdown rendering (folders created as needed)."""
    for path, text in ((json_path, json.dumps(result, indent=2, default=str)), (md_path, markdown)):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(text if text.endswith("\n") else text + "\n")
