"""Lazy, frame-exact video reading with PyAV.

The one numbering rule
----------------------
Frame ``i`` is the ``i``-th picture that a plain sequential decode of the file outputs (what
``ffmpeg``, OpenCV's ``VideoCapture`` and CVAT count), for every file this reader accepts, and
random access in any order returns exactly that picture. Timestamps are metadata, never the
index: files whose timestamps are non-monotonic (B-frames remuxed with pts = dts), duplicated,
or missing are numbered the same way.

How (see ``_index.py``): the reader knows where each group of pictures (GOP) starts, counted in
frame-carrying packets in decode order. To show frame ``i`` it seeks to the keyframe packet of
the GOP holding ``i`` (checked by its byte position, so a wrong seek can never shift the
numbering; files whose packets share or lack positions, like MPEG-PS and ASF, are read from the
start to that packet instead), starts a fresh decoder, and counts the pictures that come out
from that GOP's keyframe picture on. Sequential reads continue the running decoder. Open-GOP
leading pictures (shown before their keyframe, counted from the packets' pts) are decoded from
the previous keyframe, so they carry their real references.

Cost of opening: mp4/mov/avi list every packet in their header (FFmpeg holds that list in
memory; reading its flags takes ~2 us a frame, no file reading); mkv/webm/mpg/wmv are scanned
once, packet headers only (the compressed data is read, nothing is decoded). Then the first
frame and the last GOP are decoded: the last GOP's decode settles the frame count (a container
may list a packet that yields no picture), with frame threads and without deblocking or inverse
transform, redone the plain way if it comes up short. GOPs longer than
:data:`MAX_VERIFIED_LAST_GOP` packets are not decoded at open (one picture per packet is
trusted). ``len()`` is decided then and never changes.

Decoding uses slice threads at most: frame threads silently lose the pictures in flight when a
packet is damaged, so their count would differ from a plain decode.

Damaged data: a GOP whose packets yield fewer pictures than they should loses its *last*
numbers (the pictures that did come out keep the numbers a sequential decode gives them), and
every later GOP keeps its numbers, because the count restarts at each keyframe. The lost numbers
are listed in ``reader.damaged_frames`` and read as black frames (``damaged="fill"``, logged) or
raise ``ValueError`` (``damaged="raise"``). A plain sequential decode of such a file numbers
every later frame one lower; we keep later frames where the file puts them instead.

Rotation: a display matrix (phones and many recorders write one) is applied so that frames are
upright as players show them; ``metadata["rotation"]`` holds the counter-clockwise degrees
applied (0, 90, 180, 270). Flips in the matrix are not applied.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..formats import kind_of, suffixes_for
from ._index import (
    MISSING,
    leading_pictures,
    table_from_packet_scan,
    table_from_sample_table,
)

logger = logging.getLogger(__name__)

#: File suffixes handled as video (from the package's one format table).
VIDEO_SUFFIXES = suffixes_for("video")

#: Default RGB frame cache budget.
DEFAULT_CACHE_BYTES = 256 * 2**20

#: Longest last GOP (packets) decoded at open to settle the frame count; longer ones (rare
#: single-GOP recordings) are trusted to yield one picture per packet.
MAX_VERIFIED_LAST_GOP = 300


@dataclass
class _Session:
    """A running decoder fed from one GOP's keyframe packet on."""

    container: Any
    packets: Iterator[Any]
    expect: int  # GOP whose keyframe picture comes next (re-anchors the count)
    count: int | None  # number of the next picture; None until the first keyframe picture
    pending: deque[Any] = field(default_factory=deque)
    ended: bool = False
    start_pts: int = MISSING  # pts of the keyframe the decoder started at
    leading_left: int = 0  # that GOP's leading pictures: undecodable without the GOP before


class _Handles:
    """Open containers, closed together (also by the reader's finalizer)."""

    def __init__(self) -> None:
        self.session: _Session | None = None
        self.index: Any = None  # container for reading GOP timestamps (no decoding)

    def close(self) -> None:
        for container in (self.session.container if self.session else None, self.index):
            if container is not None:
                try:
                    container.close()
                except Exception:  # closing a broken container must not raise
                    logger.debug("error closing a video container", exc_info=True)
        self.session = None
        self.index = None


