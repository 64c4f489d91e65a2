"""napari reader contribution: NIfTI volumes, TIFF stacks and videos through napari-masam's core.

``napari_get_reader(path)`` returns a reader function for files it can open, and None otherwise,
as npe2's reader contract asks. Which files are ours is decided by THE table of file kinds
(:func:`napari_masam.io.formats.kind_of`, also the source of ``napari.yaml``'s patterns).

The reason for a refusal reaches the person: napari itself only says "refused the file" or
"returned no data", so whenever we decline a file that is ours by name (a header claiming more
voxels than the file holds, complex or colour voxels, a NaN affine, a truncated file) the message
is shown as a napari error notification as well as logged. The reader functions do the same when
the voxels turn out to be unreadable, and return None.

Layers carry ``metadata["physical_unit"]``: ``"mm"`` when ``scale`` is in millimetres (NIfTI;
TIFF with a physical unit, converted), None when sizes are only pixels (videos, TIFF without
a physical unit): the widget shows volumes in mL only for ``"mm"``.

No torch, Qt or napari import at module level: napari imports this module at start-up.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io.formats import kind_of, stem_of

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[str | list[str]], list[LayerData] | None]

#: The napari plugin name, for the reader preference (see :func:`prefer_our_reader`).
PLUGIN_NAME = "napari-masam"

#: Patterns for which napari-masam asks napari to use it without a question, when the user has
#: not chosen a reader for them yet: NIfTI only (napari's built-in reader cannot read NIfTI;
#: TIFF and videos it can, so those stay the user's choice).
PREFERRED_PATTERNS: tuple[str, ...] = ("*.nii.gz", "*.nii")


def napari_get_reader(path: str | os.PathLike[str] | list[str]) -> ReaderFunction | None:
    """Return a reader for one NIfTI / TIFF / video file (by :func:`kind_of`), else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            logger.info("napari-masam reads one file at a time, got %d", len(path))
            return None
        path = path[0]
    path = str(path)
    kind = kind_of(path)
    if kind is None:
        return None
    prefer_our_reader()
    try:
        if kind == "nifti":
            from .io.nifti import check_nifti_file

            check_nifti_file(path)
            return read_nifti_layers
        if kind == "tiff":
            import tifffile

            try:
                with tifffile.TiffFile(path) as tf:
                    if not tf.series:
                        raise ValueError("it holds no image series")
            except (tifffile.TiffFileError, OSError) as exc:
                raise ValueError(f"it is not a readable TIFF file ({exc})") from exc
            return read_tiff_layers
        from .io.video import probe_video

        probe_video(path)
        return read_video_layers
    except Exception as exc:  # napari's contract: None for files we cannot handle
        tell_user(f"napari-masam cannot open {Path(path).name}: {exc}")
        return None


def tell_user(message: str, *, error: bool = True) -> None:
    """Log ``message`` and show it as a napari notification when napari is there.

    napari only says that a reader "refused the file"; this is how our reason gets to the
    person. Without napari (scripts, the CLI) it is only logged.
    """
    logger.warning("%s", message)
    try:
        from napari.utils.notifications import show_error, show_warning
    except ImportError:  # headless use: the log is enough
        return
    (show_error if error else show_warning)(message)


def prefer_our_reader() -> None:
    """Ask napari to open ``*.nii.gz``/``*.nii`` with napari-masam without asking which reader.

    napari's built-in reader also claims these patterns (it cannot read them), so napari asks
    on the first open, and its "remember" box would store the choice for every ``*.gz`` file.
    This writes napari's own reader preference (``settings.plugins.extension2reader``, the
    same setting the dialog and *Preferences > Plugins* write) for :data:`PREFERRED_PATTERNS`
    only, and never where the user has already chosen a reader for a pattern. Runs when
    napari-masam is activated (the npe2 ``on_activate`` hook: opening its widget, a sample or
    a file with it) and whenever the reader is asked; when napari is not imported (scripts,
    ``npe2.read``, the CLI) it does nothing. napari offers no way to state this preference in a
    manifest, so the very first NIfTI opened in a fresh napari before anything of napari-masam
    was used can still show napari's question once.
    """
    if "napari" not in sys.modules:  # a script or the CLI: never touch napari's settings
        return
    try:
        from napari.settings import get_settings

        plugins = get_settings().plugins
        current = dict(plugins.extension2reader)
        missing = {p: PLUGIN_NAME for p in PREFERRED_PATTERNS if p not in current}
        if missing:
            plugins.extension2reader = {**current, **missing}
    except Exception as exc:  # settings are a convenience: never break reading over them
        logger.info("could not set napari's reader preference: %s", exc)


