"""Output names and incremental label writers (sinks) of a batch job.

Sinks write into a *staging* path that the job got from :func:`napari_masam.io._common.atomic_path`
(a hidden sibling of the final name); the job moves it onto the final name only after the
sidecar vouching for it is written. A sink never touches the final name itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import FRAME_FORMATS, BatchConfig, BoxesDict
from .inputs import BatchInput

if TYPE_CHECKING:
    from ..io.export import LabelsTiffWriter, PngMaskWriter
    from ..io.video import VideoWriter
    from ..model.base import SegmentationModel


def output_format_for(item: BatchInput, config: BatchConfig) -> str:
    """The concrete output format of ``item`` (resolves ``"auto"``).

    Raises
    ------
    ValueError
        ``--format nifti`` for a video or TIFF stack (NIfTI needs a NIfTI header).
    """
    fmt = config.output_format
    if item.kind == "nifti":
        return "nifti"
    if fmt == "auto":
        return "tiff" if item.kind == "tiff" else "png"
    if fmt == "nifti":
        raise ValueError(
            f"{item.path.name}: NIfTI output needs a NIfTI input (its header and affine); "
            f"use --format {'|'.join(FRAME_FORMATS)} for videos and TIFF stacks"
        )
    return fmt


def planned_outputs(item: BatchInput, config: BatchConfig) -> tuple[Path, Path]:
    """(labels output path, sidecar path) of ``item`` in ``config.output_dir``."""
    out = Path(config.output_dir)
    fmt = output_format_for(item, config)
    name = {
        "nifti": f"{item.stem}_seg.nii.gz",
        "png": f"{item.stem}_seg",
        "tiff": f"{item.stem}_seg.tif",
        "mp4-overlay": f"{item.stem}_overlay.mp4",
    }[fmt]
    return out / name, out / f"{item.stem}_seg.json"


def output_names(item: BatchInput) -> tuple[str, ...]:
    """Every name a job on ``item`` may write, in any format (all under one lock)."""
    stem = item.stem
    return (
        f"{stem}_seg.nii.gz",
        f"{stem}_seg",
        f"{stem}_seg.tif",
        f"{stem}_overlay.mp4",
        f"{stem}_seg.json",
    )


def lock_path(item: BatchInput, config: BatchConfig) -> Path:
    """The lock file held while ``item``'s outputs are produced."""
    return Path(config.output_dir) / f".{item.stem}_seg.lock"


def label_palette(class_colors: Sequence[str], n_labels: int) -> np.ndarray:
    """(n_labels + 1, 3) uint8 colours: row 0 black, row i the colour of label i.

    Labels beyond the model's class colours (boxes mode: one per object id) get the package
    palette's colours (:func:`napari_masam.palette.label_rgb_table`).
    """
    from ..palette import hex_to_rgb, label_rgb_table

    palette = label_rgb_table(n_labels)
    for i, color in enumerate(class_colors[:n_labels], start=1):
        palette[i] = hex_to_rgb(color)
    return palette


def to_rgb_uint8(
    frames: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """(n, H, W, 3) uint8 view of RGB or grey frames (grey min-max scaled to 0..255)."""
    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8:
        return frames
    grey = frames.astype(np.float32)
    if grey.ndim == 4:
        grey = grey.mean(axis=-1)
    low = float(np.nanmin(grey)) if low is None else low
    high = float(np.nanmax(grey)) if high is None else high
    scaled = (np.nan_to_num(grey, nan=low) - low) / max(high - low, 1e-12) * 255.0
    grey8 = np.clip(scaled, 0, 255).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=-1)


class FrameSink:
    """Writes label frames incrementally into a staging path; ``commit`` finishes the file.

    Subclasses implement :meth:`write`, :meth:`commit` and :meth:`abort`.
    """

    #: whether :meth:`write` needs the image frames (overlays)
    needs_frames = False

    def __init__(self, final: Path) -> None:
        self.final = final
        self.count = 0

    def write(self, labels: np.ndarray, frames: np.ndarray | None = None) -> None:
        """Append ``labels`` (n, H, W) (and their image ``frames`` (n, H, W[, 3]))."""
        raise NotImplementedError

    def commit(self) -> None:
        """Finish the output at :attr:`final` (the staging path)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Close and drop what was written."""
        raise NotImplementedError


class _ExportSink(FrameSink):
    """A sink around one of :mod:`napari_masam.io.export`'s streaming label writers."""

    def __init__(self, final: Path, writer: PngMaskWriter | LabelsTiffWriter) -> None:
        super().__init__(final)
        self._writer = writer

    def write(self, labels: np.ndarray, frames: np.ndarray | None = None) -> None:
        self._writer.write(labels)
        self.count = self._writer.count

    def commit(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()


class PngFolderSink(_ExportSink):
    """EndoVis PNG folder (``frame000.png``, ...) via :class:`napari_masam.io.export.PngMaskWriter`;
    :func:`napari_masam.io.export.read_png_masks` reads it back."""

    def __init__(self, final: Path, max_label: int, n_frames: int | None = None) -> None:
        from ..io.export import PngMaskWriter

        super().__init__(final, PngMaskWriter(final, max_label=max_label, n_frames=n_frames))


class TiffSink(_ExportSink):
    """One multi-page BigTIFF, a page per frame, via
    :class:`napari_masam.io.export.LabelsTiffWriter`."""

    def __init__(self, final: Path, max_label: int, axes: str = "TYX") -> None:
        from ..io.export import LabelsTiffWriter

        super().__init__(final, LabelsTiffWriter(final, max_label=max_label, axes=axes))


class OverlayMp4Sink(FrameSink):
    """H.264 mp4 of the frames with the labels blended on top (alpha 0.5), via
    :class:`napari_masam.io.video.VideoWriter` and :func:`~napari_masam.io.video.blend_labels`,
    written straight into the staging path."""

    needs_frames = True

    def __init__(self, final: Path, fps: float, palette: np.ndarray, alpha: float = 0.5) -> None:
        from ..io.video import VideoWriter

        super().__init__(final)
        self.fps = fps
        self.palette = palette
        self.alpha = alpha
        self._writer: VideoWriter | None = VideoWriter(final, self.fps)

    def write(self, labels: np.ndarray, frames: np.ndarray | None = None) -> None:
        from ..io.video import blend_labels

        if frames is None or self._writer is None:
            raise ValueError("the overlay mp4 needs the image frames and an open writer")
        rgb = to_rgb_uint8(frames)
        for image, plane in zip(rgb, np.asarray(labels), strict=True):
            self._writer.write(blend_labels(image, plane, self.palette, self.alpha))
            self.count += 1

    def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def commit(self) -> None:
        self._close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._close()


def frame_sink(
    fmt: str,
    staged: Path,
    *,
    fps: float,
    class_colors: Sequence[str],
    n_labels: int,
    n_frames: int | None = None,
    axes: str = "TYX",
) -> FrameSink:
    """The sink of frame format ``fmt`` writing into ``staged``."""
    if fmt == "png":
        return PngFolderSink(staged, n_labels, n_frames)
    if fmt == "tiff":
        return TiffSink(staged, n_labels, axes)
    return OverlayMp4Sink(staged, fps, label_palette(tuple(class_colors), n_labels))


def n_labels_for(model: SegmentationModel, mode: str, boxes: BoxesDict | None) -> int:
    """Largest label an output may hold: the highest object id (boxes) or the class count."""
    if mode == "boxes" and boxes:
        return max(boxes)
    return max(int(model.num_classes), 1)
