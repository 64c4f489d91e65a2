"""napari layers <-> arrays for the segmentation widget.

Everything here is numpy + napari layer objects; no torch and no Qt widgets. The functions are
small on purpose so that the widget stays a thin shell and the tests can check each step against
an independent computation.

Frames: an image layer's data is turned into the engine's *stack* (axis 0 = slice/frame, see
``docs/ARCHITECTURE.md``); a 2D image becomes a one-slice stack. Labels layers made here share
the image layer's ``scale``/``translate`` so that they overlay it exactly; so does the prompts
Shapes layer, which makes the rectangles' data coordinates equal the image's pixel indices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Layer, Shapes

logger = logging.getLogger(__name__)

#: Commit policies for writing a result into an existing Labels layer (widget choices).
COMMIT_POLICIES: dict[str, str] = {
    # re-running object/class k replaces the old k voxels; every other label is kept
    "keep": "replace these labels, keep others",
    "overwrite": "overwrite",
    "empty": "only empty voxels",
}

#: Name of the Labels layer the widget streams results into.
PREVIEW_LAYER_NAME = "MA-SAM preview"
#: Name of the Shapes layer holding box prompts.
PROMPTS_LAYER_NAME = "prompts"
#: Feature column of the prompts layer: the object id of each rectangle.
OBJECT_FEATURE = "object_id"

#: Colours for object ids in box mode and for classes without a colour in the checkpoint: the
#: package palette, so object ``k``'s rectangle has the colour of label ``k``.
from .palette import PALETTE as OBJECT_PALETTE  # noqa: E402


def object_color(obj_id: int) -> str:
    """``#rrggbb`` colour of object ``obj_id`` (1-based) in box mode; cycles the palette."""
    return OBJECT_PALETTE[(max(int(obj_id), 1) - 1) % len(OBJECT_PALETTE)]


