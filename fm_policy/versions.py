"""Installed package versions, for the provenance that stores, reports and benchmarks record next to their numbers."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from typing import TypeVar

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
