"""Batch inputs: which files a batch takes, their kind and output stem, and job results."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..io.formats import kind_of, stem_of, suffixes_for

logger = logging.getLogger(__name__)

#: File name endings of the inputs a batch understands, per input kind: THE format table's
#: (:mod:`napari_masam.io.formats`), the one the napari reader dispatches through too.
NIFTI_SUFFIXES = suffixes_for("nifti")
VIDEO_SUFFIXES = suffixes_for("video")
TIFF_SUFFIXES = suffixes_for("tiff")


def input_kind(path: str | os.PathLike[str]) -> str | None:
    """``"nifti"``, ``"video"``, ``"tiff"`` from the file name, or None if not an input."""
    return kind_of(path)


def input_stem(path: str | os.PathLike[str]) -> str:
    """File name without its input suffix (``case01.nii.gz`` -> ``case01``)."""
    return stem_of(path)


@dataclass(frozen=True)
class BatchInput:
    """One input file of a batch.

    Attributes
    ----------
    path : Path
        Absolute path of the input file.
    kind : str
        ``"nifti"``, ``"video"`` or ``"tiff"``.
    stem : str
        Name used for the outputs (unique within a batch).
    """

    path: Path
    kind: str
    stem: str


@dataclass
class JobResult:
    """What happened to one input.

    Attributes
    ----------
    input : str
        Input path as given (absolute).
    status : str
        ``"done"``, ``"skipped"`` (outputs up to date) or ``"failed"``.
    outputs : list of str
        Output paths (files or, for PNG, a folder), empty when failed.
    sidecar : str or None
        Path of the provenance JSON.
    error : str or None
        One-line reason for a failure, naming the input and what to do.
    frames : int
        Number of slices/frames segmented (0 when skipped or failed).
    seconds : float
        Wall time of the job, in seconds.
    """

    input: str
    status: str
    outputs: list[str] = field(default_factory=list)
    sidecar: str | None = None
    error: str | None = None
    frames: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-able copy (the ``--json`` summary rows)."""
        return dataclasses.asdict(self)


def summarize(results: Sequence[JobResult], elapsed_s: float) -> dict[str, object]:
    """The ``--json`` summary: counts, per-input rows, throughput."""
    counts = {
        status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")
    }
    frames = sum(r.frames for r in results)
    return {
        **counts,
        "total": len(results),
        "frames": frames,
        "elapsed_s": round(elapsed_s, 4),
        "frames_per_s": round(frames / elapsed_s, 4) if elapsed_s > 0 else None,
        "results": [r.to_dict() for r in results],
    }


def discover_inputs(
    paths: Sequence[str | os.PathLike[str]],
) -> tuple[list[BatchInput], list[JobResult]]:
    """Expand files and folders into batch inputs.

    Folders contribute their (non-hidden) files with a known suffix, sorted by name, not
    recursively; files with other suffixes inside folders are ignored (logged). A path given
    explicitly that is missing, or not an input kind, becomes a failed :class:`JobResult`, as does
    an input whose stem clashes with an earlier one (their outputs would overwrite each other).

    Returns
    -------
    inputs : list of BatchInput
    problems : list of JobResult
        Failed results for the paths that cannot be processed.
    """
    inputs: list[BatchInput] = []
    problems: list[JobResult] = []
    seen: dict[str, Path] = {}

    def add(path: Path) -> None:
        kind = input_kind(path)
        if kind is None:
            problems.append(
                JobResult(
                    str(path),
                    "failed",
                    error=f"{path.name}: not a NIfTI (.nii/.nii.gz), video "
                    f"({', '.join(VIDEO_SUFFIXES)}) or TIFF stack (.tif/.tiff); give one of those",
                )
            )
            return
        stem = input_stem(path)
        if stem in seen and seen[stem] != path:
            problems.append(
                JobResult(
                    str(path),
                    "failed",
                    error=f"{path.name}: output name {stem!r} is already used by {seen[stem]}; "
                    "rename one of them or run them into different output folders",
                )
            )
            return
        if stem not in seen:
            seen[stem] = path
            inputs.append(BatchInput(path, kind, stem))

    for raw in paths:
        path = Path(raw).expanduser().absolute()
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.name.startswith(".") or not child.is_file():
                    continue
                if input_kind(child) is None:
                    logger.info("Ignoring %s in %s: not a known input type", child.name, path)
                    continue
                add(child)
        elif path.is_file():
            add(path)
        elif path.exists():
            problems.append(
                JobResult(
                    str(path), "failed", error=f"{path}: not a regular file or folder; skipped"
                )
            )
        else:
            problems.append(JobResult(str(path), "failed", error=f"{path}: no such file or folder"))
    return inputs, problems