class VideoReader:
    """A video file as a lazy ``(T, H, W, 3)`` uint8 RGB array, numbered as a sequential decode.

    Frame ``i`` is the ``i``-th picture a plain sequential decode outputs (ffmpeg, OpenCV and
    CVAT count the same way), whatever the timestamps; see the module docstring for how, for
    damaged files, and for rotation. Supports ``shape``, ``dtype``, ``ndim``, ``len()``,
    ``np.asarray(reader)`` (decodes every frame: avoid for long videos) and numpy indexing whose
    first index is an int, a slice, or an integer/boolean array.

    Parameters
    ----------
    path : str or path-like
        Any container/codec FFmpeg decodes (mp4, avi, mov, mkv, webm, ...).
    cache_bytes : int
        Budget of the LRU cache of decoded RGB frames.
    index : {"auto", "scan"}
        Where the GOP table comes from: ``"auto"`` uses the container's sample table when it
        lists every packet and scans packet headers otherwise; ``"scan"`` always scans.
    threads : bool
        Let FFmpeg decode slices in parallel (never frame threads: those lose pictures of
        damaged files silently).
    damaged : {"fill", "raise"}
        What reading a frame number that a damaged GOP did not yield does: a black frame
        (logged, listed in :attr:`damaged_frames`) or ``ValueError``.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a video, no video stream, an unsupported codec, or no decodable frame; the
        message names the file.

    Attributes
    ----------
    height, width : int
        Upright frame size (after :attr:`rotation`).
    rotation : int
        Counter-clockwise degrees (0, 90, 180, 270) applied to the stored pictures.
    damaged_frames : set of int
        Frame numbers found missing so far (grows as damaged GOPs are decoded; ``len`` does not
        change).
    stats : dict
        Counters ``seeks``, ``packets_read``, ``frames_decoded``, ``frames_converted``,
        ``cache_hits`` (for tests and benchmarks).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        index: str = "auto",
        threads: bool = True,
        damaged: str = "fill",
    ) -> None:
        if index not in ("auto", "scan"):
            raise ValueError(f"index must be 'auto' or 'scan', got {index!r}")
        if damaged not in ("fill", "raise"):
            raise ValueError(f"damaged must be 'fill' or 'raise', got {damaged!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video file {self.path} does not exist")
        self._threads = threads
        self._damaged_policy = damaged
        self._lock = threading.RLock()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self.stats = {
            "seeks": 0,
            "packets_read": 0,
            "frames_decoded": 0,
            "frames_converted": 0,
            "cache_hits": 0,
        }
        self.damaged_frames: set[int] = set()
        self._gops: dict[int, tuple[int, int]] = {}  # GOP -> (keyframe pts, leading pictures)
        self._timestamps: np.ndarray | bool | None = False  # False: not computed yet
        self._handles = _Handles()
        self._finalizer = weakref.finalize(self, self._handles.close)
        self._n: int | None = None
        self._counting = ""  # "", "fast" or "exact" (see _count_frames)
        self._pos_offset: int | None = None  # packet.pos minus the table's byte position

        container = self._open_container()
        try:
            stream = container.streams.video[0]
            self.codec = stream.codec_context.name
            self.time_base = stream.time_base or Fraction(1, 90000)
            self.container_frames = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            self._declared_rate = Fraction(rate) if rate else None
            self.container_format = container.format.name
            self.pix_fmt = stream.codec_context.pix_fmt
            table = None if index == "scan" else table_from_sample_table(stream)
            if table is None:
                table = table_from_packet_scan(container, stream, self.path)
        except BaseException as exc:
            container.close()
            if isinstance(exc, av.FFmpegError):
                raise ValueError(f"{self.path}: cannot read the video stream ({exc})") from exc
            raise
        if table.n_packets == 0:
            container.close()
            raise ValueError(f"{self.path} has no video frames")
        self._table = table
        if table.source == "sample-table":  # untouched: frame 0 is decoded from it
            self._unread: Any = container
        else:
            container.close()
            self._unread = None

        self.height, self.width, self.rotation = 0, 0, 0
        self._coded: tuple[int, int] | None = None
        self._quarter_turns = 0
        first = self._decode_first()
        self._n = self._count_frames()
        self._store(0, first)

    # ------------------------------------------------------------------------------ array API
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(T, H, W, 3)``, upright."""
        return (int(self._n or 0), self.height, self.width, 3)

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
                raise IndexError(f"frame {i} out of range for {self.path.name} ({n} frames)")
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

    @property
    def cache_bytes(self) -> int:
        """Budget of the decoded-frame cache in bytes; settable (a smaller one evicts now)."""
        return self._cache_bytes

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        with self._lock:
            self._cache_bytes = max(0, int(value))
            total = sum(a.nbytes for a in self._cache.values())
            while total > self._cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                total -= old.nbytes

    # ------------------------------------------------------------------------------ metadata
    @property
    def fps(self) -> float:
        """The container's average frame rate (frames per second), 0 when it has none."""
        return float(self._declared_rate) if self._declared_rate else 0.0

    @property
    def index_source(self) -> str:
        """``"sample-table"`` or ``"packet-scan"``: where the GOP table came from."""
        return self._table.source

    @property
    def pts(self) -> np.ndarray | None:
        """``(T,)`` int64 presentation timestamps (:attr:`time_base` units) of frames 0..T-1.

        Read from the packets on first use (a pass over the packet headers for mp4). None when
        the file's timestamps cannot be matched to frames: some missing, some equal, or not one
        per frame. The frame numbers never depend on them.
        """
        with self._lock:
            if self._timestamps is False:
                self._timestamps = self._read_pts()
            return None if self._timestamps is None else self._timestamps.copy()

    @property
    def timestamps(self) -> np.ndarray | None:
        """``(T,)`` float64 seconds from frame 0 (see :attr:`pts`; None when unusable)."""
        pts = self.pts
        return None if pts is None else (pts - pts[0]) * float(self.time_base)

    @property
    def is_vfr(self) -> bool | None:
        """Whether frame durations vary by more than one time-base tick (None: unknown)."""
        pts = self.pts
        if pts is None:
            return None
        d = np.diff(pts)
        return bool(d.size > 1 and (d.max() - d.min()) > 1)

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-able description (cheap: nothing is decoded or read to build it).

        Keys: ``path``, ``n_frames``, ``height``/``width`` (upright), ``stored_height``/
        ``stored_width`` (as in the file), ``rotation`` (counter-clockwise degrees applied),
        ``fps``, ``time_base``, ``codec``, ``pix_fmt``, ``container``, ``container_frames``,
        ``index`` (always ``"decode-order"``: the numbering rule), ``index_source``,
        ``damaged_frames`` (so far) and ``damaged_fill`` (``"black"`` or ``"error"``).
        """
        stored_h, stored_w = self._coded[::-1] if self._coded else (self.height, self.width)
        return {
            "path": str(self.path),
            "n_frames": len(self),
            "height": self.height,
            "width": self.width,
            "stored_height": int(stored_h),
            "stored_width": int(stored_w),
            "rotation": self.rotation,
            "fps": self.fps,
            "time_base": [self.time_base.numerator, self.time_base.denominator],
            "codec": self.codec,
            "pix_fmt": self.pix_fmt,
            "container": self.container_format,
            "container_frames": self.container_frames,
            "index": "decode-order",
            "index_source": self.index_source,
            "damaged_frames": self._damaged_list(),
            "damaged_fill": "black" if self._damaged_policy == "fill" else "error",
        }

    def _damaged_list(self) -> list[int]:
        with self._lock:  # a reading thread may be adding to it
            return sorted(self.damaged_frames)

    # ------------------------------------------------------------------------------ decoding
    def get_frames(self, indices: Iterable[int]) -> list[np.ndarray]:
        """Decode frames ``indices`` (non-negative, any order, repeats allowed).

        Returns
        -------
        list of (H, W, 3) uint8 ndarray
            Upright, in the order asked. Cached frames are returned as copies.

        Raises
        ------
        IndexError
            An index outside ``0 .. len - 1``.
        ValueError
            A frame a damaged GOP did not yield, with ``damaged="raise"``.
        """
        wanted = [int(i) for i in indices]
        n = len(self)
        bad = [i for i in wanted if not 0 <= i < n]
        if bad:
            raise IndexError(f"frame {bad[0]} out of range for {self.path} ({n} frames)")
        with self._lock:
            found: dict[int, np.ndarray] = {}
            for i in wanted:
                if i in self._cache:
                    self._cache.move_to_end(i)
                    found[i] = self._cache[i]
                    self.stats["cache_hits"] += 1
            todo = sorted(set(wanted) - set(found))
            todo_set = set(todo)
            for i in todo:
                if i not in found:  # else decoded on the way to an earlier one
                    found.update(self._decode_to(i, todo_set))
            return [found[i].copy() for i in wanted]

    def close(self) -> None:
        """Close the file; the reader can still be used (it reopens on demand)."""
        with self._lock:
            self._handles.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"VideoReader({str(self.path)!r}, shape={self.shape}, fps={self.fps:.3f}, "
            f"codec={self.codec!r}, rotation={self.rotation})"
        )

    # ------------------------------------------------------------------------------ internals
    def _open_container(self) -> Any:
        container = open_video_container(self.path, threads=self._threads)
        if self._counting:
            stream = self._stream(container)
            # the count of pictures does not depend on deblocking or the inverse transform
            stream.codec_context.options = {"skip_loop_filter": "all", "skip_idct": "all"}
            if self._counting == "fast":
                stream.thread_type = "AUTO"
        return container

    def _stream(self, container: Any) -> Any:
        return container.streams.video[0]

    def _packets_from(self, k: int, container: Any) -> tuple[Any, Iterator[Any]]:
        """``(container, packets)`` whose first packet is GOP ``k``'s first packet.

        Seeks by timestamp, then confirms the landing place by byte position, skipping packets
        up to the keyframe; when that cannot be confirmed (no positions, a seek that lands
        after the keyframe, a file without a seek index) it reads packet headers from the start
        instead. A seek can cost time, never the numbering.
        """
        table = self._table
        target, dts = int(table.key_pos[k]), int(table.key_dts[k])
        if target != MISSING and self._pos_offset is not None:
            target += self._pos_offset
        can_seek = (
            k > 0
            and table.by_position
            and target != MISSING
            and dts != MISSING
            and self._pos_offset is not None
        )
        if can_seek:
            if container is None:
                container = self._open_container()
            stream = self._stream(container)
            try:
                container.seek(dts, stream=stream, backward=True)
                packets = container.demux(stream)
                for packet in packets:
                    self.stats["packets_read"] += 1
                    pos = packet.pos
                    if packet.size == 0 or (pos is not None and pos > target):
                        break  # the end, or past the keyframe: the seek landed too late
                    # several packets can share a position (ASF, MPEG-PS): the dts tells
                    if pos == target and packet.dts is not None and int(packet.dts) == dts:
                        return container, itertools.chain([packet], packets)
            except av.FFmpegError as exc:
                logger.debug("%s: seek to GOP %d failed (%s)", self.path, k, exc)
            logger.debug("%s: GOP %d not found by seeking; reading from the start", self.path, k)
        if container is not None:
            container.close()
        container = self._open_container()
        packets = container.demux(self._stream(container))
        raw = -1
        for packet in packets:
            self.stats["packets_read"] += 1
            if packet.size == 0:
                continue
            raw += 1
            if raw == 0:
                self._learn_pos_offset(packet)
            if raw == table.key_raw[k]:
                return container, itertools.chain([packet], packets)
        container.close()
        raise ValueError(
            f"{self.path}: keyframe {k} is gone; the file changed since it was opened. "
            "Open it again."
        )

    def _learn_pos_offset(self, first_packet: Any) -> None:
        """Sample tables may point at a chunk header (avi: 8 bytes before where the packets
        say their data starts): learn that offset once, from the file's first packet."""
        if self._pos_offset is not None:
            return
        first = int(self._table.key_pos[0])
        pos = first_packet.pos
        ok = pos is not None and pos >= 0 and first != MISSING
        self._pos_offset = int(pos) - first if ok else 0

    def _start(self, k: int) -> _Session:
        """A fresh decoder at GOP ``k`` (``k == 0``: the very start of the file)."""
        self.stats["seeks"] += 1
        old = self._handles.session
        self._handles.session = None
        container = old.container if old is not None else None
        if k == 0 and container is not None:
            container.close()
            container = None
        if k == 0 and self._unread is not None:  # the container opened for the table
            container, self._unread = self._unread, None
            packets = container.demux(self._stream(container))
            first = next((p for p in packets if p.size), None)
            if first is not None:
                self._learn_pos_offset(first)
            packets = itertools.chain([first] if first is not None else [], packets)
        else:
            container, packets = self._packets_from(k, container)
        if k > 0:
            self._stream(container).codec_context.flush_buffers()
        session = _Session(
            container=container,
            packets=packets,
            expect=k + 1 if k == 0 else k,
            count=0 if k == 0 else None,
        )
        if k > 0:
            session.start_pts, session.leading_left = self._gop(k)
        self._handles.session = session
        return session

    def _anchor(self, k: int) -> int:
        """Number of GOP ``k``'s keyframe picture in a sequential decode."""
        if k == 0:
            return 0
        return int(self._table.key_ordinal[k]) + self._gop(k)[1]

    def _gop(self, k: int) -> tuple[int, int]:
        """``(keyframe pts, leading pictures)`` of GOP ``k`` (read once, then cached)."""
        if k in self._gops:
            return self._gops[k]
        table = self._table
        n_raw = int(table.key_raw[k + 1]) if k + 1 < table.n_gops else None
        first = int(table.key_raw[k])
        if n_raw is not None and n_raw - first == 1 and table.gop_packets(k) == 1:
            # a one-picture GOP (intra-only video): no leading pictures, and its keyframe
            # picture is recognised by its flag; no need to read the file
            self._gops[k] = (MISSING, 0)
            return self._gops[k]
        if table.packet_pts is not None and table.packet_keep is not None:
            stop = n_raw if n_raw is not None else len(table.packet_pts)
            pts = table.packet_pts[first:stop][table.packet_keep[first:stop]].tolist()
        else:
            pts = self._read_gop_pts(k, None if n_raw is None else n_raw - first)
        info = (pts[0] if pts else MISSING, leading_pictures(pts[0], pts[1:]) if pts else 0)
        self._gops[k] = info
        return info

    def _read_gop_pts(self, k: int, n_raw: int | None) -> list[int]:
        """pts of GOP ``k``'s frame-carrying packets, read from the file (no decoding)."""
        container, packets = self._packets_from(k, self._handles.index)
        self._handles.index = container
        pts: list[int] = []
        seen = 0
        try:
            for packet in packets:
                if packet.size == 0:
                    continue
                if n_raw is not None and seen >= n_raw:
                    break
                seen += 1
                if not packet.is_discard:
                    pts.append(MISSING if packet.pts is None else int(packet.pts))
        except av.FFmpegError as exc:
            logger.warning("%s: reading GOP %d stopped: %s", self.path, k, exc)
        return pts

    def _number(self, session: _Session, frame: Any) -> int | None:
        """The frame number of a decoder output, or None for a picture that has none."""
        table = self._table
        if (
            session.leading_left > 0
            and not frame.key_frame
            and frame.pts is not None
            and int(frame.pts) < session.start_pts
        ):
            # a leading picture of the GOP we started at, decoded without its references;
            # some decoders (MPEG-1/2) put it out after the keyframe picture
            session.leading_left -= 1
            return None
        j = session.expect
        if frame.key_frame and j < table.n_gops:
            match = None
            for jj in range(j, min(j + 3, table.n_gops)):  # a damaged GOP may lose its key
                key_pts = self._gop(jj)[0]
                if frame.pts is not None and key_pts != MISSING:
                    if int(frame.pts) == key_pts:
                        match = jj
                        break
                elif jj == j and (session.count is None or session.count > self._anchor(j - 1)):
                    match = jj
                    break
            if match is not None:
                anchor = self._anchor(match)
                if session.count is not None and session.count < anchor:
                    self._lost(range(session.count, anchor))
                session.count = anchor
                session.expect = match + 1
        if session.count is None:
            return None  # a leading picture before the keyframe we started at
        nxt = session.expect
        if (
            nxt < table.n_gops
            and session.count >= table.key_ordinal[nxt]
            and session.count >= self._anchor(nxt)
        ):
            # more pictures than packets before the next keyframe: they have no number
            logger.debug("%s: an extra picture before GOP %d is skipped", self.path, nxt)
            return None
        i = session.count
        session.count += 1
        return i

    def _lost(self, numbers: Iterable[int]) -> None:
        lost = [i for i in numbers if self._n is None or i < self._n]
        if lost and not set(lost) <= self.damaged_frames:
            logger.warning(
                "%s: frames %d-%d cannot be decoded (damaged data); later frames keep their "
                "numbers",
                self.path,
                lost[0],
                lost[-1],
            )
        self.damaged_frames.update(lost)

    def _pull(self, session: _Session) -> tuple[int, Any] | None:
        """The next numbered picture of the session, or None at the end of the file."""
        while True:
            while session.pending:
                frame = session.pending.popleft()
                self.stats["frames_decoded"] += 1
                i = self._number(session, frame)
                if i is not None:
                    return i, frame
            if session.ended:
                return None
            try:
                packet = next(session.packets)
                self.stats["packets_read"] += 1
            except StopIteration:
                session.ended = True
                continue
            except av.FFmpegError as exc:
                logger.warning("%s: reading stopped: %s", self.path, exc)
                session.ended = True
                session.pending.extend(self._drain(session))
                continue
            except OSError as exc:
                raise ValueError(
                    f"{self.path}: reading the video failed ({exc}); the file was moved, "
                    "changed or is on a drive that is no longer reachable. Open it again."
                ) from exc
            try:
                session.pending.extend(packet.decode())
            except av.error.InvalidDataError as exc:
                # an undecodable packet: its picture is missing, the count re-anchors at the
                # next keyframe so that nothing after it shifts
                logger.debug("%s: undecodable packet at byte %s: %s", self.path, packet.pos, exc)
            except av.FFmpegError as exc:
                logger.warning("%s: decoding error: %s", self.path, exc)

    def _drain(self, session: _Session) -> list[Any]:
        try:
            return list(self._stream(session.container).codec_context.decode(None))
        except av.FFmpegError:
            return []

    def _gop_for_frame(self, i: int) -> int:
        k = self._table.gop_of_packet(i)
        if k > 0 and i < self._anchor(k):  # a leading picture: decode from the previous GOP
            k -= 1
        return k

    def _decode_first(self) -> np.ndarray:
        session = self._start(0)
        got = self._pull(session)
        if got is None:
            raise ValueError(
                f"{self.path}: no frame could be decoded; the file is damaged or its codec "
                f"({self.codec}) cannot be decoded by this FFmpeg build. Re-encode it "
                "(e.g. to H.264 mp4) or use another copy."
            )
        i, frame = got
        turns = round(float(getattr(frame, "rotation", 0) or 0) / 90.0)
        if abs(float(getattr(frame, "rotation", 0) or 0) - 90 * turns) > 1:
            logger.warning(
                "%s: a display rotation that is not a multiple of 90 degrees is ignored", self.path
            )
            turns = 0
        self._quarter_turns = turns % 4
        self.rotation = 90 * self._quarter_turns
        self._coded = (frame.width, frame.height)
        rgb = self._to_rgb(frame)
        self.height, self.width = rgb.shape[:2]
        if i != 0:
            self._lost(range(0, i))
        return rgb

    def _count_frames(self) -> int:
        """Frames a sequential decode yields: the last GOP decoded to its end (no RGB).

        Counted first with frame threads (fast); those lose pictures only where data is
        damaged, so a count short of the packets is redone the plain way.
        """
        table = self._table
        k = table.n_gops - 1
        if table.gop_packets(k) + self._gop(k)[1] > MAX_VERIFIED_LAST_GOP:
            return table.n_packets
        known = set(self.damaged_frames)
        count = self._count_last_gop(k, "fast")
        if count != table.n_packets:
            self.damaged_frames = known
            count = self._count_last_gop(k, "exact")
            logger.info(
                "%s: the container lists %d pictures, a sequential decode yields %d: "
                "the reader has %d frames",
                self.path,
                table.n_packets,
                count,
                count,
            )
        return count

    def _count_last_gop(self, k: int, mode: str) -> int:
        self._handles.close()
        self._counting = mode  # cheap decoding: pictures are counted, not looked at
        try:
            session = self._start(k)
            while self._pull(session) is not None:
                pass
        finally:
            self._counting = ""
            self._handles.close()  # the next read starts afresh
        if session.count is None:  # the last keyframe picture never came
            return self._anchor(k)
        return max(session.count, self._anchor(k))

    def _decode_to(self, target: int, wanted: set[int]) -> dict[int, np.ndarray]:
        """Decode until frame ``target`` comes out; return it and any ``wanted`` frames passed."""
        k = self._gop_for_frame(target)
        session = self._handles.session
        if not (
            session is not None
            and not session.ended
            and session.count is not None
            and self._anchor(k) <= session.count <= target
        ):
            session = self._start(k)
        out: dict[int, np.ndarray] = {}
        while True:
            got = self._pull(session)
            if got is None:
                break
            i, frame = got
            if i in wanted or i == target:
                rgb = self._to_rgb(frame)
                out[i] = rgb
                self._store(i, rgb)
            if i >= target:
                break
        if target not in out:
            if session.ended and (session.count or 0) <= target:
                self._lost(range(max(session.count or 0, target), len(self)))
            self._lost([target])
            if self._damaged_policy == "raise":
                raise ValueError(
                    f"{self.path}: frame {target} cannot be decoded (damaged data in the file); "
                    "frames after it keep their numbers. Re-encode or repair the file, or open "
                    "it with damaged='fill' to read black frames in its place."
                )
            logger.warning("%s: frame %d is damaged; returning a black frame", self.path, target)
            fill = np.zeros((self.height, self.width, 3), np.uint8)
            out[target] = fill
        return out

    def _read_pts(self) -> np.ndarray | None:
        if self._table.packet_pts is not None and self._table.packet_keep is not None:
            pts = self._table.packet_pts[self._table.packet_keep]
        else:
            container = self._open_container()
            try:
                stream = self._stream(container)
                pts = np.asarray(
                    [
                        MISSING if p.pts is None else p.pts
                        for p in container.demux(stream)
                        if p.size and not p.is_discard
                    ],
                    dtype=np.int64,
                )
            except av.FFmpegError:
                return None
            finally:
                container.close()
        pts = np.sort(pts)
        if len(pts) != len(self) or (pts == MISSING).any() or (np.diff(pts) <= 0).any():
            return None
        return pts

    def _to_rgb(self, frame: Any) -> np.ndarray:
        self.stats["frames_converted"] += 1
        if self._coded and (frame.width, frame.height) != self._coded:
            rgb = frame.to_ndarray(format="rgb24", width=self._coded[0], height=self._coded[1])
        else:
            rgb = frame.to_ndarray(format="rgb24")
        if self._quarter_turns:
            rgb = np.ascontiguousarray(np.rot90(rgb, self._quarter_turns))
        return rgb

    def _store(self, i: int, rgb: np.ndarray) -> None:
        if rgb.nbytes > self._cache_bytes:
            return
        self._cache[i] = rgb
        self._cache.move_to_end(i)
        total = sum(a.nbytes for a in self._cache.values())
        while total > self._cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            total -= old.nbytes


