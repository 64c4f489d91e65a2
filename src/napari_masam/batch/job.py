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
import threading
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io._common import atomic_path
from ..io.boxes import BoxFile
from ..weights import file_sha256
from .config import BatchConfig, BoxesDict, SegmentationRequest
from .inputs import BatchInput, JobResult
from .outputs import (
    frame_sink,
    lock_path,
    output_format_for,
    output_names,
    planned_outputs,
    to_rgb_uint8,
)
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
from .source import ModelSpec
from .stream import iter_overlapping_chunks, iter_video_frames, open_video, video_window

if TYPE_CHECKING:
    from ..inference import Progress, SegmentationResult
    from ..model.base import SegmentationModel
    from ..session import SegmentationSession

logger = logging.getLogger(__name__)

#: ``progress(done, total)`` in slices/frames of one input.
ProgressCallback = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------
# the model, loaded once per process/worker
# ----------------------------------------------------------------------------------------------
class SessionHolder:
    """Loads a :class:`SegmentationSession` on first use and keeps it (thread-safe).

    The sequential CLI owns one holder; on Dask every worker owns one (see
    :mod:`napari_masam.distributed`), so each worker loads the model once.

    Parameters
    ----------
    spec : ModelSpec
    torch_threads : int or None
        If given, ``torch.set_num_threads`` before loading (workers sharing few cores).
    session : SegmentationSession or None
        An already loaded session to use (e.g. the widget's); ``spec`` then only names it.
    """

    def __init__(
        self,
        spec: ModelSpec,
        torch_threads: int | None = None,
        session: SegmentationSession | None = None,
    ) -> None:
        self.spec = spec
        self.torch_threads = torch_threads
        self.load_seconds = 0.0
        #: how many times this holder loaded a model (0 or 1; checked by the Dask tests)
        self.loads = 0
        self._session: SegmentationSession | None = session
        self._lock = threading.Lock()
        self._identity: dict[str, object] | None = None

    def identity(self) -> dict[str, object]:
        """:meth:`ModelSpec.identity`, computed once (hashing big checkpoints takes time)."""
        if self._identity is None:
            self._identity = self.spec.identity()
        return self._identity

    def get(self) -> SegmentationSession:
        """The loaded session (loads it on the first call)."""
        with self._lock:
            if self._session is None:
                start = time.perf_counter()
                if self.torch_threads:
                    import torch

                    torch.set_num_threads(self.torch_threads)
                from ..devices import resolve_device
                from ..session import SegmentationSession

                device = resolve_device(self.spec.device)
                # every slice is segmented once per run: caching embeddings only costs memory
                self._session = SegmentationSession(
                    self.spec.load(device), device, cache_max_bytes=0
                )
                self.load_seconds = time.perf_counter() - start
                self.loads += 1
                logger.info("Loaded model %s in %.1f s", self.spec.source, self.load_seconds)
            return self._session

    @property
    def loaded(self) -> bool:
        """Whether :meth:`get` has loaded the model already."""
        return self._session is not None


def session_model(session: SegmentationSession) -> SegmentationModel:
    """The :class:`SegmentationModel` held by a session."""
    return session.model


def resolve_mode(mode: str | None, model: SegmentationModel, has_boxes: bool) -> str:
    """The mode a job runs in, with a clear error when it cannot run.

    Parameters
    ----------
    mode : str or None
        Requested mode; None = boxes when a box file/folder is given, else automatic if the
        model supports it, else boxes.
    model : SegmentationModel
    has_boxes : bool
        Whether a boxes file/folder was given.

    Raises
    ------
    ValueError
        Automatic mode on a box-only model, or boxes mode without ``--boxes``.
    """
    name = model.metadata.name
    if mode is None:  # boxes given are never ignored
        mode = "boxes" if has_boxes or not model.supports_automatic else "auto"
    if mode == "auto" and not model.supports_automatic:
        raise ValueError(
            f"model {name!r} has no trained class head, so it cannot segment automatically; "
            "use --mode boxes with --boxes FILE, or a MA-SAM checkpoint"
        )
    if mode == "boxes":
        if not model.supports_boxes:
            raise ValueError(f"model {name!r} does not take box prompts; use --mode auto")
        if not has_boxes:
            raise ValueError(
                f"model {name!r} needs box prompts (mode 'boxes') but no --boxes FILE or folder "
                "was given; see `napari-masam segment --help` for the box file schema"
            )
    return mode


# ----------------------------------------------------------------------------------------------
# boxes
# ----------------------------------------------------------------------------------------------
def boxes_file_for(item: BatchInput, boxes: Path | None) -> Path | None:
    """The box file of ``item``: ``boxes`` itself, or ``<stem>.json/.csv`` inside a folder.

    Raises
    ------
    FileNotFoundError
        ``boxes`` is a folder without a file for this input.
    """
    if boxes is None:
        return None
    boxes = Path(boxes)
    if boxes.is_file():
        return boxes
    for suffix in (".json", ".csv"):
        candidate = boxes / f"{item.stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no boxes for {item.path.name} in {boxes} (expected {item.stem}.json or {item.stem}.csv)"
    )


