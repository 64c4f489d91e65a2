"""NIfTI-1/2 volumes in and out, with exact geometry.

Display convention (docs/ARCHITECTURE.md, "Frames and conventions"): every non-oblique volume is
reoriented, without resampling, to the axis codes :data:`DISPLAY_ORIENTATION` ``"SPL"`` for a
``(Z, Y, X)`` array: the slice index grows to Superior, the row to Posterior, the column to
patient Left. napari's ``scale`` is the voxel spacing in mm along ``(Z, Y, X)`` and ``translate``
is the position of voxel ``(0, 0, 0)`` in the display world frame ``(z_RAS, -y_RAS, -x_RAS)``
(mm), so that files of one patient stored in any orientation overlay. The original affine and
header travel in :attr:`NiftiVolume.metadata` (``layer.metadata["nifti"]``), and
:func:`write_nifti` uses them to write back in the original orientation.

Extra (4th, 5th, ...) axes of a file (time, channels) become leading axes of the displayed array:
``(T, Z, Y, X)``. Two-dimensional files are shown as ``(Y, X)`` or whichever two display axes they
span. Oblique affines are shown without their rotation (voxel ``(0, 0, 0)`` and spacing exact,
everything else approximate), with a warning; the true affine is kept.

The reorientation uses nibabel's orientation utilities (``io_orientation``, ``ornt_transform``,
``apply_orientation``); ``apply_orientation`` only flips and transposes, so on an uncompressed file
the result is a view of nibabel's memory map and nothing is read until a slice is shown.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import warnings
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from ._common import atomic_path, decide_labels, minimal_label_dtype
from .formats import kind_of, suffixes_for

logger = logging.getLogger(__name__)

#: Axis codes of displayed (Z, Y, X) stacks; equals ``napari_masam.model.base.DISPLAY_ORIENTATION``
#: (repeated here so that reading files does not import torch).
DISPLAY_ORIENTATION = "SPL"

#: NIfTI intent codes that mark label volumes: NIFTI_INTENT_LABEL, NIFTI_INTENT_NEURONAME.
LABEL_INTENTS = (1002, 1003)

#: Relative size of the off-axis part of a direction cosine above which an affine is oblique.
OBLIQUE_TOLERANCE = 1e-4

#: (x, y, z)_RAS -> display world (z, -y, -x): the world frame of the "SPL" display axes.
RAS_TO_DISPLAY = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])

#: File-name endings of NIfTI files (from THE table, :mod:`napari_masam.io.formats`).
NIFTI_SUFFIXES = suffixes_for("nifti")

#: Most bytes one compressed byte can become under deflate (zlib's documented limit is 1032:1):
#: a ``.nii.gz`` of N bytes cannot hold more than ``N * MAX_DEFLATE_RATIO`` bytes of voxels.
MAX_DEFLATE_RATIO = 1032

#: Bytes decompressed per read while streaming a ``.nii.gz`` (memory grows with real data only).
_GZ_CHUNK = 16 * 2**20

#: NIfTI spatial units (nibabel's names) -> mm; "unknown" is taken as mm, as most tools do.
SPACE_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}

#: NIfTI datatype codes of colour voxels: RGB24, RGBA32.
_COLOUR_CODES = {128: "RGB24", 2304: "RGBA32"}


class ObliqueAffineWarning(UserWarning):
    """The file's affine has a rotation that the display (scale + translate) cannot show."""


