"""Headless batch segmentation: one job per input file, shared by the CLI and Dask workers.

A package of small parts:

- :mod:`~napari_masam.batch.inputs`: which files a batch takes, their kind and output stem,
  job results and the summary;
- :mod:`~napari_masam.batch.source`: the model (:class:`ModelSpec` = a parsed
  :class:`napari_masam.checkpoints.ModelSource` + device);
- :mod:`~napari_masam.batch.config`: :class:`BatchConfig` (the run) and
  :class:`SegmentationRequest` (one engine call);
- :mod:`~napari_masam.batch.engine`: the model loaded once (:class:`SessionHolder`), the mode
  resolved, one engine call per :class:`SegmentationRequest`;
- :mod:`~napari_masam.batch.prompts`: an input's box file, read once and checked;
- :mod:`~napari_masam.batch.job`: one job end to end (:func:`run_job`), the sequential batch;
- :mod:`~napari_masam.batch.videos` and :mod:`~napari_masam.batch.stream`: videos in overlapping
  chunks (or whole, for propagation), one intensity window per video;
- :mod:`~napari_masam.batch.outputs`: output names and label writers;
- :mod:`~napari_masam.batch.sidecar`: provenance, ownership (never clobber), locks, partials.

Outputs, for an input with stem ``case01`` (``case01.nii.gz``, ``case01.mp4``, ...):

- NIfTI input: ``case01_seg.nii.gz`` with the input's affine, qform/sform and orientation.
- video / TIFF input: ``case01_seg/`` (PNG per frame, label values), ``case01_seg.tif``
  (one page per frame), or ``case01_overlay.mp4`` (labels blended over the frames).
- always: ``case01_seg.json``, the provenance sidecar with the output's digest.

Resume: a job whose output is ours (its digest is the one the sidecar records) and whose
sidecar ``match`` block equals the one this run would write (input sha256, model identity,
settings, prompts) is skipped. Something at an output's name that napari-masam cannot prove it
wrote is never replaced or deleted without ``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path

from ..io._common import atomic_path
from ..weights import file_sha256
from .config import (
    FORMAT_CHOICES,
    FRAME_FORMATS,
    MODE_CHOICES,
    BatchConfig,
    BoxesDict,
    SegmentationRequest,
)
from .engine import (
    ProgressCallback,
    SessionHolder,
    drain,
    non_finite_record,
    observe,
    resolve_mode,
    segment_stack,
    session_model,
)
from .inputs import (
    NIFTI_SUFFIXES,
    TIFF_SUFFIXES,
    VIDEO_SUFFIXES,
    BatchInput,
    JobResult,
    discover_inputs,
    input_kind,
    input_stem,
    summarize,
)
from .job import match_record, read_stack, run_batch, run_job
from .outputs import (
    FrameSink,
    OverlayMp4Sink,
    PngFolderSink,
    TiffSink,
    frame_sink,
    label_palette,
    lock_path,
    n_labels_for,
    output_format_for,
    output_names,
    planned_outputs,
    to_rgb_uint8,
)
from .prompts import boxes_file_for, boxes_in_window, load_boxes, prompt_boxes
from .sidecar import (
    PROVENANCE_VERSION,
    OutputLockedError,
    OutputState,
    clean_stale_partials,
    output_digest,
    output_lock,
    output_state,
    read_sidecar,
    software_versions,
    write_json_atomic,
)
from .source import ModelSource, ModelSpec
from .stream import iter_overlapping_chunks, iter_video_frames, open_video, video_window


def is_up_to_date(output: Path, sidecar: Path, match: object) -> bool:
    """Whether ``output`` is ours and ``sidecar`` records the same ``match`` block."""
    return output_state(output, sidecar, match).up_to_date


__all__ = [
    "FORMAT_CHOICES",
    "FRAME_FORMATS",
    "MODE_CHOICES",
    "NIFTI_SUFFIXES",
    "PROVENANCE_VERSION",
    "TIFF_SUFFIXES",
    "VIDEO_SUFFIXES",
    "BatchConfig",
    "BatchInput",
    "BoxesDict",
    "FrameSink",
    "JobResult",
    "ModelSource",
    "ModelSpec",
    "OutputLockedError",
    "OutputState",
    "OverlayMp4Sink",
    "PngFolderSink",
    "ProgressCallback",
    "SegmentationRequest",
    "SessionHolder",
    "TiffSink",
    "atomic_path",
    "boxes_file_for",
    "boxes_in_window",
    "clean_stale_partials",
    "discover_inputs",
    "drain",
    "file_sha256",
    "frame_sink",
    "input_kind",
    "input_stem",
    "is_up_to_date",
    "iter_overlapping_chunks",
    "iter_video_frames",
    "label_palette",
    "load_boxes",
    "lock_path",
    "match_record",
    "n_labels_for",
    "non_finite_record",
    "observe",
    "open_video",
    "output_digest",
    "output_format_for",
    "output_lock",
    "output_names",
    "output_state",
    "planned_outputs",
    "prompt_boxes",
    "read_sidecar",
    "read_stack",
    "resolve_mode",
    "run_batch",
    "run_job",
    "segment_stack",
    "session_model",
    "software_versions",
    "summarize",
    "to_rgb_uint8",
    "video_window",
    "write_json_atomic",
]