def activate(context: Any = None) -> None:
    """npe2 ``on_activate`` hook: set the NIfTI reader preference (see
    :func:`prefer_our_reader`)."""
    prefer_our_reader()


def read_nifti_layers(
    path: str | list[str], as_labels: bool | None = None
) -> list[LayerData] | None:
    """Read a NIfTI file into one Image or Labels layer (geometry in ``metadata["nifti"]``)."""
    from .io.nifti import read_nifti

    path = _single(path)
    try:
        vol = read_nifti(path, as_labels=as_labels)
    except (OSError, ValueError) as exc:
        tell_user(f"napari-masam cannot read {Path(path).name}: {exc}")
        return None
    n_lead = vol.data.ndim - len(vol.spacing_zyx)
    spatial = (
        ("z", "y", "x")[-len(vol.spacing_zyx) :] if len(vol.spacing_zyx) < 3 else ("z", "y", "x")
    )
    kwargs: dict[str, Any] = {
        "name": stem_of(path),
        "scale": vol.scale,
        "translate": vol.translate,
        "metadata": {"nifti": vol.metadata, "physical_unit": "mm"},
        "axis_labels": tuple(f"axis{i}" for i in range(n_lead)) + spatial,
        "units": ("pixel",) * n_lead + ("mm",) * len(vol.spacing_zyx),
    }
    if n_lead == 1 and vol.metadata.get("time_step"):
        kwargs["axis_labels"] = ("t", *spatial)
    return [(vol.data, kwargs, "labels" if vol.is_labels else "image")]


def read_tiff_layers(
    path: str | list[str], as_labels: bool | None = None
) -> list[LayerData] | None:
    """Read the first series of a TIFF file into an Image (RGB if it has samples) or Labels.

    ``scale`` is in mm with napari ``units`` "mm" when the file has a physical unit (microns
    and inches converted), else 1 per axis in "pixel" (see :mod:`napari_masam.io.tiff`).
    """
    from .io.tiff import read_tiff_stack

    path = _single(path)
    try:
        stack = read_tiff_stack(path, as_labels=as_labels)
    except (OSError, ValueError) as exc:
        tell_user(f"napari-masam cannot read {Path(path).name}: {exc}")
        return None
    spatial_axes = stack.axes[:-1] if stack.is_rgb else stack.axes
    spatial_axes = spatial_axes[: len(stack.spacing)]
    physical = stack.physical_unit is not None
    kwargs: dict[str, Any] = {
        "name": stem_of(path),
        "scale": stack.spacing,
        "metadata": {"tiff": stack.metadata, "physical_unit": stack.physical_unit},
        "units": tuple("mm" if physical and ax in "ZYX" else "pixel" for ax in spatial_axes),
        "axis_labels": tuple(ax.lower() for ax in spatial_axes),
    }
    if stack.is_rgb:
        kwargs["rgb"] = True
    return [(stack.data, kwargs, "labels" if stack.is_labels else "image")]


def read_video_layers(path: str | list[str]) -> list[LayerData] | None:
    """Open a video lazily as an RGB Image layer ``(T, H, W, 3)`` backed by a VideoReader."""
    from .io.video import VideoReader, as_dask_array

    path = _single(path)
    try:
        reader = VideoReader(path)
    except (OSError, ValueError) as exc:
        tell_user(f"napari-masam cannot read {Path(path).name}: {exc}")
        return None
    kwargs: dict[str, Any] = {
        "name": Path(path).stem,
        "rgb": True,
        "contrast_limits": (0, 255),
        "metadata": {"video": reader.metadata, "physical_unit": None},
        "axis_labels": ("t", "y", "x"),
    }
    return [(as_dask_array(reader), kwargs, "image")]


def _single(path: str | list[str]) -> str:
    return str(path[0] if isinstance(path, list | tuple) else path)
