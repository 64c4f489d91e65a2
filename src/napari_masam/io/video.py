"""Frame-accurate, lazy video reading and simple video writing with PyAV.

:class:`VideoReader` presents a video as a read-only ``(T, H, W, 3)`` uint8 RGB array. Opening it
demuxes the packet headers once (no decoding) to learn every frame's presentation timestamp
(pts) and the keyframes; a frame is then fetched by seeking to the last keyframe at or before its
pts and decoding forward until the decoder outputs exactly that pts. Sequential reads continue the
running decoder without seeking, and decoded RGB frames are kept in an LRU cache. When the
container's frame count or timestamps cannot be trusted (no frame count in the header,
discarded packets, a last group of pictures that decodes to other timestamps than its packets
announce), the index is rebuilt by decoding the whole video once ("decode to count").

Frame ``i`` is the ``i``-th frame in presentation order; ``reader.timestamps[i]`` is its time in
seconds from the stream's start time. Variable frame rate needs nothing special: frames are
identified by pts, not by ``i / fps``.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..palette import label_rgb_table

logger = logging.getLogger(__name__)

#: File suffixes handled as video.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")

#: Default RGB frame cache budget.
DEFAULT_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class FrameIndex:
    """Presentation timestamps of every frame and where decoding can start.

    Attributes
    ----------
    pts : (T,) int64 ndarray
        Presentation timestamps in ``time_base`` units, strictly increasing.
    keyframe_pts : (K,) int64 ndarray
        pts of the keyframes, increasing.
    keyframe_seek : (K,) int64 ndarray
        Timestamp to seek to for each keyframe (``min(pts, dts)`` of its packet).
    source : str
        ``"demux"`` (packet headers) or ``"decode"`` (a full decode).
    """

    pts: np.ndarray
    keyframe_pts: np.ndarray
    keyframe_seek: np.ndarray
    source: str


class VideoReader:
    """A video file as a lazy ``(T, H, W, 3)`` uint8 RGB array with exact random access.

    Supports ``shape``, ``dtype``, ``ndim``, ``len()``, ``np.asarray(reader)`` (decodes every
    frame: avoid for long videos) and numpy indexing whose first index is an int, a slice, or an
    integer/boolean array (the remaining indices apply to each frame).

    Parameters
    ----------
    path : str or path-like
        Any container/codec FFmpeg decodes (mp4, avi, mov, mkv, webm, ...).
    cache_bytes : int
        Budget of the LRU cache of decoded RGB frames.
    index : {"auto", "demux", "decode"}
        How frame timestamps are found: ``"demux"`` trusts the packet headers, ``"decode"``
        decodes the whole file once, ``"auto"`` demuxes and decodes only when the container's
        count or the last group of pictures disagrees with the packets.
    threads : bool
        Let FFmpeg decode with several threads.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a video, no video stream, an unsupported codec, or no decodable frame.

    Attributes
    ----------
    stats : dict
        Counters ``seeks``, ``frames_decoded``, ``frames_converted``, ``cache_hits`` (for tests
        and benchmarks).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        index: str = "auto",
        threads: bool = True,
    ) -> None:
        if index not in ("auto", "demux", "decode"):
            raise ValueError(f"index must be 'auto', 'demux' or 'decode', got {index!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video file {self.path} does not exist")
        self._threads = threads
        self._lock = threading.RLock()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self.stats = {"seeks": 0, "frames_decoded": 0, "frames_converted": 0, "cache_hits": 0}
        self._container: Any = None
        self._decoder: Iterator[Any] | None = None
        self._last_index = -1  # frame index of the last frame the running decoder output

        container = self._open_container()
        try:
            stream = container.streams.video[0]
            self.codec = stream.codec_context.name
            self.time_base = stream.time_base or Fraction(1, 90000)
            self.container_frames = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            self._declared_rate = Fraction(rate) if rate else None
            self.start_pts = stream.start_time
            self.container_format = container.format.name
            self.pix_fmt = stream.codec_context.pix_fmt
        finally:
            container.close()

        self._index = self._demux_index() if index != "decode" else self._decode_index()
        if index == "auto":
            self._maybe_verify_index()
        if len(self._index.pts) == 0:
            raise ValueError(f"{self.path} has no video frames")
        self._pts_to_frame = {int(p): i for i, p in enumerate(self._index.pts)}

        # decoding frame 0 validates the codec and gives the true frame size
        self.height, self.width = 0, 0
        first = self._decode_first()
        self.height, self.width = first.shape[:2]
        self._store(0, first)
        self._finalizer = weakref.finalize(self, _close_container, self.__dict__)

    # ------------------------------------------------------------------------------ array API
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(T, H, W, 3)``."""
        return (len(self._index.pts), self.height, self.width, 3)

    @property
    def dtype(self) -> np.dtype:
        """Always uint8."""
        return np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        """Always 4."""
        return 4

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes if fully decoded."""
        return self.size

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        frames_key, rest = _split_key(key)
        n = len(self)
        if isinstance(frames_key, int | np.integer):
            i = int(frames_key)
            if not -n <= i < n:
                raise IndexError(f"frame {i} out of range for a video of {n} frames")
            return self.get_frames([i % n])[0][rest]
        if isinstance(frames_key, slice):
            indices = np.arange(*frames_key.indices(n))
        else:
            arr = np.asarray(frames_key)
            if arr.dtype == np.bool_:
                if arr.shape != (n,):
                    raise IndexError(f"boolean index of shape {arr.shape} for {n} frames")
                indices = np.flatnonzero(arr)
            elif arr.dtype.kind in "iu":
                if arr.size and (arr.min() < -n or arr.max() >= n):
                    raise IndexError(f"frame index out of range for a video of {n} frames")
                indices = arr % n if arr.size else arr.astype(np.int64)
            else:
                raise IndexError(f"unsupported frame index {frames_key!r}")
        indices = np.asarray(indices, dtype=np.int64)
        frames = self.get_frames(indices.ravel().tolist())
        if frames:
            out = np.stack(frames).reshape((*indices.shape, self.height, self.width, 3))
        else:
            out = np.empty((*indices.shape, self.height, self.width, 3), dtype=np.uint8)
        return out[(Ellipsis, *rest)] if rest else out

    # ------------------------------------------------------------------------------ metadata
    @property
    def pts(self) -> np.ndarray:
        """``(T,)`` int64 presentation timestamps in :attr:`time_base` units."""
        return self._index.pts.copy()

    @property
    def timestamps(self) -> np.ndarray:
        """``(T,)`` float64 frame times in seconds from the first frame's pts."""
        return (self._index.pts - self._index.pts[0]) * float(self.time_base)

    @property
    def fps(self) -> float:
        """Average frame rate (frames per second) from the timestamps, else the container's."""
        n = len(self)
        span = float((self._index.pts[-1] - self._index.pts[0]) * self.time_base)
        if n > 1 and span > 0:
            return (n - 1) / span
        return float(self._declared_rate) if self._declared_rate else 0.0

    @property
    def is_vfr(self) -> bool:
        """Whether frame durations vary by more than one time-base tick."""
        d = np.diff(self._index.pts)
        return bool(d.size > 1 and (d.max() - d.min()) > 1)

    @property
    def index_source(self) -> str:
        """``"demux"`` or ``"decode"``: how the frame timestamps were found."""
        return self._index.source

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-able description: path, frames, size, fps, time base, timestamps, codec."""
        return {
            "path": str(self.path),
            "n_frames": len(self),
            "height": self.height,
            "width": self.width,
            "fps": self.fps,
            "declared_fps": float(self._declared_rate) if self._declared_rate else None,
            "time_base": [self.time_base.numerator, self.time_base.denominator],
            "timestamps_s": self.timestamps.tolist(),
            "vfr": self.is_vfr,
            "codec": self.codec,
            "pix_fmt": self.pix_fmt,
            "container": self.container_format,
            "container_frames": self.container_frames,
            "index_source": self.index_source,
        }

    # ------------------------------------------------------------------------------ decoding
    def get_frames(self, indices: Iterable[int]) -> list[np.ndarray]:
        """Decode frames ``indices`` (non-negative, any order, repeats allowed).

        Returns
        -------
        list of (H, W, 3) uint8 ndarray
            In the order asked. Cached frames are returned as copies.
        """
        wanted = [int(i) for i in indices]
        with self._lock:
            found: dict[int, np.ndarray] = {}
            for i in wanted:
                if i in self._cache:
                    self._cache.move_to_end(i)
                    found[i] = self._cache[i]
                    self.stats["cache_hits"] += 1
            todo = sorted(set(wanted) - set(found))
            for i in todo:
                if i in found:  # decoded on the way to an earlier one
                    continue
                found.update(self._decode_to(i, set(todo)))
            return [found[i].copy() for i in wanted]

    def close(self) -> None:
        """Close the file; the reader can still be used (it reopens on demand)."""
        with self._lock:
            _close_container(self.__dict__)

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"VideoReader({str(self.path)!r}, shape={self.shape}, fps={self.fps:.3f}, "
            f"codec={self.codec!r})"
        )

    # ------------------------------------------------------------------------------ internals
    def _open_container(self) -> Any:
        try:
            container = av.open(str(self.path), "r")
        except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.path} is not a readable video file: {exc}") from exc
        if not container.streams.video:
            container.close()
            raise ValueError(f"{self.path} has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context
        if codec is None or not codec.name or codec.name == "none":
            container.close()
            raise ValueError(
                f"{self.path}: the video codec is not supported by this FFmpeg build; "
                "re-encode the video (e.g. to H.264 mp4)."
            )
        try:
            av.codec.Codec(codec.name, "r")
        except Exception as exc:
            container.close()
            raise ValueError(
                f"{self.path}: no decoder for codec {codec.name!r} in this FFmpeg build; "
                "re-encode the video (e.g. to H.264 mp4)."
            ) from exc
        if self._threads:
            stream.thread_type = "AUTO"
        return container

    def _demux_index(self) -> FrameIndex:
        container = self._open_container()
        pts: list[int] = []
        kf_pts: list[int] = []
        kf_seek: list[int] = []
        self._discarded = 0
        try:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if packet.is_discard:
                    self._discarded += 1
                    continue
                p = packet.pts if packet.pts is not None else packet.dts
                if p is None:
                    logger.info("%s: packets without timestamps; decoding to index", self.path)
                    return self._decode_index()
                pts.append(int(p))
                if packet.is_keyframe:
                    kf_pts.append(int(p))
                    kf_seek.append(int(min(p, packet.dts if packet.dts is not None else p)))
        except av.FFmpegError as exc:
            logger.warning("%s: demuxing failed (%s); decoding to index", self.path, exc)
            return self._decode_index()
        finally:
            container.close()
        return _make_index(pts, kf_pts, kf_seek, "demux")

    def _decode_index(self) -> FrameIndex:
        container = self._open_container()
        pts: list[int] = []
        kf_pts: list[int] = []
        try:
            stream = container.streams.video[0]
            for frame in _safe_decode(container, stream, self.path):
                p = _frame_pts(frame)
                if p is None:
                    p = pts[-1] + 1 if pts else 0
                pts.append(p)
                if frame.key_frame:
                    kf_pts.append(p)
        finally:
            container.close()
        self._discarded = 0
        return _make_index(pts, kf_pts, list(kf_pts), "decode")

    def _maybe_verify_index(self) -> None:
        n = len(self._index.pts)
        trusted = n > 0 and self.container_frames == n and not self._discarded
        if trusted:
            return
        # decode the last group of pictures and compare its timestamps with the packets'
        idx = self._index
        if n == 0 or len(idx.keyframe_pts) == 0:
            self._index = self._decode_index()
            return
        container = self._open_container()
        try:
            stream = container.streams.video[0]
            container.seek(int(idx.keyframe_seek[-1]), stream=stream, backward=True)
            start = int(idx.keyframe_pts[-1])
            got = [
                p
                for f in _safe_decode(container, stream, self.path)
                if (p := _frame_pts(f)) is not None and p >= start
            ]
        finally:
            container.close()
        expected = idx.pts[idx.pts >= idx.keyframe_pts[-1]].tolist()
        if got != expected:
            logger.info(
                "%s: the container's frame timestamps do not match the decoded ones "
                "(%d vs %d frames in the last GOP); decoding the whole video to index it",
                self.path,
                len(expected),
                len(got),
            )
            self._index = self._decode_index()

    def _decode_first(self) -> np.ndarray:
        frames = self._decode_to(0, {0})
        return frames[0]

    def _ensure_open(self) -> None:
        if self._container is None:
            self._container = self._open_container()
            self._decoder = None
            self._last_index = -1

    def _seek_to_keyframe(self, k: int) -> None:
        """Position the decoder at keyframe ``k`` (-1: the very start)."""
        self._ensure_open()
        stream = self._container.streams.video[0]
        if k < 0:
            _close_container(self.__dict__)
            self._ensure_open()
        else:
            self._container.seek(int(self._index.keyframe_seek[k]), stream=stream, backward=True)
        self.stats["seeks"] += 1
        self._decoder = iter(
            _safe_decode(self._container, self._container.streams.video[0], self.path)
        )
        self._last_index = -1

    def _decode_to(self, target: int, wanted: set[int]) -> dict[int, np.ndarray]:
        """Decode until frame ``target`` comes out; return it and any ``wanted`` frames passed."""
        idx = self._index
        target_pts = int(idx.pts[target])
        k = int(np.searchsorted(idx.keyframe_pts, target_pts, side="right")) - 1
        keyframe_frame = self._pts_to_frame.get(int(idx.keyframe_pts[k]), 0) if k >= 0 else 0
        running = self._decoder is not None and self._container is not None
        can_continue = (
            running and self._last_index < target and keyframe_frame <= self._last_index + 1
        )
        attempts = [None] if can_continue else []
        attempts += [k, k - 1, -1] if k >= 1 else [k, -1]
        tried: list[int | None] = []
        for start in attempts:
            if start in tried or (start is not None and start < -1):
                continue
            tried.append(start)
            if start is not None:
                self._seek_to_keyframe(start)
            out = self._run_decoder(target, target_pts, wanted)
            if out is not None:
                return out
        if idx.source == "demux":
            logger.warning(
                "%s: frame %d (pts %d) never came out of the decoder; re-indexing by decoding",
                self.path,
                target,
                target_pts,
            )
            self._index = self._decode_index()
            self._pts_to_frame = {int(p): i for i, p in enumerate(self._index.pts)}
            self._cache.clear()
            if target < len(self._index.pts):
                self._seek_to_keyframe(-1)
                out = self._run_decoder(target, int(self._index.pts[target]), wanted)
                if out is not None:
                    return out
        raise ValueError(
            f"{self.path}: cannot decode frame {target} (pts {target_pts}); the file is corrupt"
        )

    def _run_decoder(
        self, target: int, target_pts: int, wanted: set[int]
    ) -> dict[int, np.ndarray] | None:
        out: dict[int, np.ndarray] = {}
        assert self._decoder is not None  # set by _seek_to_keyframe
        for frame in self._decoder:
            self.stats["frames_decoded"] += 1
            p = _frame_pts(frame)
            i = self._pts_to_frame.get(p) if p is not None else None
            if i is None:
                if p is not None and p > target_pts:
                    self._decoder = None
                    return None
                continue
            self._last_index = i
            if i in wanted or i == target:
                rgb = self._to_rgb(frame)
                out[i] = rgb
                self._store(i, rgb)
            if i == target:
                return out
            if i > target:  # overshot: the target's pts never came
                self._decoder = None
                return None
        self._decoder = None
        return None

    def _to_rgb(self, frame: Any) -> np.ndarray:
        self.stats["frames_converted"] += 1
        if self.width and (frame.width != self.width or frame.height != self.height):
            return frame.to_ndarray(format="rgb24", width=self.width, height=self.height)
        return frame.to_ndarray(format="rgb24")

    def _store(self, i: int, rgb: np.ndarray) -> None:
        if rgb.nbytes > self._cache_bytes:
            return
        self._cache[i] = rgb
        self._cache.move_to_end(i)
        total = sum(a.nbytes for a in self._cache.values())
        while total > self._cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            total -= old.nbytes


def read_video(path: str | os.PathLike[str], **kwargs: Any) -> VideoReader:
    """Open a video lazily as a ``(T, H, W, 3)`` uint8 array-like (see :class:`VideoReader`)."""
    return VideoReader(path, **kwargs)


def is_video_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file suffix is one of :data:`VIDEO_SUFFIXES`."""
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def as_dask_array(reader: VideoReader) -> Any:
    """A dask array over ``reader`` with one chunk per frame (nothing decoded until computed)."""
    import dask.array as da

    stat = reader.path.stat()
    name = f"video-{reader.path.resolve()}-{stat.st_mtime_ns}-{stat.st_size}"
    return da.from_array(
        reader,
        chunks=(1, reader.height, reader.width, 3),
        name=name,
        meta=np.empty((0, 0, 0, 0), dtype=np.uint8),
        lock=False,
        asarray=True,
        fancy=False,
    )


