"""Point prompts in the engine (issue 17 point 5): stack pixels -> model input, validation,
iter_segment_boxes with clicks against a direct decode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_masam.inference import (
    _Engine,
    iter_segment_boxes,
    points_batch,
    points_to_model_frame,
    run,
)
from napari_masam.model import config as masam_config
from napari_masam.model import masam
from napari_masam.model.base import points_refusal
from napari_masam.preprocess import INTENSITY_PRESETS, StackPipeline, resize_slices_torch
from napari_masam.prompts import check_points_in_stack

S = masam_config.MASAM_CONFIGS["tiny"].image_size  # 64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = dataclasses.replace(masam_config.MASAM_CONFIGS["tiny"], slices_per_group=3)
    model = masam.build_masam(config, num_classes=1).eval()
    with torch.no_grad():  # SAM's point embeddings start near zero: make clicks matter
        for emb in model.prompt_encoder.point_embeddings:
            emb.weight.normal_()
    return model


# ---------------------------------------------------------------------------- geometry
def _sample(img: np.ndarray, y: float, x: float) -> float:
    """Bilinear value of ``img`` at fractional pixel index (y, x) (pixel centres at integers)."""
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    fy, fx = y - y0, x - x0
    v = img[y0 : y0 + 2, x0 : x0 + 2]
    return float(
        v[0, 0] * (1 - fy) * (1 - fx)
        + v[0, 1] * (1 - fy) * fx
        + v[1, 0] * fy * (1 - fx)
        + v[1, 1] * fy * fx
    )


@pytest.mark.parametrize("model_orientation", ["SPL", "SLP", "SAL", "SPR", "SRA", "IAR"])
@pytest.mark.parametrize(
    ("shape_yx", "size", "mode"),
    [((40, 52), 64, "stretch"), ((40, 52), 32, "longest_side"), ((64, 64), 64, "stretch")],
)
def test_point_lands_where_its_pixel_goes(model_orientation, shape_yx, size, mode) -> None:
    """Independent of the point formula: ramps holding each pixel's own (row, col) go down the
    engine's pixel road (orientation, then the resize), and the model-frame point must read back
    its stack position from them."""
    ny, nx = shape_yx
    rows, cols = np.mgrid[:ny, :nx].astype(np.float32)
    stack_r = np.stack([rows] * 3)
    stack_c = np.stack([cols] * 3)
    pipe = StackPipeline(
        stack_r,
        image_size=size,
        slices_per_group=1,
        resize_mode=mode,
        model_orientation=model_orientation,
        preset=INTENSITY_PRESETS["minmax"],
    )
    z = 1
    zm = pipe.transform.slice_to_model(z, 3)
    road = []
    for stack in (stack_r, stack_c):
        oriented = pipe.transform.inplane_to_model(stack[pipe.transform.slice_from_model(zm, 3)])
        t = torch.from_numpy(np.ascontiguousarray(oriented, dtype=np.float32))[None, None]
        road.append(resize_slices_torch(t, pipe.info.scaled_yx)[0, 0].numpy())
    points = [(10.0, 13.0, 1), (25.0, 30.0, 0), (17.4, 40.6, 1)]
    got = points_to_model_frame(points, pipe.transform, (ny, nx), pipe.info)
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_array_equal(got[:, 2], [1, 0, 1])
    for (y, x, _), (xm, ym, _) in zip(points, got, strict=True):
        assert _sample(road[0], ym, xm) == pytest.approx(y, abs=0.05)
        assert _sample(road[1], ym, xm) == pytest.approx(x, abs=0.05)


def test_engine_points_to_model_is_the_module_function(tiny) -> None:
    stack = np.random.default_rng(0).random((4, 40, 52)).astype(np.float32)
    eng = _Engine(
        tiny,
        stack,
        preset=None,
        device="cpu",
        cache=None,
        stack_orientation="SPR",  # the model is SPL: columns flip
        batch_size=None,
        autocast=False,
    )
    pts = [(3.0, 5.0, 1), (39.0, 0.0, 0)]
    got = eng.points_to_model(pts)
    np.testing.assert_array_equal(
        got, points_to_model_frame(pts, eng.transform, (40, 52), eng.info)
    )
    # by hand: columns flipped (x -> 51 - x), then stretched 52 -> 64 and 40 -> 64
    sx, sy = 64 / 52, 64 / 40
    np.testing.assert_allclose(
        got,
        [
            [(51 - 5 + 0.5) * sx - 0.5, (3 + 0.5) * sy - 0.5, 1],
            [(51 - 0 + 0.5) * sx - 0.5, (39 + 0.5) * sy - 0.5, 0],
        ],
        rtol=1e-6,
    )


def test_points_batch_pads_with_minus_one() -> None:
    assert points_batch([None, np.zeros((0, 3))]) is None
    coords, labels = points_batch([np.array([[1.0, 2.0, 1.0], [3.0, 4.0, 0.0]]), None])
    assert coords.dtype == torch.float32 and labels.dtype == torch.int64
    np.testing.assert_array_equal(coords.numpy(), [[[1, 2], [3, 4]], [[0, 0], [0, 0]]])
    np.testing.assert_array_equal(labels.numpy(), [[1, 0], [-1, -1]])


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("points", "message"),
    [
        ({1: {7: [(1, 1, 1)]}}, "outside the stack's 4 slices"),
        ({1: {0: [(1, 60, 1)]}}, "outside the 40 x 52 slice"),
        ({1: {0: [(-0.6, 3, 1)]}}, "outside the 40 x 52 slice"),
        ({1: {0: [(1, 1, 2)]}}, "must be 1 (positive) or 0 (negative)"),
        ({1: {0: [(1, 1, True)]}}, "must be 1 (positive) or 0 (negative)"),
        ({1: {0: [(float("nan"), 1, 1)]}}, "not finite"),
        ({1: {0: [(1, 1)]}}, "(y, x, label)"),
        ({0: {0: [(1, 1, 1)]}}, "positive integers"),
    ],
)
def test_bad_points_are_refused_naming_object_and_slice(points, message) -> None:
    with pytest.raises(ValueError) as info:
        check_points_in_stack(points, (4, 40, 52))
    assert message in str(info.value)


def test_valid_points_are_sorted_and_typed() -> None:
    got = check_points_in_stack(
        {2: {3: [(1, 2.5, 0)], 1: []}, 1: {0: [(39.4, 51.4, 1)]}}, (4, 40, 52)
    )
    assert got == {1: {0: [(39.4, 51.4, 1)]}, 2: {3: [(1.0, 2.5, 0)]}}


# ---------------------------------------------------------------------------- iter_segment_boxes
def _direct(model, stack, z, box, points) -> np.ndarray:
    """The object's mask on slice z, decoded by hand (identity geometry: S x S slices, SPL)."""
    pipe = StackPipeline.for_model(model, stack)
    x = torch.from_numpy(pipe.group_input(pipe.members(z)))[None]
    with torch.inference_mode():
        emb = model.encode(x)[pipe.front : pipe.front + 1]
        coords = torch.tensor([[[p[1], p[0]] for p in points]], dtype=torch.float32)  # x = col
        labels = torch.tensor([[p[2] for p in points]])
        box_t = None if box is None else torch.tensor([box], dtype=torch.float32)
        logits = model.decode(emb, box_t, (coords, labels))
    return (1.0 - logits.softmax(dim=1)[0, 0]).numpy() > 0.5


