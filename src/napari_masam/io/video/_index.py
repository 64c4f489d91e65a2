"""Where each group of pictures (GOP) of a video starts, counted in decode order.

The frame numbering rule of :class:`~napari_masam.io.video.VideoReader` rests on two facts that
hold for every decoder FFmpeg has: each compressed packet carries at most one picture, and the
pictures come out of the decoder in display order. So the number of pictures that a plain
sequential decode outputs before the first picture of GOP ``k`` equals the number of
frame-carrying packets before GOP ``k``'s keyframe packet, plus the GOP's *leading pictures*
(pictures of GOP ``k`` shown before its keyframe, in open-GOP streams). Timestamps are never used
to number frames; they only tell which packets of a GOP are leading pictures.

The table is read from the container's sample table when that lists every packet (mp4, mov,
avi: no file reading beyond the header), else from one pass over the packet headers (mkv, webm:
the compressed data is read, nothing is decoded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

logger = logging.getLogger(__name__)

#: Marker for an unknown timestamp or byte position in the int64 tables.
MISSING = int(np.iinfo(np.int64).min)

# AVIndexEntry flags (libavformat/avformat.h)
_AVINDEX_KEYFRAME = 0x0001
_AVINDEX_DISCARD_FRAME = 0x0002
_EMPTY = -(2**20)


@dataclass(frozen=True)
class PacketTable:
    """The GOPs of a video stream in decode order; decided once when the file is opened.

    Attributes
    ----------
    n_packets : int
        Frame-carrying packets (non-empty, not flagged discard): what a sequential decode
        yields when nothing is damaged.
    key_ordinal : (K,) int64 ndarray
        For each GOP, the number of frame-carrying packets before its keyframe packet. GOP 0
        starts at the first packet of the file (ordinal 0) whatever its flags.
    key_raw : (K,) int64 ndarray
        Index of the GOP's first packet among all non-empty packets (discarded ones included),
        used to find it again when seeking by byte position is impossible.
    key_pos : (K,) int64 ndarray
        Byte position of the GOP's first packet (``MISSING`` if unknown).
    key_dts : (K,) int64 ndarray
        Decode timestamp of that packet in stream time-base units (``MISSING`` if none).
    packet_pts : (N,) int64 ndarray or None
        Presentation timestamp of every non-empty packet in decode order (``MISSING`` where
        none); only for ``source == "packet-scan"`` (else read per GOP on demand).
    packet_keep : (N,) bool ndarray or None
        Whether each non-empty packet carries a frame (not discarded); with ``packet_pts``.
    source : str
        ``"sample-table"`` (the container's index) or ``"packet-scan"`` (one demuxing pass).
    by_position : bool
        Whether every packet that starts a GOP has a byte position no other packet shares, so
        a seek can be checked by position (not so in MPEG-PS or ASF, whose packets share or
        lack positions: those are read from the start to reach a GOP).
    """

    n_packets: int
    key_ordinal: np.ndarray
    key_raw: np.ndarray
    key_pos: np.ndarray
    key_dts: np.ndarray
    packet_pts: np.ndarray | None
    packet_keep: np.ndarray | None
    source: str
    by_position: bool = True

    @property
    def n_gops(self) -> int:
        """Number of GOPs (keyframes)."""
        return len(self.key_ordinal)

    def gop_of_packet(self, ordinal: int) -> int:
        """GOP holding frame-carrying packet ``ordinal``."""
        return max(int(np.searchsorted(self.key_ordinal, ordinal, side="right")) - 1, 0)

    def gop_packets(self, k: int) -> int:
        """Frame-carrying packets of GOP ``k``."""
        end = self.key_ordinal[k + 1] if k + 1 < self.n_gops else self.n_packets
        return int(end - self.key_ordinal[k])


def _table(
    pos: list[int],
    dts: list[int],
    key: list[bool],
    keep: list[bool],
    pts: list[int] | None,
    source: str,
) -> PacketTable:
    known = [p for p in pos if p != MISSING]
    unique = len(set(known)) == len(known)
    key_ordinal, key_raw, key_pos, key_dts = [], [], [], []
    ordinal = 0
    for raw, (p, d, is_key, kept) in enumerate(zip(pos, dts, key, keep, strict=True)):
        if raw == 0 or (is_key and kept):
            key_ordinal.append(ordinal)
            key_raw.append(raw)
            key_pos.append(p)
            key_dts.append(d)
        ordinal += bool(kept)
    as_i8 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return PacketTable(
        n_packets=ordinal,
        key_ordinal=as_i8(key_ordinal),
        key_raw=as_i8(key_raw),
        key_pos=as_i8(key_pos),
        key_dts=as_i8(key_dts),
        packet_pts=None if pts is None else as_i8(pts),
        packet_keep=None if pts is None else np.asarray(keep, dtype=bool),
        source=source,
        by_position=unique and MISSING not in key_pos,
    )


def _value(v: int | None) -> int:
    return MISSING if v is None or v < 0 else int(v)


def _ts(v: int | None) -> int:
    return MISSING if v is None else int(v)


def table_from_sample_table(stream: Any) -> PacketTable | None:
    """The table from the container's own index, or None when that index is not complete.

    mp4/mov/avi list every sample (packet) in their header; FFmpeg keeps that list in memory,
    so this costs no file reading. Matroska's cues list only some keyframes: None.
    """
    entries = getattr(stream, "index_entries", None)
    n = int(stream.frames or 0)
    if entries is None or n <= 0 or len(entries) != n:
        return None
    # one pass over FFmpeg's in-memory list (~2 us an entry, no file reading): the flags of
    # every entry (_EMPTY for empty ones); positions and times of keyframes only. FFmpeg keeps
    # the flags in a signed 2-bit field (3 reads as -1): only their low bits count.
    flags_all = np.fromiter(
        (e.flags if e.size > 0 else _EMPTY for e in entries), dtype=np.int64, count=len(entries)
    )
    present = np.flatnonzero(flags_all != _EMPTY)
    if not present.size:
        return None
    flags = flags_all[present] & 3
    key = (flags & _AVINDEX_KEYFRAME) != 0
    keep = (flags & _AVINDEX_DISCARD_FRAME) == 0
    ordinal = np.concatenate([[0], np.cumsum(keep)[:-1]])
    first = key & keep
    first[0] = True  # GOP 0 starts at the first packet whatever its flags
    raw = np.flatnonzero(first)
    picked = [entries[int(present[r])] for r in raw]
    key_pos = np.array([_value(e.pos) for e in picked], dtype=np.int64)
    return PacketTable(
        n_packets=int(keep.sum()),
        key_ordinal=ordinal[raw].astype(np.int64),
        key_raw=raw.astype(np.int64),
        key_pos=key_pos,
        key_dts=np.array([_ts(e.timestamp) for e in picked], dtype=np.int64),
        packet_pts=None,
        packet_keep=None,
        source="sample-table",
        by_position=bool((key_pos != MISSING).all()),
    )


def table_from_packet_scan(container: Any, stream: Any, path: Path) -> PacketTable:
    """The table from one pass over the packet headers (compressed data read, not decoded)."""
    pos, dts, key, keep, pts = [], [], [], [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            pos.append(_value(packet.pos))
            dts.append(_ts(packet.dts))
            pts.append(_ts(packet.pts))
            key.append(bool(packet.is_keyframe))
            keep.append(not packet.is_discard)
    except av.FFmpegError as exc:
        # a damaged tail: what was read so far is the file as far as it can be demuxed
        logger.warning("%s: reading packets stopped at packet %d: %s", path, len(pos), exc)
    return _table(pos, dts, key, keep, pts, "packet-scan")


def leading_pictures(key_pts: int, gop_pts: list[int]) -> int:
    """Pictures of a GOP shown before its keyframe: packets with an earlier pts.

    ``gop_pts`` are the pts of the GOP's frame-carrying packets after the keyframe packet.
    Without a keyframe pts (or with pts equal to dts, as in remuxed camera files) no packet is
    earlier, which is right for the closed GOPs such files have.
    """
    if key_pts == MISSING:
        return 0
    return sum(1 for p in gop_pts if p != MISSING and p < key_pts)