def prompt_boxes(
    path: Path,
    n_frames: int | None,
    shape_yx: tuple[int, int] | None = None,
    parsed: BoxFile | None = None,
    *,
    keyframes_only: bool = False,
) -> tuple[BoxesDict, dict[int, tuple[int, int]], dict[str, object]]:
    """Read a box file once, check it against the stack, and give the engine's prompts.

    Parameters
    ----------
    path : Path
        A box file (:mod:`napari_masam.io.boxes`: our JSON/CSV table or napari's Shapes CSV).
    n_frames : int or None
        Number of slices/frames of the stack (None: unknown).
    shape_yx : (int, int) or None
        Slice size: a box wholly outside it is an error, a box partly outside is clipped.
    parsed : BoxFile or None
        ``path`` already parsed (the CLI parses a single box file once, at the edge).
    keyframes_only : bool
        Give the keyframes as drawn (for propagation) instead of boxes interpolated over each
        object's range.

    Returns
    -------
    boxes : dict
        ``{object_id: {slice: (x0, y0, x1, y1)}}``.
    limits : dict
        ``{object_id: (first, last)}`` of the objects the file bounds with ``last_slice``.
    record : dict
        JSON-able prompts block for the provenance sidecar (the keyframes as given).

    Raises
    ------
    ValueError
        Unusable file: empty, no boxes, non-integral ids/slices, boxes outside the stack.
    """
    from ..io.boxes import read_box_file
    from ..prompts import clip_box

    box_file = parsed if parsed is not None and parsed.path == path else read_box_file(path)
    box_file.check_fits(n_frames, shape_yx)
    boxes = box_file.boxes(interpolate=not keyframes_only)
    if shape_yx is not None:
        boxes = {
            oid: {z: b for z, b in ((z, clip_box(b, shape_yx)) for z, b in frames.items()) if b}
            for oid, frames in boxes.items()
        }
    limits = box_file.limits()
    record: dict[str, object] = {
        "file": path.name,
        "format": box_file.kind,
        "sha256": file_sha256(path),
        "objects": sorted(boxes),
        "keyframes": {
            str(obj): {str(z): [float(v) for v in b] for z, b in sorted(frames.items())}
            for obj, frames in sorted(box_file.keyframes.items())
        },
        "ranges": {str(obj): list(r) for obj, r in sorted(box_file.ranges.items())},
        "limits": {str(obj): list(r) for obj, r in limits.items()},
        "use": "propagated from keyframes" if keyframes_only else "interpolated between keyframes",
    }
    return boxes, limits, record


def load_boxes(
    path: Path,
    n_frames: int | None,
    shape_yx: tuple[int, int] | None = None,
    parsed: BoxFile | None = None,
) -> tuple[BoxesDict, dict[str, object]]:
    """Boxes interpolated over each object's range, and the sidecar's prompts block
    (:func:`prompt_boxes` without propagation)."""
    boxes, _, record = prompt_boxes(path, n_frames, shape_yx, parsed)
    return boxes, record


def _boxes_in_window(boxes: BoxesDict, start: int, stop: int) -> BoxesDict:
    """Boxes of slices ``start <= z < stop``, re-indexed from ``start``; empty objects dropped."""
    out: BoxesDict = {}
    for obj_id, frames in boxes.items():
        sub = {z - start: b for z, b in frames.items() if start <= z < stop}
        if sub:
            out[obj_id] = sub
    return out


# ----------------------------------------------------------------------------------------------
# driving the engine
# ----------------------------------------------------------------------------------------------
class _Observed:
    """An iterator over an engine generator that reports each item; its StopIteration carries
    the generator's return value, so :func:`napari_masam.inference.run` drains it."""

    def __init__(
        self, gen: Generator[Progress, None, SegmentationResult], report: Callable[[Progress], None]
    ) -> None:
        self._gen = gen
        self._report = report

    def __iter__(self) -> _Observed:
        return self

    def __next__(self) -> Progress:
        progress = next(self._gen)
        self._report(progress)
        return progress


def observe(
    gen: Generator[Progress, None, SegmentationResult], report: Callable[[Progress], None]
) -> Generator[Progress, None, SegmentationResult]:
    """``gen``, calling ``report(progress)`` on every item it yields; returns its result."""
    return (yield from _Observed(gen, report))


def drain(
    gen: Generator[Progress, None, SegmentationResult],
    on_progress: Callable[[Progress], None] | None = None,
) -> SegmentationResult:
    """Run an engine generator to the end (:func:`napari_masam.inference.run`), reporting."""
    from ..inference import run

    return run(gen if on_progress is None else observe(gen, on_progress))


