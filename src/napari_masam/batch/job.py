"""One batch job: segment one input end to end, never clobbering what is not ours.

A job takes one input (a NIfTI volume, a video, or a TIFF stack), segments it with a
:class:`~napari_masam.session.SegmentationSession` (the very object the napari widget drives),
writes the labels and a provenance sidecar, and returns a :class:`JobResult`. Nothing here
prints: progress goes to a callback and problems into the result (and ``logging``).

Order of a job (see :mod:`napari_masam.batch.sidecar` for the ownership rules):

1. take the output's lock; delete our stale hidden partials of it;
2. skip if up to date; refuse (unless ``--overwrite``) if something we cannot prove ours is
   at the output's name;
3. write the labels into a hidden staging path (:func:`napari_masam.io._common.atomic_path`);
4. write the sidecar (recording the new output's digest and the digest it replaces);
5. move the staging path onto the output's name; release the lock.

A failure at any step leaves the previous output and its sidecar as they were (a failure
between 4 and 5 leaves the old output, which the new sidecar still recognises as ours).
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io._common import atomic_path
from ..weights import file_sha256
from .config import BatchConfig, SegmentationRequest
from .engine import (
    ProgressCallback,
    SessionHolder,
    non_finite_record,
    resolve_mode,
    segment_stack,
)
from .inputs import BatchInput, JobResult
from .outputs import (
    frame_sink,
    lock_path,
    n_labels_for,
    output_format_for,
    output_names,
    planned_outputs,
    to_rgb_uint8,
)
from .prompts import boxes_file_for, prompt_boxes
from .sidecar import (
    PROVENANCE_VERSION,
    canonical,
    clean_stale_partials,
    output_digest,
    output_lock,
    output_state,
    software_versions,
    write_json_atomic,
)
from .videos import segment_video_chunks, segment_video_whole

if TYPE_CHECKING:
    from ..inference import Progress
    from ..model.base import SegmentationModel
    from ..session import SegmentationSession

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------
def match_record(
    item: BatchInput,
    config: BatchConfig,
    holder: SessionHolder,
    input_facts: dict[str, object] | None = None,
) -> object:
    """What must be equal for an existing output to count as up to date (resume).

    ``input_facts``: the input's name, size and sha256 if already computed.
    """
    try:
        boxes_file = boxes_file_for(item, config.boxes)
    except FileNotFoundError:  # automatic mode does not need one; boxes mode fails later
        boxes_file = None
    return canonical(
        {
            "provenance_version": PROVENANCE_VERSION,
            "input": input_facts
            or {
                "name": item.path.name,
                "size": item.path.stat().st_size,
                "sha256": file_sha256(item.path),
            },
            "model": holder.identity(),
            "settings": config.settings(),
            "boxes_sha256": file_sha256(boxes_file) if boxes_file else None,
        }
    )


def _model_record(session: SegmentationSession, holder: SessionHolder) -> object:
    from ..model.runtime import backend_info

    model = session.model
    meta = model.metadata
    return canonical(
        {
            "source": holder.spec.source,
            "identity": holder.identity(),
            "name": meta.name,
            "kind": model.kind,
            "sha256": meta.sha256,
            "config": model.get_config(),
            "class_names": list(meta.class_names),
            "class_colors": list(meta.class_colors),
            "device": str(session.device),
            "backend": backend_info(model).to_dict(),
        }
    )


def _preprocessing_record(
    model: SegmentationModel, config: BatchConfig, facts: dict[str, object]
) -> object:
    meta = model.metadata
    return canonical(
        {
            "intensity_preset": config.preset or meta.intensity_preset,
            "preset_from": "--preset" if config.preset else "model",
            "image_size": model.image_size,
            "slices_per_group": model.slices_per_group,
            "resize_mode": meta.resize_mode,
            "orientation": meta.orientation,
            "stride": config.stride,
            "batch_size": config.batch_size,
            **facts,
        }
    )


# ----------------------------------------------------------------------------------------------
# one job
# ----------------------------------------------------------------------------------------------
def run_job(
    item: BatchInput,
    config: BatchConfig,
    holder: SessionHolder,
    progress: ProgressCallback | None = None,
) -> JobResult:
    """Segment one input end to end; never raises for a bad input (the result says why).

    Parameters
    ----------
    item : BatchInput
    config : BatchConfig
    holder : SessionHolder
        Gives the loaded session (loaded on first need, so up-to-date jobs load nothing).
    progress : callable or None
        ``progress(done, total)`` in slices/frames of this input (total may be an estimate
        for videos and is corrected at the end).

    Returns
    -------
    JobResult
        ``failed`` (with the reason and what to do) when the input is unusable, the output's
        name holds something napari-masam did not write (without ``--overwrite``), or another
        run is producing the same output.
    """
    start = time.perf_counter()
    try:
        output, sidecar = planned_outputs(item, config)
        fmt = output_format_for(item, config)
        input_facts = {
            "name": item.path.name,
            "size": item.path.stat().st_size,
            "sha256": file_sha256(item.path),
        }
        match = match_record(item, config, holder, input_facts)
        out_dir = Path(config.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with output_lock(lock_path(item, config)):
            clean_stale_partials(out_dir, output_names(item))
            state = output_state(output, sidecar, match)
            if state.up_to_date and not config.overwrite:
                return JobResult(
                    str(item.path),
                    "skipped",
                    outputs=[str(output)],
                    sidecar=str(sidecar),
                    seconds=time.perf_counter() - start,
                )
            if not state.ours and not config.overwrite:
                target = output if state.exists else sidecar
                raise ValueError(
                    f"{item.path.name}: {target} exists and napari-masam cannot prove it wrote "
                    f"it ({state.reason}); nothing was changed. Move it away, choose another "
                    "--output folder, or pass --overwrite to replace it"
                )
            replaces = state.digest or output_digest(output)  # hashed once
            session = holder.get()
            mode = resolve_mode(config.mode, session.model, config.boxes is not None)
            timings: dict[str, float] = {"model_load_s": round(holder.load_seconds, 4)}
            with atomic_path(output, directory=fmt == "png") as staged:
                frames, facts, prompts_record = _segment_into(
                    staged, item, config, session, mode, fmt, progress, timings
                )
                seconds = time.perf_counter() - start
                timings["total_s"] = round(seconds, 4)
                record = {
                    "producer": "napari-masam",
                    "status": "complete",
                    "match": match,
                    "input": {"path": str(item.path), "kind": item.kind, **input_facts},
                    "output": {
                        "path": output.name,
                        "format": fmt,
                        "frames": frames,
                        "digest": output_digest(staged),
                        "replaces": replaces,
                    },
                    "model": _model_record(session, holder),
                    "mode": mode,
                    "settings": config.settings(),
                    "preprocessing": _preprocessing_record(session.model, config, facts),
                    "prompts": prompts_record,
                    "software": software_versions(),
                    "timings": timings,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": platform.node(),
                }
                write_json_atomic(sidecar, record)  # before the output moves in (see above)
        return JobResult(
            str(item.path),
            "done",
            outputs=[str(output)],
            sidecar=str(sidecar),
            frames=frames,
            seconds=seconds,
        )
    except Exception as exc:
        logger.debug("job %s failed", item.path, exc_info=True)
        message = str(exc) or type(exc).__name__
        if item.path.name not in message:
            message = f"{item.path.name}: {type(exc).__name__}: {message}"
        return JobResult(
            str(item.path), "failed", error=message, seconds=time.perf_counter() - start
        )


def _segment_into(
    staged: Path,
    item: BatchInput,
    config: BatchConfig,
    session: SegmentationSession,
    mode: str,
    fmt: str,
    progress: ProgressCallback | None,
    timings: dict[str, float],
) -> tuple[int, dict[str, object], dict[str, object] | None]:
    """Segment ``item`` and write its labels into ``staged``: (frames, facts, prompts record)."""
    boxes_path = boxes_file_for(item, config.boxes) if mode == "boxes" else None
    if item.kind == "video" and config.propagate:
        return segment_video_whole(
            item, config, session, boxes_path, fmt, staged, progress, timings
        )
    if item.kind == "video":
        return segment_video_chunks(
            item, config, session, mode, boxes_path, fmt, staged, progress, timings
        )
    return _run_in_memory(item, config, session, mode, boxes_path, fmt, staged, progress, timings)


def read_stack(item: BatchInput) -> tuple[np.ndarray, dict[str, object] | None, dict[str, object]]:
    """(stack, NIfTI reference for writing, stack facts) for NIfTI and TIFF inputs."""
    if item.kind == "nifti":
        from ..io.nifti import read_nifti

        volume = read_nifti(item.path, as_labels=False)
        # THE 2-D/3-D/4-D rule: a 2-D file is a one-slice stack, written back as 2-D
        stack = np.asarray(volume.stack_zyx())
        facts: dict[str, object] = {
            "shape_zyx": list(stack.shape),
            "spacing_zyx": [float(s) for s in volume.spacing_zyx],
            "file_orientation": volume.orientation,
        }
        return stack, volume.metadata, facts
    from ..io.tiff import read_tiff_stack

    stack = np.asarray(read_tiff_stack(item.path).data)
    if stack.ndim not in (3, 4):
        raise ValueError(
            f"{item.path.name}: expected a (Z, Y, X) or (T, Y, X, 3) stack, got shape {stack.shape}"
        )
    return stack, None, {"shape": list(stack.shape), "dtype": str(stack.dtype)}


def _run_in_memory(
    item: BatchInput,
    config: BatchConfig,
    session: SegmentationSession,
    mode: str,
    boxes_path: Path | None,
    fmt: str,
    staged: Path,
    progress: ProgressCallback | None,
    timings: dict[str, float],
) -> tuple[int, dict[str, object], dict[str, object] | None]:
    model = session.model
    t0 = time.perf_counter()
    stack, reference, facts = read_stack(item)
    timings["read_s"] = round(time.perf_counter() - t0, 4)
    n = int(stack.shape[0])
    boxes, limits, prompts_record = None, None, None
    if boxes_path is not None:
        boxes, limits, prompts_record = prompt_boxes(
            boxes_path,
            n,
            (int(stack.shape[1]), int(stack.shape[2])),
            config.box_file,
            keyframes_only=config.propagate,
        )
    request = SegmentationRequest(
        mode,
        config.preset,
        config.stride,
        config.batch_size,
        boxes=boxes,
        propagate=config.propagate,
        slice_ranges=limits,
    )

    def on_progress(p: Progress) -> None:
        if progress is not None:
            # engine units: all slices (automatic) or the slices with a box (boxes)
            progress(int(p.done), int(p.total or n))

    t0 = time.perf_counter()
    result = segment_stack(session, stack, request, on_progress)
    labels = np.asarray(result.labels)
    if labels.shape[:3] != stack.shape[:3]:
        raise ValueError(
            f"{item.path.name}: engine returned labels of shape {labels.shape} for a stack of "
            f"shape {stack.shape}"
        )
    timings["segment_s"] = round(time.perf_counter() - t0, 4)
    timings.update({f"engine_{k}": v for k, v in result.timings.items()})
    facts["engine"] = result.preprocessing
    facts["non_finite"] = non_finite_record([result.preprocessing])

    t0 = time.perf_counter()
    if fmt == "nifti":
        from ..io.nifti import write_nifti

        write_nifti(staged, labels, reference)
    else:
        sink = frame_sink(
            fmt,
            staged,
            fps=25.0,
            class_colors=model.metadata.class_colors,
            n_labels=n_labels_for(model, mode, boxes),
            n_frames=n,
            axes="ZYX" if stack.ndim == 3 else "TYX",  # (Z, Y, X) grey or (T, Y, X, 3) RGB
        )
        try:
            sink.write(labels, to_rgb_uint8(stack) if sink.needs_frames else None)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    timings["write_s"] = round(time.perf_counter() - t0, 4)
    facts["labels_dtype"] = str(labels.dtype)
    return n, facts, prompts_record


# ----------------------------------------------------------------------------------------------
# a sequential batch
# ----------------------------------------------------------------------------------------------
def run_batch(
    items: Sequence[BatchInput],
    config: BatchConfig,
    *,
    holder: SessionHolder | None = None,
    on_start: Callable[[BatchInput], ProgressCallback | None] | None = None,
    on_result: Callable[[BatchInput, JobResult], None] | None = None,
) -> list[JobResult]:
    """Run the jobs one after the other in this process, loading the model once.

    Parameters
    ----------
    items : sequence of BatchInput
    config : BatchConfig
    holder : SessionHolder or None
        Reuse a loaded model (a new holder otherwise).
    on_start : callable or None
        Called with each input before its job; may return a ``progress(done, total)`` callback.
    on_result : callable or None
        Called with each input and its :class:`JobResult`.

    Returns
    -------
    list of JobResult
        In the order of ``items``.
    """
    holder = holder or SessionHolder(config.model)
    results = []
    for item in items:
        callback = on_start(item) if on_start is not None else None
        result = run_job(item, config, holder, callback)
        if on_result is not None:
            on_result(item, result)
        results.append(result)
    return results
