"""Helpers shared by the file formats: labels detection, minimal dtypes, atomic writes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import formats

#: File-name tokens that mark a label volume (matched as whole words of the stem, case-insensitive).
LABEL_NAME_HINTS: tuple[str, ...] = (
    "seg",
    "segs",
    "segmentation",
    "label",
    "labels",
    "labelmap",
    "mask",
    "masks",
    "aal",
    "atlas",
    "parc",
    "parcellation",
    "aseg",
    "annot",
    "annotation",
    "roi",
    "gt",
    "groundtruth",
)

#: An integer volume with at most this many distinct values (background included) counts as labels.
MAX_LABEL_VALUES = 32

#: Voxels looked at before deciding that an integer volume has many distinct values.
_SUBSAMPLE_VOXELS = 1_000_000


def stem_of(path: str | os.PathLike[str]) -> str:
    """File name without its (possibly double, ``.nii.gz``) extension; see
    :func:`napari_masam.io.formats.stem_of` (the one table of file endings)."""
    return formats.stem_of(path)


def name_suggests_labels(path: str | os.PathLike[str]) -> bool:
    """Whether the file name contains one of :data:`LABEL_NAME_HINTS` as a word.

    Words are split at non-letters and at lower-to-upper case changes, so ``liver_seg``,
    ``LiverSeg``, ``aal`` and ``mask-01`` match but ``segment`` or ``Gtx`` do not.
    """
    stem = stem_of(path)
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)
    words = {w.lower() for w in re.split(r"[^A-Za-z]+", spaced) if w}
    return bool(words & set(LABEL_NAME_HINTS))


def has_few_values(data: np.ndarray, max_values: int = MAX_LABEL_VALUES) -> bool:
    """Whether an integer array holds at most ``max_values`` distinct values.

    A strided subsample is checked first so that a CT or MRI volume is rejected after reading
    about :data:`_SUBSAMPLE_VOXELS` voxels; only label-like arrays are scanned in full.
    """
    arr = np.asarray(data)
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        return False
    step = max(1, round((arr.size / _SUBSAMPLE_VOXELS) ** (1.0 / max(arr.ndim, 1))))
    sample = arr[(slice(None, None, step),) * arr.ndim]
    if np.unique(sample).size > max_values:
        return False
    return np.unique(arr).size <= max_values


def values_are_whole(data: np.ndarray) -> bool:
    """Whether every value is a finite whole number (integer and bool arrays always are).

    Float arrays are scanned one leading slice at a time, so no full-size temporary is made.
    """
    arr = data
    kind = np.dtype(arr.dtype).kind
    if kind in "iub":
        return True
    if kind != "f":
        return False
    arr = np.asarray(arr)
    blocks = arr if arr.ndim > 2 else [arr]
    for block in blocks:
        block = np.asarray(block)
        if not np.all(np.isfinite(block)) or np.any(block != np.round(block)):
            return False
    return True


def decide_labels(
    data: np.ndarray,
    *,
    path: str | os.PathLike[str] | None = None,
    intent_says_labels: bool = False,
    as_labels: bool | None = None,
) -> bool:
    """THE image-versus-labels rule for volumes read from files (NIfTI and TIFF).

    1. ``as_labels`` given: that.
    2. Intent: the header says "label map" (NIfTI intent ``label``/``neuroname``) or the file
       name has a label word (:data:`LABEL_NAME_HINTS`: ``case01_seg``, ``liver-mask``,
       ``aal``, ...): labels when every value is a finite whole number, whatever the stored dtype
       (a float32 ``*_seg.nii.gz`` holding {0, 1, 2} is labels), else an image.
    3. No intent: content alone decides only for 8-bit integer volumes: at most
       :data:`MAX_LABEL_VALUES` distinct values make labels (a uint8 mask). A 16-bit or wider
       integer volume (an MRI, even with few grey levels) or a float volume stays an image.
    """
    if as_labels is not None:
        return bool(as_labels)
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "iufb" or dtype.fields is not None:
        return False
    if intent_says_labels or (path is not None and name_suggests_labels(path)):
        return values_are_whole(data)
    return dtype.kind in "iub" and dtype.itemsize == 1 and has_few_values(data)


def label_dtype_for(max_label: int) -> np.dtype:
    """Smallest unsigned integer dtype holding labels ``0..max_label`` (uint8 up to 255, then
    uint16, uint32, uint64): THE label dtype rule of the engine, the writers and the exports."""
    max_label = int(max_label)
    if max_label < 0:
        raise ValueError(f"label values are >= 0; got a maximum of {max_label}")
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label {max_label} does not fit a 64-bit integer")


def minimal_label_dtype(data: np.ndarray) -> np.dtype:
    """Smallest integer dtype that holds every value of ``data`` exactly.

    Unsigned types are preferred (uint8, uint16, uint32) when no value is negative, else the
    smallest signed type. Raises ``ValueError`` for non-integral values.
    """
    arr = np.asarray(data)
    if arr.size == 0:
        return np.dtype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.bool_):
            return np.dtype(np.uint8)
        if not np.all(np.isfinite(arr)) or not np.all(np.mod(arr, 1) == 0):
            raise ValueError(
                "labels must hold whole numbers; got non-integral values of dtype "
                f"{arr.dtype}. Round or cast the labels before saving them."
            )
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0:
        return label_dtype_for(hi)
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    raise ValueError(f"labels range {lo}..{hi} does not fit a 64-bit integer")


def _suffix_of(target: Path) -> str:
    return (
        "".join(target.suffixes[-2:]) if target.name.lower().endswith(".nii.gz") else target.suffix
    )


def current_umask() -> int:
    """The process's file-creation mask (e.g. ``0o022``), read without changing it where the
    system allows (Linux ``/proc``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_sibling(path: str | os.PathLike[str], *, directory: bool = False) -> Path:
    """Create a hidden, uniquely named empty file (or folder) beside ``path`` and return it.

    The file keeps ``path``'s suffixes (``.partial.nii.gz``, ``.partial.tif``) so writers that go
    by the extension write the right format. Pair with :func:`commit_path` / :func:`discard_path`.
    Its permissions follow the umask like any file the user creates (``0o666 & ~umask``, folders
    ``0o777 & ~umask``): ``tempfile`` alone would make it private (0600/0700), and the rename
    would carry that onto the final output, which a lab group then cannot read.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    umask = current_umask()
    if directory:
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        )
        os.chmod(tmp, 0o777 & ~umask)
        return tmp
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".partial{_suffix_of(target)}", dir=target.parent
    )
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~umask)
    return Path(tmp_name)


def commit_path(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Move the finished ``tmp`` onto ``path`` atomically.

    A folder replaces an existing folder: the old one is renamed aside first and deleted after the
    new one is in place, so ``path`` always names a complete output.
    """
    tmp, target = Path(tmp), Path(path)
    if not tmp.is_dir():
        os.replace(tmp, target)
        return
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_path(tmp: str | os.PathLike[str]) -> None:
    """Delete a temporary file or folder made by :func:`temp_sibling` (missing is fine)."""
    tmp = Path(tmp)
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); move it onto ``path`` on success.

    THE one temp-file + rename helper: every file napari-masam writes goes through it (or
    through :func:`temp_sibling` + :func:`commit_path`). The output gets the umask's
    permissions (see :func:`temp_sibling`). A crash or an exception while writing leaves any existing file at ``path`` untouched and no
    half-written file behind. ``directory=True`` yields an empty folder that replaces the folder
    ``path`` as a whole (see :func:`commit_path`).
    """
    tmp = temp_sibling(path, directory=directory)
    try:
        yield tmp
        commit_path(tmp, path)
    finally:
        if tmp.exists():
            discard_path(tmp)