def segment_stack(
    session: SegmentationSession,
    stack: np.ndarray,
    request: SegmentationRequest,
    on_progress: Callable[[Progress], None] | None = None,
) -> SegmentationResult:
    """Segment one in-memory stack with the session (the widget's code path).

    Parameters
    ----------
    session : SegmentationSession
    stack : ndarray
        (Z, Y, X) grey or (T, Y, X, 3) uint8 RGB, axis 0 = slices/frames.
    request : SegmentationRequest
        Mode, preset, stride, batch size, boxes (pixel indices of ``stack``), window.

    Returns
    -------
    SegmentationResult
        ``labels`` (Z, Y, X) uint8/uint16.
    """
    if request.mode == "auto":
        gen = session.iter_automatic(
            stack,
            preset=request.preset,
            stride=request.stride,
            batch_size=request.batch_size,
            window=request.window,
        )
    elif request.propagate:
        gen = session.iter_boxes(
            stack,
            request.boxes or {},
            propagate=True,
            slice_ranges=request.slice_ranges or None,
            preset=request.preset,
            window=request.window,
        )
    else:
        gen = session.iter_boxes(
            stack, request.boxes or {}, preset=request.preset, window=request.window
        )
    return drain(gen, on_progress)


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
            replaces = output_digest(output)
            session = holder.get()
            model = session.model
            mode = resolve_mode(config.mode, model, config.boxes is not None)
            boxes_path = boxes_file_for(item, config.boxes) if mode == "boxes" else None
            timings: dict[str, float] = {"model_load_s": round(holder.load_seconds, 4)}
            with atomic_path(output, directory=fmt == "png") as staged:
                if item.kind == "video" and config.propagate:
                    frames, facts, prompts_record = _run_video_whole(
                        item, config, session, boxes_path, fmt, staged, progress, timings
                    )
                elif item.kind == "video":
                    frames, facts, prompts_record = _run_video(
                        item, config, session, mode, boxes_path, fmt, staged, progress, timings
                    )
                else:
                    frames, facts, prompts_record = _run_in_memory(
                        item, config, session, mode, boxes_path, fmt, staged, progress, timings
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
                    "preprocessing": _preprocessing_record(model, config, facts),
                    "prompts": prompts_record,
                    "software": software_versions(),
                    "timings": timings,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": platform.node(),
                }
                write_json_atomic(sidecar, record)
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


def read_stack(item: BatchInput) -> tuple[np.ndarray, dict[str, object] | None, dict[str, object]]:
    """(stack, NIfTI reference for writing, stack facts) for NIfTI and TIFF inputs."""
    if item.kind == "nifti":
        from ..io.nifti import read_nifti

        volume = read_nifti(item.path, as_labels=False)
        stack = np.asarray(volume.data)
        if stack.ndim == 2:
            raise ValueError(
                f"{item.path.name}: a single 2-D slice of shape {stack.shape}; the CLI segments "
                "3-D volumes (Z, Y, X). Open it in napari and segment it with the widget"
            )
        if stack.ndim != 3:
            raise ValueError(
                f"{item.path.name}: expected a 3-D volume, got shape {stack.shape}; "
                "split 4-D series into 3-D files first"
            )
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


def _n_labels(model: SegmentationModel, mode: str, boxes: BoxesDict | None) -> int:
    if mode == "boxes" and boxes:
        return max(boxes)
    return max(int(model.num_classes), 1)


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
            n_labels=_n_labels(model, mode, boxes),
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


