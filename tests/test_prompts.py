"""The box convention: napari rectangles, keyframes, clipping and the CLI's boxes files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_masam.prompts import (
    boxes_from_labels,
    boxes_from_rectangles,
    boxes_from_shapes,
    check_boxes_in_stack,
    clip_box,
    clip_boxes_to_stack,
    expand_box,
    interpolate_keyframes,
    load_boxes_file,
    mask_box,
    rectangle_to_xyxy,
    save_boxes_file,
)


def rect(z: float, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
    """napari rectangle vertices (4, 3) in (z, row, col), drawn from (r0, c0) to (r1, c1)."""
    return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)


@pytest.mark.parametrize(
    ("vertices", "expected"),
    [
        ([[-0.5, -0.5], [9.5, 9.5]], (0, 0, 9, 9)),  # pixel edges
        ([[0, 0], [9, 9]], (0, 0, 9, 9)),  # pixel centres
        ([[9.5, 9.5], [-0.5, -0.5]], (0, 0, 9, 9)),  # inverted drawing direction
        ([[2.0000001, 3], [4.9999999, 7]], (3, 2, 7, 5)),  # float noise of world_to_data
        ([[3.2, 5.1], [3.4, 5.3]], (5, 3, 5, 3)),  # thinner than a pixel: nearest pixel
        ([[1.2, 0.7], [6.6, 8.4]], (1, 2, 8, 6)),  # centres inside the rectangle
    ],
)
def test_rectangle_to_xyxy(vertices, expected) -> None:
    assert rectangle_to_xyxy(np.array(vertices)) == expected


def test_clip_box_edges() -> None:
    assert clip_box((-5, -3, 4, 100), (50, 60)) == (0, 0, 4, 49)
    assert clip_box((70, 0, 80, 5), (50, 60)) is None
    assert clip_box((59, 49, 59, 49), (50, 60)) == (59, 49, 59, 49)


@pytest.mark.parametrize("v", [0.5, 1.5, 2.5, 3.5, 10.5, -0.5, 2.4999, 2.5001])
def test_half_coordinates_round_up_in_clip_and_keyframes(v: float) -> None:
    """.5 rounds up everywhere (Python's round would give 2 for 2.5 and 4 for 3.5)."""
    expected = int(np.floor(v + 0.5))
    box = (v, v + 1, v + 2, v + 3)
    want = tuple(expected + k for k in range(4))
    assert clip_box(box, (100, 100)) == tuple(max(w, 0) for w in want)
    # a keyframe alone, and a keyframe repeated over a range: the same rounding
    assert interpolate_keyframes({4: box})[4] == want
    assert interpolate_keyframes({4: box}, slice_range=(4, 6))[6] == want
    # the midpoint of two keyframes lands on .5 exactly and also rounds up
    mid = interpolate_keyframes({0: (v - 0.5,) * 4, 2: (v + 0.5,) * 4})[1]
    assert mid == (expected,) * 4


def test_interpolate_keyframes_linear() -> None:
    key = {2: (10, 20, 30, 40), 6: (14, 20, 38, 48)}
    out = interpolate_keyframes(key)
    assert sorted(out) == [2, 3, 4, 5, 6]
    # independent linear interpolation, rounded half up
    for z in range(2, 7):
        t = (z - 2) / 4
        exp = [np.floor((1 - t) * a + t * b + 0.5) for a, b in zip(key[2], key[6])]
        assert out[z] == tuple(int(v) for v in exp)
    assert out[2] == key[2] and out[6] == key[6]


def test_single_rectangle_with_range_is_a_3d_box() -> None:
    out = interpolate_keyframes({5: (1, 2, 3, 4)}, slice_range=(3, 8))
    assert out == {z: (1, 2, 3, 4) for z in range(3, 9)}
    # extra keyframes: range ends repeat the nearest keyframe, outside the range nothing
    out = interpolate_keyframes({4: (0, 0, 4, 4), 6: (2, 2, 6, 6)}, slice_range=(3, 5))
    assert out == {3: (0, 0, 4, 4), 4: (0, 0, 4, 4), 5: (1, 1, 5, 5)}


def test_boxes_from_rectangles_data_coordinates() -> None:
    # rectangles already in the image's data coordinates, (z, row, col) and 2-D (row, col)
    boxes = boxes_from_rectangles(
        [rect(3, 4, 8, 9, 20), rect(0, 1.6, 2.4, 5.4, 6.6)[:, 1:]],
        [2, 5],
        image_shape=(6, 30, 40),
        default_slice=4,
    )
    # pixel centres inside: rows 2..5, cols 3..6 for the half-pixel rectangle
    assert boxes == {2: {3: (8, 4, 20, 9)}, 5: {4: (3, 2, 6, 5)}}
    # keyframes without interpolation (what propagation takes) vs interpolated
    two = [rect(1, 0, 0, 4, 4), rect(5, 0, 0, 8, 8)]
    assert boxes_from_rectangles(two, [1, 1], interpolate=False) == {
        1: {1: (0, 0, 4, 4), 5: (0, 0, 8, 8)}
    }
    assert boxes_from_rectangles(two, [1, 1])[1][3] == (0, 0, 6, 6)
    with pytest.raises(ValueError, match="positive"):
        boxes_from_rectangles(two, [0, 1])
    with pytest.raises(ValueError, match="ids"):
        boxes_from_rectangles(two, [1])


def test_world_mapping_is_not_done_here() -> None:
    # world <-> data mapping belongs to napari_masam._layers: refused, with the way out
    with pytest.raises(TypeError, match="rectangles_in_image_frame"):
        boxes_from_shapes([rect(0, 0, 0, 2, 2)], "rectangle", {"scale": [1, 1, 1]})
    with pytest.raises(TypeError, match="boxes_from_rectangles"):
        boxes_from_shapes([rect(0, 0, 0, 2, 2)], "rectangle", shapes_layer=object())


def test_mask_box_and_expand_box() -> None:
    m = np.zeros((10, 12), bool)
    assert mask_box(m) is None
    m[2:5, 3:9] = True
    m[7, 1] = True
    assert mask_box(m) == (1, 2, 8, 7)
    assert expand_box((3, 2, 8, 4), (10, 12), margin_px=2) == (1, 0, 10, 6)
    # fraction of the side: 6 columns * 0.5 = 3; 3 rows * 0.5 = 1.5: rows 0.5 -> 1, 5.5 -> 6
    assert expand_box((3, 2, 8, 4), (10, 12), margin_fraction=0.5) == (0, 1, 11, 6)
    with pytest.raises(ValueError, match="outside"):
        expand_box((30, 30, 40, 40), (10, 12))


def test_one_clipping_rule_two_strengths(caplog) -> None:
    boxes = {3: (-5, -5, 4, 4), 7: (2, 2, 4, 4), 1: (20, 1, 30, 3)}
    with caplog.at_level("WARNING"):
        kept = clip_boxes_to_stack(boxes, (5, 10, 12))
    # where prompts are made: cut what sticks out, drop (with a warning) what cannot be used
    assert kept == {3: (0, 0, 4, 4)}
    assert "slice 7" in caplog.text and "wholly outside" in caplog.text
    # the engine's validation: the same cut, but an error where the edge would drop
    assert check_boxes_in_stack({2: {3: (-5, -5, 4, 4)}}, (5, 10, 12)) == {2: {3: (0, 0, 4, 4)}}
    with pytest.raises(ValueError, match="outside the stack"):
        check_boxes_in_stack({2: {7: (2, 2, 4, 4)}}, (5, 10, 12))
    with pytest.raises(ValueError, match="wholly outside"):
        check_boxes_in_stack({2: {1: (20, 1, 30, 3)}}, (5, 10, 12))
    with pytest.raises(ValueError, match="positive"):
        check_boxes_in_stack({0: {1: (1, 1, 3, 3)}}, (5, 10, 12))


def test_boxes_from_shapes_ids_keyframes_edges_and_skips() -> None:
    shapes = [
        rect(0, -4, -4, 5, 6),  # object 1, touches/overflows the top-left corner
        rect(4, 2, 2, 8, 12),  # object 1 keyframe
        rect(2, 20, 30, 10, 25),  # object 2, drawn bottom-right to top-left
        rect(1, 0, 0, 3, 3),  # a polygon: ignored
        rect(9, 0, 0, 3, 3),  # object 3 on a slice outside the stack: dropped
    ]
    types = ["rectangle", "rectangle", "rectangle", "polygon", "rectangle"]
    boxes = boxes_from_shapes(
        shapes, types, None, object_ids=[1, 1, 2, 7, 3], image_shape=(5, 16, 28)
    )
    assert sorted(boxes) == [1, 2]
    assert boxes[1][0] == (0, 0, 6, 5)
    assert sorted(boxes[1]) == [0, 1, 2, 3, 4]
    # interpolation uses the rectangles as drawn, clipping comes last:
    # halfway between (-4, -4, 6, 5) and (2, 2, 12, 8) is (-1, -1, 9, 7) -> clipped
    assert boxes[1][2] == (0, 0, 9, 7)
    assert boxes[2] == {2: (25, 10, 27, 15)}  # clipped to the 28 x 16 slice


def test_object_ids_from_features_and_colors() -> None:
    shapes = [rect(0, 0, 0, 2, 2), rect(3, 1, 1, 3, 3), rect(1, 5, 5, 7, 7)]
    by_feature = boxes_from_shapes(shapes, "rectangle", features={"object_id": [4, 4, 9]})
    assert sorted(by_feature) == [4, 9]
    assert sorted(by_feature[4]) == [0, 1, 2, 3]
    red, blue = [1, 0, 0, 1], [0, 0, 1, 1]
    by_colour = boxes_from_shapes(shapes, "rectangle", colors=[red, blue, red])
    assert sorted(by_colour) == [1, 2]
    assert sorted(by_colour[1]) == [0, 1]
    per_rect = boxes_from_shapes(shapes, "rectangle")
    assert sorted(per_rect) == [1, 2, 3]
    assert boxes_from_shapes([], []) == {}
    with pytest.raises(ValueError, match="object ids"):
        boxes_from_shapes(shapes, "rectangle", object_ids=[1])


def test_boxes_from_labels() -> None:
    labels = np.zeros((3, 10, 12), np.uint8)
    labels[1, 2:5, 3:9] = 2
    labels[2, 0, 11] = 2
    assert boxes_from_labels(labels) == {2: {1: (3, 2, 8, 4), 2: (11, 0, 11, 0)}}


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_boxes_file_round_trip_and_keyframes(tmp_path, suffix) -> None:
    path = tmp_path / f"boxes{suffix}"
    if suffix == ".json":
        records = [
            {"object": 1, "slice": 2, "x0": 10, "y0": 10, "x1": 20, "y1": 30},
            {"object_id": 1, "frame": 4, "x0": 14, "y0": 10, "x1": 24, "y1": 30},
            {"id": 2, "z": 0, "x0": 5, "y0": 5, "x1": 1, "y1": 1, "last_slice": 2},
        ]
        path.write_text(json.dumps({"boxes": records}))
    else:
        path.write_text(
            "object,slice,x0,y0,x1,y1,last_slice\n"
            "1,2,10,10,20,30,\n1,4,14,10,24,30,\n2,0,5,5,1,1,2\n"
        )
    boxes = load_boxes_file(path)
    assert boxes[1] == {2: (10, 10, 20, 30), 3: (12, 10, 22, 30), 4: (14, 10, 24, 30)}
    assert boxes[2] == {z: (1, 1, 5, 5) for z in range(3)}  # inverted corners, 3D box
    assert load_boxes_file(path, interpolate=False)[1] == {2: (10, 10, 20, 30), 4: (14, 10, 24, 30)}
    out = tmp_path / f"again{suffix}"
    save_boxes_file(boxes, out)
    assert load_boxes_file(out) == boxes


def test_boxes_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_boxes_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_boxes_file(bad)
    missing = tmp_path / "missing_field.csv"
    missing.write_text("object,slice,x0,y0,x1\n1,2,3,4,5\n")
    with pytest.raises(ValueError, match="y1"):
        load_boxes_file(missing)
    other = tmp_path / "boxes.txt"
    other.write_text("")
    with pytest.raises(ValueError, match="suffix"):
        load_boxes_file(other)
