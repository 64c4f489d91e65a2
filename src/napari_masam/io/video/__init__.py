"""Video files: frame-exact lazy reading (:class:`VideoReader`) and writing (:class:`VideoWriter`).

Frame ``i`` is the ``i``-th picture of a plain sequential decode, for every file (see
:mod:`napari_masam.io.video.reader`); frames are upright (display matrix applied).
"""

from __future__ import annotations

import av  # noqa: F401  (tests patch ``napari_masam.io.video.av``)

from ._index import PacketTable
from .reader import (
    DEFAULT_CACHE_BYTES,
    VIDEO_SUFFIXES,
    VideoReader,
    as_dask_array,
    is_video_path,
    open_video_container,
    probe_video,
    read_video,
)
from .writer import VideoWriter, blend_labels, iter_write_overlay_mp4, write_overlay_mp4

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "VIDEO_SUFFIXES",
    "PacketTable",
    "VideoReader",
    "VideoWriter",
    "as_dask_array",
    "blend_labels",
    "is_video_path",
    "iter_write_overlay_mp4",
    "open_video_container",
    "probe_video",
    "read_video",
    "write_overlay_mp4",
]