# ------------------------------------------------------------------------------------- writing
class VideoWriter:
    """Write RGB frames to a video file (H.264 in mp4 by default).

    Odd frame sizes are padded by one edge row/column for 4:2:0 chroma; the padding is
    dropped again by :meth:`VideoReader` users only if they crop, so prefer even sizes.

    Parameters
    ----------
    path : str or path-like
        Output file; the container follows the suffix.
    fps : float
        Frame rate (constant).
    codec : str
        FFmpeg encoder name (``"libx264"``, ``"mpeg4"``, ``"libvpx-vp9"``, ``"ffv1"``, ...).
    crf : int or None
        Constant rate factor for encoders that take one (lower = better).
    pix_fmt : str
        Encoder pixel format.
    options : dict, optional
        Extra encoder options.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float,
        *,
        codec: str = "libx264",
        crf: int | None = 18,
        pix_fmt: str = "yuv420p",
        options: dict[str, str] | None = None,
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self._container = av.open(str(self.path), "w")
        try:
            self._stream = self._container.add_stream(
                codec, rate=Fraction(fps).limit_denominator(100_000)
            )
            self._stream.pix_fmt = pix_fmt
            opts = dict(options or {})
            if crf is not None and codec in ("libx264", "libx265", "libvpx-vp9"):
                opts.setdefault("crf", str(crf))
            self._stream.options = opts
        except Exception as exc:
            # never leave the container (and its file handle) open, nor an empty new file
            container, self._container = self._container, None
            container.close()
            if not existed:
                self.path.unlink(missing_ok=True)
            if isinstance(exc, av.FFmpegError | ValueError | TypeError):
                raise ValueError(
                    f"cannot write {self.path} with codec {codec!r} and pixel format "
                    f"{pix_fmt!r}: {exc}. Use an encoder this FFmpeg build has (e.g. 'libx264', "
                    "'mpeg4', 'ffv1') and a pixel format it accepts."
                ) from exc
            raise
        self._pad = pix_fmt.endswith(("420p", "422p"))
        self._size: tuple[int, int] | None = None
        self.frames_written = 0

    def write(self, frame_rgb: np.ndarray) -> None:
        """Append one ``(H, W, 3)`` uint8 RGB frame (all frames must share one size)."""
        frame_rgb = np.ascontiguousarray(frame_rgb, dtype=np.uint8)
        if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB frame, got shape {frame_rgb.shape}")
        if self._pad and (frame_rgb.shape[0] % 2 or frame_rgb.shape[1] % 2):
            frame_rgb = np.pad(
                frame_rgb,
                ((0, frame_rgb.shape[0] % 2), (0, frame_rgb.shape[1] % 2), (0, 0)),
                mode="edge",
            )
        if self._size is None:
            self._size = frame_rgb.shape[:2]
            self._stream.height, self._stream.width = self._size
        elif frame_rgb.shape[:2] != self._size:
            raise ValueError(
                f"frame size {frame_rgb.shape[:2]} differs from the first {self._size}"
            )
        frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        if self._container is None:
            return
        if self._size is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def blend_labels(
    frame_rgb: np.ndarray,
    labels: np.ndarray,
    colors: np.ndarray | dict[int, tuple[int, int, int]] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a label image onto an RGB frame.

    Parameters
    ----------
    frame_rgb : (H, W, 3) uint8
    labels : (H, W) int
        0 = background (left unchanged).
    colors : (L + 1, 3) uint8 array or {label: (r, g, b)}, optional
        Default: :func:`napari_masam.palette.label_rgb_table` (the package palette).
    alpha : float
        Opacity of the label colour in [0, 1].

    Returns
    -------
    (H, W, 3) uint8
    """
    labels = np.asarray(labels)
    if labels.shape != frame_rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} and frame {frame_rgb.shape[:2]} differ in size")
    max_label = int(labels.max()) if labels.size else 0
    if colors is None:
        lut = label_rgb_table(max_label)
    elif isinstance(colors, dict):
        lut = label_rgb_table(max(max_label, max(colors, default=0)))
        for k, c in colors.items():
            lut[int(k)] = c
    else:
        lut = np.asarray(colors, dtype=np.uint8)
        if len(lut) <= max_label:
            lut = np.concatenate([lut, label_rgb_table(max_label)[len(lut) :]])
    out = frame_rgb.astype(np.float32)
    mask = labels > 0
    out[mask] = (1 - alpha) * out[mask] + alpha * lut[labels[mask]].astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def iter_write_overlay_mp4(
    frames: Any,
    labels: Any,
    path: str | os.PathLike[str],
    *,
    fps: float | None = None,
    alpha: float = 0.5,
    colors: np.ndarray | dict[int, tuple[int, int, int]] | None = None,
    crf: int = 18,
) -> Iterator[int]:
    """Write masks blended on frames to an mp4 for review; yields frames done, returns the path.

    Parameters
    ----------
    frames : (T, H, W, 3) uint8 array-like
        E.g. a :class:`VideoReader` (its fps is used when ``fps`` is None).
    labels : (T, H, W) int array-like
    path : str or path-like
    fps : float, optional
        Default: ``frames.fps`` or 25.
    alpha, colors
        See :func:`blend_labels`.
    crf : int
        H.264 quality.
    """
    if len(frames) != len(labels):
        raise ValueError(f"{len(frames)} frames but {len(labels)} label frames")
    if fps is None:
        fps = float(getattr(frames, "fps", 0.0) or 25.0)
    if colors is None:
        max_label = int(max((int(np.max(labels[t])) for t in range(len(labels))), default=0))
        colors = label_rgb_table(max_label)
    with VideoWriter(path, fps, crf=crf) as writer:
        for t in range(len(frames)):
            writer.write(blend_labels(np.asarray(frames[t]), np.asarray(labels[t]), colors, alpha))
            yield t + 1
    return Path(path)


