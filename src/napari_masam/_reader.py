"""napari reader contribution: NIfTI volumes, TIFF stacks and videos through napari-masam's core.

``napari_get_reader(path)`` returns a reader function for files it can open, and None (with the
reason in the log) otherwise, as npe2's reader contract asks. The reader function itself returns
None instead of raising when a file turns out to be corrupt while its voxels are read.

No torch, Qt or napari import here: napari imports this module at start-up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io._common import stem_of

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[str | list[str]], list[LayerData] | None]


def napari_get_reader(path: str | os.PathLike[str] | list[str]) -> ReaderFunction | None:
    """Return a reader for one ``.nii``/``.nii.gz``/``.tif``/``.tiff``/video file, else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            logger.info("napari-masam reads one file at a time, got %d", len(path))
            return None
        path = path[0]
    path = str(path)
    from .io.nifti import is_nifti_path
    from .io.tiff import is_tiff_path
    from .io.video import is_video_path

    try:
        if is_nifti_path(path):
            from .io.nifti import check_nifti_file

            check_nifti_file(path)
            return read_nifti_layers
        if is_tiff_path(path):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                if not tf.series:
                    raise ValueError("no image series")
            return read_tiff_layers
        if is_video_path(path):
            from .io.video import probe_video

            probe_video(path)
            return read_video_layers
    except Exception as exc:  # napari's contract: None for files we cannot handle
        logger.info("napari-masam cannot read %s: %s", path, exc)
        return None
    return None


def read_nifti_layers(
    path: str | list[str], as_labels: bool | None = None
) -> list[LayerData] | None:
    """Read a NIfTI file into one Image or Labels layer (geometry in ``metadata["nifti"]``)."""
    from .io.nifti import read_nifti

    path = _single(path)
    try:
        vol = read_nifti(path, as_labels=as_labels)
    except (OSError, ValueError) as exc:
        logger.warning("napari-masam cannot read %s: %s", path, exc)
        return None
    n_lead = vol.data.ndim - len(vol.spacing_zyx)
    spatial = (
        ("z", "y", "x")[-len(vol.spacing_zyx) :] if len(vol.spacing_zyx) < 3 else ("z", "y", "x")
    )
    kwargs: dict[str, Any] = {
        "name": stem_of(path),
        "scale": vol.scale,
        "translate": vol.translate,
        "metadata": {"nifti": vol.metadata},
        "axis_labels": tuple(f"axis{i}" for i in range(n_lead)) + spatial,
        "units": ("pixel",) * n_lead + ("mm",) * len(vol.spacing_zyx),
    }
    if n_lead == 1 and vol.metadata.get("time_step"):
        kwargs["axis_labels"] = ("t", *spatial)
    return [(vol.data, kwargs, "labels" if vol.is_labels else "image")]


def read_tiff_layers(
    path: str | list[str], as_labels: bool | None = None
) -> list[LayerData] | None:
    """Read the first series of a TIFF file into an Image (RGB if it has samples) or Labels."""
    from .io.tiff import read_tiff_stack

    path = _single(path)
    try:
        stack = read_tiff_stack(path, as_labels=as_labels)
    except (OSError, ValueError) as exc:
        logger.warning("napari-masam cannot read %s: %s", path, exc)
        return None
    kwargs: dict[str, Any] = {
        "name": stem_of(path),
        "scale": stack.spacing,
        "metadata": {"tiff": stack.metadata},
    }
    if stack.is_rgb:
        kwargs["rgb"] = True
    return [(stack.data, kwargs, "labels" if stack.is_labels else "image")]


def read_video_layers(path: str | list[str]) -> list[LayerData] | None:
    """Open a video lazily as an RGB Image layer ``(T, H, W, 3)`` backed by a VideoReader."""
    from .io.video import VideoReader, as_dask_array

    path = _single(path)
    try:
        reader = VideoReader(path)
    except (OSError, ValueError) as exc:
        logger.warning("napari-masam cannot read %s: %s", path, exc)
        return None
    kwargs: dict[str, Any] = {
        "name": Path(path).stem,
        "rgb": True,
        "contrast_limits": (0, 255),
        "metadata": {"video": reader.metadata},
        "axis_labels": ("t", "y", "x"),
    }
    return [(as_dask_array(reader), kwargs, "image")]


def _single(path: str | list[str]) -> str:
    return str(path[0] if isinstance(path, list | tuple) else path)
