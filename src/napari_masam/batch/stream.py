"""Videos streamed through a job: frames in order, overlapping chunks, one intensity window.

Frames are decoded, segmented and written in chunks of ``chunk_frames`` frames plus
``slices_per_group - 1`` frames of overlap on each side, so every frame sees exactly the
D-frame windows it would see in a whole-stack run (stride 1) while memory stays independent of
the video's length. A volume-level intensity window (``--preset mri``) is computed once per
video by :func:`video_window` and handed to every chunk, so labels do not depend on
``--chunk-frames``.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..io.video import VideoReader
    from ..preprocess import IntensityPreset


def open_video(path: str | os.PathLike[str], cache_frames: int = 8) -> VideoReader:
    """The widget's :class:`~napari_masam.io.video.VideoReader` with a small frame cache.

    The batch reads frames in order, so a cache of a few frames is enough; the reader's default
    budget (256 MiB) would otherwise count against the streaming memory.
    """
    from ..io.video import VideoReader

    reader = VideoReader(path, cache_bytes=1)  # opened once: the size sets the cache budget
    height, width = (int(n) for n in reader.shape[1:3])
    reader.cache_bytes = max(1, cache_frames) * max(1, height * width * 3)
    return reader


def video_record(reader: VideoReader) -> dict[str, object]:
    """What the sidecar keeps of a video's reading: the numbering rule and its source, the
    rotation applied (counter-clockwise degrees; exports are on the upright grid), the stored
    and upright sizes and the frames found damaged (read after the job, it grows while
    reading). ``path`` is left out: the sidecar's input record names the file."""
    meta = dict(reader.metadata)
    meta.pop("path", None)
    return meta


def iter_video_frames(reader: VideoReader, block: int = 8) -> Iterator[np.ndarray]:
    """Frames ``0, 1, ...`` of a :class:`VideoReader`, one (H, W, 3) uint8 RGB array each.

    Read in presentation order through the reader's running decoder (no seeking), ``block``
    frames at a time: memory does not grow with the video's length.
    """
    n = len(reader)
    for first in range(0, n, block):
        yield from reader.get_frames(range(first, min(first + block, n)))


def iter_overlapping_chunks(
    frames: Iterable[np.ndarray], chunk: int, overlap: int
) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """Group a frame stream into windows of ``chunk`` new frames plus ``overlap`` on each side.

    Parameters
    ----------
    frames : iterable of ndarray
        The stream, frame by frame, all of one shape.
    chunk : int
        Frames finalised per window (the last window may hold fewer).
    overlap : int
        Context frames on each side (clipped at the ends of the stream).

    Yields
    ------
    start : int
        Stream index of the window's first frame.
    window : ndarray
        (n, ...) the window's frames, stacked.
    lo, hi : int
        Rows ``window[lo:hi]`` are this window's own frames (stream ``start + lo`` onwards);
        consecutive windows' own frames tile the stream without gaps or repeats.

    Notes
    -----
    At most ``chunk + 2 * overlap`` frames are held at any time.
    """
    if chunk < 1 or overlap < 0:
        raise ValueError(f"chunk must be >= 1 and overlap >= 0, got {chunk}, {overlap}")
    it = iter(frames)
    buffer: deque[np.ndarray] = deque()
    buffer_start = 0
    core_start = 0
    exhausted = False
    while True:
        needed = core_start + chunk + overlap
        while not exhausted and buffer_start + len(buffer) < needed:
            frame = next(it, None)
            if frame is None:
                exhausted = True
            else:
                buffer.append(frame)
        available = buffer_start + len(buffer)
        if core_start >= available:
            return
        core_stop = min(core_start + chunk, available)
        start = max(0, core_start - overlap)
        rows = list(buffer)[start - buffer_start :]
        window = np.stack(rows)
        del rows
        yield start, window, core_start - start, core_stop - start
        del window
        core_start = core_stop
        while buffer_start < core_start - overlap:
            buffer.popleft()
            buffer_start += 1


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's percentile interpolation (``method="linear"``), same rounding
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def video_window(reader: VideoReader, preset: IntensityPreset) -> tuple[float, float] | None:
    """The volume-level intensity window of a whole video, computed in one streamed pass.

    Equals :func:`napari_masam.preprocess.volume_window` of the decoded video (all frames
    stacked) without holding it: uint8 frames are counted into a 256-bin histogram, from which
    the minimum and the ``"mri"`` percentile follow exactly (numpy's linear interpolation).

    Returns
    -------
    (float, float) or None
        None when the preset needs no volume-level window
        (:func:`napari_masam.preprocess.needs_volume_window`).
    """
    from ..preprocess import needs_volume_window, volume_window

    if not needs_volume_window(preset):
        return None
    if preset.kind in ("ct", "rgb"):
        return volume_window(np.zeros((1, 1, 1), np.uint8), preset)  # the preset's constants
    counts = np.zeros(256, dtype=np.int64)
    for frame in iter_video_frames(reader):
        counts += np.bincount(np.asarray(frame, dtype=np.uint8).ravel(), minlength=256)
    total = int(counts.sum())
    if total == 0:
        return 0.0, 0.0
    present = np.flatnonzero(counts)
    low, high = float(present[0]), float(present[-1])
    if preset.kind != "mri":
        return low, high
    cumulative = np.cumsum(counts)
    position = float(preset.percentile) / 100.0 * (total - 1)  # type: ignore[arg-type]
    below = math.floor(position)
    above = min(below + 1, total - 1)
    value_below = float(np.searchsorted(cumulative, below, side="right"))
    value_above = float(np.searchsorted(cumulative, above, side="right"))
    return low, _lerp(value_below, value_above, position - below)
