"""Writing videos: H.264 mp4 (or any FFmpeg encoder) from RGB frames, label overlays.

Frames given to these functions are on the upright grid that
:class:`~napari_masam.io.video.VideoReader` returns; the written files carry no rotation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from ...palette import label_rgb_table


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
    from ...inference import run

    return run(iter_write_overlay_mp4(frames, labels, path, **kwargs))