def test_clicks_reach_the_decoder_in_the_boxes_frame(tiny) -> None:
    rng = np.random.default_rng(1)
    stack = rng.random((4, S, S)).astype(np.float32)
    boxes = {1: {1: (5, 8, 40, 50)}}
    clicks = {1: {1: [(20, 12, 1), (45, 30, 0)]}, 3: {2: [(50, 10, 1)]}}  # object 3: points alone
    plain = run(iter_segment_boxes(tiny, stack, boxes))
    result = run(iter_segment_boxes(tiny, stack, boxes, points=clicks))
    assert result.object_ids == (1, 3)
    assert [z for z in range(4) if result.labels[z].any()] == [1, 2]
    one = _direct(tiny, stack, 1, boxes[1][1], clicks[1][1])
    three = _direct(tiny, stack, 2, None, clicks[3][2])
    assert one.any() and three.any()
    np.testing.assert_array_equal(result.labels[1] == 1, one)
    np.testing.assert_array_equal(result.labels[2] == 3, three)
    assert not np.array_equal(result.labels[1], plain.labels[1])  # the clicks changed the mask
    # x/y swapped clicks give another mask (the frame matters)
    swapped = {1: {1: [(12, 20, 1), (30, 45, 0)]}}
    other = run(iter_segment_boxes(tiny, stack, boxes, points=swapped))
    assert not np.array_equal(other.labels[1], result.labels[1])


def test_a_model_without_points_refuses_before_any_work(tiny) -> None:
    stack = np.zeros((4, S, S), np.float32)
    tiny.supports_points = False
    try:
        gen = iter_segment_boxes(tiny, stack, {1: {0: (1, 1, 9, 9)}}, points={1: {0: [(2, 2, 1)]}})
        with pytest.raises(ValueError) as info:
            next(gen)
    finally:
        tiny.supports_points = True
    assert str(info.value) == points_refusal(tiny)
    assert "not supported" in str(info.value) and tiny.metadata.name in str(info.value)
    # bad points are refused before any encode as well, with the check's words
    with pytest.raises(ValueError, match="outside the stack's 4 slices"):
        next(iter_segment_boxes(tiny, stack, {1: {0: (1, 1, 9, 9)}}, points={1: {9: [(2, 2, 1)]}}))


# ---------------------------------------------------------------------------- widget's rule
def test_a_click_goes_to_the_box_holding_it_nearest_centre_first() -> None:
    from napari_masam._layers import assign_points_to_objects

    boxes = {1: {2: (0, 0, 20, 20)}, 2: {2: (10, 10, 40, 40), 3: (0, 0, 5, 5)}}
    clicks = [
        (2, 5.0, 5.0, 1),  # only in box 1
        (2, 15.0, 18.0, 0),  # in both: centre of 1 is (10, 10), of 2 (25, 25) -> object 1
        (2, 19.0, 20.0, 1),  # in both: |(19,20)-(10,10)| = 13.5 > |(19,20)-(25,25)| = 7.8 -> 2
        (2, 20.4, 50.0, 1),  # in no box
        (3, 5.4, 5.4, 0),  # on box 2's inclusive edge pixel (x1 + 0.5 still inside)
    ]
    assigned, unassigned = assign_points_to_objects(clicks, boxes, default_object=None)
    assert assigned == {
        1: {2: [(5.0, 5.0, 1), (15.0, 18.0, 0)]},
        2: {2: [(19.0, 20.0, 1)], 3: [(5.4, 5.4, 0)]},
    }
    assert unassigned == [(2, 20.4, 50.0)]
    assigned, unassigned = assign_points_to_objects(clicks, boxes, default_object=7)
    assert assigned[7] == {2: [(20.4, 50.0, 1)]} and not unassigned
