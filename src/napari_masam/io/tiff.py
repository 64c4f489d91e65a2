"""TIFF stacks (3D volumes, time series) in and out through tifffile.

For people whose volumes are not NIfTI: a multi-page TIFF or an ImageJ hyperstack becomes a
``(Z, Y, X)`` / ``(T, Y, X)`` / ``(T, Z, Y, X)`` array (RGB samples last). Uncompressed files are
memory-mapped (lazy).

Units (the spacing is never taken without its unit): the voxel size comes from ImageJ's
``unit``/``spacing`` and the resolution tags, or from the ``unit``/``spacing`` napari-masam's own
writer records; a physical unit (micron, nm, mm, cm, m, inch) is converted to millimetres, so
``spacing`` is in mm and :attr:`TiffStack.physical_unit` is ``"mm"``. A file without a physical
unit (ImageJ ``pixel``, no resolution tags, TIFF resolution unit "none", or the 72-dpi default
that many programs write) gets spacing 1 per axis and ``physical_unit`` None: sizes are in
pixels and no volume in mL can be given.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ._common import atomic_path, decide_labels, minimal_label_dtype
from .formats import kind_of, suffixes_for

logger = logging.getLogger(__name__)

#: File-name endings of TIFF files (from THE table, :mod:`napari_masam.io.formats`).
TIFF_SUFFIXES = suffixes_for("tiff")

#: Length units as files name them -> millimetres per unit.
UNIT_TO_MM: dict[str, float] = {
    "nm": 1e-6,
    "nanometer": 1e-6,
    "nanometre": 1e-6,
    "um": 1e-3,
    "\u00b5m": 1e-3,
    "\u03bcm": 1e-3,
    "micron": 1e-3,
    "microns": 1e-3,
    "micrometer": 1e-3,
    "micrometre": 1e-3,
    "mm": 1.0,
    "millimeter": 1.0,
    "millimetre": 1.0,
    "cm": 10.0,
    "centimeter": 10.0,
    "centimetre": 10.0,
    "m": 1000.0,
    "meter": 1000.0,
    "metre": 1000.0,
    "inch": 25.4,
    "in": 25.4,
}

#: Dots per inch that mean "no physical size" (the default of many writers), not 0.35 mm pixels.
DEFAULT_DPI = (72.0, 96.0)

#: TIFF ResolutionUnit tag values -> unit name (1: none).
_RESOLUTION_UNITS = {2: "inch", 3: "cm"}

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
        Size per axis of :attr:`data` excluding ``S``: millimetres for Z/Y/X when the file has a
        physical unit, else 1 (pixels); 1 for T/C/Q axes.
    unit : str
        ``"mm"`` when the spacing is physical, else ``"pixel"``.
    is_labels : bool
    is_rgb : bool
        Last axis holds RGB(A) samples.
    metadata : dict
        Path, axes, spacing (mm or pixels), unit, ``physical_unit`` (``"mm"`` or None),
        ``source_unit`` and ``source_spacing`` (as the file states them), ImageJ metadata.
    """

    data: Any
    axes: str
    spacing: tuple[float, ...]
    unit: str
    is_labels: bool
    is_rgb: bool
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def physical_unit(self) -> str | None:
        """``"mm"`` when :attr:`spacing` is physical (volumes in mL make sense), else None."""
        return "mm" if self.unit == "mm" else None


def is_tiff_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file name ends in ``.tif``/``.tiff`` (case-insensitive)."""
    return kind_of(path) == "tiff"


def read_tiff_stack(path: str | os.PathLike[str], as_labels: bool | None = None) -> TiffStack:
    """Read the first series of a TIFF file.

    Parameters
    ----------
    path : str or path-like
    as_labels : bool or None
        ``None``: THE rule of :func:`napari_masam.io._common.decide_labels` (the name says
        labels and the values are whole numbers, or an 8-bit volume with at most 32 values);
        RGB is never labels.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing, or not a readable TIFF.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a TIFF file; choose the file inside it")
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
            res_unit_tag = page.tags.get("ResolutionUnit")
            res_unit = int(res_unit_tag.value) if res_unit_tag is not None else None
            shaped = dict(tf.shaped_metadata[0]) if tf.shaped_metadata else {}
            _check_declared_size(path, series)
            if np.dtype(series.dtype).kind == "c":
                raise _RefusedError(
                    f"{path} holds complex pixels ({np.dtype(series.dtype)}); napari-masam will "
                    "not guess which part to segment. Save the magnitude (abs) or the real part "
                    "as a float stack first."
                )
            try:
                data = tifffile.memmap(path, mode="r", series=0)
            except Exception:  # compressed or not contiguous: read into memory
                data = series.asarray()
    except (_NoSeriesError, _RefusedError):
        raise
    except Exception as exc:  # tifffile.TiffFileError, OSError, ...
        raise ValueError(
            f"{path} is not a readable TIFF file ({type(exc).__name__}: {exc})"
        ) from exc
    data = np.asarray(data).reshape(series.shape) if data.shape != tuple(series.shape) else data
    is_rgb = axes.endswith("S") and data.shape[-1] in (3, 4)
    spatial_axes = axes[:-1] if axes.endswith("S") else axes
    source_unit, source_spacing = _stated_spacing(spatial_axes, ij, shaped, xres, yres, res_unit)
    to_mm = UNIT_TO_MM.get(_normal_unit(source_unit)) if source_unit else None
    # an unnamed page axis (Q: "pages") may be depth of unknown size: no physical volume then
    physical = (
        to_mm is not None
        and "Q" not in spatial_axes
        and all(source_spacing[i] is not None for i, ax in enumerate(spatial_axes) if ax in "ZYX")
    )
    spacing = [
        float(source_spacing[i]) * to_mm if physical and ax in "ZYX" else 1.0  # type: ignore[operator]
        for i, ax in enumerate(spatial_axes)
    ]
    unit = "mm" if physical else "pixel"
    if source_unit and not physical:
        logger.info("%s: spacing in %r is not a physical length; using pixels", path, source_unit)
    is_labels = (
        False
        if is_rgb and as_labels is None
        else decide_labels(data, path=path, as_labels=as_labels)
    )
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
        "physical_unit": "mm" if physical else None,
        "source_unit": source_unit,
        "source_spacing": tuple(source_spacing),
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


