"""Export of video labels ``(T, H, W)``: per-frame PNG masks, a TIFF stack, an overlay mp4.

The PNG folder follows the EndoVis challenge layout: one lossless PNG per frame named
``frame000.png``, ``frame001.png``, ... (at least three digits) holding the label value of every
pixel (8-bit when all labels are below 256, else 16-bit), plus ``labels.json`` with the class
names when given. Nothing goes through JPEG or any lossy step.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._common import minimal_label_dtype
from .tiff import write_tiff_stack
from .video import blend_labels, iter_write_overlay_mp4, label_colors, write_overlay_mp4

logger = logging.getLogger(__name__)

__all__ = [
    "blend_labels",
    "iter_write_overlay_mp4",
    "iter_write_png_masks",
    "label_colors",
    "read_png_masks",
    "write_labels_tiff",
    "write_overlay_mp4",
    "write_png_masks",
]

_FRAME_RE = re.compile(r"^frame(\d+)\.png$")


def iter_write_png_masks(
    labels: Any,
    folder: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    start_index: int = 0,
) -> Iterator[int]:
    """Write ``(T, H, W)`` labels as one PNG per frame; yields frames done, returns the paths.

    Parameters
    ----------
    labels : (T, H, W) integer array-like
        0 = background.
    folder : str or path-like
        Created if needed; existing ``frame*.png`` files of the same names are overwritten.
    class_names : sequence of str, optional
        Written to ``labels.json`` as ``{"0": "background", "1": ...}``.
    start_index : int
        Number of the first frame's file (EndoVis counts from 0).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    digits = max(3, len(str(start_index + n - 1)))
    import imageio.v3 as iio

    # one dtype for the whole folder, so every file reads back the same
    dtype = np.dtype(np.uint8)
    for t in range(n):
        d = minimal_label_dtype(np.asarray(labels[t]))
        if d.kind == "i" or d.itemsize > 2:
            raise ValueError(
                f"frame {t}: PNG masks hold labels 0..65535; got dtype {d}. Use a TIFF stack."
            )
        dtype = max(dtype, d, key=lambda x: x.itemsize)
    paths = []
    for t in range(n):
        p = folder / f"frame{start_index + t:0{digits}d}.png"
        iio.imwrite(p, np.asarray(labels[t]).astype(dtype), extension=".png")
        paths.append(p)
        yield t + 1
    if class_names is not None:
        (folder / "labels.json").write_text(
            json.dumps({str(i): name for i, name in enumerate(class_names)}, indent=1)
        )
    logger.info("wrote %d PNG masks to %s", n, folder)
    return paths


def write_png_masks(labels: Any, folder: str | os.PathLike[str], **kwargs: Any) -> list[Path]:
    """Run :func:`iter_write_png_masks` to the end; return the written files."""
    gen = iter_write_png_masks(labels, folder, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def read_png_masks(folder: str | os.PathLike[str]) -> np.ndarray:
    """Read a folder written by :func:`write_png_masks` back into ``(T, H, W)`` labels."""
    import imageio.v3 as iio

    folder = Path(folder)
    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FRAME_RE.match(p.name)))
    if not files:
        raise ValueError(f"no frameNNN.png masks in {folder}")
    return np.stack([iio.imread(p) for _, p in files])


def write_labels_tiff(
    labels: Any,
    path: str | os.PathLike[str],
    *,
    axes: str | None = None,
    spacing: tuple[float, ...] | None = None,
) -> Path:
    """``(T, H, W)`` (or ``(Z, Y, X)``) labels as a lossless TIFF stack in the smallest dtype."""
    arr = np.asarray(labels)
    if axes is None and arr.ndim == 3:
        axes = "TYX"
    return write_tiff_stack(path, arr, axes=axes, spacing=spacing, is_labels=True)
