"""Image embeddings computed once: a bounded in-memory LRU, optionally backed by a directory.

An embedding depends only on the preprocessed input group and the model, so keys are digests
of (model identity, preprocessing description, content hashes of the raw slices of the group,
row in the group); see :func:`make_key`. A second box on the same slice runs only the decoder.

On disk each entry is one safetensors file ``<key>.safetensors`` (no pickle) holding the
tensor ``embedding`` and, in the header metadata, the key and a blake2b checksum of the tensor
bytes. Files are written to a temporary name in the same directory and renamed (atomic on
POSIX and Windows), so concurrent sessions sharing a directory never read half-written
entries; unreadable, truncated or checksum-failing entries are deleted and reported as misses,
and the caller recomputes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io._common import atomic_path

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Default memory bound of :class:`EmbeddingCache` (bytes).
DEFAULT_MAX_BYTES = 1 << 30
#: Default bound of an :class:`EmbeddingCache` directory (bytes): 20 GiB, about 5000 slices of
#: a 256 x 64 x 64 float32 embedding (LiteMedSAM, MA-SAM rows are the same size).
DEFAULT_MAX_DISK_BYTES = 20 << 30


def default_cache_dir() -> Path:
    """THE default on-disk embedding folder (per user): ``<user cache dir>/napari-masam/
    embeddings`` (``platformdirs.user_cache_dir``; e.g. ``~/.cache/napari-masam/embeddings`` on
    Linux). Not created here."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-masam")) / "embeddings"


def hash_array(arr: np.ndarray) -> str:
    """Content digest of an array (dtype, shape and bytes): 32 hex characters (blake2b-128)."""
    a = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def make_key(*parts: Any) -> str:
    """Digest of the string forms of ``parts`` (model identity, preprocessing, hashes, row)."""
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x1f")
    return h.hexdigest()


_IDENTITY_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_IDENTITY_LOCK = threading.Lock()


def _tensors_version(model: Any) -> tuple[int, int]:
    # tensor._version counts in-place writes (optimizer steps, load_state_dict): a cheap way to
    # notice that weights changed since the identity was computed.
    tensors = list(model.parameters()) + list(model.buffers())
    return len(tensors), sum(int(t._version) for t in tensors)


def _hash_weights(model: Any) -> str:
    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        arr = t.detach().cpu().contiguous()
        h.update(str(arr.dtype).encode() + str(tuple(arr.shape)).encode())
        h.update(arr.view(-1).view(dtype=_uint8_dtype()).numpy().tobytes())
    return h.hexdigest()


def _uint8_dtype() -> Any:
    import torch

    return torch.uint8


def model_identity(model: Any) -> str:
    """A string that changes whenever the model's weights or architecture change.

    ``metadata.sha256`` (the digest of the weights file) plus the class and config when the
    weights are untouched since first seen; otherwise (no sha256, or weights modified in place,
    e.g. by fine-tuning) a digest of all weights. Memoised per model object.
    """
    version = _tensors_version(model)
    with _IDENTITY_LOCK:
        memo = _IDENTITY_MEMO.get(model)
        if memo is not None and memo[0] == version:
            return memo[1]
        first_seen = memo is None
    meta = getattr(model, "metadata", None)
    sha = getattr(meta, "sha256", None)
    config: Any = None
    get_config = getattr(model, "get_config", None)
    if callable(get_config):
        try:
            config = get_config()
        except Exception:  # identity must never fail because of a config quirk
            config = None
    arch = f"{type(model).__module__}.{type(model).__qualname__}:{config!r}"
    if sha and first_seen:
        ident = make_key("sha256", sha, arch, getattr(meta, "name", ""))
    else:
        ident = make_key("weights", _hash_weights(model), arch)
    with _IDENTITY_LOCK:
        _IDENTITY_MEMO[model] = (version, ident)
    return ident


