"""THE box convention of napari-masam, and every way boxes come in (pure numpy, no napari).

Box convention
--------------
``boxes_xyxy = (x0, y0, x1, y1) = (col_min, row_min, col_max, row_max)``: pixel indices of the
slice (pixel centres at integers, as napari data coordinates and SAM), **both max edges
inclusive**. A box of one pixel is ``(c, r, c, r)``.

Boxes of a stack are ``dict[object_id, dict[slice_index, (x0, y0, x1, y1)]]``: object ids are
positive ints (the label value the object gets), slice indices index axis 0 of the stack.

Clipping rule (one rule, two strengths): where prompts are *made* (napari rectangles, box
files: :func:`clip_boxes_to_stack`), a box sticking out of its slice is cut to it and a box on a
slice outside the stack or wholly outside its slice is dropped with a warning; the engine then
*validates* with :func:`check_boxes_in_stack`: it cuts with the same :func:`clip_box` but raises
for anything the edges would have dropped (never a silent empty result).

Mask -> box is :func:`mask_box` (tight inclusive box of the True pixels), everywhere.

A rectangle drawn in napari covers the pixels whose centres lie inside it: after mapping its
vertices into the image layer's data coordinates, ``col_min = ceil(min col)`` and
``col_max = floor(max col)`` (to 1e-6), so a rectangle from ``-0.5`` to ``9.5`` and one with
corners on the pixel centres ``0`` and ``9`` both give columns 0..9.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
BoxesByObject = dict[int, dict[int, Box]]

_EPS = 1e-6


def round_half_up(value: float) -> int:
    """``floor(value + 0.5)``: THE rounding of box coordinates (2.5 -> 3, -0.5 -> 0).

    Python's ``round`` rounds halves to even (2.5 -> 2, 3.5 -> 4), which would move box edges
    at ``.5`` coordinates by different amounts depending on parity.
    """
    return math.floor(float(value) + 0.5)


# ----------------------------------------------------------------------------------------------
# Boxes on one slice
# ----------------------------------------------------------------------------------------------
def rectangle_to_xyxy(vertices_rc: np.ndarray) -> Box | None:
    """Rectangle vertices (any order, any drawing direction) -> inclusive pixel box.

    Parameters
    ----------
    vertices_rc : ndarray
        (K, 2) (row, col) in the image's data coordinates (pixel centres at integers).

    Returns
    -------
    tuple or None
        ``(col_min, row_min, col_max, row_max)`` of the pixels whose centres lie inside the
        rectangle; a rectangle thinner than a pixel gives the pixel nearest to its middle.
    """
    v = np.asarray(vertices_rc, dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return None
    lo, hi = v.min(axis=0), v.max(axis=0)
    out = []
    for axis in (1, 0):  # cols then rows
        a, b = math.ceil(lo[axis] - _EPS), math.floor(hi[axis] + _EPS)
        if a > b:
            a = b = round_half_up((lo[axis] + hi[axis]) / 2)
        out.append((a, b))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def clip_box(box_xyxy: Sequence[float], shape_yx: Sequence[int]) -> Box | None:
    """Clip an inclusive box to a (Y, X) slice; None when it lies wholly outside.

    Coordinates are rounded half up (:func:`round_half_up`) and ordered (a box drawn from
    bottom-right to top-left is the same box)."""
    x0, y0, x1, y1 = (round_half_up(v) for v in box_xyxy)
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    ny, nx = int(shape_yx[0]), int(shape_yx[1])
    if x1 < 0 or y1 < 0 or x0 > nx - 1 or y0 > ny - 1:
        return None
    return (max(x0, 0), max(y0, 0), min(x1, nx - 1), min(y1, ny - 1))


def mask_box(mask_yx: np.ndarray) -> Box | None:
    """THE mask -> box conversion: the tight inclusive box of a (Y, X) mask's True pixels.

    Parameters
    ----------
    mask_yx : ndarray
        (Y, X) bool (or anything whose non-zero pixels are the object).

    Returns
    -------
    (x0, y0, x1, y1) or None
        ``(col_min, row_min, col_max, row_max)``, None for an empty mask.
    """
    m = np.asarray(mask_yx)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def expand_box(
    box_xyxy: Sequence[float],
    shape_yx: Sequence[int],
    *,
    margin_px: float = 0.0,
    margin_fraction: float = 0.0,
) -> Box:
    """Grow an inclusive box on every side and clip it to a (Y, X) slice.

    Each side moves out by ``max(margin_px, margin_fraction * side length)`` pixels (side
    length = ``x1 - x0 + 1`` for left/right, ``y1 - y0 + 1`` for top/bottom), rounded half up.

    Raises
    ------
    ValueError
        If the grown box lies wholly outside the slice.
    """
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    mx = max(float(margin_px), float(margin_fraction) * (abs(x1 - x0) + 1.0))
    my = max(float(margin_px), float(margin_fraction) * (abs(y1 - y0) + 1.0))
    grown = clip_box(
        (min(x0, x1) - mx, min(y0, y1) - my, max(x0, x1) + mx, max(y0, y1) + my), shape_yx
    )
    if grown is None:
        raise ValueError(f"Box {tuple(box_xyxy)} lies wholly outside a slice of {tuple(shape_yx)}.")
    return grown


# ----------------------------------------------------------------------------------------------
# Keyframes
# ----------------------------------------------------------------------------------------------
def interpolate_keyframes(
    keyframes: Mapping[int, Sequence[float]],
    slice_range: tuple[int, int] | None = None,
) -> dict[int, Box]:
    """Boxes on every slice from boxes drawn on a few (keyframes).

    Parameters
    ----------
    keyframes : mapping int -> xyxy
        Slice index -> inclusive box.
    slice_range : (int, int) or None
        Inclusive ``(first, last)`` slices the object spans. Slices between two keyframes get
        the linear interpolation of the four coordinates (rounded half up); slices of the range
        before the first/after the last keyframe repeat the nearest keyframe. One keyframe plus
        a range is a "3D box". None: only the span between the first and last keyframe.

    Returns
    -------
    dict int -> (x0, y0, x1, y1)
        Integer inclusive boxes, keyframes unchanged.
    """
    if not keyframes:
        return {}
    zs = sorted(int(z) for z in keyframes)
    key = {int(z): np.asarray(b, dtype=np.float64) for z, b in keyframes.items()}
    out: dict[int, Box] = {}

    def as_box(v: np.ndarray) -> Box:
        return (round_half_up(v[0]), round_half_up(v[1]), round_half_up(v[2]), round_half_up(v[3]))

    for a, b in itertools.pairwise(zs):
        for z in range(a, b + 1):
            t = (z - a) / (b - a)
            out[z] = as_box((1 - t) * key[a] + t * key[b])
    for z in zs:
        out[z] = as_box(key[z])
    if slice_range is not None:
        first, last = int(min(slice_range)), int(max(slice_range))
        for z in range(first, zs[0]):
            out[z] = as_box(key[zs[0]])
        for z in range(zs[-1] + 1, last + 1):
            out[z] = as_box(key[zs[-1]])
        out = {z: b for z, b in out.items() if first <= z <= last}
    return dict(sorted(out.items()))


def _object_ids_from_colors(colors: Sequence[Any]) -> list[int]:
    ids: dict[tuple, int] = {}
    out = []
    for c in colors:
        k = tuple(np.round(np.asarray(c, dtype=np.float64).ravel(), 4))
        ids.setdefault(k, len(ids) + 1)
        out.append(ids[k])
    return out


def boxes_from_rectangles(
    rectangles: Sequence[np.ndarray],
    object_ids: Sequence[int] | None = None,
    *,
    image_shape: Sequence[int] | None = None,
    slice_ranges: Mapping[int, tuple[int, int]] | None = None,
    interpolate: bool = True,
    default_slice: int = 0,
) -> BoxesByObject:
    """Rectangles in an image's data coordinates -> per-object, per-slice inclusive pixel boxes.

    Parameters
    ----------
    rectangles : sequence of ndarray
        One (K, 3) ``(slice, row, col)`` or (K, 2) ``(row, col)`` vertex array per rectangle
        (usually K = 4), already in the image's data coordinates (napari world -> data mapping
        is ``napari_masam._layers``' job); (K, 2) rectangles lie on ``default_slice``. Vertices
        with more leading axes use the last three.
    object_ids : sequence of int or None
        Object id (label value, >= 1) of each rectangle; None: one object per rectangle
        (1, 2, ...).
    image_shape : sequence of int or None
        ``(Z, Y, X)`` or ``(Z, Y, X, 3)``: boxes are clipped to the stack with
        :func:`clip_boxes_to_stack` (outside the stack: dropped). None: no clipping.
    slice_ranges : mapping or None
        Object id -> inclusive (first, last) slice range (see :func:`interpolate_keyframes`).
    interpolate : bool
        Interpolate between keyframes of an object; False: the keyframes only (what
        propagation takes).
    default_slice : int

    Returns
    -------
    dict int -> dict int -> (x0, y0, x1, y1)

    Raises
    ------
    ValueError
        If the number of ids differs from the number of rectangles or an id is < 1.

    Notes
    -----
    A rectangle's slice is the rounded mean of its vertices' slice coordinates (a warning when
    they differ by more than half a slice). Several rectangles of one object on the same slice:
    the last one wins (logged).
    """
    n = len(rectangles)
    ids = list(range(1, n + 1)) if object_ids is None else [int(i) for i in object_ids]
    if len(ids) != n:
        raise ValueError(f"Got {len(ids)} object ids for {n} rectangles; pass one per rectangle.")
    keyframes: dict[int, dict[int, Box]] = {}
    for i, vertices in enumerate(rectangles):
        v = np.asarray(vertices, dtype=np.float64)
        if v.ndim != 2 or v.shape[-1] < 2:
            raise ValueError(f"Rectangle {i}: expected (K, 2) or (K, 3) vertices, got {v.shape}.")
        if v.shape[-1] >= 3:
            zs = v[:, -3]
            if not np.all(np.isfinite(zs)):
                continue
            z = round_half_up(np.mean(zs))
            if np.ptp(zs) > 0.5:
                logger.warning("Rectangle %d is not on one slice (z %s); using slice %d.", i, zs, z)
        else:
            z = int(default_slice)
        box = rectangle_to_xyxy(v[:, -2:])
        if box is None:
            continue
        oid = ids[i]
        if oid < 1:
            raise ValueError(f"Object ids must be positive integers (rectangle {i} has id {oid}).")
        if z in keyframes.get(oid, {}):
            logger.info("Object %d has several rectangles on slice %d; the last one wins.", oid, z)
        keyframes.setdefault(oid, {})[z] = box
    out: BoxesByObject = {}
    for oid, frames in keyframes.items():
        rng = None if slice_ranges is None else slice_ranges.get(oid)
        boxes = interpolate_keyframes(frames, rng) if interpolate else dict(sorted(frames.items()))
        if image_shape is not None:
            boxes = clip_boxes_to_stack(boxes, image_shape)
        if boxes:
            out[oid] = boxes
    return dict(sorted(out.items()))


def boxes_from_shapes(
    shapes_data: Sequence[np.ndarray],
    shape_types: Sequence[str] | str | None = None,
    image_layer: Any = None,
    *,
    shapes_layer: Any = None,
    object_ids: Sequence[int] | None = None,
    features: Any = None,
    id_column: str = "object_id",
    colors: Sequence[Any] | None = None,
    image_shape: Sequence[int] | None = None,
    slice_ranges: Mapping[int, tuple[int, int]] | None = None,
    interpolate: bool = True,
    default_slice: int = 0,
) -> BoxesByObject:
    """Shapes-layer rectangles -> boxes; superseded by :func:`boxes_from_rectangles`.

    Kept for callers that still pass a Shapes layer's columns: non-rectangle shapes are skipped
    (``shape_types``), object ids come from ``object_ids``, else ``features[id_column]``, else
    one id per distinct colour of ``colors`` (in order of first use), else one per rectangle;
    the rest is :func:`boxes_from_rectangles`. Vertices must already be in the image's data
    coordinates: world <-> data mapping lives in ``napari_masam._layers``
    (``rectangles_in_image_frame``), so ``image_layer``/``shapes_layer`` are refused.

    Raises
    ------
    TypeError
        If ``image_layer`` or ``shapes_layer`` is given.
    ValueError
        As :func:`boxes_from_rectangles`.
    """
    if image_layer is not None or shapes_layer is not None:
        raise TypeError(
            "boxes_from_shapes no longer maps napari world coordinates: map the rectangles "
            "into the image's data coordinates first (napari_masam._layers."
            "rectangles_in_image_frame) and call boxes_from_rectangles."
        )
    n = len(shapes_data)
    if isinstance(shape_types, str):
        shape_types = [shape_types] * n
    if object_ids is None and features is not None:
        try:
            column = features[id_column]
        except (KeyError, IndexError, TypeError):
            column = None
        if column is not None:
            object_ids = [int(v) for v in np.asarray(column)]
    if object_ids is None and colors is not None and len(colors) == n:
        object_ids = _object_ids_from_colors(colors)
    if object_ids is None:
        object_ids = list(range(1, n + 1))
    if len(object_ids) != n:
        raise ValueError(f"Got {len(object_ids)} object ids for {n} shapes; pass one per shape.")
    keep = [i for i in range(n) if shape_types is None or shape_types[i] == "rectangle"]
    return boxes_from_rectangles(
        [shapes_data[i] for i in keep],
        [object_ids[i] for i in keep],
        image_shape=image_shape,
        slice_ranges=slice_ranges,
        interpolate=interpolate,
        default_slice=default_slice,
    )


def clip_boxes_to_stack(
    boxes: Mapping[int, Sequence[float]], image_shape: Sequence[int]
) -> dict[int, Box]:
    """Clip one object's per-slice boxes to a stack of ``image_shape`` (Z, Y, X[, 3]).

    The lenient half of THE clipping rule (see the module docstring): used where prompts are
    made (napari rectangles, box files). Boxes partly outside a slice are cut to it; slices
    outside ``[0, Z)`` and boxes wholly outside the slice are dropped, with a warning.
    """
    depth, shape_yx = int(image_shape[0]), (int(image_shape[1]), int(image_shape[2]))
    out: dict[int, Box] = {}
    for z, b in boxes.items():
        if not 0 <= int(z) < depth:
            logger.warning("Dropping a box on slice %d outside a stack of %d slices.", z, depth)
            continue
        c = clip_box(b, shape_yx)
        if c is None:
            logger.warning("Dropping a box %s wholly outside the %s slice.", tuple(b), shape_yx)
            continue
        out[int(z)] = c
    return out


def check_boxes_in_stack(
    boxes: Mapping[int, Mapping[int, Sequence[float]]], stack_shape: Sequence[int]
) -> BoxesByObject:
    """The strict half of THE clipping rule: what the engine accepts.

    Parameters
    ----------
    boxes : mapping object id -> mapping slice -> xyxy
    stack_shape : sequence of int
        (Z, Y, X[, ...]) of the stack.

    Returns
    -------
    dict int -> dict int -> (x0, y0, x1, y1)
        Integer boxes, cut to the slice where they stick out (:func:`clip_box`), sorted.

    Raises
    ------
    ValueError
        For an object id < 1, a box that is not 4 numbers, a box on a slice outside the stack
        or a box wholly outside its slice (naming the object, slice and box): the edges that
        make prompts (:func:`clip_boxes_to_stack`) already dropped those with a warning, so one
        reaching the engine is a caller's mistake and must not become a silent empty result.
    """
    depth, shape_yx = int(stack_shape[0]), (int(stack_shape[1]), int(stack_shape[2]))
    out: BoxesByObject = {}
    for oid, frames in boxes.items():
        oid = int(oid)
        if oid < 1:
            raise ValueError(f"Object ids must be positive integers, got {oid}.")
        for z, box in frames.items():
            z = int(z)
            if not 0 <= z < depth:
                raise ValueError(
                    f"Object {oid} has a box on slice {z}, outside the stack's {depth} slices."
                )
            if len(box) != 4:
                raise ValueError(f"Object {oid}, slice {z}: a box has 4 numbers, got {box!r}.")
            clipped = clip_box(box, shape_yx)
            if clipped is None:
                raise ValueError(
                    f"Object {oid}: box {tuple(box)} on slice {z} lies wholly outside the "
                    f"{shape_yx[0]} x {shape_yx[1]} slice (x = column, y = row; are x and y "
                    "swapped?)."
                )
            out.setdefault(oid, {})[z] = clipped
    return {oid: dict(sorted(per.items())) for oid, per in sorted(out.items())}


#: A point prompt of a stack slice: ``(y, x, label)`` = (row, col) pixel indices (pixel centres at
#: integers, fractions allowed) and 1 positive / 0 negative.
Point = tuple[float, float, int]
PointsByObject = dict[int, dict[int, list[Point]]]
#: Point labels: what a click says about the pixel under it.
POSITIVE, NEGATIVE = 1, 0


def check_points_in_stack(
    points: Mapping[Any, Mapping[Any, Sequence[Sequence[float]]]], stack_shape: Sequence[int]
) -> PointsByObject:
    """THE validation of point prompts of a stack (what the engine accepts).

    Parameters
    ----------
    points : mapping object id -> mapping slice -> sequence of (y, x, label)
        (row, col) pixel indices of the stack slice (pixel centres at integers; a point belongs
        to the pixel whose centre is nearest, so -0.5 <= y < Y - 0.5), label 1 = positive
        (part of the object), 0 = negative (not part of it).
    stack_shape : sequence of int
        (Z, Y, X[, ...]) of the stack.

    Returns
    -------
    dict int -> dict int -> list of (float, float, int)
        Sorted by object and slice; empty point lists dropped.

    Raises
    ------
    ValueError
        For an object id < 1, a slice outside the stack, a point that is not three numbers, a
        non-finite coordinate, a point outside its slice or a label other than 0/1 (naming the
        object, slice and point).
    """
    depth, ny, nx = int(stack_shape[0]), int(stack_shape[1]), int(stack_shape[2])
    out: PointsByObject = {}
    for oid, frames in points.items():
        oid = int(oid)
        if oid < 1:
            raise ValueError(f"Object ids must be positive integers, got {oid}.")
        for z, items in frames.items():
            z = int(z)
            if not 0 <= z < depth:
                raise ValueError(
                    f"Object {oid} has points on slice {z}, outside the stack's {depth} slices "
                    f"(0..{depth - 1})."
                )
            kept: list[Point] = []
            for item in items:
                if len(item) != 3:
                    raise ValueError(
                        f"Object {oid}, slice {z}: a point is (y, x, label), got {tuple(item)!r}."
                    )
                y, x, label = float(item[0]), float(item[1]), item[2]
                if not (math.isfinite(y) and math.isfinite(x)):
                    raise ValueError(
                        f"Object {oid}, slice {z}: point {(y, x)} is not finite; give pixel "
                        "(row, col) positions."
                    )
                if not (-0.5 <= y < ny - 0.5 and -0.5 <= x < nx - 0.5):
                    raise ValueError(
                        f"Object {oid}, slice {z}: point (y={y:g}, x={x:g}) lies outside the "
                        f"{ny} x {nx} slice (y = row, x = column; are they swapped?)."
                    )
                if isinstance(label, bool) or label not in (POSITIVE, NEGATIVE):
                    raise ValueError(
                        f"Object {oid}, slice {z}: point label {label!r} must be 1 (positive) "
                        "or 0 (negative)."
                    )
                kept.append((y, x, int(label)))
            if kept:
                out.setdefault(oid, {})[z] = kept
    return {oid: dict(sorted(per.items())) for oid, per in sorted(out.items())}


def boxes_from_labels(labels: np.ndarray, object_ids: Iterable[int] | None = None) -> BoxesByObject:
    """Tight inclusive boxes of each label value on every slice where it occurs.

    Parameters
    ----------
    labels : ndarray
        (Z, Y, X) integer labels.
    object_ids : iterable of int or None
        Label values to box (default: all non-zero values present).
    """
    arr = np.asarray(labels)
    ids = (
        sorted(int(v) for v in np.unique(arr) if v != 0) if object_ids is None else list(object_ids)
    )
    out: BoxesByObject = {}
    for oid in ids:
        per: dict[int, Box] = {}
        for z in range(arr.shape[0]):
            box = mask_box(arr[z] == oid)
            if box is not None:
                per[z] = box
        if per:
            out[oid] = per
    return out


def __getattr__(name: str) -> Any:
    """Box FILES live in :mod:`napari_masam.io.boxes`; ``load_boxes_file`` and
    ``save_boxes_file`` stay importable from here (lazily: io.boxes imports this module)."""
    if name in ("load_boxes_file", "save_boxes_file"):
        from .io import boxes

        return getattr(boxes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
