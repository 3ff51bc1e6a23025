"""The writer's types: :class:`WriteConfig` (what ``write-dataset`` is asked), :class:`WriteSummary`
(what it did: written, skipped by reason, speed) and :class:`NoPairsError`.

Shared by ``declip_fast.data.write`` (which re-exports them), its workers (``write_prepare``) and
the CLI's summary output (:func:`save_summary`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path

from declip_fast.data.sources import Skip


@dataclasses.dataclass
class WriteConfig:
    max_side: int = 384  # longest image side stored
    jpeg_quality: int = 90
    upscale: bool = False  # also enlarge smaller images to max_side (bicubic); the demo uses it
    seed: int = 0  # base of the per-sample EDA seeds
    workers: int = 0  # processes preparing pairs; 0 = all cores, 1 = in the main process
    limit: int | None = None  # write at most this many pairs
    overwrite: bool = False
    progress: bool = True
    chunk_size: int = 64
    page_size: int = 1 << 23  # FFCV's default (4 x 2 MiB)


@dataclasses.dataclass
class WriteSummary:
    output: str
    written: int
    skips: list[Skip]
    seconds: float

    @property
    def skipped(self) -> int:
        return len(self.skips)

    @property
    def pairs_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def by_reason(self) -> dict[str, int]:
        return dict(collections.Counter(s.reason for s in self.skips).most_common())

    def to_json(self) -> dict:
        return {
            "output": self.output,
            "written": self.written,
            "skipped": self.skipped,
            "skipped_by_reason": self.by_reason(),
            "pairs_per_s": round(self.pairs_per_s, 2),
            "seconds": round(self.seconds, 3),
            "skips": [{"source": s.source, "reason": s.reason} for s in self.skips],
        }

    def format(self) -> str:
        lines = [f"written: {self.written} pairs -> {self.output}", f"skipped: {self.skipped}"]
        lines += [f"  {reason}: {n}" for reason, n in self.by_reason().items()]
        lines.append(f"pairs/s: {self.pairs_per_s:.1f} ({self.seconds:.2f} s)")
        return "\n".join(lines)


class NoPairsError(ValueError):
    """Nothing valid to write; ``summary`` says why."""

    def __init__(self, message: str, summary: WriteSummary):
        super().__init__(message)
        self.summary = summary


def save_summary(summary: WriteSummary, path: str | os.PathLike) -> None:
    """The summary as JSON (``WriteSummary.to_json``) at ``path``, its folder made if need be."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
