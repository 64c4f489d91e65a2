"""Box prompt FILES: the CLI's JSON/CSV table and napari's own Shapes CSV, in and out.

The box convention itself (XYXY pixel indices, max edge inclusive, keyframe interpolation)
lives in :mod:`napari_masam.prompts`; this module only reads and writes files and checks that
what a file holds is usable.

Formats
-------
**Table** (JSON or CSV; one record per keyframe box, coordinates of the input as the CLI and
napari show it, i.e. after the reader's reorientation):

======================  =================================================================
``object``              positive integer, the label value (aliases ``object_id``, ``id``,
                        ``label``)
``slice``               integer >= 0, slice/frame index on axis 0 (aliases ``frame``,
                        ``z``, ``t``)
``x0, y0, x1, y1``      numbers, ``col_min, row_min, col_max, row_max`` (max inclusive)
``last_slice``          optional integer: the box holds on ``slice..last_slice`` (a 3D box;
                        aliases ``last_frame``, ``z1``)
======================  =================================================================

JSON: a list of records or ``{"boxes": [records...]}``; CSV/TSV: a header row with those names.

**napari Shapes CSV** (what *File > Save Selected Layers* writes for a Shapes layer, napari's
``napari_write_shapes``): columns ``index, shape-type, vertex-index, axis-0, axis-1[, axis-2]``,
one row per vertex. For a stack the shapes must be 3-D (``axis-0`` = slice/frame, ``axis-1`` =
row, ``axis-2`` = column) in the image's data coordinates (pixel indices: a Shapes layer with
the image's scale and translate, as the widget's prompts layer), every vertex of one shape on
one slice. Rectangles give their box (:func:`napari_masam.prompts.rectangle_to_xyxy`);
ellipses and polygons their bounding box; lines and paths are refused. Object ids: an
``object`` column if present (one value per shape; napari's reader ignores extra columns, so
such a file still opens in napari), else one object per shape (shape ``index`` + 1).
:func:`save_napari_shapes_csv` writes this schema back, with the ``object`` column.

Every reader here refuses a file with nothing usable (empty, header only, ``[]``), non-integral
object ids or slices (never truncated), and, given the image shape, boxes wholly outside the
image (a box partly outside is clipped to it).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..prompts import clip_box, interpolate_keyframes, rectangle_to_xyxy, round_half_up
from ._common import atomic_path

Box = tuple[int, int, int, int]
BoxesByObject = dict[int, dict[int, Box]]

#: Column names of napari's Shapes CSV (``napari_builtins`` writer), before the ``axis-N`` ones.
NAPARI_SHAPES_COLUMNS = ("index", "shape-type", "vertex-index")
#: Shape types read as their bounding box.
_BOXED_SHAPES = ("rectangle", "ellipse", "polygon")

_ALIASES = {
    "object": ("object", "object_id", "id", "label"),
    "slice": ("slice", "frame", "z", "t"),
    "last_slice": ("last_slice", "last_frame", "z1"),
}

#: Suffixes of box files.
BOX_SUFFIXES = (".json", ".csv", ".tsv")


@dataclass(frozen=True)
class BoxFile:
    """The keyframes a box file holds, before interpolation.

    Attributes
    ----------
    path : Path
    kind : str
        ``"table"`` (our JSON/CSV) or ``"napari-shapes"`` (napari's Shapes CSV).
    keyframes : dict
        ``{object_id: {slice: (x0, y0, x1, y1)}}`` integer inclusive boxes as given.
    ranges : dict
        ``{object_id: (first_slice, last_slice)}`` inclusive (``last_slice`` extends it).
    bounded : frozenset of int
        Objects whose file gives a ``last_slice``: their range is a limit the user set (a
        propagation must not leave it), not just the span of their keyframes.
    """

    path: Path
    kind: str
    keyframes: dict[int, dict[int, Box]]
    ranges: dict[int, tuple[int, int]]
    bounded: frozenset[int] = frozenset()

    def limits(self) -> dict[int, tuple[int, int]]:
        """``{object_id: (first, last)}`` of the objects with a ``last_slice`` (see ``bounded``)."""
        return {oid: self.ranges[oid] for oid in sorted(self.bounded)}

    def boxes(self, *, interpolate: bool = True) -> BoxesByObject:
        """Per-slice boxes: keyframes interpolated over each object's range (or as given)."""
        out: BoxesByObject = {}
        for oid, frames in sorted(self.keyframes.items()):
            if interpolate:
                out[oid] = interpolate_keyframes(frames, self.ranges[oid])
            else:
                out[oid] = dict(sorted(frames.items()))
        return out

    def check_fits(self, n_slices: int | None, shape_yx: Sequence[int] | None) -> None:
        """Raise if a box lies on a slice outside ``0..n_slices-1`` or wholly outside the slice.

        Raises
        ------
        ValueError
            Naming the object, slice and box, with the likely cause.
        """
        for oid, (first, last) in sorted(self.ranges.items()):
            if n_slices is not None and not (first >= 0 and last < n_slices):
                raise ValueError(
                    f"boxes file {self.path.name}: object {oid} spans slices/frames "
                    f"{first}..{last}, outside the stack's 0..{n_slices - 1}; slices count "
                    "from 0 along axis 0 as napari shows the image"
                )
        if shape_yx is None:
            return
        ny, nx = int(shape_yx[0]), int(shape_yx[1])
        for oid, frames in sorted(self.keyframes.items()):
            for z, box in sorted(frames.items()):
                if clip_box(box, (ny, nx)) is None:
                    raise ValueError(
                        f"boxes file {self.path.name}: object {oid}, slice {z}: box "
                        f"x0,y0,x1,y1 = {list(box)} lies wholly outside the image (x = column "
                        f"0..{nx - 1}, y = row 0..{ny - 1}); are x and y swapped?"
                    )


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------
def _integer(value: object, name: str, where: str) -> int:
    """An integral value (``3``, ``3.0``, ``"3"``); anything else is refused, never truncated."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
    if isinstance(value, int | np.integer):
        return int(value)
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}") from None
    if not math.isfinite(number) or number != math.floor(number):
        raise ValueError(
            f"{where}: {name} must be an integer, got {value!r}; napari-masam does not round "
            "object ids or slice numbers"
        )
    return int(number)


def _number(value: object, name: str, where: str) -> float:
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    return number


def _field(record: Mapping[str, object], name: str, where: str) -> object:
    for alias in _ALIASES.get(name, (name,)):
        if alias in record and record[alias] not in (None, ""):
            return record[alias]
    if name == "last_slice":
        return None
    raise ValueError(
        f"{where}: missing field {name!r} (record: {dict(record)}); a box needs object, slice, "
        "x0, y0, x1, y1 (or use napari's Shapes CSV)"
    )


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _header(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        first = next(csv.reader(fh), [])
    return [c.strip() for c in first]


def is_napari_shapes_csv(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a CSV with napari's Shapes columns (index, shape-type, ...)."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    columns = _header(path)
    return set(NAPARI_SHAPES_COLUMNS) <= set(columns) and "axis-0" in columns


def _table_records(path: Path) -> list[object]:
    suffix = path.suffix.lower()
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"boxes file {path}: the file is empty; it holds no boxes")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"boxes file {path}: not valid JSON ({exc})") from exc
        records = data.get("boxes") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise ValueError(
                f"boxes file {path}: expected a list of records or {{'boxes': [...]}}, got "
                f"{type(records).__name__}"
            )
        return records
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    except csv.Error as exc:
        raise ValueError(f"boxes file {path}: not valid CSV ({exc})") from exc


def _read_table(path: Path) -> BoxFile:
    records = _table_records(path)
    keyframes: dict[int, dict[int, Box]] = {}
    ranges: dict[int, tuple[int, int]] = {}
    bounded: set[int] = set()
    for i, rec in enumerate(records):
        where = f"{path.name} record {i + 1}"
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where}: expected an object with named fields, got {rec!r}")
        oid = _integer(_field(rec, "object", where), "object", where)
        z = _integer(_field(rec, "slice", where), "slice", where)
        x0, y0, x1, y1 = (
            _number(_field(rec, k, where), k, where) for k in ("x0", "y0", "x1", "y1")
        )
        raw_last = _field(rec, "last_slice", where)
        last = z if raw_last is None else _integer(raw_last, "last_slice", where)
        if oid < 1:
            raise ValueError(f"{where}: object ids must be positive integers, got {oid}")
        if z < 0 or last < z:
            raise ValueError(f"{where}: slice {z} .. last_slice {last} is not a range from 0 up")
        keyframes.setdefault(oid, {})[z] = (
            round_half_up(min(x0, x1)),
            round_half_up(min(y0, y1)),
            round_half_up(max(x0, x1)),
            round_half_up(max(y0, y1)),
        )
        lo, hi = ranges.get(oid, (z, z))
        ranges[oid] = (min(lo, z), max(hi, last))
        if raw_last is not None:
            bounded.add(oid)
    return BoxFile(path, "table", keyframes, ranges, frozenset(bounded))


def _read_napari_shapes(path: Path) -> BoxFile:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = _header(path)
    axes = sorted((c for c in columns if c.startswith("axis-")), key=lambda c: int(c[5:]))
    if len(axes) != 3:
        raise ValueError(
            f"boxes file {path.name}: napari Shapes with {len(axes)} axes; a stack needs 3-D "
            "shapes (axis-0 = slice/frame, axis-1 = row, axis-2 = column). Draw the boxes in a "
            "Shapes layer over the 3-D image (the widget's prompts layer is one)"
        )
    shapes: dict[int, list[dict[str, str]]] = {}
    for i, row in enumerate(rows):
        where = f"{path.name} row {i + 2}"
        shapes.setdefault(_integer(row.get("index"), "index", where), []).append(row)
    keyframes: dict[int, dict[int, Box]] = {}
    ranges: dict[int, tuple[int, int]] = {}
    has_object = "object" in columns
    for index, vertices in sorted(shapes.items()):
        where = f"{path.name} shape {index}"
        kind = (vertices[0].get("shape-type") or "").strip().lower()
        if kind not in _BOXED_SHAPES:
            raise ValueError(
                f"{where}: a {kind or 'unnamed'} shape cannot be a box prompt; use rectangles "
                "(ellipses and polygons count as their bounding box)"
            )
        zyx = np.array(
            [[_number(v.get(a), a, where) for a in axes] for v in vertices], dtype=np.float64
        )
        if np.ptp(zyx[:, 0]) > 1e-6:
            raise ValueError(
                f"{where}: its vertices lie on slices {sorted(set(zyx[:, 0].tolist()))}; a box "
                "prompt is drawn on one slice"
            )
        z = _integer(float(zyx[0, 0]), "slice (axis-0)", where)
        if has_object:
            ids = {_integer(v.get("object"), "object", where) for v in vertices}
            if len(ids) != 1:
                raise ValueError(f"{where}: its vertices name objects {sorted(ids)}; give one")
            oid = ids.pop()
        else:
            oid = index + 1
        if oid < 1:
            raise ValueError(f"{where}: object ids must be positive integers, got {oid}")
        box = rectangle_to_xyxy(zyx[:, 1:])
        if box is None:
            raise ValueError(f"{where}: no usable vertices")
        if z < 0:
            raise ValueError(f"{where}: slice {z} is negative")
        keyframes.setdefault(oid, {})[z] = box
        lo, hi = ranges.get(oid, (z, z))
        ranges[oid] = (min(lo, z), max(hi, z))
    return BoxFile(path, "napari-shapes", keyframes, ranges)


def read_box_file(path: str | os.PathLike[str]) -> BoxFile:
    """Read a box file (table JSON/CSV/TSV or napari Shapes CSV) into its keyframes.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist (a folder is named as such).
    ValueError
        Unknown suffix, unparsable content, missing fields, non-integral ids or slices, or no
        box at all (empty file, header only, ``[]``).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"boxes file {path} is a folder; give a .json or .csv file")
    if not path.is_file():
        raise FileNotFoundError(f"boxes file {path}: no such file")
    if path.suffix.lower() not in BOX_SUFFIXES:
        raise ValueError(
            f"boxes file {path}: unknown suffix {path.suffix!r}; use {', '.join(BOX_SUFFIXES)}"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"boxes file {path}: the file is empty; it holds no boxes")
    result = _read_napari_shapes(path) if is_napari_shapes_csv(path) else _read_table(path)
    if not result.keyframes:
        raise ValueError(
            f"boxes file {path}: holds no boxes (header only or an empty list); nothing to "
            "segment. Add one record per box (see `napari-masam segment --help`)"
        )
    return result