class EmbeddingCache:
    """Image embeddings by key: an LRU in memory, optionally persisted in a directory.

    Parameters
    ----------
    max_items : int or None
        Bound on the number of in-memory entries (None: unbounded by count).
    max_bytes : int or None
        Bound on the in-memory bytes (default 1 GiB; None: unbounded). The least recently
        used entries are dropped first; an entry larger than the bound is not kept in memory.
    directory : str, Path or None
        Folder of the on-disk cache (created on first write); None: memory only.
    max_disk_bytes : int or None
        Bound on the bytes of the entries in ``directory`` (default
        :data:`DEFAULT_MAX_DISK_BYTES`; None: unbounded). After a write that crosses it, the
        least recently used entries (file modification time; a disk hit refreshes it) are
        deleted until the folder is back under 90 % of the bound. Entries written by other
        sessions sharing the folder count too.

    Notes
    -----
    Values are CPU float tensors (an embedding row ``(E, g, g)``); :meth:`get` returns the stored
    tensor (treat it as read-only). Thread-safe for one writer and readers (a lock guards the
    LRU). Statistics: :attr:`hits`, :attr:`misses`, :attr:`disk_hits`, :attr:`corrupt`.
    """

    def __init__(
        self,
        max_items: int | None = None,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        directory: str | Path | None = None,
        max_disk_bytes: int | None = None,
    ) -> None:
        if max_disk_bytes is None and directory is not None:
            max_disk_bytes = DEFAULT_MAX_DISK_BYTES
        if max_disk_bytes is not None and max_disk_bytes < 0:
            raise ValueError(f"max_disk_bytes must be >= 0 or None, got {max_disk_bytes}.")
        self.max_disk_bytes = max_disk_bytes
        self._disk_bytes: int | None = None  # running total, measured on first write
        if max_items is not None and max_items < 0:
            raise ValueError(f"max_items must be >= 0 or None, got {max_items}.")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}.")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.directory = None if directory is None else Path(directory)
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self.corrupt = 0

    # -- memory ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries or (self._path(key) is not None and self._path(key).is_file())

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self._bytes

    def clear(self, disk: bool = False) -> None:
        """Drop the in-memory entries (and the on-disk ones if ``disk``)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        if disk and self.directory is not None and self.directory.is_dir():
            for f in self.directory.glob("*.safetensors"):
                f.unlink(missing_ok=True)

    def _remember(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if (self.max_bytes is not None and size > self.max_bytes) or self.max_items == 0:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._entries[key] = value
            self._bytes += size
            while self._entries and (
                (self.max_bytes is not None and self._bytes > self.max_bytes)
                or (self.max_items is not None and len(self._entries) > self.max_items)
            ):
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()

    def get(self, key: str) -> torch.Tensor | None:
        """The embedding stored under ``key`` (memory first, then disk), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
        if value is None and self.directory is not None:
            value = self._load(key)
            if value is not None:
                self.disk_hits += 1
                self._remember(key, value)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store a CPU copy of ``value`` (float32) under ``key``, in memory and on disk."""
        import torch

        value = value.detach().to("cpu", torch.float32).contiguous()
        self._remember(key, value)
        if self.directory is not None:
            self._save(key, value)

    def get_many(self, keys: Iterable[str]) -> list[torch.Tensor | None]:
        """:meth:`get` for each key."""
        return [self.get(k) for k in keys]

    # -- disk ------------------------------------------------------------------------------
    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"Cache keys are hex digests (see make_key), got {key!r}.")
        return self.directory / f"{key}.safetensors"

    @staticmethod
    def _checksum(value: torch.Tensor) -> str:
        return hashlib.blake2b(value.numpy().tobytes(), digest_size=16).hexdigest()

    def _save(self, key: str, value: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._path(key)
        assert path is not None  # only called with a directory
        try:
            replaced = path.stat().st_size if path.is_file() else 0  # a rewrite replaces it
        except OSError:
            replaced = 0
        try:
            with atomic_path(path) as tmp:
                save_file(
                    {"embedding": value},
                    str(tmp),
                    metadata={"key": key, "blake2b": self._checksum(value)},
                )
        except OSError as exc:  # a full or read-only disk must not stop segmentation
            logger.warning("Could not write embedding cache entry %s: %s", path, exc)
            return
        self._account(path, replaced)

    def disk_bytes(self) -> int:
        """Bytes of the entries now in :attr:`directory` (0 without one)."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        total = 0
        for f in self.directory.glob("*.safetensors"):
            with contextlib.suppress(OSError):  # removed meanwhile by another session
                total += f.stat().st_size
        return total

    def _account(self, path: Path, replaced: int = 0) -> None:
        if self.max_disk_bytes is None:
            return
        if self._disk_bytes is None:
            self._disk_bytes = self.disk_bytes()
        else:
            try:
                self._disk_bytes += path.stat().st_size - replaced
            except OSError:
                return
        if self._disk_bytes > self.max_disk_bytes:
            self.prune_disk(int(0.9 * self.max_disk_bytes))

    def prune_disk(self, target_bytes: int) -> int:
        """Delete least recently used entries until the folder holds <= ``target_bytes``.

        Returns
        -------
        int
            Entries deleted.
        """
        if self.directory is None or not self.directory.is_dir():
            return 0
        entries = []
        for f in self.directory.glob("*.safetensors"):
            try:
                st = f.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, f))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, f in entries:
            if total <= target_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
            removed += 1
        self._disk_bytes = total
        if removed:
            logger.info("Embedding cache %s: removed %d old entries.", self.directory, removed)
        return removed

    def _load(self, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                value = fh.get_tensor("embedding")
            if meta.get("key") != key or meta.get("blake2b") != self._checksum(value):
                raise ValueError("key or checksum mismatch")
            with contextlib.suppress(OSError):
                os.utime(path)  # most recently used: pruned last
        except Exception as exc:  # any failure to read is a corrupt entry: drop and recompute
            self.corrupt += 1
            logger.warning("Corrupt embedding cache entry %s (%s); recomputing.", path, exc)
            path.unlink(missing_ok=True)
            return None
        return value
