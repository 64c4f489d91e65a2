"""Networks: tensors in, tensors out. No napari, no Qt.

The registry is importable without torch (menus list presets at napari start-up); the rest is
loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import DEFAULT_MODEL, MODEL_REGISTRY, ModelPreset, build_model

_LAZY = {
    "DISPLAY_ORIENTATION": ".base",
    "ModelMetadata": ".base",
    "SegmentationModel": ".base",
    "BACKENDS": ".runtime",
    "backend_info": ".runtime",
    "describe_backends": ".runtime",
    "with_backend": ".runtime",
}

__all__ = ["DEFAULT_MODEL", "MODEL_REGISTRY", "ModelPreset", "build_model", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