def _run_video(
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
    from ..preprocess import resolve_preset

    model = session.model
    reader = open_video(item.path)
    try:
        estimated, fps = len(reader), float(reader.fps or 25.0)
        height, width = (int(v) for v in reader.shape[1:3])
        boxes, prompts_record = None, None
        if boxes_path is not None:
            # interpolation needs the whole timeline; boxes are small, frames are streamed
            boxes, prompts_record = load_boxes(
                boxes_path, estimated, (height, width), config.box_file
            )
        preset = resolve_preset(config.preset, default=model.metadata.intensity_preset)
        t0 = time.perf_counter()
        window = video_window(reader, preset)  # once per video: labels independent of chunks
        timings["window_s"] = round(time.perf_counter() - t0, 4)
        depth = max(int(model.slices_per_group), 1)
        overlap = depth - 1
        if config.stride > 1 and overlap:
            overlap = -(-overlap // config.stride) * config.stride
        chunk = max(config.chunk_frames, 1)
        if config.stride > 1:
            chunk = -(-chunk // config.stride) * config.stride

        sink = frame_sink(
            fmt,
            staged,
            fps=fps,
            class_colors=model.metadata.class_colors,
            n_labels=_n_labels(model, mode, boxes),
            n_frames=estimated,
        )
        done = 0
        segment_s = 0.0
        engine: object = None
        try:
            for start, window_frames, lo, hi in iter_overlapping_chunks(
                iter_video_frames(reader), chunk, overlap
            ):
                total = max(estimated, start + hi)
                t0 = time.perf_counter()
                result: SegmentationResult | None = None
                sub_boxes = (
                    _boxes_in_window(boxes or {}, start, start + len(window_frames))
                    if mode == "boxes"
                    else None
                )
                if mode == "boxes" and not sub_boxes:
                    labels = np.zeros(window_frames.shape[:3], dtype=np.uint8)  # nothing boxed
                else:
                    request = SegmentationRequest(
                        mode,
                        config.preset,
                        config.stride,
                        config.batch_size,
                        boxes=sub_boxes,
                        window=window,
                    )

                    def on_progress(
                        p: Progress, base: int = done, own: int = hi - lo, tot: int = total
                    ) -> None:
                        if progress is not None and mode == "auto" and p.total:
                            progress(base + int(min(1.0, p.done / p.total) * own), tot)

                    result = segment_stack(session, window_frames, request, on_progress)
                    labels = np.asarray(result.labels)
                segment_s += time.perf_counter() - t0
                if engine is None and result is not None:
                    engine = result.preprocessing
                if labels.shape[0] != window_frames.shape[0]:
                    raise ValueError(
                        f"{item.path.name}: engine returned {labels.shape[0]} label frames for a "
                        f"chunk of {window_frames.shape[0]}"
                    )
                sink.write(labels[lo:hi], window_frames[lo:hi] if sink.needs_frames else None)
                done += hi - lo
                if progress is not None:
                    progress(done, max(total, done))
                del window_frames, labels
            if done == 0:
                raise ValueError(f"{item.path.name}: the video has no decodable frames")
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    finally:
        reader.close()
    timings["segment_s"] = round(segment_s, 4)
    if progress is not None:
        progress(done, done)
    facts: dict[str, object] = {
        "frames": done,
        "frame_shape": [height, width, 3],
        "fps": fps,
        "chunk_frames": chunk,
        "chunk_overlap": overlap,
        "volume_window": None if window is None else list(window),
        "engine": engine,
    }
    return done, facts, prompts_record


def _run_video_whole(
    item: BatchInput,
    config: BatchConfig,
    session: SegmentationSession,
    boxes_path: Path | None,
    fmt: str,
    staged: Path,
    progress: ProgressCallback | None,
    timings: dict[str, float],
) -> tuple[int, dict[str, object], dict[str, object] | None]:
    """A video propagated from keyframes: the walk needs the whole timeline, so the engine
    reads the (lazy, cached) reader frame by frame instead of chunks; labels are held whole."""
    from ..preprocess import resolve_preset

    if boxes_path is None:  # BatchConfig refuses --propagate without --boxes
        raise ValueError(f"{item.path.name}: --propagate needs --boxes")
    model = session.model
    reader = open_video(item.path, cache_frames=2 * max(int(model.slices_per_group), 1) + 8)
    try:
        n, fps = len(reader), float(reader.fps or 25.0)
        height, width = (int(v) for v in reader.shape[1:3])
        boxes, limits, prompts_record = prompt_boxes(
            boxes_path, n, (height, width), config.box_file, keyframes_only=True
        )
        preset = resolve_preset(config.preset, default=model.metadata.intensity_preset)
        window = video_window(reader, preset)
        request = SegmentationRequest(
            "boxes",
            config.preset,
            config.stride,
            config.batch_size,
            boxes=boxes,
            window=window,
            propagate=True,
            slice_ranges=limits,
        )

        def on_progress(p: Progress) -> None:
            if progress is not None:
                progress(int(p.done), int(p.total or n))

        t0 = time.perf_counter()
        result = segment_stack(session, reader, request, on_progress)
        labels = np.asarray(result.labels)
        timings["segment_s"] = round(time.perf_counter() - t0, 4)
        sink = frame_sink(
            fmt,
            staged,
            fps=fps,
            class_colors=model.metadata.class_colors,
            n_labels=_n_labels(model, "boxes", boxes),
            n_frames=n,
        )
        try:
            block = max(config.chunk_frames, 1)
            frames = iter_video_frames(reader, block) if sink.needs_frames else None
            for first in range(0, n, block):
                rows = labels[first : first + block]
                images = None
                if frames is not None:
                    images = np.stack([next(frames) for _ in range(len(rows))])
                sink.write(rows, images)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    finally:
        reader.close()
    facts: dict[str, object] = {
        "frames": n,
        "frame_shape": [height, width, 3],
        "fps": fps,
        "volume_window": None if window is None else list(window),
        "engine": result.preprocessing,
    }
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