def load_boxes_file(
    path: str | os.PathLike[str],
    *,
    interpolate: bool = True,
    image_shape: Sequence[int] | None = None,
) -> BoxesByObject:
    """Boxes of one input from a box file: ``{object_id: {slice: (x0, y0, x1, y1)}}``.

    Parameters
    ----------
    path : str or path-like
        Table JSON/CSV/TSV or napari Shapes CSV (see the module docstring).
    interpolate : bool
        Interpolate keyframes over each object's range (as the widget does).
    image_shape : sequence of int or None
        ``(Z, Y, X[, 3])`` of the stack: slices must lie in ``0..Z-1``, boxes partly outside
        the slice are clipped, a box wholly outside is an error.

    Raises
    ------
    FileNotFoundError, ValueError
        See :func:`read_box_file` and :meth:`BoxFile.check_fits`.
    """
    box_file = read_box_file(path)
    shape_yx = None
    if image_shape is not None:
        shape_yx = (int(image_shape[1]), int(image_shape[2]))
        box_file.check_fits(int(image_shape[0]), shape_yx)
    boxes = box_file.boxes(interpolate=interpolate)
    if shape_yx is None:
        return boxes
    clipped: BoxesByObject = {}
    for oid, frames in boxes.items():
        per = {z: clip_box(b, shape_yx) for z, b in frames.items()}
        clipped[oid] = {z: b for z, b in per.items() if b is not None}
    return clipped


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def save_boxes_file(
    boxes: Mapping[int, Mapping[int, Sequence[float]]], path: str | os.PathLike[str]
) -> Path:
    """Write boxes as a table (JSON or CSV by suffix), one record per slice given, atomically."""
    path = Path(path)
    records = [
        {
            "object": int(oid),
            "slice": int(z),
            "x0": float(b[0]),
            "y0": float(b[1]),
            "x1": float(b[2]),
            "y1": float(b[3]),
        }
        for oid, per in sorted(boxes.items())
        for z, b in sorted(per.items())
    ]
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps({"boxes": records}, indent=1) + "\n")
        else:
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["object", "slice", "x0", "y0", "x1", "y1"])
                writer.writeheader()
                writer.writerows(records)
    return path


def save_napari_shapes_csv(
    boxes: Mapping[int, Mapping[int, Sequence[float]]], path: str | os.PathLike[str]
) -> Path:
    """Write boxes as napari's Shapes CSV (3-D rectangles) plus an ``object`` column.

    Each box becomes a rectangle with its corners on the centres of its corner pixels
    (``(z, y0, x0), (z, y0, x1), (z, y1, x1), (z, y1, x0)``), so napari shows it over exactly
    the boxed pixels and :func:`read_box_file` reads the same box back. Opens in napari with
    *File > Open* (napari's reader ignores the ``object`` column).
    """
    path = Path(path)
    rows: list[list[object]] = []
    index = 0
    for oid, per in sorted(boxes.items()):
        for z, b in sorted(per.items()):
            x0, y0, x1, y1 = (float(v) for v in b)
            corners = ((y0, x0), (y0, x1), (y1, x1), (y1, x0))
            for vertex, (r, c) in enumerate(corners):
                rows.append([index, "rectangle", vertex, float(z), r, c, int(oid)])
            index += 1
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*NAPARI_SHAPES_COLUMNS, "axis-0", "axis-1", "axis-2", "object"])
        writer.writerows(rows)
    return path
