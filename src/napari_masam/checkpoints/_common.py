"""Pieces every checkpoint format shares: the error type, file digests, key grouping."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PathLike = str | Path


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, wrong kind, wrong backbone or class count.

    The message names the file, says what is wrong and what to do.
    """


def _torch():
    import torch

    return torch


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    from ..weights import file_sha256

    return file_sha256(path)


def _file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file (cached per path, size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def _group_keys(keys: Iterable[str], limit: int = 12) -> str:
    """``a.blocks.*.b (x12), c`` -- keys grouped by replacing numeric path parts with ``*``."""
    counts = Counter(re.sub(r"(?<=\.)\d+(?=\.|$)|(?<=_FacTs_)\d+$", "*", k) for k in keys)
    parts = [f"{name} (x{n})" if n > 1 else name for name, n in sorted(counts.items())]
    more = f", ... and {len(parts) - limit} more groups" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))
