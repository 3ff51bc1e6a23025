"""Checksums of a checkpoint's files: ``MANIFEST.json`` (sha256 and size per file).

A checkpoint folder that is complete by name and marker can still be damaged: a disk that
loses a block, a copy that stopped half-way, a flipped bit. Loading such a folder either fails
with a deep traceback or, worse, loads NaN or wrong weights silently. The manifest is written at
save time inside the atomic write (before ``COMPLETE`` and the rename), so a complete checkpoint
always has one; loading verifies every listed file against it and that no listed file is
missing. Hashing reads every byte once (about a second per GB), which is small next to writing
them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

MANIFEST = "MANIFEST.json"
_UNLISTED = ("COMPLETE", MANIFEST)  # written after the manifest


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match its manifest (or that has none while other
    checkpoints of its run do)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_bytes(folder: Path) -> bytes:
    """The manifest of every file now in ``folder`` (subfolders included), as JSON bytes."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in _UNLISTED:
            files[name] = {"sha256": sha256_of(path), "size": path.stat().st_size}
    return (json.dumps({"version": 1, "files": files}, indent=1) + "\n").encode()


def verify(folder: str | os.PathLike) -> None:
    """Raise :class:`CheckpointDamaged` (one line naming the folder and the first bad file)
    unless every file listed in the manifest is present with its size and sha256."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        if not any((p / MANIFEST).is_file() for p in folder.parent.iterdir() if p != folder):
            # A run saved before checkpoints had checksums: nothing to verify against, and
            # refusing would strand it. In a run that has manifests, a missing one is damage.
            print(
                f"warning: checkpoint {folder} has no {MANIFEST} (saved by an older version): loading it unverified",
                file=sys.stderr,
            )
            return
        raise CheckpointDamaged(f"checkpoint {folder} is damaged: {MANIFEST} is missing") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged: {MANIFEST} is unreadable ({err})") from None
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointDamaged(f"checkpoint {folder} is damaged: {name} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointDamaged(
                f"checkpoint {folder} is damaged: {name} has {size} bytes, {want['size']} were written"
            )
        if sha256_of(path) != want["sha256"]:
            raise CheckpointDamaged(
                f"checkpoint {folder} is damaged: {name} does not match its sha256 (its bytes changed after the save)"
            )


__all__ = ["MANIFEST", "CheckpointDamaged", "manifest_bytes", "sha256_of", "verify"]
