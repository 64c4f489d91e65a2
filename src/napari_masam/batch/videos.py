"""Videos through a job: streamed in overlapping chunks, or (propagation) read lazily whole.

Both write the labels into the job's staging path and return ``(frames, facts, prompts record)``
for the sidecar. The window of a volume-level intensity preset is computed once per video
(:func:`napari_masam.batch.stream.video_window`) and handed to every engine call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import BatchConfig, SegmentationRequest
from .engine import ProgressCallback, non_finite_record, segment_stack
from .inputs import BatchInput
from .outputs import frame_sink, n_labels_for
from .prompts import boxes_in_window, load_boxes, prompt_boxes
from .stream import (
    iter_overlapping_chunks,
    iter_video_frames,
    open_video,
    video_record,
    video_window,
)

if TYPE_CHECKING:
    from ..inference import Progress, SegmentationResult
    from ..session import SegmentationSession


def chunk_plan(slices_per_group: int, config: BatchConfig) -> tuple[int, int]:
    """``(chunk, overlap)`` frames of the streamed windows: ``D - 1`` context frames on each
    side (rounded up to the stride, so window starts line up across chunks), chunks a multiple
    of the stride."""
    overlap = max(slices_per_group, 1) - 1
    chunk = max(config.chunk_frames, 1)
    if config.stride > 1:
        overlap = -(-overlap // config.stride) * config.stride
        chunk = -(-chunk // config.stride) * config.stride
    return chunk, overlap


def segment_video_chunks(
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
        chunk, overlap = chunk_plan(int(model.slices_per_group), config)
        sink = frame_sink(
            fmt,
            staged,
            fps=fps,
            class_colors=model.metadata.class_colors,
            n_labels=n_labels_for(model, mode, boxes),
            n_frames=estimated,
        )
        done = 0
        segment_s = 0.0
        engine: dict[str, object] | None = None
        reports: list[dict[str, object]] = []
        try:
            for start, window_frames, lo, hi in iter_overlapping_chunks(
                iter_video_frames(reader), chunk, overlap
            ):
                total = max(estimated, start + hi)
                t0 = time.perf_counter()
                result: SegmentationResult | None = None
                sub_boxes = (
                    boxes_in_window(boxes or {}, start, start + len(window_frames))
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
                if result is not None:
                    reports.append(result.preprocessing)
                    engine = engine or result.preprocessing
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
        video = video_record(reader)
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
        "non_finite": non_finite_record(reports),
        "video": video,
    }
    return done, facts, prompts_record


def segment_video_whole(
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
            n_labels=n_labels_for(model, "boxes", boxes),
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
        video = video_record(reader)
    finally:
        reader.close()
    facts: dict[str, object] = {
        "frames": n,
        "frame_shape": [height, width, 3],
        "fps": fps,
        "volume_window": None if window is None else list(window),
        "engine": result.preprocessing,
        "non_finite": non_finite_record([result.preprocessing]),
        "video": video,
    }
    return n, facts, prompts_record