@dataclass(frozen=True)
class LayerStack:
    """An image layer seen as the engine's stack.

    Attributes
    ----------
    stack : array-like
        ``(Z, Y, X)`` grey or ``(T, H, W, 3)`` RGB; may be lazy (dask, video reader): it is read
        in the worker thread, never here.
    labels_shape : tuple of int
        Shape of a Labels layer that overlays the image (the layer's own dimensions: ``(Y, X)``
        for a 2D image, ``(Z, Y, X)`` otherwise).
    is_rgb : bool
        RGB(A) image or video.
    is_2d : bool
        The image is a single 2D picture; ``stack`` has one slice.
    scale, translate : tuple of float
        The image layer's scale and translate over ``labels_shape``'s axes (mm for NIfTI).
    """

    stack: Any
    labels_shape: tuple[int, ...]
    is_rgb: bool
    is_2d: bool
    scale: tuple[float, ...]
    translate: tuple[float, ...]

    @property
    def n_slices(self) -> int:
        """Number of slices/frames Z of ``stack``."""
        return 1 if self.is_2d else int(self.labels_shape[0])

    @property
    def is_volume(self) -> bool:
        """A grey 3D stack (a volume, where a volume table in mL makes sense)."""
        return not self.is_rgb and not self.is_2d

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size along (Z, Y, X) from the layer scale (mm for NIfTI; 1 for a 2D image's Z)."""
        if self.is_2d:
            return (1.0, float(self.scale[0]), float(self.scale[1]))
        return tuple(float(s) for s in self.scale[-3:])  # type: ignore[return-value]


def stack_from_layer(layer: Any) -> LayerStack:
    """Describe an image layer as the engine's stack without reading its pixels.

    Parameters
    ----------
    layer : napari.layers.Image
        Grey 2D ``(Y, X)`` or 3D ``(Z, Y, X)``, or RGB(A) ``(H, W, 3|4)`` / ``(T, H, W, 3|4)``
        (``layer.rgb``). Multiscale layers use their full-resolution level.

    Returns
    -------
    LayerStack

    Raises
    ------
    TypeError
        If ``layer`` is not an image layer.
    ValueError
        If the image has more than 3 non-channel dimensions.
    """
    from napari.layers import Image

    if not isinstance(layer, Image):
        kind = type(layer).__name__
        raise TypeError(
            f"Layer {getattr(layer, 'name', layer)!r} is a {kind} layer; choose an Image layer "
            "(a volume, a video or an RGB picture) to segment."
        )
    data = layer.data[0] if layer.multiscale else layer.data
    rgb = bool(layer.rgb)
    n_spatial = data.ndim - (1 if rgb else 0)
    if n_spatial not in (2, 3):
        raise ValueError(
            f"Image layer {layer.name!r} has shape {tuple(data.shape)}: napari-masam segments 2D "
            "images, (Z, Y, X) volumes and (T, H, W[, 3]) videos. Split channels or time points "
            "first (right-click the layer > Split Stack) and pick one of the parts."
        )
    if rgb and data.shape[-1] == 4:
        data = data[..., :3]  # drop alpha; lazy for dask/zarr
    is_2d = n_spatial == 2
    stack = np.asarray(data)[np.newaxis] if is_2d else data
    labels_shape = tuple(int(s) for s in data.shape[:n_spatial])
    scale = tuple(float(s) for s in layer.scale[-n_spatial:])
    translate = tuple(float(t) for t in layer.translate[-n_spatial:])
    return LayerStack(stack, labels_shape, rgb, is_2d, scale, translate)


def class_colormap(class_colors: Sequence[str], default: str = "#ffffff") -> Any:
    """A napari ``DirectLabelColormap``: 0 transparent, label ``i`` -> ``class_colors[i-1]``.

    Parameters
    ----------
    class_colors : sequence of str
        Colours of labels 1..C (any napari colour string, e.g. ``"#rrggbb"``).
    default : str
        Colour of label values not in the table (e.g. later objects).
    """
    from napari.utils.colormaps import DirectLabelColormap

    color_dict: dict[int | None, Any] = {None: default, 0: "transparent"}
    for value, color in enumerate(class_colors, start=1):
        color_dict[value] = color
    return DirectLabelColormap(color_dict=color_dict)


def set_label_classes(
    layer: Labels, class_names: Sequence[str], class_colors: Sequence[str]
) -> None:
    """Name and colour the classes of a Labels layer.

    After this the status bar shows ``class_name: liver`` under the cursor and the colours are
    the checkpoint's. Colours missing in ``class_colors`` come from :data:`OBJECT_PALETTE`.

    Parameters
    ----------
    layer : napari.layers.Labels
    class_names : sequence of str
        Name of label ``i`` is ``class_names[i - 1]``; 0 is ``"background"``.
    class_colors : sequence of str
        ``#rrggbb`` per class (may be shorter than ``class_names``).
    """
    import pandas as pd

    names = [str(n) for n in class_names]
    colors = [
        str(class_colors[i]) if i < len(class_colors) else object_color(i + 1)
        for i in range(len(names))
    ]
    layer.colormap = class_colormap(colors)
    layer.features = pd.DataFrame(
        {
            "index": np.arange(len(names) + 1),
            "class_name": ["background", *names],
            "color": ["transparent", *colors],
        }
    )
    layer.metadata["class_names"] = tuple(names)
    layer.metadata["class_colors"] = tuple(colors)


@dataclass(frozen=True)
class VolumeRow:
    """One line of the per-class volume table."""

    label: int
    name: str
    voxels: int
    volume_ml: float


def volume_table(
    labels: np.ndarray, spacing_zyx: Sequence[float], class_names: Sequence[str] = ()
) -> list[VolumeRow]:
    """Per-label voxel counts and volumes in millilitres.

    Parameters
    ----------
    labels : ndarray
        ``(Z, Y, X)`` integer labels, 0 = background.
    spacing_zyx : sequence of 3 float
        Voxel size in mm along (Z, Y, X) (the image layer's scale for NIfTI).
    class_names : sequence of str
        Name of label ``i`` is ``class_names[i - 1]``; unnamed labels are called ``"label i"``.

    Returns
    -------
    list of VolumeRow
        One row per non-zero label present, sorted by label value; 1 mL = 1000 mm^3.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return []
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False))
    voxel_ml = float(np.prod(np.asarray(spacing_zyx, dtype=np.float64))) / 1000.0
    rows = []
    for value in np.flatnonzero(counts):
        if value == 0:
            continue
        name = class_names[value - 1] if 0 < value <= len(class_names) else f"label {value}"
        rows.append(VolumeRow(int(value), str(name), int(counts[value]), counts[value] * voxel_ml))
    return rows


def new_labels_layer(
    viewer: napari.Viewer, like: LayerStack, name: str, dtype: np.dtype | type = np.uint8
) -> Labels:
    """Add an all-zero Labels layer that overlays the image described by ``like``."""
    data = np.zeros(like.labels_shape, dtype=dtype)
    return viewer.add_labels(data, name=name, scale=like.scale, translate=like.translate)


#: layer.metadata keys that describe the source file's geometry (the writers' input)
GEOMETRY_KEYS = ("nifti",)


def copy_geometry(source: Layer, target: Layer) -> None:
    """Give ``target`` the source file's geometry record of ``source`` (e.g. the NIfTI header),
    so that saving ``target`` writes it on the original grid, orientation and header."""
    for key in GEOMETRY_KEYS:
        if key in source.metadata:
            target.metadata[key] = source.metadata[key]


def write_slice(
    layer: Labels, slice_index: int, labels_slice: np.ndarray, *, is_2d: bool, dims: Any = None
) -> None:
    """Put one finished slice into a (preview) Labels layer without history; refresh if shown.

    Only the slice is written; the view is refreshed only when that slice is on screen (or the
    view is 3D), so streaming costs one small texture update per visible slice.

    Parameters
    ----------
    layer : napari.layers.Labels
        ``(Z, Y, X)`` (or ``(Y, X)`` when ``is_2d``) numpy-backed labels.
    slice_index : int
        Slice/frame index along axis 0 of the stack.
    labels_slice : ndarray
        ``(Y, X)`` integer labels of that slice.
    is_2d : bool
        The layer is 2D (a one-slice stack).
    dims : napari.components.Dims, optional
        ``viewer.dims``; without it the layer is always refreshed.
    """
    values = np.asarray(labels_slice)
    if is_2d:
        layer.data[...] = values
        layer.refresh()
        return
    layer.data[slice_index] = values
    if dims is None or slice_on_screen(layer, slice_index, dims):
        layer.refresh()


def slice_on_screen(layer: Any, slice_index: int, dims: Any) -> bool:
    """Whether axis-0 index ``slice_index`` of ``layer`` is drawn with the viewer's ``dims``."""
    first_axis = dims.ndim - layer.ndim  # the layer's axis 0 in the viewer's world axes
    if first_axis in dims.displayed:
        return True  # 3D view, or axis 0 shown in-plane
    point = np.asarray(dims.point, dtype=float)[first_axis:]
    return int(np.round(layer.world_to_data(point)[0])) == int(slice_index)


def merge_slice(
    target: np.ndarray, result: np.ndarray, policy: str, result_values: Iterable[int]
) -> np.ndarray:
    """New contents of one slice of a target layer after committing ``result`` into it.

    Parameters
    ----------
    target : ndarray
        ``(Y, X)`` current labels of the user's layer.
    result : ndarray
        ``(Y, X)`` labels from the run (0 = background).
    policy : {"keep", "overwrite", "empty"}
        ``"overwrite"``: voxels of ``result_values`` are cleared, then every result foreground
        voxel is written (other labels lose the overlap). ``"keep"``: voxels of
        ``result_values`` are cleared, then result foreground is written only where the target
        is then background (other labels are kept). ``"empty"``: result foreground is written
        only where the target is background; nothing is removed.
    result_values : iterable of int
        Label values the run produced (its classes/objects): their old voxels are replaced.

    Returns
    -------
    ndarray
        ``(Y, X)`` of ``target.dtype``.
    """
    if policy not in COMMIT_POLICIES:
        raise ValueError(
            f"Unknown commit policy {policy!r}; choose one of {', '.join(COMMIT_POLICIES)}."
        )
    new = np.array(target, copy=True)
    fg = result != 0
    if policy in ("keep", "overwrite"):
        values = np.fromiter((int(v) for v in result_values), dtype=np.int64)
        if values.size:
            new[np.isin(new, values)] = 0
    write = fg if policy == "overwrite" else fg & (new == 0)
    new[write] = result[write].astype(new.dtype, copy=False)
    return new


def commit_labels(
    target: Labels,
    result: np.ndarray,
    policy: str,
    *,
    slices: Iterable[int] | None = None,
    is_2d: bool = False,
) -> int:
    """Write a result into a user's Labels layer as ONE undoable step (Ctrl+Z restores it).

    Parameters
    ----------
    target : napari.layers.Labels
        The user's layer, shape ``(Z, Y, X)`` (``(Y, X)`` when ``is_2d``).
    result : ndarray
        Labels of the same shape (the preview layer's data).
    policy : {"keep", "overwrite", "empty"}
        See :func:`merge_slice`.
    slices : iterable of int, optional
        Slice indices the run processed (only those are touched); default: all slices.
    is_2d : bool
        The layers are 2D.

    Returns
    -------
    int
        Number of voxels that changed.

    Raises
    ------
    ValueError
        On a shape mismatch, an unknown policy or label values the target dtype cannot hold.
    """
    result = np.asarray(result)
    if tuple(target.data.shape) != tuple(result.shape):
        raise ValueError(
            f"Cannot commit: target layer {target.name!r} has shape {tuple(target.data.shape)} "
            f"but the result has {tuple(result.shape)}. Pick a Labels layer made for this image "
            "or commit to a new layer."
        )
    if policy not in COMMIT_POLICIES:
        raise ValueError(
            f"Unknown commit policy {policy!r}; choose one of {', '.join(COMMIT_POLICIES)}."
        )
    values = np.unique(result)
    values = values[values != 0]
    dtype = np.dtype(target.data.dtype)
    if values.size and np.issubdtype(dtype, np.integer) and int(values.max()) > np.iinfo(dtype).max:
        raise ValueError(
            f"Label {int(values.max())} does not fit layer {target.name!r} ({dtype}); convert the "
            "layer to a wider type or commit to a new layer."
        )
    targets_3d = result[np.newaxis] if is_2d else result
    z_range = range(targets_3d.shape[0]) if slices is None else sorted(set(int(z) for z in slices))
    changed_total = 0
    with target.block_history():  # all slices form one undo item
        for z in z_range:
            current = np.asarray(target.data if is_2d else target.data[z])
            new = merge_slice(current, targets_3d[z], policy, values)
            rows, cols = np.nonzero(new != current)
            if rows.size == 0:
                continue
            index = (rows, cols) if is_2d else (np.full(rows.shape, z, dtype=np.intp), rows, cols)
            target.data_setitem(index, new[rows, cols], refresh=False)
            changed_total += int(rows.size)
    target.refresh()
    return changed_total


def create_prompts_layer(
    viewer: napari.Viewer, image_layer: Image, name: str = PROMPTS_LAYER_NAME, object_id: int = 1
) -> Shapes:
    """Add a Shapes layer for box prompts that overlays ``image_layer`` exactly.

    The layer copies the image's spatial ``scale`` and ``translate`` (and its affine, if any),
    so rectangle vertices in the layer's data frame are the image's pixel indices
    ``(slice, row, col)``. New rectangles get the feature :data:`OBJECT_FEATURE` = ``object_id``
    (change it with :func:`set_current_object`). The layer is selected in rectangle mode.
    """
    info = stack_from_layer(image_layer)
    ndim = len(info.labels_shape)
    kwargs: dict[str, Any] = {}
    affine = np.asarray(image_layer.affine.affine_matrix)
    if not np.allclose(affine, np.eye(affine.shape[0])):
        kwargs["affine"] = affine[-(ndim + 1) :, -(ndim + 1) :]
    layer = viewer.add_shapes(
        ndim=ndim,
        name=name,
        scale=info.scale,
        translate=info.translate,
        face_color="transparent",
        edge_color=object_color(object_id),
        edge_width=max(1.0, 0.006 * max(info.labels_shape[-2:])),
        features={OBJECT_FEATURE: np.zeros(0, dtype=int)},
        feature_defaults={OBJECT_FEATURE: int(object_id)},
        **kwargs,
    )
    layer.metadata["napari_masam_prompts_for"] = image_layer.name
    viewer.layers.selection.active = layer
    layer.mode = "add_rectangle"
    return layer


def set_current_object(layer: Shapes, object_id: int) -> None:
    """Make rectangles drawn next in ``layer`` belong to object ``object_id`` (and its colour)."""
    defaults = layer.feature_defaults
    if OBJECT_FEATURE in getattr(defaults, "columns", ()):
        layer.feature_defaults = {OBJECT_FEATURE: int(object_id)}
    layer.current_edge_color = object_color(object_id)


def rectangles_in_image_frame(
    shapes_layer: Shapes, image_layer: Image
) -> tuple[list[np.ndarray], list[str], list[int]]:
    """Rectangles of a Shapes layer as vertices in the image layer's pixel frame.

    Vertices go data(shapes) -> world -> data(image), so a prompts layer with another scale or
    translate still maps to the right pixels. For a 2D image a leading slice coordinate 0 is
    added, so the result is always ``(slice, row, col)``.

    Returns
    -------
    vertices : list of ndarray
        One ``(4, 3)`` float array ``(slice, row, col)`` per rectangle (other shape types are
        skipped and logged).
    shape_types : list of str
        ``"rectangle"`` for each kept shape.
    object_ids : list of int
        From the :data:`OBJECT_FEATURE` feature when present, else ``1, 2, ...`` per rectangle.
    """
    info = stack_from_layer(image_layer)
    features = shapes_layer.features
    has_ids = OBJECT_FEATURE in getattr(features, "columns", ())
    vertices: list[np.ndarray] = []
    types: list[str] = []
    ids: list[int] = []
    for i, (data, kind) in enumerate(zip(shapes_layer.data, shapes_layer.shape_type, strict=True)):
        if kind != "rectangle":
            logger.info(
                "prompts layer %r: skipping %s shape %d (only rectangles are boxes)",
                shapes_layer.name,
                kind,
                i,
            )
            continue
        world = np.array([shapes_layer.data_to_world(v) for v in np.asarray(data, dtype=float)])
        img = np.array([image_layer.world_to_data(w) for w in world], dtype=float)
        img = img[:, -len(info.labels_shape) :]
        if info.is_2d:
            img = np.concatenate([np.zeros((img.shape[0], 1)), img], axis=1)
        vertices.append(img)
        types.append("rectangle")
        ids.append(int(features[OBJECT_FEATURE].iloc[i]) if has_ids else len(ids) + 1)
    return vertices, types, ids


def class_info_or_default(
    class_names: Sequence[str] | None, class_colors: Sequence[str] | None, values: Iterable[int]
) -> tuple[list[str], list[str]]:
    """Names and colours for labels ``1..max(values)``; unnamed ones become ``object i``."""
    top = max([0, *[int(v) for v in values]])
    names = list(class_names or ())
    colors = list(class_colors or ())
    n = max(top, len(names))
    names += [f"object {i}" for i in range(len(names) + 1, n + 1)]
    colors += [object_color(i) for i in range(len(colors) + 1, n + 1)]
    return names[:n], colors[:n]
