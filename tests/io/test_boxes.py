"""Box prompt files: the CLI table and napari's own Shapes CSV (checked with napari's writer and
reader from napari_builtins, not ours), and every file with nothing usable refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_masam.io.boxes import (
    is_napari_shapes_csv,
    load_boxes_file,
    read_box_file,
    save_boxes_file,
    save_napari_shapes_csv,
)


def _napari_csv(path: Path, shapes: list[np.ndarray], types: list[str]) -> Path:
    """A Shapes CSV written by napari's own writer (what File > Save Selected Layers does)."""
    from napari_builtins.io._write import napari_write_shapes

    assert napari_write_shapes(str(path), shapes, {"shape_type": types}) == str(path)
    return path


def _rect(z: float, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
    return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)


# ------------------------------------------------------------------------------------ table
def test_table_csv_keyframes_interpolate_and_last_slice(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text("object,slice,x0,y0,x1,y1,last_slice\n1,2,10,10,20,20,\n1,6,14,10,24,20,8\n")
    boxes = load_boxes_file(path)
    assert sorted(boxes[1]) == list(range(2, 9))  # 2..6 interpolated, held to last_slice 8
    assert boxes[1][4] == (12, 10, 22, 20)  # halfway between the keyframes
    assert boxes[1][8] == (14, 10, 24, 20)
    assert load_boxes_file(path, interpolate=False) == {
        1: {2: (10, 10, 20, 20), 6: (14, 10, 24, 20)}
    }


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "empty"),
        ("empty.json", "", "empty"),
        ("header.csv", "object,slice,x0,y0,x1,y1\n", "no boxes"),
        ("list.json", "[]", "no boxes"),
        ("dict.json", '{"boxes": []}', "no boxes"),
        ("napari_header.csv", "index,shape-type,vertex-index,axis-0,axis-1,axis-2\n", "no boxes"),
        ("float_id.csv", "object,slice,x0,y0,x1,y1\n1.5,2,1,1,5,5\n", "object must be an integer"),
        (
            "float_z.json",
            '[{"object": 1, "slice": 2.5, "x0": 1, "y0": 1, "x1": 5, "y1": 5}]',
            "slice must be an integer",
        ),
        (
            "bool_id.json",
            '[{"object": true, "slice": 2, "x0": 1, "y0": 1, "x1": 5, "y1": 5}]',
            "object must be an integer",
        ),
        ("text_z.csv", "object,slice,x0,y0,x1,y1\n1,two,1,1,5,5\n", "slice must be an integer"),
        ("nan.csv", "object,slice,x0,y0,x1,y1\n1,2,nan,1,5,5\n", "finite"),
        ("zero_id.csv", "object,slice,x0,y0,x1,y1\n0,2,1,1,5,5\n", "positive"),
        ("missing.csv", "object,slice,x0,y0\n1,2,1,1\n", "missing field 'x1'"),
    ],
)
def test_unusable_box_files_are_refused(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_box_file(path)


def test_integral_values_in_any_spelling_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps([{"object": 2.0, "slice": "3", "x0": 1, "y0": 1, "x1": 5, "y1": 5}]))
    assert load_boxes_file(path) == {2: {3: (1, 1, 5, 5)}}


