"""napari-masam: MA-SAM segmentation of CT, MRI and video, in napari and headless.

Importing this package is cheap: no torch, Qt or napari. The headless API is loaded on first
attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    from ._version import version as __version__
except ImportError:  # running from a source tree without a build
    __version__ = "0.0.0+unknown"

#: public name -> module that defines it (imported lazily)
_LAZY = {
    "MODEL_REGISTRY": ".model.registry",
    "DEFAULT_MODEL": ".model.registry",
    "build_model": ".model.registry",
    "load_model": ".checkpoints",
    "ModelSource": ".checkpoints",
    "SegmentationSession": ".session",
    "iter_segment_automatic": ".inference",
    "iter_segment_boxes": ".inference",
    "iter_propagate": ".propagation",
    "PropagationConfig": ".propagation",
    "load_boxes_file": ".io.boxes",
    "read_nifti": ".io.nifti",
    "write_nifti": ".io.nifti",
    "read_video": ".io.video",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
