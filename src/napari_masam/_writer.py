"""napari writer contributions (npe2 single-layer signature ``(path, data, meta) -> list[str]``).

Labels go to NIfTI (``.nii.gz`` default, ``.nii``) or TIFF; images to NIfTI. The geometry is
never invented when it exists:

- a layer carrying ``metadata["nifti"]`` (every layer read by napari-masam's reader, and layers
  derived from one) is written in the ORIGINAL orientation with the original affine (oblique
  included), qform/sform codes and units;
- a layer without it (napari's own *New Layer > Labels* over an image) is written on the grid
  of the NIfTI image it was drawn over: the image layer of the current viewer with
  ``metadata["nifti"]`` and the same shape, ``scale`` and ``translate``. When NIfTI images are
  open but none matches (or several different ones do), the layer is refused with a message
  saying why, instead of being written with a made-up straight affine;
- only a layer unrelated to any open NIfTI image is written as a new RAS file from its
  ``scale``/``translate`` under the display convention of docs/ARCHITECTURE.md.

Refusals are raised as ``ValueError`` with the reason and shown as a napari notification (napari
itself turns a writer's ValueError into "No data written!").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a Labels layer; returns the written path(s)."""
    return _write(path, data, meta, is_labels=True)


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save an Image layer as NIfTI; returns the written path(s)."""
    if meta.get("rgb"):
        raise _refuse(
            f"cannot save the RGB image {meta.get('name')!r} as NIfTI ({path}); save it as "
            "PNG/TIFF with napari's built-in writer"
        )
    return _write(path, data, meta, is_labels=False)


def _write(path: str, data: Any, meta: dict[str, Any], *, is_labels: bool) -> list[str]:
    from .io.formats import kind_of, save_labels_like
    from .io.nifti import write_nifti
    from .io.tiff import write_tiff_stack

    data = np.asarray(data)
    metadata = dict(meta.get("metadata") or {})
    scale = meta.get("scale")
    translate = meta.get("translate")
    kind = kind_of(path)
    if kind == "tiff":
        if not is_labels:
            raise _refuse(f"napari-masam writes images as NIfTI only, not {path}")
        if metadata.get("tiff") is not None or metadata.get("video") is not None:
            return [str(save_labels_like(path, data, metadata))]
        unit = "mm" if metadata.get("physical_unit", "mm") == "mm" else "pixel"
        out = write_tiff_stack(
            path,
            data,
            spacing=None if scale is None else tuple(scale),
            unit=unit,
            is_labels=True,
        )
        return [str(out)]
    frames_image = metadata.get("tiff") is not None or metadata.get("video") is not None
    no_ending = kind is None and not Path(path).suffix
    if no_ending and is_labels and frames_image and metadata.get("nifti") is None:
        # no ending typed: labels of a TIFF stack or a video go to TIFF like their image
        return [str(save_labels_like(path, data, metadata))]
    if kind not in (None, "nifti") or (kind is None and Path(path).suffix):
        raise _refuse(f"napari-masam cannot write {Path(path).name!r}; use .nii.gz, .nii or .tif")
    reference = metadata.get("nifti")
    if reference is not None and not _fits(reference, data.shape):
        logger.info(
            "layer %r has shape %s but its NIfTI reference %s; looking for its image",
            meta.get("name"),
            data.shape,
            reference.get("display_shape"),
        )
        reference = None
    try:
        if reference is None:
            reference = _reference_from_viewer(data.shape, meta)
        out = write_nifti(
            path,
            data,
            reference,
            is_labels=is_labels,
            spacing_zyx=None if scale is None else tuple(scale),
            translate_zyx=None if translate is None else tuple(translate),
        )
    except ValueError as exc:
        raise _refuse(str(exc)) from exc
    return [str(out)]


def _fits(reference: dict[str, Any], shape: tuple[int, ...]) -> bool:
    display = tuple(reference.get("display_shape", ()))
    if shape == display:
        return True
    # a 2-D file segmented as a one-slice stack
    return reference.get("squeezed_axis") is not None and shape == (1, *display)


def _reference_from_viewer(shape: tuple[int, ...], meta: dict[str, Any]) -> dict[str, Any] | None:
    """``metadata["nifti"]`` of the NIfTI image a header-less layer was drawn over, or None
    when no NIfTI layer is open; raises ``ValueError`` when NIfTI layers are open but none (or
    more than one different one) sits on the layer's grid."""
    try:
        import napari
    except ImportError:
        return None
    viewer = napari.current_viewer()
    if viewer is None:
        return None
    scale = np.asarray(meta.get("scale") if meta.get("scale") is not None else np.ones(len(shape)))
    translate = np.asarray(
        meta.get("translate") if meta.get("translate") is not None else np.zeros(len(shape))
    )
    nifti_layers = [
        layer
        for layer in viewer.layers
        if isinstance(getattr(layer, "metadata", None), dict) and layer.metadata.get("nifti")
    ]
    if not nifti_layers:
        return None
    matches = []
    for layer in nifti_layers:
        ref = layer.metadata["nifti"]
        if (
            _fits(ref, shape)
            and len(layer.scale) == len(scale)
            and np.allclose(layer.scale, scale, rtol=1e-6, atol=1e-9)
            and np.allclose(layer.translate, translate, rtol=1e-6, atol=1e-6)
        ):
            matches.append(layer)
    distinct = {id(m.metadata["nifti"]["header"]): m for m in matches}
    by_geometry = {}
    for m in distinct.values():
        ref = m.metadata["nifti"]
        key = (np.asarray(ref["affine"]).round(6).tobytes(), tuple(ref["file_shape"]))
        by_geometry.setdefault(key, m)
    name = str(meta.get("name") or "")
    if len(by_geometry) > 1:
        # New Labels names its layer "<image> - Labels": that image decides
        named = [m for m in by_geometry.values() if name.startswith(m.name)]
        if len(named) == 1:
            return named[0].metadata["nifti"]
        raise ValueError(
            f"layer {name!r} sits on the grid of several NIfTI images with different headers "
            f"({', '.join(repr(m.name) for m in by_geometry.values())}); napari-masam cannot tell "
            "which one it belongs to. Use the Segment widget's Export with the image chosen."
        )
    if by_geometry:
        (match,) = by_geometry.values()
        logger.info("writing %r on the grid of image %r", name, match.name)
        return match.metadata["nifti"]
    raise ValueError(
        f"layer {name!r} (shape {tuple(shape)}, scale {tuple(np.round(scale, 4))}, translate "
        f"{tuple(np.round(translate, 3))}) does not lie on the grid of any NIfTI image open in "
        f"the viewer ({', '.join(repr(m.name) for m in nifti_layers)}), so its position in the "
        "patient cannot be written truthfully. Make the labels with the image selected "
        "(Layer > New Labels), or save as .tif."
    )


def _refuse(message: str) -> ValueError:
    # napari swallows a writer's ValueError (it reads it as "no writer found" and warns "No data
    # written!"), so the reason is also shown as a notification
    from ._reader import tell_user

    tell_user(message)
    return ValueError(message)