@dataclass
class NiftiVolume:
    """A NIfTI volume in display orientation, with its geometry.

    Attributes
    ----------
    data : array-like
        ``(Z, Y, X)`` (3D), ``(T, Z, Y, X)`` (4D: extra file axes lead), or the two spanned
        display axes for a 2D file. Native dtype of the file (int16 stays int16); float32 when
        the header has ``scl_slope``/``scl_inter`` scaling; a labels volume is integer. A view
        of nibabel's memory map for uncompressed files (read lazily).
    spacing_zyx : tuple of float
        Voxel spacing (mm) along the spatial display axes, ``(Z, Y, X)`` (two values for 2D);
        headers in microns or meters are converted to mm (the affine keeps the file's unit).
    translate_zyx : tuple of float
        World position (mm) of voxel 0 in the display world frame ``(z_RAS, -y_RAS, -x_RAS)``.
    affine : (4, 4) float64 ndarray
        The file's true voxel-to-RAS+ affine (nibabel's ``img.affine``) for the ORIGINAL voxel
        order.
    header : nibabel.Nifti1Header or nibabel.Nifti2Header
        A copy of the file's header.
    is_labels : bool
        Whether the volume is a label map (see :func:`read_nifti`).
    orientation : str
        Axis codes of the file as stored, e.g. ``"LAS"`` (nibabel's ``aff2axcodes``).
    oblique : bool
        The affine has a rotation that ``scale``/``translate`` does not show.
    path : pathlib.Path or None
        Where it was read from.
    metadata : dict
        Everything :func:`write_nifti` needs to write data of the displayed shape back in the
        original orientation and header (goes to ``layer.metadata["nifti"]``).
    """

    data: Any
    spacing_zyx: tuple[float, ...]
    translate_zyx: tuple[float, ...]
    affine: np.ndarray
    header: Any
    is_labels: bool
    orientation: str
    oblique: bool = False
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> tuple[float, ...]:
        """napari ``scale`` for every axis of :attr:`data` (1 for leading time/channel axes)."""
        lead = np.ndim(self.data) - len(self.spacing_zyx)
        return (1.0,) * lead + tuple(self.spacing_zyx)

    @property
    def translate(self) -> tuple[float, ...]:
        """napari ``translate`` for every axis of :attr:`data` (0 for leading axes)."""
        lead = np.ndim(self.data) - len(self.translate_zyx)
        return (0.0,) * lead + tuple(self.translate_zyx)

    def stack_zyx(self) -> Any:
        """The volume as a ``(Z, Y, X)`` stack for segmentation: THE 2-D/3-D/4-D rule.

        A 3-D file is its display array; a 2-D file (one slice) is a stack of one slice
        ``(1, Y, X)`` (the widget, the writer and the CLI all accept it, and
        :func:`write_nifti` writes a ``(1, Y, X)`` result back as the 2-D file it came from).

        Raises
        ------
        ValueError
            For a 4-D or higher file (time series, channels): napari-masam segments one volume
            at a time; the message says how to split the series.
        """
        ndim = np.ndim(self.data)
        if len(self.spacing_zyx) == 2 and ndim == 2:
            return self.data[None]
        if ndim == 3:
            return self.data
        where = self.path or "the volume"
        raise ValueError(
            f"{where} is a {ndim}-D series of shape {tuple(np.shape(self.data))} (leading axes: "
            "time/channels); napari-masam segments one 3-D volume at a time. Split the series "
            "into 3-D files first (e.g. fslsplit, or nibabel's four_to_three)."
        )


# --------------------------------------------------------------------------------------- reading
def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return kind_of(path) == "nifti"


def check_nifti_file(path: str | os.PathLike[str]) -> None:
    """Cheap validity check of a NIfTI file without reading its voxels.

    Parses the header and checks it against what the file can hold, before any voxel memory is
    allocated: an uncompressed file must be long enough for the voxels its header declares; a
    ``.nii.gz`` cannot hold more than :data:`MAX_DEFLATE_RATIO` times its size (a short
    ``.nii.gz`` within that bound is caught while its voxels are streamed, see
    :func:`read_nifti`). Also refuses what napari-masam cannot segment: complex and colour
    (RGB24/RGBA32) voxels, and affines with NaN/Inf.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a NIfTI file, truncated, a header claiming more voxels than the file holds, complex
        or colour voxels, or a non-finite affine; the message says what to do.
    """
    path = Path(path)
    _require_file(path, "NIfTI")
    img = _load_header(path)
    _check_header(path, img)


def _require_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {what} file; choose the file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")


