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

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Layer, Points, Shapes

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
    units : tuple of str
        The image layer's ``units`` over the same axes (``"millimeter"``, ``"pixel"``, ...); layers
        made over the image get them too, so napari never sees inconsistent units.
    """

    stack: Any
    labels_shape: tuple[int, ...]
    is_rgb: bool
    is_2d: bool
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    units: tuple[str, ...] = ()

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
    units = tuple(str(u) for u in tuple(getattr(layer, "units", ()) or ())[-n_spatial:])
    return LayerStack(stack, labels_shape, rgb, is_2d, scale, translate, units)


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


def import_labels_dependencies() -> None:
    """Import what napari imports lazily when the first Labels layer of a session is made.

    napari's Labels layer imports pandas (its features table) and scikit-image's colour module
    (its label colormap) on first use: 376 modules, 0.2-0.5 s on the GUI thread, measured at the
    first Run's preview creation (benchmarks/gui_freeze.py). The segmentation widget calls this
    when it opens, so the first Run does not pay it.
    """
    with contextlib.suppress(ImportError):  # napari's own dependencies; it imports them anyway
        import pandas  # noqa: F401
        from skimage.color import colorconv  # noqa: F401


def new_labels_layer(
    viewer: napari.Viewer, like: LayerStack, name: str, dtype: np.dtype | type = np.uint8
) -> Labels:
    """Add an all-zero Labels layer that overlays the image described by ``like`` (same scale,
    translate and units; not made the active layer, so the user's drawing tool stays active)."""
    data = np.zeros(like.labels_shape, dtype=dtype)
    active = viewer.layers.selection.active
    kwargs: dict[str, Any] = {"units": like.units} if like.units else {}
    layer = viewer.add_labels(data, name=name, scale=like.scale, translate=like.translate, **kwargs)
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return layer


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


#: layer.metadata key of a prompts layer: the image layer it belongs to (see bind_prompts)
PROMPTS_IMAGE_KEY = "napari_masam_prompts_for"
#: Shape types that become their bounding box; lines and paths enclose nothing and are refused.
BOX_SHAPE_TYPES = ("rectangle", "ellipse", "polygon")


def image_binding(image_layer: Layer) -> dict[str, str]:
    """What a prompts layer records about its image: the layer's name and napari unique id."""
    return {"name": str(image_layer.name), "id": str(image_layer.unique_id)}


def bind_prompts(shapes_layer: Layer, image_layer: Layer) -> None:
    """Record in ``shapes_layer.metadata`` that its boxes are prompts for ``image_layer``."""
    shapes_layer.metadata[PROMPTS_IMAGE_KEY] = image_binding(image_layer)


def prompts_image(shapes_layer: Layer) -> dict[str, str] | None:
    """The image binding of a prompts layer (``{"name", "id"}``), or None when unbound.

    Layers made before bindings carried ids hold just the image name; that is returned as
    ``{"name": name, "id": ""}``.
    """
    bound = shapes_layer.metadata.get(PROMPTS_IMAGE_KEY)
    if bound is None:
        return None
    if isinstance(bound, str):
        return {"name": bound, "id": ""}
    return {"name": str(bound.get("name", "")), "id": str(bound.get("id", ""))}


def is_bound_to(shapes_layer: Layer, image_layer: Layer) -> bool:
    """Whether ``shapes_layer`` holds prompts for ``image_layer`` (by napari unique id, or by
    name for a binding without id)."""
    bound = prompts_image(shapes_layer)
    if bound is None:
        return False
    if bound["id"]:
        return bound["id"] == str(image_layer.unique_id)
    return bound["name"] == str(image_layer.name)


def create_prompts_layer(
    viewer: napari.Viewer, image_layer: Image, name: str = PROMPTS_LAYER_NAME, object_id: int = 1
) -> Shapes:
    """Add a Shapes layer for box prompts that overlays ``image_layer`` exactly.

    The layer copies the image's spatial ``scale``, ``translate``, ``units`` (and its affine, if
    any), so rectangle vertices in the layer's data frame are the image's pixel indices
    ``(slice, row, col)``; it is bound to the image (:func:`bind_prompts`). New rectangles get
    the feature :data:`OBJECT_FEATURE` = ``object_id`` (change it with
    :func:`set_current_object`). The layer is selected in rectangle mode.
    """
    info = stack_from_layer(image_layer)
    ndim = len(info.labels_shape)
    kwargs: dict[str, Any] = {"units": info.units} if info.units else {}
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
    bind_prompts(layer, image_layer)
    activate_for_drawing(viewer, layer)
    return layer


def activate_for_drawing(viewer: napari.Viewer, shapes_layer: Shapes) -> None:
    """Make ``shapes_layer`` the active layer in rectangle mode: the next drag draws a box."""
    viewer.layers.selection.active = shapes_layer
    shapes_layer.mode = "add_rectangle"


def set_current_object(layer: Shapes, object_id: int, color: str | None = None) -> None:
    """Make rectangles drawn next in ``layer`` belong to object ``object_id`` (and its colour;
    default the palette's)."""
    defaults = layer.feature_defaults
    if OBJECT_FEATURE in getattr(defaults, "columns", ()):
        layer.feature_defaults = {OBJECT_FEATURE: int(object_id)}
    layer.current_edge_color = color or object_color(object_id)


def color_object_shapes(layer: Shapes, object_id: int, color: str) -> None:
    """Give every shape of object ``object_id`` in a prompts layer the edge colour ``color``."""
    if OBJECT_FEATURE not in getattr(layer.features, "columns", ()):
        return
    ids = np.asarray(layer.features[OBJECT_FEATURE], dtype=np.int64)
    if not ids.size:
        return
    from napari.utils.colormaps.standardize_color import transform_color

    edges = np.array(layer.edge_color, dtype=float, copy=True)
    edges[ids == int(object_id)] = transform_color(color)[0]
    layer.edge_color = edges


@dataclass(frozen=True)
class ShapePrompts:
    """Box prompts read from a Shapes layer, in an image's pixel frame.

    Attributes
    ----------
    vertices_rc : list of ndarray
        One ``(n, 3)`` float array ``(slice, row, col)`` per usable shape: the 4 corners of the
        shape's axis-aligned bounding box (an ellipse or polygon becomes its bounding box).
    object_ids : list of int
        Object id of each shape (:data:`OBJECT_FEATURE`, else ``1, 2, ...``).
    skipped : tuple of str
        Shape types that were ignored (lines and paths enclose no region).
    mapped_slice : int or None
        For a 2-D Shapes layer over a volume: the image slice the boxes were put on (the one
        on screen); None otherwise.
    """

    vertices_rc: list[np.ndarray]
    object_ids: list[int]
    skipped: tuple[str, ...] = ()
    mapped_slice: int | None = None


def shapes_in_image_frame(
    shapes_layer: Shapes, image_layer: Image, *, world_point: Sequence[float] | None = None
) -> ShapePrompts:
    """Rectangles, ellipses and polygons of a Shapes layer as boxes in an image's pixel frame.

    This is the one place where prompt vertices go from napari's world to the image's data
    frame: data(shapes) -> world -> data(image), so a prompts layer with another scale,
    translate or affine still maps to the right pixels.

    Parameters
    ----------
    shapes_layer : napari.layers.Shapes
    image_layer : napari.layers.Image
        A 2-D picture, a ``(Z, Y, X)`` volume or a ``(T, H, W[, 3])`` video.
    world_point : sequence of float, optional
        The viewer's current world point (``viewer.dims.point``). Needed only when the Shapes
        layer has fewer spatial dimensions than the image (a 2-D layer over a volume): its
        boxes are then put on the slice on screen, and :attr:`ShapePrompts.mapped_slice` says
        which.

    Returns
    -------
    ShapePrompts

    Raises
    ------
    ValueError
        A 2-D Shapes layer over a volume without ``world_point`` (there is no slice to put the
        boxes on: never guessed).
    """
    info = stack_from_layer(image_layer)
    n_img = len(info.labels_shape)
    n_shapes = int(shapes_layer.ndim)
    features = shapes_layer.features
    has_ids = OBJECT_FEATURE in getattr(features, "columns", ())
    lower_dim = n_shapes < n_img
    if lower_dim and world_point is None:
        raise ValueError(
            f"Shapes layer {shapes_layer.name!r} is {n_shapes}-D but image {image_layer.name!r} "
            f"is {n_img}-D: its boxes belong to no slice. Use 'Add prompts layer' to make a "
            "prompts layer for this image, and draw on the slice you mean."
        )
    vertices: list[np.ndarray] = []
    ids: list[int] = []
    skipped: list[str] = []
    mapped: set[int] = set()
    for i, (data, kind) in enumerate(zip(shapes_layer.data, shapes_layer.shape_type, strict=True)):
        if kind not in BOX_SHAPE_TYPES:
            logger.info("prompts layer %r: skipping %s shape %d", shapes_layer.name, kind, i)
            skipped.append(str(kind))
            continue
        world = np.array([shapes_layer.data_to_world(v) for v in np.asarray(data, dtype=float)])
        if lower_dim:
            # a 2-D layer is drawn on every slice: it means the slice on screen
            point = np.asarray(world_point, dtype=float)
            full = np.repeat(point[np.newaxis], len(world), axis=0)
            full[:, -world.shape[1] :] = world[:, -world.shape[1] :]
            world = full
        img = np.array([image_layer.world_to_data(w) for w in world], dtype=float)
        img = img[:, -n_img:]
        if info.is_2d:
            img = np.concatenate([np.zeros((img.shape[0], 1)), img], axis=1)
        if lower_dim:
            z = int(np.round(img[0, 0]))
            img[:, 0] = z
            mapped.add(z)
        lo, hi = img[:, 1:].min(axis=0), img[:, 1:].max(axis=0)
        z = float(np.round(img[:, 0].mean()))
        corners = np.array(
            [[z, lo[0], lo[1]], [z, lo[0], hi[1]], [z, hi[0], hi[1]], [z, hi[0], lo[1]]]
        )
        vertices.append(corners)
        ids.append(int(features[OBJECT_FEATURE].iloc[i]) if has_ids else len(ids) + 1)
    return ShapePrompts(vertices, ids, tuple(skipped), mapped_slice=min(mapped) if mapped else None)


# ----------------------------------------------------------------------------------------------
# Point prompts (clicks)
# ----------------------------------------------------------------------------------------------
#: Name of the Points layer holding point prompts.
POINT_PROMPTS_LAYER_NAME = "point prompts"
#: Categorical feature of a point prompts layer: what each click says about its pixel.
POINT_PROMPT_FEATURE = "prompt"
POSITIVE_POINT, NEGATIVE_POINT = "positive", "negative"
#: Colours of the two kinds of click (micro-sam and SAM demos use the same green / red).
POINT_PROMPT_COLORS = {POSITIVE_POINT: "#00e000", NEGATIVE_POINT: "#ff2020"}
#: The key (on the point prompts layer) that toggles what the next click adds. napari's own
#: Points keys are 2-5, P, S, Z, A, Delete/Backspace and Ctrl combinations; "T" is a Shapes-only
#: key (path mode), so on a Points layer it is free (micro-sam's annotators use it the same way).
TOGGLE_POINT_KEY = "T"


def create_point_prompts_layer(
    viewer: napari.Viewer, image_layer: Image, name: str = POINT_PROMPTS_LAYER_NAME
) -> Points:
    """Add a Points layer for positive / negative clicks that overlays ``image_layer`` exactly.

    Like :func:`create_prompts_layer`: the image's ``scale``, ``translate``, ``units`` (and
    affine) are copied, so point coordinates in the layer's data frame are the image's pixel
    indices ``(slice, row, col)``, and the layer is bound to the image (:func:`bind_prompts`).
    Each point has the categorical feature :data:`POINT_PROMPT_FEATURE` (``"positive"`` green,
    ``"negative"`` red); new points get ``"positive"`` until :func:`set_next_point_prompt` or
    :func:`toggle_next_point_prompt` changes it. The layer is selected in add mode.
    """
    import pandas as pd

    info = stack_from_layer(image_layer)
    ndim = len(info.labels_shape)
    kwargs: dict[str, Any] = {"units": info.units} if info.units else {}
    affine = np.asarray(image_layer.affine.affine_matrix)
    if not np.allclose(affine, np.eye(affine.shape[0])):
        kwargs["affine"] = affine[-(ndim + 1) :, -(ndim + 1) :]
    # ~2 % of the slice's side, in pixels (napari sizes points in data units), so a click shows
    size = max(2.0, 0.02 * float(max(info.labels_shape[-2:])))
    layer = viewer.add_points(
        ndim=ndim,
        name=name,
        scale=info.scale,
        translate=info.translate,
        size=size,
        features={POINT_PROMPT_FEATURE: pd.Categorical([], categories=list(POINT_PROMPT_COLORS))},
        feature_defaults={POINT_PROMPT_FEATURE: POSITIVE_POINT},
        face_color=POINT_PROMPT_FEATURE,
        face_color_cycle=dict(POINT_PROMPT_COLORS),
        border_color="white",
        **kwargs,
    )
    bind_prompts(layer, image_layer)
    activate_for_clicking(viewer, layer)
    return layer


def activate_for_clicking(viewer: napari.Viewer, points_layer: Points) -> None:
    """Make ``points_layer`` the active layer in add mode: the next click adds a point."""
    viewer.layers.selection.active = points_layer
    points_layer.mode = "add"


def next_point_prompt(points_layer: Points) -> str:
    """``"positive"`` or ``"negative"``: what the next click in ``points_layer`` adds."""
    defaults = points_layer.feature_defaults
    if POINT_PROMPT_FEATURE not in getattr(defaults, "columns", ()):
        return POSITIVE_POINT
    return str(defaults[POINT_PROMPT_FEATURE].iloc[0])


def set_next_point_prompt(points_layer: Points, kind: str) -> None:
    """Make the next clicks in ``points_layer`` add ``kind`` (``"positive"``/``"negative"``).

    Raises
    ------
    ValueError
        For another kind.
    """
    if kind not in POINT_PROMPT_COLORS:
        raise ValueError(
            f"A point prompt is {' or '.join(map(repr, POINT_PROMPT_COLORS))}, not {kind!r}."
        )
    # (not current_face_color: napari applies that to the selected points, i.e. the last
    # click; the face colour follows the feature through the layer's colour cycle)
    points_layer.feature_defaults = {POINT_PROMPT_FEATURE: kind}


def toggle_next_point_prompt(points_layer: Points) -> str:
    """Switch what the next click adds (positive <-> negative); returns the new kind."""
    kind = NEGATIVE_POINT if next_point_prompt(points_layer) == POSITIVE_POINT else POSITIVE_POINT
    set_next_point_prompt(points_layer, kind)
    return kind


@dataclass(frozen=True)
class PointPrompts:
    """Clicks read from a Points layer, in an image's pixel frame.

    Attributes
    ----------
    points_zyx : list of (int, float, float, int)
        ``(slice, row, col, label)`` per point inside the image: pixel indices of the image's
        data (pixel centres at integers), label 1 positive / 0 negative.
    outside : int
        Points that lie outside the image (ignored; the widget says how many).
    mapped_slice : int or None
        For a 2-D Points layer over a volume: the slice the points were put on (the one on
        screen); None otherwise.
    """

    points_zyx: list[tuple[int, float, float, int]]
    outside: int = 0
    mapped_slice: int | None = None


def points_in_image_frame(
    points_layer: Points, image_layer: Image, *, world_point: Sequence[float] | None = None
) -> PointPrompts:
    """The clicks of a Points layer in an image's pixel frame (data -> world -> image data).

    The point-prompt twin of :func:`shapes_in_image_frame` (same frames, same 2-D-over-volume
    rule). A point's kind is its :data:`POINT_PROMPT_FEATURE` (``"negative"`` -> 0, anything
    else -> 1); a Points layer without that feature holds positive clicks only.

    Raises
    ------
    ValueError
        A 2-D Points layer over a volume without ``world_point``.
    """
    info = stack_from_layer(image_layer)
    n_img = len(info.labels_shape)
    n_pts = int(points_layer.ndim)
    lower_dim = n_pts < n_img
    if lower_dim and world_point is None:
        raise ValueError(
            f"Points layer {points_layer.name!r} is {n_pts}-D but image {image_layer.name!r} is "
            f"{n_img}-D: its points belong to no slice. Use 'Add point prompts' to make a point "
            "layer for this image, and click on the slice you mean."
        )
    features = points_layer.features
    kinds = (
        [str(v) for v in features[POINT_PROMPT_FEATURE]]
        if POINT_PROMPT_FEATURE in getattr(features, "columns", ())
        else [POSITIVE_POINT] * len(points_layer.data)
    )
    out: list[tuple[int, float, float, int]] = []
    outside = 0
    mapped: set[int] = set()
    shape_yx = info.labels_shape[-2:]
    n_slices = info.n_slices
    for data, kind in zip(np.asarray(points_layer.data, dtype=float), kinds, strict=True):
        world = np.asarray(points_layer.data_to_world(data), dtype=float)
        if lower_dim:
            full = np.asarray(world_point, dtype=float).copy()
            full[-world.shape[0] :] = world[-world.shape[0] :]
            world = full
        img = np.asarray(image_layer.world_to_data(world), dtype=float)[-n_img:]
        if info.is_2d:
            img = np.concatenate([[0.0], img])
        z = int(np.round(img[0]))
        y, x = float(img[1]), float(img[2])
        if lower_dim:
            mapped.add(z)
        inside = (
            0 <= z < n_slices and -0.5 <= y < shape_yx[0] - 0.5 and -0.5 <= x < shape_yx[1] - 0.5
        )
        if not inside:
            outside += 1
            continue
        out.append((z, y, x, 0 if kind == NEGATIVE_POINT else 1))
    return PointPrompts(out, outside, mapped_slice=min(mapped) if mapped else None)


def assign_points_to_objects(
    points_zyx: Sequence[tuple[int, float, float, int]],
    boxes: dict[int, dict[int, Sequence[float]]],
    default_object: int | None,
) -> tuple[dict[int, dict[int, list[tuple[float, float, int]]]], list[tuple[int, float, float]]]:
    """Each click goes to the object whose box contains it on that slice.

    Parameters
    ----------
    points_zyx : sequence of (slice, row, col, label)
        From :func:`points_in_image_frame`.
    boxes : dict object id -> dict slice -> (x0, y0, x1, y1)
        Inclusive pixel boxes (:mod:`napari_masam.prompts`).
    default_object : int or None
        Object of clicks inside no box (a model that decodes points alone); None: such clicks
        are returned as unassigned.

    Returns
    -------
    assigned : dict object id -> dict slice -> list of (row, col, label)
        The engine's ``points`` argument.
    unassigned : list of (slice, row, col)
        Clicks in no box when ``default_object`` is None.

    Notes
    -----
    A click inside several boxes goes to the box whose centre is nearest (Euclidean, pixels);
    box edges are pixel indices, inclusive, so a click on the edge pixel's outer half still
    counts (``x0 - 0.5 <= x <= x1 + 0.5``).
    """
    assigned: dict[int, dict[int, list[tuple[float, float, int]]]] = {}
    unassigned: list[tuple[int, float, float]] = []
    for z, y, x, label in points_zyx:
        best, best_d = None, float("inf")
        for oid, frames in boxes.items():
            box = frames.get(z)
            if box is None:
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            if x0 - 0.5 <= x <= x1 + 0.5 and y0 - 0.5 <= y <= y1 + 0.5:
                d = ((x - (x0 + x1) / 2) ** 2 + (y - (y0 + y1) / 2) ** 2) ** 0.5
                if d < best_d:
                    best, best_d = oid, d
        if best is None:
            if default_object is None:
                unassigned.append((z, y, x))
                continue
            best = int(default_object)
        assigned.setdefault(int(best), {}).setdefault(int(z), []).append((y, x, int(label)))
    return assigned, unassigned


def rectangles_in_image_frame(
    shapes_layer: Shapes, image_layer: Image
) -> tuple[list[np.ndarray], list[str], list[int]]:
    """Boxes of a Shapes layer as vertices in the image layer's pixel frame.

    Kept for callers of the earlier API: :func:`shapes_in_image_frame` without a world point,
    returned as ``(vertices, ["rectangle", ...], object_ids)``. Ellipses and polygons count as
    their bounding boxes; lines and paths are skipped.
    """
    found = shapes_in_image_frame(shapes_layer, image_layer)
    return found.vertices_rc, ["rectangle"] * len(found.vertices_rc), found.object_ids


def write_objects_slice(
    layer: Labels,
    slice_index: int,
    labels_slice: np.ndarray,
    object_ids: Iterable[int],
    *,
    is_2d: bool,
    dims: Any = None,
) -> None:
    """Replace the voxels of ``object_ids`` on one slice of a preview layer (no history).

    Voxels of other objects stay (so a run that recomputes one object keeps the others); then
    the foreground of ``labels_slice`` is written. Refreshes only when the slice is on screen.

    Parameters
    ----------
    layer : napari.layers.Labels
        ``(Z, Y, X)`` (``(Y, X)`` when ``is_2d``) numpy-backed preview labels.
    slice_index : int
        Slice/frame index along axis 0.
    labels_slice : ndarray
        ``(Y, X)`` labels of the recomputed objects on that slice (0 = background).
    object_ids : iterable of int
        The objects being recomputed: their old voxels on this slice are cleared first.
    """
    values = np.asarray(labels_slice)
    current = layer.data if is_2d else layer.data[slice_index]
    new = np.array(current, copy=True)
    ids = np.fromiter((int(v) for v in object_ids), dtype=np.int64)
    if ids.size:
        new[np.isin(new, ids)] = 0
    fg = values != 0
    new[fg] = values[fg]
    write_slice(layer, slice_index, new, is_2d=is_2d, dims=dims)


def clear_objects(
    layer: Labels, object_ids: Iterable[int], slices: Iterable[int] | None = None
) -> None:
    """Set the voxels of ``object_ids`` to 0 on ``slices`` (default all) of a preview layer."""
    ids = np.fromiter((int(v) for v in object_ids), dtype=np.int64)
    if not ids.size:
        return
    data = layer.data
    if slices is None or data.ndim == 2:
        data[np.isin(data, ids)] = 0
    else:
        for z in sorted({int(z) for z in slices}):
            if 0 <= z < data.shape[0]:
                plane = data[z]
                plane[np.isin(plane, ids)] = 0
    layer.refresh()


def label_classes(layer: Labels) -> dict[int, tuple[str, str]]:
    """Label value -> ``(name, #rrggbb)`` as set by :func:`set_label_classes` (may be empty)."""
    names = layer.metadata.get("class_names", ())
    colors = layer.metadata.get("class_colors", ())
    return {
        i: (str(name), str(colors[i - 1]) if i - 1 < len(colors) else object_color(i))
        for i, name in enumerate(names, start=1)
    }


def merge_label_classes(layer: Labels, classes: dict[int, tuple[str, str]]) -> None:
    """Add or rename classes of a Labels layer, keeping the ones it already has.

    Parameters
    ----------
    layer : napari.layers.Labels
    classes : dict
        Label value -> ``(name, "#rrggbb")``; values not given keep their name and colour (or
        get ``label i`` and the palette colour when they had none).
    """
    merged = label_classes(layer)
    merged.update({int(k): (str(n), str(c)) for k, (n, c) in classes.items()})
    if not merged:
        return
    top = max(merged)
    names = [merged.get(i, (f"label {i}", object_color(i)))[0] for i in range(1, top + 1)]
    colors = [merged.get(i, (f"label {i}", object_color(i)))[1] for i in range(1, top + 1)]
    set_label_classes(layer, names, colors)


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
