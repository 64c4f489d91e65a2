"""napari writer contributions (npe2 single-layer signature ``(path, data, meta) -> list[str]``).

Labels go to NIfTI (``.nii.gz`` default, ``.nii``) or TIFF; images to NIfTI. When the layer
carries ``metadata["nifti"]`` (every layer read by napari-masam's reader, and layers derived from
one), the file is written in the ORIGINAL orientation with the original affine, qform/sform codes
and units; otherwise a RAS file is built from the layer's ``scale``/``translate`` under the
display convention of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a Labels layer; returns the written path(s)."""
    return _write(path, data, meta, is_labels=True)


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save an Image layer as NIfTI; returns the written path(s)."""
    if meta.get("rgb"):
        raise ValueError(
            f"cannot save the RGB image {meta.get('name')!r} as NIfTI ({path}); save it as "
            "PNG/TIFF with napari's built-in writer"
        )
    return _write(path, data, meta, is_labels=False)


def _write(path: str, data: Any, meta: dict[str, Any], *, is_labels: bool) -> list[str]:
    import numpy as np

    from .io.nifti import is_nifti_path, write_nifti
    from .io.tiff import is_tiff_path, write_tiff_stack

    data = np.asarray(data)
    metadata = meta.get("metadata") or {}
    scale = meta.get("scale")
    translate = meta.get("translate")
    if is_tiff_path(path):
        if not is_labels:
            raise ValueError(f"napari-masam writes images as NIfTI only, not {path}")
        out = write_tiff_stack(
            path, data, spacing=None if scale is None else tuple(scale), is_labels=True
        )
        return [str(out)]
    if not is_nifti_path(path) and Path(path).suffix:
        raise ValueError(f"napari-masam cannot write {Path(path).suffix!r} files ({path})")
    reference = metadata.get("nifti")
    if reference is not None and tuple(reference.get("display_shape", ())) != data.shape:
        logger.warning(
            "layer %r has shape %s but its NIfTI reference %s; writing with the layer's "
            "scale/translate instead",
            meta.get("name"),
            data.shape,
            reference.get("display_shape"),
        )
        reference = None
    out = write_nifti(
        path,
        data,
        reference,
        is_labels=is_labels,
        spacing_zyx=None if scale is None else tuple(scale),
        translate_zyx=None if translate is None else tuple(translate),
    )
    return [str(out)]