def _check_header(path: Path, img: nib.Nifti1Image | nib.Nifti2Image) -> None:
    """The checks of :func:`check_nifti_file` on a loaded header (no voxel is read)."""
    code = int(img.header["datatype"])
    dtype = img.get_data_dtype()
    shape = tuple(int(s) for s in img.shape)
    if code in _COLOUR_CODES or dtype.fields is not None:
        raise ValueError(
            f"{path} holds colour voxels ({_COLOUR_CODES.get(code, dtype)}, shape {shape}); "
            "napari-masam segments single-channel (grey) volumes. Convert it to one channel "
            "first (e.g. the luminance, with nibabel or `fslmaths`), or open it with another "
            "napari reader to view it."
        )
    if dtype.kind == "c":
        raise ValueError(
            f"{path} holds complex voxels ({dtype}); napari-masam will not guess which part to "
            "segment. Save the magnitude (abs) or the real part as a float volume first, e.g. "
            "`fslcomplex -realabs` or nibabel with np.abs."
        )
    if any(s == 0 for s in shape):
        raise ValueError(
            f"{path} declares an empty axis (shape {shape}): there are no voxels to show. "
            "Re-export the file."
        )
    _check_affine(np.asarray(img.affine, dtype=np.float64), path)
    offset = max(int(img.header.get_data_offset()), _min_offset(img))
    nbytes = _nbytes(img)
    size = path.stat().st_size
    if _is_gzip(path):
        bound = size * MAX_DEFLATE_RATIO
        if offset + nbytes > bound:
            raise ValueError(
                f"{path}: the header declares {_voxels_text(shape, dtype, nbytes)}, but a "
                f"{_bytes_text(size)} gzip file can hold at most {_bytes_text(bound)}. The "
                "header is wrong or the file is truncated; nothing was read. Re-export the file."
            )
        return
    if size < offset + nbytes:
        raise ValueError(
            f"{path} is truncated: the header declares {_voxels_text(shape, dtype, nbytes)} "
            f"after a {offset}-byte header ({offset + nbytes} bytes), the file has {size}. "
            "Re-export the file."
        )


def _check_affine(affine: np.ndarray, where: Any) -> None:
    if not np.all(np.isfinite(affine)):
        raise ValueError(
            f"{where}: the voxel-to-world affine of the header (sform, else qform) holds NaN or "
            f"infinite values ({np.round(affine, 3).tolist()}), so the voxels cannot be placed. "
            "Repair the header (e.g. set a valid sform/qform with nibabel, or "
            "`fslorient -copyqform2sform` when the qform is valid) and open the file again."
        )