def write_overlay_mp4(
    frames: Any, labels: Any, path: str | os.PathLike[str], **kwargs: Any
) -> Path:
    """Run :func:`iter_write_overlay_mp4` to the end and return the written path."""
    gen = iter_write_overlay_mp4(frames, labels, path, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ------------------------------------------------------------------------------------- helpers
def _close_container(state: dict[str, Any]) -> None:
    container = state.get("_container")
    state["_container"] = None
    state["_decoder"] = None
    state["_last_index"] = -1
    if container is not None:
        try:
            container.close()
        except Exception:  # closing a broken container must not raise
            logger.debug("error closing video container", exc_info=True)


def _safe_decode(container: Any, stream: Any, path: Path) -> Iterator[Any]:
    """Decoded frames; stops at the first undecodable packet (logged) instead of raising."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError as exc:
                logger.debug("%s: skipping an undecodable packet: %s", path, exc)
                continue
            yield from frames
    except av.FFmpegError as exc:
        logger.warning("%s: decoding stopped: %s", path, exc)


def _frame_pts(frame: Any) -> int | None:
    if frame.pts is not None:
        return int(frame.pts)
    return int(frame.dts) if frame.dts is not None else None


def _make_index(pts: list[int], kf_pts: list[int], kf_seek: list[int], source: str) -> FrameIndex:
    p = np.asarray(pts, dtype=np.int64)
    order = np.argsort(p, kind="stable")
    p = p[order]
    if p.size and np.any(np.diff(p) == 0):
        logger.warning("duplicate frame timestamps: keeping the first of each")
        p = np.unique(p)
    kp = np.asarray(kf_pts, dtype=np.int64)
    ks = np.asarray(kf_seek, dtype=np.int64)
    korder = np.argsort(kp, kind="stable")
    return FrameIndex(pts=p, keyframe_pts=kp[korder], keyframe_seek=ks[korder], source=source)


def _split_key(key: Any) -> tuple[Any, tuple[Any, ...]]:
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is None for k in key):
        raise IndexError("VideoReader does not support np.newaxis; index the result instead")
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        fill = 4 - (len(key) - 1)
        key = key[:i] + (slice(None),) * fill + key[i + 1 :]
    if len(key) > 4:
        raise IndexError(f"too many indices for a 4-D video: {len(key)}")
    if not key:
        return slice(None), ()
    return key[0], tuple(key[1:])


def probe_video(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Cheap check that ``path`` is a video FFmpeg can decode; no frame is decoded.

    Returns the codec name, size and the container's frame count. Raises ``ValueError`` (not a
    video, no video stream, no decoder) or ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    try:
        container = av.open(str(path), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable video file: {exc}") from exc
    try:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        name = stream.codec_context.name if stream.codec_context is not None else None
        if not name or name == "none":
            raise ValueError(f"{path}: the video codec is not supported by this FFmpeg build")
        try:
            av.codec.Codec(name, "r")
        except Exception as exc:
            raise ValueError(f"{path}: no decoder for codec {name!r}") from exc
        return {
            "codec": name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "container_frames": int(stream.frames or 0),
        }
    finally:
        container.close()
