"""TIFF stacks (3D volumes, time series) in and out through tifffile.

For people whose volumes are not NIfTI: a multi-page TIFF or an ImageJ hyperstack becomes a
``(Z, Y, X)`` / ``(T, Y, X)`` / ``(T, Z, Y, X)`` array (RGB samples last), with the voxel size
from ImageJ's ``spacing`` and the resolution tags when present. Uncompressed files are
memory-mapped (lazy).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ._common import atomic_path, has_few_values, minimal_label_dtype, name_suggests_labels

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")

#: dtypes ImageJ hyperstacks can hold
_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


@dataclass
class TiffStack:
    """A TIFF series as an array with its axes and physical spacing.

    Attributes
    ----------
    data : ndarray
        The series, axes as in :attr:`axes` (e.g. ``"ZYX"``, ``"TZYX"``, ``"ZYXS"`` for RGB).
        A read-only memory map for uncompressed files.
    axes : str
        tifffile's axis letters (``Z`` slices, ``T`` time, ``C`` channels, ``S`` RGB samples,
        ``Q`` unknown).
    spacing : tuple of float
        Physical size per axis of :attr:`data` excluding ``S`` (1 where unknown).
    unit : str
        Unit of the spacing (``"pixel"`` when there is none).
    is_labels : bool
    is_rgb : bool
        Last axis holds RGB(A) samples.
    metadata : dict
        Path, axes, spacing, unit, ImageJ metadata.
    """

    data: Any
    axes: str
    spacing: tuple[float, ...]
    unit: str
    is_labels: bool
    is_rgb: bool
    metadata: dict[str, Any] = field(default_factory=dict)


def is_tiff_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file name ends in ``.tif``/``.tiff``."""
    return str(path).lower().endswith(TIFF_SUFFIXES)


def read_tiff_stack(path: str | os.PathLike[str], as_labels: bool | None = None) -> TiffStack:
    """Read the first series of a TIFF file.

    Parameters
    ----------
    path : str or path-like
    as_labels : bool or None
        ``None``: labels when the dtype is integer and the name says so (``seg``, ``mask``,
        ``label``, ...) or there are at most 32 distinct values.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing, or not a readable TIFF.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TIFF file {path} does not exist")
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise _NoSeriesError(f"{path} holds no image series")
            series = tf.series[0]
            axes = series.axes
            ij = dict(tf.imagej_metadata or {})
            page = series.pages[0]
            xres = _resolution(page, "XResolution")
            yres = _resolution(page, "YResolution")
            try:
                data = tifffile.memmap(path, mode="r", series=0)
            except Exception:  # compressed or not contiguous: read into memory
                data = series.asarray()
    except _NoSeriesError:
        raise
    except Exception as exc:  # tifffile.TiffFileError, OSError, ...
        raise ValueError(
            f"{path} is not a readable TIFF file ({type(exc).__name__}: {exc})"
        ) from exc
    data = np.asarray(data).reshape(series.shape) if data.shape != tuple(series.shape) else data
    is_rgb = axes.endswith("S") and data.shape[-1] in (3, 4)
    spatial_axes = axes[:-1] if axes.endswith("S") else axes
    unit = str(ij.get("unit", "pixel")) if ij else "pixel"
    spacing = []
    for ax in spatial_axes:
        if ax == "Z":
            spacing.append(float(ij.get("spacing", 1.0)))
        elif ax == "Y":
            spacing.append(yres)
        elif ax == "X":
            spacing.append(xres)
        else:
            spacing.append(1.0)
    if as_labels is None:
        is_labels = (
            not is_rgb
            and data.dtype.kind in "iu"
            and (name_suggests_labels(path) or has_few_values(data))
        )
    else:
        is_labels = bool(as_labels)
    if is_labels and (data.dtype.kind not in "iu" or not data.dtype.isnative):
        arr = np.asarray(data)
        data = arr.astype(
            minimal_label_dtype(arr) if arr.dtype.kind not in "iu" else arr.dtype.newbyteorder("=")
        )
    metadata = {
        "path": str(path),
        "axes": axes,
        "spacing": tuple(spacing),
        "unit": unit,
        "imagej": {k: v for k, v in ij.items() if isinstance(v, int | float | str)},
    }
    return TiffStack(data, axes, tuple(spacing), unit, is_labels, is_rgb, metadata)


def write_tiff_stack(
    path: str | os.PathLike[str],
    data: Any,
    *,
    axes: str | None = None,
    spacing: tuple[float, ...] | None = None,
    unit: str = "mm",
    is_labels: bool = False,
) -> Path:
    """Write an array as a (multi-page) TIFF, lossless and uncompressed.

    Parameters
    ----------
    path : str or path-like
    data : array-like
        ``(Z, Y, X)``, ``(T, Y, X)``, ``(T, Z, Y, X)``, ... (``axes`` names them; default
        ``"ZYX"`` for 3D, ``"TZYX"`` for 4D, ``"YX"`` for 2D).
    spacing : tuple of float, optional
        Physical size per axis (same length as ``axes``); Z goes to ImageJ ``spacing``, Y/X to
        the resolution tags.
    unit : str
        Unit of ``spacing``.
    is_labels : bool
        Store in the smallest integer dtype holding the values.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if is_labels:
        arr = arr.astype(minimal_label_dtype(arr), copy=False)
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}.get(arr.ndim)
        if axes is None:
            raise ValueError(f"cannot name the axes of a {arr.ndim}-D array; pass axes=")
    if len(axes) != arr.ndim:
        raise ValueError(f"axes {axes!r} do not match an array of shape {arr.shape}")
    sp = dict(zip(axes, spacing)) if spacing is not None else {}
    kwargs: dict[str, Any] = {}
    if "X" in sp and "Y" in sp:
        kwargs["resolution"] = (1.0 / float(sp["X"]), 1.0 / float(sp["Y"]))
    imagej = arr.dtype.type in _IMAGEJ_DTYPES and set(axes) <= set("TZCYX") and _imagej_order(axes)
    if imagej:
        meta: dict[str, Any] = {"axes": axes, "unit": unit}
        if "Z" in sp:
            meta["spacing"] = float(sp["Z"])
        kwargs.update(imagej=True, metadata=meta)
    else:
        kwargs["metadata"] = {
            "axes": axes,
            "spacing": [float(sp.get(a, 1.0)) for a in axes],
            "unit": unit,
        }
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, **kwargs)
    logger.info("wrote %s %s %s", path, arr.shape, arr.dtype)
    return path


class _NoSeriesError(ValueError):
    pass


def _imagej_order(axes: str) -> bool:
    order = "TZCYX"
    positions = [order.index(a) for a in axes]
    return positions == sorted(positions) and axes.endswith("YX")


def _resolution(page: Any, tag: str) -> float:
    """Pixel size (1 / pixels per unit) from a resolution tag; 1 when absent."""
    t = page.tags.get(tag)
    if t is None:
        return 1.0
    value = t.value
    num, den = (value if isinstance(value, tuple) else (value, 1))[:2]
    if not num or not den:
        return 1.0
    return float(den) / float(num)
