"""Files that appear under their name only once complete: ``atomic_write``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then renamed onto ``path``:
    readers see the old file or the whole new one, never a partial one; on error nothing changes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