def test_boxes_against_the_image(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    # image (Z, Y, X) = (4, 20, 60): x up to 59, y up to 19; this box was written y, x swapped
    path.write_text("object,slice,x0,y0,x1,y1\n1,1,5,30,15,50\n")
    with pytest.raises(ValueError, match=r"wholly outside the image.*swapped"):
        load_boxes_file(path, image_shape=(4, 20, 60))
    path.write_text("object,slice,x0,y0,x1,y1\n1,9,5,5,15,15\n")
    with pytest.raises(ValueError, match=r"outside the stack's 0\.\.3"):
        load_boxes_file(path, image_shape=(4, 20, 60))
    path.write_text("object,slice,x0,y0,x1,y1\n1,1,50,5,80,15\n")  # partly outside: clipped
    assert load_boxes_file(path, image_shape=(4, 20, 60)) == {1: {1: (50, 5, 59, 15)}}


def test_folder_and_missing_file_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a folder"):
        read_box_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_box_file(tmp_path / "nope.csv")


def test_table_round_trip(tmp_path: Path) -> None:
    boxes = {1: {2: (1, 2, 3, 4)}, 3: {0: (5, 6, 7, 8), 4: (9, 10, 11, 12)}}
    for name in ("t.json", "t.csv"):
        save_boxes_file(boxes, tmp_path / name)
        assert load_boxes_file(tmp_path / name, interpolate=False) == boxes


# ------------------------------------------------------------------------------------ napari
def test_napari_shapes_csv_from_napari_writer(tmp_path: Path) -> None:
    shapes = [
        _rect(3, 10, 20, 30, 40),  # drawn corner to corner on pixel centres
        _rect(5, 0.6, 1.5, 6.4, 4.5),  # an edge-aligned drag: pixels whose centres lie inside
        np.array([[7, 2, 2], [7, 2, 8], [7, 9, 5]], dtype=float),  # polygon: bounding box
        np.array([[8, 4, 4], [8, 4, 10], [8, 12, 10], [8, 12, 4]], dtype=float),  # ellipse
    ]
    path = _napari_csv(
        tmp_path / "shapes.csv", shapes, ["rectangle", "rectangle", "polygon", "ellipse"]
    )
    assert is_napari_shapes_csv(path)
    parsed = read_box_file(path)
    assert parsed.kind == "napari-shapes"
    # one object per shape (index + 1); xyxy = (col_min, row_min, col_max, row_max)
    assert parsed.boxes(interpolate=False) == {
        1: {3: (20, 10, 40, 30)},
        2: {5: (2, 1, 4, 6)},
        3: {7: (2, 2, 8, 9)},
        4: {8: (4, 4, 10, 12)},
    }


@pytest.mark.parametrize(
    ("shapes", "types", "message"),
    [
        ([np.array([[3, 1, 1], [3, 5, 5]], dtype=float)], ["line"], "cannot be a box prompt"),
        ([np.array([[1, 1], [1, 5], [5, 5], [5, 1]], dtype=float)], ["rectangle"], "3-D shapes"),
        (
            [np.array([[3, 1, 1], [3, 1, 5], [4, 5, 5], [4, 5, 1]], dtype=float)],
            ["rectangle"],
            "one slice",
        ),
        ([_rect(2.5, 1, 1, 5, 5)], ["rectangle"], "must be an integer"),
    ],
)
def test_napari_shapes_that_are_not_boxes_are_refused(
    tmp_path: Path, shapes: list[np.ndarray], types: list[str], message: str
) -> None:
    path = _napari_csv(tmp_path / "shapes.csv", shapes, types)
    with pytest.raises(ValueError, match=message):
        read_box_file(path)


def test_napari_shapes_round_trip_opens_in_napari(tmp_path: Path) -> None:
    from napari_builtins.io._read import csv_to_layer_data

    boxes = {1: {2: (5, 6, 9, 12), 6: (7, 6, 11, 12)}, 4: {0: (0, 0, 3, 3)}}
    path = save_napari_shapes_csv(boxes, tmp_path / "out.csv")
    assert read_box_file(path).keyframes == boxes  # the object column keeps the ids
    data, meta, layer_type = csv_to_layer_data(str(path), require_type="shapes")
    assert layer_type == "shapes" and meta["shape_type"] == ["rectangle"] * 3
    np.testing.assert_array_equal(data[0], _rect(2, 6, 5, 12, 9))  # napari's own reading
    # and napari's writer writes the same geometry back (without our object column)
    again = _napari_csv(tmp_path / "again.csv", data, meta["shape_type"])
    assert read_box_file(again).boxes(interpolate=False) == {
        1: {2: (5, 6, 9, 12)},
        2: {6: (7, 6, 11, 12)},
        3: {0: (0, 0, 3, 3)},
    }


def test_napari_shapes_object_column_groups_keyframes(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "index,shape-type,vertex-index,axis-0,axis-1,axis-2,object\n"
        + "".join(
            f"0,rectangle,{i},2,{r},{c},5\n"
            for i, (r, c) in enumerate([(1, 1), (1, 9), (9, 9), (9, 1)])
        )
        + "".join(
            f"1,rectangle,{i},6,{r},{c},5\n"
            for i, (r, c) in enumerate([(1, 5), (1, 13), (9, 13), (9, 5)])
        )
    )
    boxes = load_boxes_file(path)
    assert sorted(boxes) == [5] and sorted(boxes[5]) == list(range(2, 7))
    assert boxes[5][4] == (3, 1, 11, 9)