def _voxels_text(shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> str:
    return f"{' x '.join(map(str, shape))} {dtype.name} voxels ({_bytes_text(nbytes)})"


def _bytes_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _read_gz_stored(path: Path, img: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    """The stored (unscaled) voxels of a ``.nii.gz``, streamed: memory grows with the bytes
    that really come out of the stream, never with what the header declares.

    Raises ``ValueError`` when the stream ends before the declared voxels (short or truncated
    file) or is corrupt.
    """
    dtype = img.get_data_dtype()
    shape = tuple(int(s) for s in img.shape)
    nbytes = _nbytes(img)
    # nibabel's proxy knows where the voxels start (vox_offset 0 means "right after the header")
    offset = int(getattr(img.dataobj, "offset", 0)) or max(
        int(img.header.get_data_offset()), _min_offset(img)
    )
    # chunks first (memory = what the stream really gave), then one array filled while the
    # chunks are released: resident memory stays about one copy of the voxels
    chunks: deque[bytes] = deque()
    got = 0
    try:
        with gzip.open(path, "rb") as fh:
            skipped = len(fh.read(offset))
            while skipped == offset and got < nbytes:
                chunk = fh.read(min(_GZ_CHUNK, nbytes - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(
            f"{path} is truncated or corrupt: the compressed stream broke after "
            f"{_bytes_text(got)} of the {_voxels_text(shape, dtype, nbytes)} its header "
            f"declares ({type(exc).__name__}: {exc}). Re-export the file."
        ) from exc
    if got < nbytes:
        raise ValueError(
            f"{path} is short: its header declares {_voxels_text(shape, dtype, nbytes)}, the "
            f"compressed stream holds only {_bytes_text(got)}. The header is wrong or the "
            "file is truncated; re-export it."
        )
    flat = np.empty(nbytes, dtype=np.uint8)
    pos = 0
    while chunks:
        chunk = chunks.popleft()
        flat[pos : pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        pos += len(chunk)
    return flat.view(dtype).reshape(shape, order="F")


def read_nifti(
    path: str | os.PathLike[str],
    as_labels: bool | None = None,
    *,
    mmap: bool = True,
) -> NiftiVolume:
    """Read a NIfTI-1/2 file (``.nii`` or ``.nii.gz``) in the display orientation.

    Parameters
    ----------
    path : str or path-like
        The file.
    as_labels : bool or None
        ``True``: a label map (values must be whole numbers; stored as the smallest integer
        dtype); ``False``: an image; ``None`` (default): THE rule of
        :func:`napari_masam.io._common.decide_labels`: labels when the header intent
        (``label``/``neuroname``) or the file name (``seg``, ``label``, ``mask``, ``aal``, ... as
        a word) says so AND every value is a whole number, whatever the dtype (a float32
        ``case_seg.nii.gz`` with {0, 1, 2} is labels); without such intent only an 8-bit
        integer volume with at most 32 distinct values is labels (an int16 MRI with few grey
        levels stays an image).
    mmap : bool
        Memory-map uncompressed files (lazy). ``False`` reads the voxels into memory.

    Returns
    -------
    NiftiVolume
        Data in display orientation with its napari geometry and the original header.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a NIfTI file, truncated or corrupt, a header declaring more voxels than the file
        holds (checked before any voxel memory is allocated; a ``.nii.gz`` is streamed and
        memory grows only with the bytes really in it), complex or colour voxels, a NaN/Inf
        affine, or ``as_labels=True`` on non-integral data.
    """
    path = Path(path)
    _require_file(path, "NIfTI")
    img = _load_header(path, mmap=mmap)
    # every size in the header is checked against the file before memory is allocated
    _check_header(path, img)
    if _is_gzip(path):
        raw = _read_gz_stored(path, img)
    else:
        try:
            raw = img.dataobj.get_unscaled()
        except Exception as exc:  # OS errors from a corrupt file
            raise ValueError(
                f"cannot read the voxels of {path}: {exc!r}. The file is truncated or corrupt."
            ) from exc
    return volume_from_image(img, raw=raw, path=path, as_labels=as_labels)


def volume_from_image(
    img: nib.Nifti1Image | nib.Nifti2Image,
    *,
    raw: np.ndarray | None = None,
    path: str | os.PathLike[str] | None = None,
    as_labels: bool | None = None,
) -> NiftiVolume:
    """Put an in-memory nibabel image into the display convention (see :func:`read_nifti`).

    ``raw`` is the unscaled stored array (``img.dataobj.get_unscaled()`` when omitted).
    """
    header = img.header.copy()
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(affine, path or "<in-memory image>")
    if raw is None:
        raw = np.asanyarray(
            img.dataobj.get_unscaled() if nib.is_proxy(img.dataobj) else img.dataobj
        )
    file_shape = tuple(int(s) for s in img.shape)
    # nibabel moves scl_slope/scl_inter from the loaded header into the array proxy
    slope, inter = _slope_inter(img)
    scaled = slope != 1.0 or inter != 0.0
    # scaling is applied last, lazily (see _scale_lazily): the stored array is only viewed here
    data = raw

    # drop trailing singleton extra axes ((X, Y, Z, 1) is 3D); pad 2D to 3 spatial axes
    n_keep = len(file_shape)
    while n_keep > 3 and file_shape[n_keep - 1] == 1:
        n_keep -= 1
    data = np.reshape(data, file_shape[:n_keep]) if n_keep != len(file_shape) else data
    flat_2d = data.ndim < 3
    spatial_shape = tuple(file_shape[:3]) + (1,) * (3 - min(3, len(file_shape)))
    data = np.reshape(data, spatial_shape) if flat_2d else data

    ornt_file = _safe_io_orientation(affine)
    transform = ornt_transform(ornt_file, axcodes2ornt(tuple(DISPLAY_ORIENTATION)))
    data = apply_orientation(data, transform)
    n_extra = data.ndim - 3
    if n_extra:
        data = np.moveaxis(data, tuple(range(3, data.ndim)), tuple(range(n_extra)))

    # display index (z, y, x) -> RAS, then -> display world
    disp_to_ras = affine @ inv_ornt_aff(transform, spatial_shape)
    world = np.eye(4)
    world[:3, :3] = RAS_TO_DISPLAY @ disp_to_ras[:3, :3]
    world[:3, 3] = RAS_TO_DISPLAY @ disp_to_ras[:3, 3]
    # the display world is in mm whatever the file's spatial unit (micron/meter headers)
    world[:3, :] *= SPACE_UNIT_TO_MM.get(header.get_xyzt_units()[0], 1.0)
    spacing = np.linalg.norm(world[:3, :3], axis=0)
    spacing = np.where(spacing > 0, spacing, 1.0)
    off_axis = np.abs(world[:3, :3] - np.diag(np.diag(world[:3, :3]))) / spacing[None, :]
    oblique = bool(off_axis.max() > OBLIQUE_TOLERANCE) or bool(np.any(np.diag(world[:3, :3]) <= 0))
    translate = world[:3, 3].copy()

    squeezed: int | None = None
    if flat_2d:
        # the padded third file axis became this display axis
        squeezed = int(transform[2, 0])
        data = np.squeeze(data, axis=n_extra + squeezed)
        keep = [i for i in range(3) if i != squeezed]
        spacing_out, translate_out = spacing[keep], translate[keep]
    else:
        spacing_out, translate_out = spacing, translate

    where = str(path) if path is not None else "<in memory>"
    axcodes = "".join(c or "?" for c in aff2axcodes(affine))
    if oblique:
        msg = (
            f"{where} has an oblique affine (orientation closest to {axcodes}); it is shown "
            "without its rotation (voxel 0 and spacing exact). The true affine is kept in "
            "layer.metadata['nifti']['affine'] and used when saving."
        )
        logger.warning(msg)
        warnings.warn(msg, ObliqueAffineWarning, stacklevel=3)

    if scaled:
        data = _scale_lazily(data, slope, inter)
    is_labels = decide_labels(
        data,
        path=path,
        intent_says_labels=int(header["intent_code"]) in LABEL_INTENTS,
        as_labels=as_labels,
    )
    if is_labels and (data.dtype.kind not in "iu" or not data.dtype.isnative):
        # labels are edited in place by napari: a native integer array in memory
        data = np.asarray(data)
        data = data.astype(
            minimal_label_dtype(data)
            if data.dtype.kind not in "iu"
            else data.dtype.newbyteorder("=")
        )

    space_unit, time_unit = header.get_xyzt_units()
    zooms = header.get_zooms()
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    metadata: dict[str, Any] = {
        "path": None if path is None else str(path),
        "affine": affine,
        "header": header,
        "nifti_version": 2 if isinstance(header, nib.Nifti2Header) else 1,
        "orientation": axcodes,
        "display_orientation": DISPLAY_ORIENTATION,
        "transform": np.asarray(transform, dtype=float),
        "file_shape": file_shape,
        "display_shape": tuple(int(s) for s in data.shape),
        "squeezed_axis": squeezed,
        "dtype": str(raw.dtype),
        "scl_slope": float(slope),
        "scl_inter": float(inter),
        "qform_code": int(qcode),
        "sform_code": int(scode),
        "qform": None if qform is None else np.asarray(qform),
        "sform": None if sform is None else np.asarray(sform),
        "xyzt_units": (space_unit, time_unit),
        "time_step": float(zooms[3]) if len(zooms) > 3 else None,
        "intent_code": int(header["intent_code"]),
        "oblique": oblique,
        "display_world_affine": world,
        "spacing_zyx": tuple(float(s) for s in spacing_out),
        "translate_zyx": tuple(float(t) for t in translate_out),
        "is_labels": is_labels,
    }
    return NiftiVolume(
        data=data,
        spacing_zyx=metadata["spacing_zyx"],
        translate_zyx=metadata["translate_zyx"],
        affine=affine,
        header=header,
        is_labels=is_labels,
        orientation=axcodes,
        oblique=oblique,
        path=None if path is None else Path(path),
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------- writing
def write_nifti(
    path: str | os.PathLike[str],
    data_zyx: Any,
    reference_meta: dict[str, Any] | None = None,
    *,
    is_labels: bool = True,
    spacing_zyx: tuple[float, ...] | None = None,
    translate_zyx: tuple[float, ...] | None = None,
) -> Path:
    """Write a displayed array back to NIfTI.

    Parameters
    ----------
    path : str or path-like
        Target; ``.nii.gz`` (default, appended when the name has no NIfTI suffix) or ``.nii``.
    data_zyx : array-like
        Array in display orientation, of the shape :func:`read_nifti` gave for the reference
        (``(Z, Y, X)``, ``(T, Z, Y, X)``, ...).
    reference_meta : dict or None
        ``NiftiVolume.metadata`` / ``layer.metadata["nifti"]`` of the volume the data belongs
        to: the data are written in its ORIGINAL orientation with its affine, qform/sform codes,
        units and other header fields. ``None``: a new RAS file is made from ``spacing_zyx`` and
        ``translate_zyx`` under the display convention (qform/sform code 1, mm).
    is_labels : bool
        Labels are stored in the smallest integer dtype holding their values, intent ``label``;
        images keep their dtype (bool -> uint8) without intensity scaling.
    spacing_zyx, translate_zyx : tuple of float, optional
        napari ``scale``/``translate`` of the spatial axes; only used without a reference.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ValueError
        Shape does not match the reference, non-integral labels, or an unsupported suffix.
    """
    path = Path(path)
    if not is_nifti_path(path):
        path = path.with_name(path.name + ".nii.gz")
    data = np.asarray(data_zyx)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if is_labels:
        data = data.astype(minimal_label_dtype(data), copy=False)
    elif data.dtype.kind not in "iuf":
        raise ValueError(f"cannot write an image of dtype {data.dtype} to NIfTI ({path})")

    if reference_meta is not None:
        img = _image_like_reference(data, reference_meta, is_labels=is_labels, path=path)
    else:
        img = _image_from_display(data, spacing_zyx, translate_zyx, is_labels=is_labels)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    logger.info("wrote %s %s %s", path, img.shape, img.get_data_dtype())
    return path


def display_to_file_array(data_zyx: np.ndarray, reference_meta: dict[str, Any]) -> np.ndarray:
    """Undo the display reorientation: an array of the displayed shape in the file's voxel order.

    Raises ``ValueError`` when the shape differs from ``reference_meta["display_shape"]``.
    """
    data = np.asarray(data_zyx)
    display_shape = tuple(reference_meta["display_shape"])
    if (
        reference_meta.get("squeezed_axis") is not None
        and data.shape == (1, *display_shape)
        and len(display_shape) == 2
    ):
        data = data[0]  # a 2-D file segmented as a one-slice stack (NiftiVolume.stack_zyx)
    if data.shape != display_shape:
        raise ValueError(
            f"data of shape {data.shape} does not match the displayed shape {display_shape} of "
            f"{reference_meta.get('path') or 'the reference volume'}: cannot write it with that "
            "geometry. Save layers that were drawn on this volume, or pass no reference."
        )
    file_shape = tuple(reference_meta["file_shape"])
    squeezed = reference_meta.get("squeezed_axis")
    n_extra = len(display_shape) - (2 if squeezed is not None else 3)
    if n_extra:
        data = np.moveaxis(
            data, tuple(range(n_extra)), tuple(range(data.ndim - n_extra, data.ndim))
        )
    if squeezed is not None:
        data = np.expand_dims(data, squeezed)
    file_ornt = _safe_io_orientation(np.asarray(reference_meta["affine"], dtype=np.float64))
    inverse = ornt_transform(axcodes2ornt(tuple(DISPLAY_ORIENTATION)), file_ornt)
    data = apply_orientation(data, inverse)
    return np.reshape(data, file_shape)


# ------------------------------------------------------------------------------------- internals
def _load_header(path: Path, mmap: bool = True) -> nib.Nifti1Image | nib.Nifti2Image:
    try:
        img = nib.load(path, mmap=mmap)
    except Exception as exc:  # ImageFileError, HeaderDataError, OSError, EOFError, zlib.error
        raise ValueError(
            f"{path} is not a readable NIfTI file ({type(exc).__name__}: {exc}). Check that it "
            "is a complete .nii/.nii.gz file."
        ) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path} is a {type(img).__name__}, not a NIfTI-1/2 image")
    return img


def scaled_dtype(stored: np.dtype, slope: float, inter: float) -> np.dtype:
    """dtype of ``stored * slope + inter`` values (NIfTI ``scl_slope``/``scl_inter``).

    Integer stored data with a whole-number slope and intercept (DICOM-converted CT: int16,
    slope 1, intercept -1024) stay integers: the smallest integer dtype holding every possible
    value (int16 + -1024 needs int32). Otherwise float32 (float64 for float64 data).
    """
    stored = np.dtype(stored)
    if stored.kind in "iu" and float(slope).is_integer() and float(inter).is_integer():
        info = np.iinfo(stored)
        ends = [int(info.min) * int(slope) + int(inter), int(info.max) * int(slope) + int(inter)]
        lo, hi = min(ends), max(ends)
        ladder = (
            (np.uint8, np.uint16, np.uint32, np.uint64)
            if lo >= 0
            else (np.int8, np.int16, np.int32, np.int64)
        )
        for dtype in ladder:
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return np.dtype(dtype)
    return np.dtype(np.float64 if stored == np.float64 else np.float32)


def _scale_lazily(data: Any, slope: float, inter: float) -> Any:
    """``data * slope + inter`` as a dask array computed one 2D slice at a time on access.

    ``data`` (the stored values, already in display order) may be a view of nibabel's memory
    map: nothing is read until a slice is asked for. Values equal nibabel's ``get_fdata``.
    """
    import dask.array as da

    out = scaled_dtype(data.dtype, slope, inter)
    s, i = out.type(slope), out.type(inter)

    def scale(block: np.ndarray) -> np.ndarray:
        return block.astype(out) * s + i

    chunks = (1,) * max(data.ndim - 2, 0) + tuple(data.shape[-2:])
    # name=False: a random graph name, so dask does not hash (read) the whole array; the view
    # wrapper has no ``copy``, which dask would otherwise call (reading the whole array)
    lazy = da.from_array(_SliceView(data), chunks=chunks, name=False, asarray=True)
    return lazy.map_blocks(scale, dtype=out)


class _SliceView:
    """Read-only window on an array (a memory map): only what is indexed gets read."""

    def __init__(self, array: Any) -> None:
        self._array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.ndim = array.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array[key])


def _nbytes(img: nib.Nifti1Image | nib.Nifti2Image) -> int:
    # Python integers: a NIfTI-2 header's 64-bit dims must not wrap around into a small number
    return math.prod(int(s) for s in img.shape) * img.get_data_dtype().itemsize


def _slope_inter(img: nib.Nifti1Image | nib.Nifti2Image) -> tuple[float, float]:
    """Effective intensity scaling (1, 0 when the file has none)."""
    if nib.is_proxy(img.dataobj):
        slope, inter = img.dataobj.slope, img.dataobj.inter
    else:
        slope, inter = img.header.get_slope_inter()
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def _min_offset(img: nib.Nifti1Image | nib.Nifti2Image) -> int:
    header = img.header
    base = 540 if isinstance(header, nib.Nifti2Header) else 348
    return base + 4 + sum(ext.get_sizeondisk() for ext in header.extensions)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _safe_io_orientation(affine: np.ndarray) -> np.ndarray:
    ornt = io_orientation(affine)
    if np.any(np.isnan(ornt)):
        logger.warning("degenerate affine %s: treating the voxel axes as RAS", affine.tolist())
        ornt = axcodes2ornt(("R", "A", "S"))
    return ornt


def _image_like_reference(
    data: np.ndarray, ref: dict[str, Any], *, is_labels: bool, path: Path
) -> nib.Nifti1Image | nib.Nifti2Image:
    arr = display_to_file_array(data, ref)
    header = ref["header"].copy()
    if tuple(header.get_data_shape()) != arr.shape:
        header.set_data_shape(arr.shape)
    slope, inter = float(ref.get("scl_slope", 1.0)), float(ref.get("scl_inter", 0.0))
    stored = np.dtype(ref["dtype"])
    if not is_labels and (slope, inter) != (1.0, 0.0) and arr.dtype.kind in "iuf":
        # re-quantise to the stored dtype when that reproduces every value (unchanged image)
        requant = _requantize(arr, stored, slope, inter)
        if requant is not None:
            arr = requant
        else:
            slope, inter = 1.0, 0.0
    else:
        slope, inter = 1.0, 0.0
    header.set_data_dtype(arr.dtype)
    header.set_slope_inter(np.nan, np.nan)
    if is_labels:
        header["cal_min"] = 0
        header["cal_max"] = 0
        header.set_intent("label", allow_unknown=True)
    elif int(header["intent_code"]) in LABEL_INTENTS:
        header.set_intent("none")
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(arr, None, header=header)
    if (slope, inter) != (1.0, 0.0):
        # non-nan scaling in the header: nibabel writes ``arr`` (the stored values) unscaled
        img.header.set_slope_inter(slope, inter)
    # the header's qform/sform fields are copied verbatim: the affine round-trips bit for bit
    return img


def _requantize(arr: np.ndarray, stored: np.dtype, slope: float, inter: float) -> np.ndarray | None:
    if stored.kind not in "iu":
        return None
    raw = np.rint((arr.astype(np.float64) - inter) / slope)
    info = np.iinfo(stored)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        return None
    raw = raw.astype(stored)
    back = raw.astype(arr.dtype) * arr.dtype.type(slope) + arr.dtype.type(inter)
    return raw if np.array_equal(back, arr) else None


def _image_from_display(
    data: np.ndarray,
    spacing_zyx: tuple[float, ...] | None,
    translate_zyx: tuple[float, ...] | None,
    *,
    is_labels: bool,
) -> nib.Nifti1Image:
    n_spatial = min(3, data.ndim)
    spacing = (
        np.ones(n_spatial) if spacing_zyx is None else np.asarray(spacing_zyx, float)[-n_spatial:]
    )
    origin = (
        np.zeros(n_spatial)
        if translate_zyx is None
        else np.asarray(translate_zyx, float)[-n_spatial:]
    )
    arr = data
    if data.ndim == 2:  # one axial slice
        arr = data[None]
        spacing = np.concatenate([[1.0], spacing])
        origin = np.concatenate([[0.0], origin])
    n_extra = arr.ndim - 3
    if n_extra:  # leading time/channel axes go after the spatial ones
        arr = np.moveaxis(arr, tuple(range(n_extra)), tuple(range(3, arr.ndim)))
    world = np.eye(4)
    world[:3, :3] = np.diag(spacing)
    world[:3, 3] = origin
    to_ras = np.eye(4)
    to_ras[:3, :3] = RAS_TO_DISPLAY.T
    img = nib.Nifti1Image(arr, to_ras @ world)
    img = nib.as_closest_canonical(img)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.set_data_dtype(arr.dtype)
    if is_labels:
        img.header.set_intent("label", allow_unknown=True)
    return img
