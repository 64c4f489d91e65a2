"""File formats, headless (no napari, no Qt, no torch): NIfTI, TIFF stacks, video, label export.

Frames and conventions: docs/ARCHITECTURE.md. Submodules are imported on first use so that
``import napari_masam.io`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FORMATS": ".formats",
    "kind_of": ".formats",
    "suffixes_for": ".formats",
    "atomic_path": "._common",
    "save_labels_like": ".formats",
    "NiftiVolume": ".nifti",
    "read_nifti": ".nifti",
    "write_nifti": ".nifti",
    "DISPLAY_ORIENTATION": ".nifti",
    "VideoReader": ".video",
    "VideoWriter": ".video",
    "read_video": ".video",
    "as_dask_array": ".video",
    "blend_labels": ".video",
    "write_overlay_mp4": ".video",
    "iter_write_overlay_mp4": ".video",
    "TiffStack": ".tiff",
    "read_tiff_stack": ".tiff",
    "write_tiff_stack": ".tiff",
    "write_png_masks": ".export",
    "iter_write_png_masks": ".export",
    "read_png_masks": ".export",
    "write_labels_tiff": ".export",
    "make_ct_phantom": ".sample_data",
    "head_mri_path": ".sample_data",
    "sample_video_path": ".sample_data",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
