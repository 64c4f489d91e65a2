"""THE box convention of napari-masam, and every way boxes come in (pure numpy, no napari).

Box convention
--------------
``boxes_xyxy = (x0, y0, x1, y1) = (col_min, row_min, col_max, row_max)``: pixel indices of the
slice (pixel centres at integers, as napari data coordinates and SAM), **both max edges
inclusive**. A box of one pixel is ``(c, r, c, r)``.

Boxes of a stack are ``dict[object_id, dict[slice_index, (x0, y0, x1, y1)]]``: object ids are
positive ints (the label value the object gets), slice indices index axis 0 of the stack.

A rectangle drawn in napari covers the pixels whose centres lie inside it: after mapping its
vertices into the image layer's data coordinates, ``col_min = ceil(min col)`` and
``col_max = floor(max col)`` (to 1e-6), so a rectangle from ``-0.5`` to ``9.5`` and one with
corners on the pixel centres ``0`` and ``9`` both give columns 0..9.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
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
# Coordinate maps
# ----------------------------------------------------------------------------------------------
def _as_point_map(transform: Any, direction: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """A function mapping one point (ndim,) between frames, from many kinds of description.

    ``transform`` may be None (identity), a callable (one point -> one point), an object with a
    ``world_to_data``/``data_to_world`` method (a napari layer; ``direction`` picks which), or
    a mapping/object with ``scale`` and/or ``translate`` (data = (world - translate) / scale).
    """
    if transform is None:
        return None
    method = getattr(transform, direction, None)
    if callable(method):
        return lambda p: np.asarray(method(p), dtype=np.float64)
    if callable(transform):
        return lambda p: np.asarray(transform(p), dtype=np.float64)
    if isinstance(transform, Mapping):
        scale, translate = transform.get("scale"), transform.get("translate")
    else:
        scale = getattr(transform, "scale", None)
        translate = getattr(transform, "translate", None)
    if scale is None and translate is None:
        raise TypeError(
            f"Cannot use {type(transform).__name__} as a coordinate transform: pass a napari "
            "layer, a callable, or something with 'scale'/'translate'."
        )

    def apply(p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        n = p.shape[-1]
        s = np.ones(n) if scale is None else np.asarray(scale, dtype=np.float64)[-n:]
        t = np.zeros(n) if translate is None else np.asarray(translate, dtype=np.float64)[-n:]
        if direction == "world_to_data":
            return (p - t) / s
        return p * s + t

    return apply


def _map_vertices(
    vertices: np.ndarray, fn: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
    if fn is None:
        return vertices
    return np.stack([fn(v) for v in vertices])


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
    """Clip an inclusive box to a (Y, X) slice; None when it lies wholly outside."""
    x0, y0, x1, y1 = (round_half_up(v) for v in box_xyxy)
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    ny, nx = int(shape_yx[0]), int(shape_yx[1])
    if x1 < 0 or y1 < 0 or x0 > nx - 1 or y0 > ny - 1:
        return None
    return (max(x0, 0), max(y0, 0), min(x1, nx - 1), min(y1, ny - 1))


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
    """napari Shapes rectangles -> per-object, per-slice inclusive pixel boxes of an image.

    Parameters
    ----------
    shapes_data : sequence of ndarray
        ``shapes_layer.data``: one (4, ndim) vertex array per shape in the Shapes layer's data
        coordinates, ``(..., slice, row, col)``; ndim 2 shapes lie on ``default_slice``.
    shape_types : sequence of str, str or None
        ``shapes_layer.shape_type``; only ``"rectangle"`` shapes are used (None: all).
    image_layer : napari layer, callable, mapping or None
        Maps world -> the image's data coordinates: a layer (its ``world_to_data``), a callable
        taking one point, or ``{"scale": ..., "translate": ...}`` / an object with those
        attributes (data = (world - translate) / scale). None: identity.
    shapes_layer : napari layer, callable, mapping or None
        Maps the Shapes layer's data -> world (its ``data_to_world``; or scale/translate as
        above, world = data * scale + translate). None: identity (a Shapes layer created with
        the image's scale/translate already has the image's data coordinates if both are
        passed, or pass neither).
    object_ids : sequence of int or None
        Object id of each shape (label value). Else ``features[id_column]``, else one id per
        distinct colour in ``colors`` (in order of first use), else one object per rectangle.
    features : table or None
        ``shapes_layer.features`` (a pandas DataFrame or a mapping of columns).
    colors : sequence or None
        Per-shape colours (e.g. ``shapes_layer.edge_color``).
    image_shape : sequence of int or None
        Shape of the image's data, ``(Z, Y, X)`` or ``(Z, Y, X, 3)``: boxes are clipped to the
        slice and dropped outside the stack. None: no clipping.
    slice_ranges : mapping or None
        Object id -> inclusive (first, last) slice range (a "3D box"; see
        :func:`interpolate_keyframes`).
    interpolate : bool
        Interpolate between keyframes of an object (see :func:`interpolate_keyframes`).
    default_slice : int

    Returns
    -------
    dict int -> dict int -> (x0, y0, x1, y1)

    Notes
    -----
    Several rectangles of one object on the same slice: the last one drawn wins (logged).
    """
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

    to_world = _as_point_map(shapes_layer, "data_to_world")
    to_data = _as_point_map(image_layer, "world_to_data")
    keyframes: dict[int, dict[int, Box]] = {}
    for i, vertices in enumerate(shapes_data):
        if shape_types is not None and shape_types[i] != "rectangle":
            continue
        v = _map_vertices(_map_vertices(np.asarray(vertices, dtype=np.float64), to_world), to_data)
        if v.shape[-1] >= 3:
            zs = v[:, -3]
            z = round_half_up(np.mean(zs))
            if np.ptp(zs) > 0.5:
                logger.warning("Rectangle %d is not on one slice (z %s); using slice %d.", i, zs, z)
        else:
            z = default_slice
        box = rectangle_to_xyxy(v[:, -2:])
        if box is None:
            continue
        oid = int(object_ids[i])
        if oid < 1:
            raise ValueError(f"Object ids must be positive integers (shape {i} has id {oid}).")
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


def clip_boxes_to_stack(
    boxes: Mapping[int, Sequence[float]], image_shape: Sequence[int]
) -> dict[int, Box]:
    """Clip one object's per-slice boxes to a stack of ``image_shape`` (Z, Y, X[, 3]).

    Slices outside ``[0, Z)`` and boxes wholly outside the slice are dropped (logged).
    """
    depth, shape_yx = int(image_shape[0]), (int(image_shape[1]), int(image_shape[2]))
    out: dict[int, Box] = {}
    for z, b in boxes.items():
        if not 0 <= int(z) < depth:
            logger.info("Dropping a box on slice %d outside a stack of %d slices.", z, depth)
            continue
        c = clip_box(b, shape_yx)
        if c is None:
            logger.info("Dropping a box %s wholly outside the %s slice.", tuple(b), shape_yx)
            continue
        out[int(z)] = c
    return out


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
            rows, cols = np.nonzero(arr[z] == oid)
            if rows.size:
                per[z] = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
        if per:
            out[oid] = per
    return out


# ----------------------------------------------------------------------------------------------
# Files for the CLI
# ----------------------------------------------------------------------------------------------
_ALIASES = {
    "object": ("object", "object_id", "id", "label"),
    "slice": ("slice", "frame", "z", "t"),
    "last_slice": ("last_slice", "last_frame", "z1"),
}


def _field(record: Mapping[str, Any], name: str, where: str) -> Any:
    for alias in _ALIASES.get(name, (name,)):
        if alias in record and record[alias] not in (None, ""):
            return record[alias]
    if name == "last_slice":
        return None
    raise ValueError(f"{where}: missing field {name!r} (record: {dict(record)}).")


def load_boxes_file(
    path: str | Path, *, interpolate: bool = True, image_shape: Sequence[int] | None = None
) -> BoxesByObject:
    """Read box prompts of one input from a JSON or CSV file.

    Schema (one record per keyframe box; pixel coordinates of the input as the CLI and napari
    show it, i.e. after the reader's reorientation; XYXY with max **inclusive**):

    ======================  =========================================================
    ``object``              positive int, the label value (aliases ``object_id``, ``id``,
                            ``label``)
    ``slice``               int, slice/frame index on axis 0 (aliases ``frame``, ``z``, ``t``)
    ``x0, y0, x1, y1``      numbers, ``col_min, row_min, col_max, row_max``
    ``last_slice``          optional int: the box holds on ``slice..last_slice`` (a 3D box;
                            aliases ``last_frame``, ``z1``)
    ======================  =========================================================

    JSON: a list of records, or ``{"boxes": [records...]}``. CSV: a header row with those
    column names. Example CSV::

        object,slice,x0,y0,x1,y1,last_slice
        1,10,40,52,80,90,
        1,20,44,50,86,96,
        2,15,100,100,120,130,25

    Keyframes of one object are interpolated linearly between the slices they are on
    (``interpolate=True``); a ``last_slice`` extends the object's range.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For an unknown suffix, unparsable content or a record with missing fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Boxes file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
            records = data.get("boxes") if isinstance(data, dict) else data
            if not isinstance(records, list):
                raise ValueError("expected a list of records or {'boxes': [...]}")
        elif suffix in (".csv", ".tsv"):
            with path.open(newline="") as fh:
                records = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise ValueError(f"unknown suffix {suffix!r}; use .json or .csv")
    except (json.JSONDecodeError, csv.Error) as exc:
        raise ValueError(f"Cannot parse boxes file {path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"Boxes file {path}: {exc}.") from exc

    keyframes: dict[int, dict[int, Box]] = {}
    ranges: dict[int, list[int]] = {}
    for i, rec in enumerate(records):
        where = f"{path.name} record {i + 1}"
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where}: expected an object with named fields, got {rec!r}.")
        try:
            oid = int(_field(rec, "object", where))
            z = int(_field(rec, "slice", where))
            box = tuple(float(_field(rec, k, where)) for k in ("x0", "y0", "x1", "y1"))
            last = _field(rec, "last_slice", where)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if oid < 1:
            raise ValueError(f"{where}: object ids must be positive, got {oid}.")
        x0, y0, x1, y1 = box
        keyframes.setdefault(oid, {})[z] = (
            round_half_up(min(x0, x1)),
            round_half_up(min(y0, y1)),
            round_half_up(max(x0, x1)),
            round_half_up(max(y0, y1)),
        )
        rng = ranges.setdefault(oid, [z, z])
        rng[0], rng[1] = min(rng[0], z), max(rng[1], z if last is None else int(last))
    out: BoxesByObject = {}
    for oid, frames in keyframes.items():
        if interpolate:
            boxes = interpolate_keyframes(frames, tuple(ranges[oid]))  # type: ignore[arg-type]
        else:
            boxes = dict(sorted(frames.items()))
        if image_shape is not None:
            boxes = clip_boxes_to_stack(boxes, image_shape)
        if boxes:
            out[oid] = boxes
    return dict(sorted(out.items()))


def save_boxes_file(boxes: Mapping[int, Mapping[int, Sequence[float]]], path: str | Path) -> None:
    """Write boxes in the :func:`load_boxes_file` schema (JSON or CSV by suffix), one record
    per slice (no keyframe compression)."""
    path = Path(path)
    records = [
        {"object": int(oid), "slice": int(z), "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]}
        for oid, per in boxes.items()
        for z, b in per.items()
    ]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"boxes": records}, indent=1))
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["object", "slice", "x0", "y0", "x1", "y1"])
        writer.writeheader()
        writer.writerows(records)