class _RefusedError(ValueError):
    pass


#: Most bytes one stored byte can decode to, per TIFF compression code, where a bound exists:
#: none (1), LZW (5: a 12-bit code stands for at most 4096 bytes), deflate (8, 32946: 1032:1),
#: PackBits (32773: 2 bytes -> 128). Other codecs (zstd, lzma, JPEG, ...) have no useful bound.
_MAX_DECODE_RATIO = {1: 1, 5: 4096 * 8 // 12, 8: 1032, 32946: 1032, 32773: 64}


def _check_declared_size(path: Path, series: Any) -> None:
    """Refuse a series whose tags declare more pixels than its stored bytes can decode to,
    before any memory is allocated for it (untrusted sizes, issue 13.2)."""
    pages = [p for p in series.pages if p is not None]
    codes = {int(getattr(p, "compression", 1)) for p in pages}
    if len(codes) != 1 or next(iter(codes)) not in _MAX_DECODE_RATIO:
        return
    code = next(iter(codes))
    ratio = _MAX_DECODE_RATIO[code]
    declared = math.prod(int(d) for d in series.shape) * np.dtype(series.dtype).itemsize
    page_bytes = math.prod(int(d) for d in pages[0].shape) * np.dtype(series.dtype).itemsize
    offset = getattr(series, "dataoffset", None)
    if code == 1 and offset is not None:
        # contiguous uncompressed data (ImageJ > 4 GB files list one IFD for all frames)
        stored = path.stat().st_size - int(offset)
    elif len(pages) * page_bytes < declared:
        return  # frames without their own IFD and compressed: no bound to check against
    else:
        stored = sum(int(sum(getattr(p, "databytecounts", ()) or ())) for p in pages)
    if declared > ratio * stored + 65536:
        raise _RefusedError(
            f"{path}: its tags declare {' x '.join(map(str, series.shape))} "
            f"{np.dtype(series.dtype).name} pixels ({declared / 2**20:.1f} MiB), but the "
            f"{stored} bytes it stores cannot decode to more than {ratio * stored / 2**20:.1f} MiB. "
            "The file is damaged or truncated; nothing was read. Re-export it."
        )


def _imagej_order(axes: str) -> bool:
    order = "TZCYX"
    positions = [order.index(a) for a in axes]
    return positions == sorted(positions) and axes.endswith("YX")


def _resolution(page: Any, tag: str) -> float | None:
    """Pixel size (1 / pixels per unit) from a resolution tag; None when absent or zero."""
    t = page.tags.get(tag)
    if t is None:
        return None
    value = t.value
    num, den = (value if isinstance(value, tuple) else (value, 1))[:2]
    if not num or not den:
        return None
    return float(den) / float(num)


def _normal_unit(unit: str) -> str:
    # ImageJ escapes the micro sign as the six characters "\u00B5"
    return unit.replace("\\u00B5", "\u00b5").replace("\\u00b5", "\u00b5").strip().lower()


def _stated_spacing(
    spatial_axes: str,
    ij: dict[str, Any],
    shaped: dict[str, Any],
    xres: float | None,
    yres: float | None,
    res_unit: int | None,
) -> tuple[str | None, list[float | None]]:
    """(unit, size per axis) as the file states them; None where the file says nothing.

    Precedence: ImageJ metadata (``unit``; Z from ``spacing``, Y/X from the resolution tags,
    which ImageJ writes in pixels per that unit), then napari-masam's own shaped metadata
    (``unit`` and one ``spacing`` per axis), then the TIFF resolution tags with their
    ResolutionUnit (inch when absent, as the TIFF specification says; 72/96 dpi = no size).
    """
    sizes: list[float | None] = [None] * len(spatial_axes)
    if ij:
        unit = str(ij["unit"]) if ij.get("unit") else None
        for i, ax in enumerate(spatial_axes):
            if ax == "Z":
                sizes[i] = float(ij.get("spacing", 1.0))
            elif ax == "Y":
                sizes[i] = yres if yres is not None else 1.0
            elif ax == "X":
                sizes[i] = xres if xres is not None else 1.0
        return unit, sizes
    stated = shaped.get("spacing")
    if shaped.get("unit") and isinstance(stated, list | tuple):
        axes = str(shaped.get("axes", ""))
        by_axis = dict(zip(axes, stated, strict=False)) if len(axes) == len(stated) else {}
        sizes = [
            float(by_axis[ax]) if ax in by_axis and ax in "ZYX" else None for ax in spatial_axes
        ]
        return str(shaped["unit"]), sizes
    unit = _RESOLUTION_UNITS.get(2 if res_unit is None else res_unit)
    if unit is None or xres is None or yres is None:
        return None, sizes
    if unit == "inch" and any(
        abs(1.0 / r - dpi) < 1e-6 for r in (xres, yres) for dpi in DEFAULT_DPI
    ):
        return None, sizes
    for i, ax in enumerate(spatial_axes):
        if ax == "Y":
            sizes[i] = yres
        elif ax == "X":
            sizes[i] = xres
    return unit, sizes
