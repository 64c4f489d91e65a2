"""THE table of file kinds: which file-name endings napari-masam reads, and as what.

Every place that decides "what is this file?" from its name goes through :func:`kind_of`: the
napari reader (and the reader patterns of ``napari.yaml``, which a test checks against
:data:`FORMATS`), the batch CLI and the training data loader. Matching is on the END of the file
name, case-insensitive, longest suffix first (``.nii.gz`` before ``.gz``, ``.ome.tif`` before
``.tif``).

One video list for everything: every suffix in :data:`FORMATS` with kind ``"video"`` was checked
to decode frame-accurately with :class:`napari_masam.io.video.VideoReader` (PyAV/FFmpeg):
``.mp4 .m4v .mov .avi .mkv .webm .mpg .mpeg .wmv``.

:func:`save_labels_like` is the matching way out: labels drawn over an image are written in
that image's format and grid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The kinds of input napari-masam understands.
KINDS: tuple[str, ...] = ("nifti", "tiff", "video")

#: File-name ending (lower case, with the dot) -> kind. Compound endings are listed whole.
FORMATS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".ome.tiff": "tiff",
    ".ome.tif": "tiff",
    ".tiff": "tiff",
    ".tif": "tiff",
    ".mp4": "video",
    ".m4v": "video",
    ".mov": "video",
    ".avi": "video",
    ".mkv": "video",
    ".webm": "video",
    ".mpg": "video",
    ".mpeg": "video",
    ".wmv": "video",
}

# longest first, so that a compound ending wins over its tail
_BY_LENGTH = tuple(sorted(FORMATS, key=len, reverse=True))


def suffixes_for(kind: str) -> tuple[str, ...]:
    """The file-name endings of one kind, longest first (e.g. ``(".nii.gz", ".nii")``).

    Raises ``ValueError`` for an unknown kind (see :data:`KINDS`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown file kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return tuple(s for s in _BY_LENGTH if FORMATS[s] == kind)


def suffix_of(path: str | os.PathLike[str]) -> str | None:
    """The ending of :data:`FORMATS` that ``path``'s file name has (lower case), or None."""
    name = Path(path).name.lower()
    for suffix in _BY_LENGTH:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def kind_of(path: str | os.PathLike[str]) -> str | None:
    """``"nifti"``, ``"tiff"`` or ``"video"`` from the file name, or None when not an input.

    Only the name is looked at (no file access); whether the content is readable is the
    format reader's business.
    """
    suffix = suffix_of(path)
    return None if suffix is None else FORMATS[suffix]


def stem_of(path: str | os.PathLike[str]) -> str:
    """File name without its :data:`FORMATS` ending (``case01.nii.gz`` -> ``case01``);
    other names lose their last suffix (``notes.txt`` -> ``notes``)."""
    name = Path(path).name
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def reader_patterns() -> tuple[str, ...]:
    """The ``filename_patterns`` the napari manifest's reader must declare (``"*.nii.gz"``, ...),
    in table order."""
    return tuple(f"*{suffix}" for suffix in FORMATS)


def save_labels_like(
    path: str | os.PathLike[str],
    labels: Any,
    image_metadata: Mapping[str, Any],
) -> Path:
    """Write labels drawn over an image in that image's format, on its true grid and header.

    The core of "Export" (the widget) and of the napari writer: labels drawn on a NIfTI image
    go to NIfTI in the image's ORIGINAL voxel order, affine (oblique included), qform/sform
    codes and units; labels of a TIFF stack or a video go to a TIFF with the image's spacing
    (mm when physical, else pixels).

    Parameters
    ----------
    path : str or path-like
        Target. Its ending chooses the format (``.nii.gz``/``.nii`` or ``.tif``/``.tiff``);
        without a known ending the image's own format is used and its ending appended
        (``.nii.gz`` for NIfTI images, ``.tif`` otherwise).
    labels : array-like of int
        Labels on the image's DISPLAY grid: the shape of the image layer's data without RGB
        samples, ``(Z, Y, X)``, ``(T, H, W)``, ... (a 2-D NIfTI image also takes ``(1, Y, X)``).
        Stored in the smallest integer dtype holding the values.
    image_metadata : mapping
        ``layer.metadata`` of the image layer as napari-masam's reader made it (``"nifti"``,
        ``"tiff"`` or ``"video"`` entry, ``"physical_unit"``).

    Returns
    -------
    pathlib.Path
        The written file (replaced atomically, permissions from the umask).

    Raises
    ------
    ValueError
        The shape does not match the image's grid; NIfTI asked for an image that is not NIfTI
        (its geometry would be invented); non-integral labels; an unknown ending.
    """
    path = Path(path)
    nifti_ref = image_metadata.get("nifti")
    kind = kind_of(path)
    if kind is None:
        if path.suffix and path.suffix.lower() not in (".gz",):
            raise ValueError(
                f"cannot write labels to {path.name!r}: use .nii.gz/.nii (NIfTI) or .tif/.tiff"
            )
        kind = "nifti" if nifti_ref is not None else "tiff"
        path = path.with_name(path.name + (".nii.gz" if kind == "nifti" else ".tif"))
    if kind == "nifti":
        from .nifti import write_nifti

        if nifti_ref is None:
            raise ValueError(
                f"cannot write {path.name} as NIfTI: the image the labels belong to was not read "
                "from a NIfTI file, so there is no true geometry to write. Save as .tif instead."
            )
        return write_nifti(path, labels, nifti_ref, is_labels=True)
    if kind == "tiff":
        import numpy as np

        from .tiff import write_tiff_stack

        arr = np.asarray(labels)
        tiff_meta = image_metadata.get("tiff") or {}
        spacing = tiff_meta.get("spacing")
        if nifti_ref is not None:
            spacing = tuple(nifti_ref.get("spacing_zyx") or ())
        unit = "mm" if image_metadata.get("physical_unit") == "mm" else "pixel"
        if spacing is not None and len(spacing) < arr.ndim:
            spacing = (1.0,) * (arr.ndim - len(spacing)) + tuple(spacing)
        if spacing is not None and len(spacing) != arr.ndim:
            spacing = None
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(arr.ndim)
        if image_metadata.get("video") is not None and arr.ndim == 3:
            axes = "TYX"
        return write_tiff_stack(
            path,
            arr,
            axes=axes,
            spacing=None if spacing is None else tuple(float(s) for s in spacing),
            unit=unit,
            is_labels=True,
        )
    raise ValueError(f"cannot write labels as {kind} ({path.name}); use .nii.gz or .tif")
