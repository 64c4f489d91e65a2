"""Export of labels from the widget, in the source image's format and on its grid.

The format follows the image the labels were drawn over: a NIfTI image gives a NIfTI file with
that image's header, affine and voxel order; a TIFF stack gives a TIFF stack with its spacing
(both through the IO core's :func:`napari_masam.io.formats.save_labels_like`, the same road as
napari's writer); a video gives per-frame PNG masks in the EndoVis layout, a TIFF stack or an
overlay mp4 (:mod:`napari_masam.io.export`). No Qt here: the widget asks for the path and runs :func:`iter_export`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Export format choices (the widget's "as" drop-down).
EXPORT_NIFTI = "NIfTI (image's header)"
EXPORT_PNG = "PNG masks (EndoVis)"
EXPORT_TIFF = "TIFF stack"
EXPORT_MP4 = "overlay mp4"

#: Formats offered per kind of source image, the source's own first.
#: (NIfTI only for NIfTI images: any other geometry would be invented.)
FORMATS_BY_SOURCE: dict[str, tuple[str, ...]] = {
    "nifti": (EXPORT_NIFTI, EXPORT_TIFF),
    "video": (EXPORT_PNG, EXPORT_TIFF, EXPORT_MP4),
    "tiff": (EXPORT_TIFF,),
    "plain": (EXPORT_TIFF,),
}

#: File-name suffix (or "" for a folder) each format writes.
SUFFIXES: dict[str, str] = {
    EXPORT_NIFTI: ".nii.gz",
    EXPORT_TIFF: ".tif",
    EXPORT_MP4: ".mp4",
    EXPORT_PNG: "",
}

#: layer.metadata key of labels made by the widget: the image they belong to.
LABELS_IMAGE_KEY = "napari_masam_image"


def source_kind(image_layer: Any) -> str:
    """``"nifti"``, ``"video"``, ``"tiff"`` or ``"plain"`` from the image layer's metadata."""
    metadata = getattr(image_layer, "metadata", {}) or {}
    for kind in ("nifti", "video", "tiff"):
        if kind in metadata:
            return kind
    return "plain"


@dataclass(frozen=True)
class ExportRequest:
    """What :func:`iter_export` writes.

    Attributes
    ----------
    labels : ndarray
        ``(Z, Y, X)``/``(T, H, W)`` (or ``(Y, X)``) integer labels, a snapshot of the layer.
    fmt : str
        One of the ``EXPORT_*`` choices.
    path : Path
        File, or folder for PNG masks.
    image_metadata : dict
        ``layer.metadata`` of the image (its ``"nifti"``/``"tiff"``/``"video"`` record and
        ``"physical_unit"``): the grid and header the labels are written on.
    class_names, class_colors : tuple of str
        Names/colours of labels ``1..n``.
    frames : array-like or None
        ``(T, H, W, 3)`` video frames for the overlay (read frame by frame in the worker).
    fps : float or None
    """

    labels: np.ndarray
    fmt: str
    path: Path
    image_metadata: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    class_colors: tuple[str, ...] = ()
    frames: Any = None
    fps: float | None = None


def export_request(
    labels_layer: Any, image_layer: Any, fmt: str, path: str | Path
) -> ExportRequest:
    """Check that ``labels_layer`` lies on ``image_layer``'s grid and describe the export.

    Raises
    ------
    ValueError
        The labels' shape is not the image's (they were not drawn over it), or the format does
        not fit the image (an overlay mp4 needs a video).
    """
    from . import _layers

    info = _layers.stack_from_layer(image_layer)
    labels = np.array(
        labels_layer.data, copy=True
    )  # painting during a worker export must not leak in
    if tuple(labels.shape) != tuple(info.labels_shape):
        raise ValueError(
            f"Labels layer {labels_layer.name!r} has shape {tuple(labels.shape)} but image "
            f"{image_layer.name!r} has {tuple(info.labels_shape)}: they are not on one grid. "
            "Pick the image the labels were drawn over (the 'image' drop-down)."
        )
    kind = source_kind(image_layer)
    if fmt not in FORMATS_BY_SOURCE[kind]:
        raise ValueError(
            f"{fmt} does not fit image {image_layer.name!r} ({kind}); choose one of "
            f"{', '.join(FORMATS_BY_SOURCE[kind])}."
        )
    names = tuple(labels_layer.metadata.get("class_names", ()))
    colors = tuple(labels_layer.metadata.get("class_colors", ()))
    video = image_layer.metadata.get("video", {}) if kind == "video" else {}
    path = Path(path)
    from .io.formats import kind_of

    if SUFFIXES[fmt] and kind_of(path) is None:
        path = path.with_name(path.name + SUFFIXES[fmt])
    return ExportRequest(
        labels=labels,
        fmt=fmt,
        path=path,
        image_metadata=dict(image_layer.metadata),
        class_names=names,
        class_colors=colors,
        frames=image_layer.data if fmt == EXPORT_MP4 else None,
        fps=video.get("fps"),
    )


def _color_table(colors: Sequence[str], max_label: int) -> np.ndarray:
    from .palette import hex_to_rgb, label_rgb_table

    table = label_rgb_table(max_label)
    for i, color in enumerate(colors[:max_label], start=1):
        table[i] = hex_to_rgb(color)
    return table


def iter_export(request: ExportRequest) -> Generator[int, None, Path]:
    """Write ``request``; yields the number of frames/slices written so far, returns the path
    written (``.nii.gz`` added to a NIfTI name without a NIfTI suffix; the folder for PNG
    masks)."""
    labels = request.labels
    fmt = request.fmt
    n = int(labels.shape[0]) if labels.ndim == 3 else 1
    if fmt in (EXPORT_NIFTI, EXPORT_TIFF):
        from .io.formats import save_labels_like

        path = save_labels_like(request.path, labels, request.image_metadata)
        yield n
        return path
    stack = labels if labels.ndim == 3 else labels[np.newaxis]
    if fmt == EXPORT_PNG:
        from .io.export import iter_write_png_masks

        yield from iter_write_png_masks(
            stack, request.path, class_names=request.class_names or None
        )
        return Path(request.path)
    if fmt == EXPORT_MP4:
        from .io.video import iter_write_overlay_mp4

        colors = _color_table(request.class_colors, int(stack.max(initial=0)))
        path = yield from iter_write_overlay_mp4(
            request.frames, stack, request.path, fps=request.fps, colors=colors
        )
        return Path(path)
    raise ValueError(f"Unknown export format {fmt!r}; choose one of {', '.join(SUFFIXES)}.")
