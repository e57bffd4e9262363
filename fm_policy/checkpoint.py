"""Atomic, verifiable checkpoint directories.

A checkpoint is a directory written under a temporary name, sealed with a `manifest.json` (size and SHA-256 of every
file) and renamed into place, so a crash or a full disk never leaves something that looks like a checkpoint but is
not. Loading checks the manifest first: a truncated or altered file is reported by name instead of surfacing as an
obscure deserialisation error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fm_policy.errors import UserError

MANIFEST = "manifest.json"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or corrupt; the message names the directory and the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint_dir(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, seal the files with a manifest and move the directory to `final` atomically.

    An existing `final` is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
            files[file.relative_to(tmp).as_posix()] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps({"files": files}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint_dir(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` unless every file in the manifest is present with its recorded size and hash."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; not a checkpoint written by fm-policy, or an incomplete copy")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}/{MANIFEST}: unreadable ({exc})") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: file '{name}' is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: file '{name}' has {file.stat().st_size} bytes, the manifest says {expected['bytes']} "
                "(truncated or replaced)"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{path}: file '{name}' does not match its SHA-256 in the manifest (corrupt)")
