"""Export of video labels ``(T, H, W)``: per-frame PNG masks, a TIFF stack, an overlay mp4.

The PNG folder follows the EndoVis challenge layout: one lossless PNG per frame named
``frame000.png``, ``frame001.png``, ... (at least three digits) holding the label value of every
pixel (8-bit when all labels are below 256, else 16-bit), plus ``labels.json`` with the class
names when given. Nothing goes through JPEG or any lossy step.

For videos, file ``frameNNN.png`` holds the labels of frame ``NNN`` as
:class:`~napari_masam.io.video.VideoReader` numbers it: the ``NNN``-th picture of a sequential
decode (what ffmpeg, OpenCV and CVAT count), on the upright grid (the video's display rotation
applied; ``np.rot90(mask, -rotation // 90)`` gives the stored orientation back, with
``rotation`` from the reader's metadata).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    commit_path,
    discard_path,
    label_dtype_for,
    minimal_label_dtype,
    temp_sibling,
)
from .video import blend_labels, iter_write_overlay_mp4, write_overlay_mp4

logger = logging.getLogger(__name__)

__all__ = [
    "LabelsTiffWriter",
    "PngMaskWriter",
    "blend_labels",
    "iter_write_overlay_mp4",
    "iter_write_png_masks",
    "read_png_masks",
    "write_labels_tiff",
    "write_overlay_mp4",
    "write_png_masks",
]

_FRAME_RE = re.compile(r"^frame(\d+)\.png$")


class _AtomicFrameWriter:
    """Base of the streaming label writers: a temporary output beside the final one, frames
    appended one by one, moved onto the final name by :meth:`close` (or deleted by
    :meth:`abort`), so a crash never leaves a half-written output under the real name.

    Use as a context manager: leaving the ``with`` block normally closes, an exception aborts.
    """

    _directory = False

    def __init__(self, path: str | os.PathLike[str], *, max_label: int) -> None:
        self.path = Path(path)
        self.dtype = label_dtype_for(max_label)
        self.count = 0
        self.tmp = temp_sibling(self.path, directory=self._directory)
        self._closed = False

    def write(self, labels: Any) -> None:
        """Append one ``(H, W)`` frame or a block ``(n, H, W)`` of frames (integers 0..max)."""
        if self._closed:
            raise ValueError(f"{type(self).__name__} for {self.path} is already closed")
        block = np.asarray(labels)
        if block.ndim == 2:
            block = block[np.newaxis]
        if block.ndim != 3:
            raise ValueError(f"expected (H, W) or (n, H, W) labels, got shape {block.shape}")
        for plane in block:
            self._write_plane(self._checked(plane))
            self.count += 1

    def _checked(self, plane: np.ndarray) -> np.ndarray:
        if plane.size and plane.dtype != self.dtype:
            lo, hi = plane.min(), plane.max()
            info = np.iinfo(self.dtype)
            whole = plane.dtype.kind in "biu" or (
                plane.dtype.kind == "f" and bool(np.all(np.mod(plane, 1) == 0))
            )
            if not whole or lo < 0 or hi > info.max:
                raise ValueError(
                    f"frame {self.count} of {self.path}: labels must be integers in 0..{info.max} "
                    f"(the writer's {self.dtype}); got {plane.dtype} values {lo}..{hi}"
                )
        return plane.astype(self.dtype, copy=False)

    def _write_plane(self, plane: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Flush and close the temporary output (before it is renamed)."""

    def close(self) -> Path:
        """Finish the output and move it onto its final name atomically; returns that name."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            self._finish()
            commit_path(self.tmp, self.path)
        except BaseException:
            discard_path(self.tmp)
            raise
        logger.info("wrote %d label frames (%s) to %s", self.count, self.dtype, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary output; the final name is left as it was."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._finish()
        discard_path(self.tmp)

    def __enter__(self) -> _AtomicFrameWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class PngMaskWriter(_AtomicFrameWriter):
    """Streams ``(H, W)`` label frames into an EndoVis PNG folder (``frame000.png``, ...).

    Frames are written into a hidden folder beside ``folder``; :meth:`close` replaces
    ``folder`` with it as a whole (so stale frames of an earlier, longer run do not survive).

    Parameters
    ----------
    folder : str or path-like
        The mask folder. If it exists it may hold only ``*.png`` files and ``labels.json``
        (a previous mask folder); anything else raises ``ValueError`` rather than being deleted.
    max_label : int
        Largest label value to come: 8-bit PNGs up to 255, 16-bit up to 65535 (every file of a
        folder has the same bit depth).
    n_frames : int, optional
        Expected frame count, to size the zero-padding of the numbers (at least 3 digits); a
        longer stream just gets wider numbers, which :func:`read_png_masks` orders numerically.
    start_index : int
        Number of the first frame's file (EndoVis counts from 0).
    class_names : sequence of str, optional
        Written to ``labels.json`` as ``{"0": "background", "1": ...}``.
    """

    _directory = True

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        max_label: int = 255,
        n_frames: int | None = None,
        start_index: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        folder = Path(folder)
        if int(max_label) > 65535:
            raise ValueError(
                f"PNG masks hold labels 0..65535; got labels up to {max_label}. Use a TIFF stack."
            )
        if folder.exists():
            strangers = (
                [p.name for p in folder.iterdir() if not _is_mask_file(p)]
                if folder.is_dir()
                else [folder.name]
            )
            if strangers:
                raise ValueError(
                    f"{folder} exists and holds {', '.join(sorted(strangers)[:5])}, which are "
                    "not PNG masks; writing masks there would delete them. Choose a new folder."
                )
        super().__init__(folder, max_label=max_label)
        self.start_index = int(start_index)
        last = self.start_index + max(int(n_frames or 0), 1) - 1
        self.digits = max(3, len(str(last)))
        self.class_names = None if class_names is None else list(class_names)
        self.paths: list[Path] = []

    def _write_plane(self, plane: np.ndarray) -> None:
        import imageio.v3 as iio

        name = f"frame{self.start_index + self.count:0{self.digits}d}.png"
        iio.imwrite(self.tmp / name, plane, extension=".png")
        self.paths.append(self.path / name)

    def _finish(self) -> None:
        if self.class_names is not None and self.tmp.is_dir():
            names = {str(i): name for i, name in enumerate(self.class_names)}
            (self.tmp / "labels.json").write_text(json.dumps(names, indent=1))


class LabelsTiffWriter(_AtomicFrameWriter):
    """Streams ``(H, W)`` label frames into one multi-page BigTIFF, a page per frame.

    The pages are contiguous and the series carries tifffile's shaped metadata (axes, spacing,
    unit), so :func:`napari_masam.io.tiff.read_tiff_stack` memory-maps it back as ``(T, H, W)``
    (or ``(Z, Y, X)``) with the Y/X spacing from the resolution tags.

    Parameters
    ----------
    path : str or path-like
        ``.tif``/``.tiff`` file.
    max_label : int
        Largest label value to come; the file's dtype is the smallest unsigned one holding it.
    axes : str
        Axis letters of the stack, ``"TYX"`` (video) or ``"ZYX"`` (volume).
    spacing : tuple of float, optional
        Physical size per axis of ``axes``.
    unit : str
        Unit of ``spacing``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_label: int,
        axes: str = "TYX",
        spacing: tuple[float, ...] | None = None,
        unit: str = "mm",
    ) -> None:
        import tifffile

        if len(axes) != 3 or not axes.endswith("YX"):
            raise ValueError(f"a label stack has axes like 'TYX' or 'ZYX'; got {axes!r}")
        if spacing is not None and len(spacing) != 3:
            raise ValueError(f"spacing {spacing} does not match axes {axes!r}")
        super().__init__(path, max_label=max_label)
        self._kwargs: dict[str, Any] = {
            "contiguous": True,
            "photometric": "minisblack",
            "metadata": {"axes": axes, "unit": unit},
        }
        if spacing is not None:
            self._kwargs["metadata"]["spacing"] = [float(v) for v in spacing]
            self._kwargs["resolution"] = (1.0 / float(spacing[2]), 1.0 / float(spacing[1]))
        self._writer: Any = tifffile.TiffWriter(self.tmp, bigtiff=True)

    def _write_plane(self, plane: np.ndarray) -> None:
        self._writer.write(plane, **self._kwargs)

    def _finish(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


def _is_mask_file(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() == ".png" or path.name == "labels.json")


def _max_label(labels: Any) -> int:
    """Largest value of integer labels ``(T, H, W)``, read frame by frame; ValueError if < 0."""
    hi = 0
    for t in range(len(labels)):
        plane = np.asarray(labels[t])
        if plane.size == 0:
            continue
        d = minimal_label_dtype(plane)  # also rejects non-integral values
        if d.kind == "i":
            raise ValueError(
                f"frame {t}: labels must be >= 0 (got {int(plane.min())}); "
                "PNG masks and label TIFFs hold unsigned labels."
            )
        hi = max(hi, int(plane.max()))
    return hi


def iter_write_png_masks(
    labels: Any,
    folder: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    start_index: int = 0,
) -> Iterator[int]:
    """Write ``(T, H, W)`` labels as one PNG per frame; yields frames done, returns the paths.

    Runs a :class:`PngMaskWriter` (the folder appears complete or not at all).

    Parameters
    ----------
    labels : (T, H, W) integer array-like
        0 = background; values 0..65535 (8-bit PNGs when all are below 256).
    folder : str or path-like
        Created, or replaced when it is a previous mask folder (see :class:`PngMaskWriter`).
    class_names : sequence of str, optional
        Written to ``labels.json`` as ``{"0": "background", "1": ...}``.
    start_index : int
        Number of the first frame's file (EndoVis counts from 0).
    """
    n = len(labels)
    max_label = _max_label(labels)
    if max_label > 65535:
        raise ValueError(
            f"PNG masks hold labels 0..65535; got labels up to {max_label}. Use a TIFF stack."
        )
    with PngMaskWriter(
        folder,
        max_label=max_label,
        n_frames=n,
        start_index=start_index,
        class_names=class_names,
    ) as writer:
        for t in range(n):
            writer.write(labels[t])
            yield t + 1
    return writer.paths


def write_png_masks(labels: Any, folder: str | os.PathLike[str], **kwargs: Any) -> list[Path]:
    """Run :func:`iter_write_png_masks` to the end; return the written files."""
    from ..inference import run

    return run(iter_write_png_masks(labels, folder, **kwargs))


def read_png_masks(folder: str | os.PathLike[str]) -> np.ndarray:
    """Read a PNG mask folder (:class:`PngMaskWriter`, :func:`write_png_masks`, the CLI's
    ``--format png``) back into ``(T, H, W)`` labels, frames in numeric order."""
    import imageio.v3 as iio

    folder = Path(folder)
    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FRAME_RE.match(p.name)))
    if not files:
        raise ValueError(f"no frameNNN.png masks in {folder}")
    return np.stack([iio.imread(p) for _, p in files])


def write_labels_tiff(
    labels: Any,
    path: str | os.PathLike[str],
    *,
    axes: str | None = None,
    spacing: tuple[float, ...] | None = None,
) -> Path:
    """``(T, H, W)`` (or ``(Z, Y, X)``) labels as a lossless TIFF stack in the smallest dtype.

    Streams the frames through a :class:`LabelsTiffWriter` (``axes`` default ``"TYX"``).
    """
    if np.ndim(labels) != 3:
        raise ValueError(f"expected (T, H, W) labels, got shape {np.shape(labels)}")
    with LabelsTiffWriter(
        path, max_label=_max_label(labels), axes=axes or "TYX", spacing=spacing
    ) as writer:
        for t in range(len(labels)):
            writer.write(labels[t])
    return Path(path)