def open_video_container(path: Path, *, threads: bool = True) -> Any:
    """Open ``path`` with PyAV, checking it has a video stream FFmpeg can decode.

    Raises
    ------
    ValueError
        With the file name and what to do, for anything FFmpeg cannot open or decode.
    """
    try:
        container = av.open(str(path), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not a readable video file ({exc}). Check that it is a complete video "
            "(mp4, mov, avi, mkv, webm) and not still being written."
        ) from exc
    try:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream (audio only or another kind of file)")
        stream = container.streams.video[0]
        codec = stream.codec_context
        if codec is None or not codec.name or codec.name == "none":
            raise ValueError(
                f"{path}: the video codec is not known to this FFmpeg build; re-encode the "
                "video (e.g. to H.264 mp4)."
            )
        try:
            av.codec.Codec(codec.name, "r")
        except Exception as exc:
            raise ValueError(
                f"{path}: no decoder for codec {codec.name!r} in this FFmpeg build; re-encode "
                "the video (e.g. to H.264 mp4)."
            ) from exc
    except BaseException:
        container.close()
        raise
    # slice threads (PyAV's default) at most: frame threads silently drop the pictures in
    # flight when a packet is damaged, so the count would differ from a plain decode
    stream.thread_type = "SLICE"
    if not threads:
        stream.thread_count = 1
    return container


def read_video(path: str | os.PathLike[str], **kwargs: Any) -> VideoReader:
    """Open a video lazily as a ``(T, H, W, 3)`` uint8 array-like (see :class:`VideoReader`)."""
    return VideoReader(path, **kwargs)


def is_video_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file suffix is one of :data:`VIDEO_SUFFIXES` (the format table's videos)."""
    return kind_of(path) == "video"


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


def probe_video(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Cheap check that ``path`` is a video FFmpeg can decode; no frame is decoded.

    Returns
    -------
    dict
        ``codec``, ``width``, ``height`` (as stored, before any rotation) and
        ``container_frames`` (0 when the container does not say).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a video, no video stream, or no decoder for its codec.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    container = open_video_container(path, threads=False)
    try:
        stream = container.streams.video[0]
        return {
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "container_frames": int(stream.frames or 0),
        }
    finally:
        container.close()


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
