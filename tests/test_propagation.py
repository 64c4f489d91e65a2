"""Propagation of keyframe prompts through a stack, on a deterministic model.

``Threshold`` segments exactly the bright pixels inside the box it is given (logits +-10), so
what the engine does with boxes, walks, stops, meetings and corrections is exactly checkable
against a phantom of known extent.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from napari_masam.cache import EmbeddingCache
from napari_masam.inference import PropagationConfig, iter_propagate, iter_segment_boxes, run
from napari_masam.model.base import ModelMetadata, SegmentationModel
from napari_masam.prompts import interpolate_keyframes, mask_box

S = 64
DEPTH = 32
FIRST, LAST = 5, 25  # the phantom's extent
CENTRE = (30, 34)  # (row, col)


#: The mechanics under test, independent of the tuned defaults: plain walks meeting between
#: keyframes, no overlap check, boxes following the mask freely.
BASE = PropagationConfig(
    min_area_fraction=0.1, max_shrink_px=None, min_overlap=0.0, between_keyframes="walk"
)


def cfg(**changes) -> PropagationConfig:
    return dataclasses.replace(BASE, **changes)


def propagate(*args, config: PropagationConfig | None = None, **kwargs):
    return iter_propagate(*args, config=BASE if config is None else config, **kwargs)


class Threshold(SegmentationModel):
    """Foreground = model pixels inside the box whose (group-normalised) value is > 0.5."""

    kind = "threshold"

    def __init__(self, group: int = 1) -> None:
        super().__init__()
        self.image_size = S
        self.slices_per_group = group
        self.num_classes = 1
        self.supports_automatic = False
        self.supports_boxes = True
        self.metadata = ModelMetadata("threshold", orientation="", resize_mode="stretch")
        self.dummy = nn.Parameter(torch.zeros(()))
        self.encoded = 0  # slices encoded

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0] * images.shape[1]
        return images.flatten(0, 1)[:, :1] + self.dummy

    def decode(self, embeddings, boxes_xyxy=None):
        idx = torch.arange(self.image_size, dtype=torch.float32)
        b = boxes_xyxy.float()
        inx = (idx >= b[:, 0:1] - 0.5) & (idx < b[:, 2:3] + 0.5)
        iny = (idx >= b[:, 1:2] - 0.5) & (idx < b[:, 3:4] + 0.5)
        fg = (iny[:, :, None] & inx[:, None, :]) & (embeddings[:, 0] > 0.5)
        fg = torch.where(fg, 10.0, -10.0)
        return torch.stack([torch.zeros_like(fg), fg], dim=1)


def radius(z: int) -> float:
    """A cross-section that changes non-linearly: grows fast, plateaus, shrinks."""
    t = (z - FIRST) / (LAST - FIRST)
    return 5.0 + 7.0 * np.sin(np.pi * t) ** 0.5


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """(Z, S, S) float32 image (1 inside the object, 0 outside) and its uint8 truth."""
    rows, cols = np.mgrid[:S, :S]
    truth = np.zeros((DEPTH, S, S), np.uint8)
    for z in range(FIRST, LAST + 1):
        r = radius(z)
        truth[z] = (rows - CENTRE[0]) ** 2 + ((cols - CENTRE[1]) * 0.8) ** 2 <= r * r
    image = truth.astype(np.float32)
    image[:, 2:6, 2:6] = 0.2  # something dim in every slice, so that min-max never divides by 0
    return image, truth


def box_of(truth: np.ndarray, z: int) -> tuple[int, int, int, int]:
    return mask_box(truth[z] > 0)  # type: ignore[return-value]


@pytest.fixture
def data():
    return phantom()


def test_one_box_gives_the_whole_object_and_stops_at_its_end(data) -> None:
    image, truth = data
    model = Threshold()
    seen = []
    gen = propagate(model, image, {1: {15: box_of(truth, 15)}}, preset="minmax")
    result = None
    try:
        while True:
            seen.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    np.testing.assert_array_equal(result.labels, truth)
    assert result.extents == {1: (FIRST, LAST)}
    assert result.mode == "propagate" and result.object_ids == (1,)
    # every finished slice streamed once, labels as written
    assert sorted(p.slice_index for p in seen) == list(range(DEPTH))
    for p in seen:
        if p.labels_slice is not None:
            np.testing.assert_array_equal(p.labels_slice, truth[p.slice_index])
        else:
            assert not truth[p.slice_index].any()
    # walks ended on the first empty slice each way: decoded 1 keyframe + 10 + 1 up + 10 + 1 down
    assert result.timings["decoded"] == 1 + (LAST - 15 + 1) + (15 - FIRST + 1)
    assert result.preprocessing["propagation"] == BASE.to_dict()


def test_slice_range_is_never_left(data) -> None:
    image, truth = data
    result = run(
        propagate(Threshold(), image, {1: {15: box_of(truth, 15)}}, slice_ranges={1: (12, 19)})
    )
    expected = truth.copy()
    expected[:12] = 0
    expected[20:] = 0
    np.testing.assert_array_equal(result.labels, expected)
    with pytest.raises(ValueError, match="outside its slice range"):
        run(propagate(Threshold(), image, {1: {15: box_of(truth, 15)}}, slice_ranges={1: (0, 9)}))


def test_stop_criterion_area_fraction() -> None:
    image, truth = phantom()
    # the tips (radius 5 at the ends, 12 in the middle) are < 40 % of the keyframe's area
    config = cfg(min_area_fraction=0.4)
    result = run(propagate(Threshold(), image, {1: {15: box_of(truth, 15)}}, config=config))
    area = truth.reshape(DEPTH, -1).sum(axis=1)
    kept = [z for z in range(DEPTH) if result.labels[z].any()]
    first_small_up = next(z for z in range(15, DEPTH) if area[z] < 0.4 * area[15])
    first_small_down = next(z for z in range(15, -1, -1) if area[z] < 0.4 * area[15])
    assert kept == list(range(first_small_down + 1, first_small_up))
    for z in kept:
        np.testing.assert_array_equal(result.labels[z], truth[z])


def test_two_keyframes_meet_without_a_seam(data) -> None:
    image, truth = data
    boxes = {1: {8: box_of(truth, 8), 22: box_of(truth, 22)}}
    result = run(propagate(Threshold(), image, boxes))
    np.testing.assert_array_equal(result.labels, truth)
    # what interpolated keyframes give on the same phantom (the non-linear profile is lost)
    interp = run(iter_segment_boxes(Threshold(), image, {1: interpolate_keyframes(boxes[1])}))
    assert (interp.labels != truth).sum() > 0


def test_meeting_walks_are_weighted_by_distance() -> None:
    # two different keyframe masks on an all-bright stack: the walk from each keyframe keeps
    # its own mask (the Threshold model fills the box), the combination switches half way
    image = np.ones((11, S, S), np.float32)
    image[:, 0, 0] = 0
    a = np.zeros((S, S), bool)
    a[10:20, 10:20] = True
    b = np.zeros((S, S), bool)
    b[30:50, 30:50] = True
    config = cfg(margin_px=0, max_growth=100)
    result = run(propagate(Threshold(), image, {}, masks={1: {0: a, 10: b}}, config=config))
    lab = result.labels
    np.testing.assert_array_equal(lab[0], a)
    np.testing.assert_array_equal(lab[10], b)
    for z in range(1, 10):
        # weight of the walk from 0 is (10 - z) / 10: it wins (> 0.5) for z < 5; at z = 5
        # each side has 0.5, not above the threshold: only where both agree (nowhere here)
        expected = a if z < 5 else b if z > 5 else a & b
        np.testing.assert_array_equal(lab[z] > 0, expected, err_msg=f"slice {z}")


def test_correction_changes_only_dependent_slices(data) -> None:
    image, truth = data
    model = Threshold()
    boxes = {1: {15: box_of(truth, 15)}, 2: {3: (50, 50, 60, 60)}}
    image = image.copy()
    image[2:5, 52:58, 52:58] = 1.0  # a second object on slices 2..4
    before = run(propagate(model, image, boxes)).labels
    assert set(np.unique(before)) == {0, 1, 2}
    # the user fixes slice 18 with the brush (half of the blob) and marks it as a keyframe
    fixed = truth[18] > 0
    fixed[:, : CENTRE[1]] = False
    seen = []
    gen = propagate(model, image, boxes, masks={1: {18: fixed}}, previous=before, changed={1: [18]})
    try:
        while True:
            seen.append(next(gen))
    except StopIteration as stop:
        after = stop.value.labels
    np.testing.assert_array_equal(after[18] == 1, fixed)
    changed = {z for z in range(DEPTH) if not np.array_equal(after[z], before[z])}
    assert 18 in changed and changed <= set(range(16, LAST + 1))
    # slices before the gap and object 2 were not recomputed: bit-identical and never yielded
    np.testing.assert_array_equal(after[:16], before[:16])
    assert min(p.slice_index for p in seen) >= 16
    # up from 18 the walk regrows by the margin and rejoins the old result: it stops there
    rejoined = max(changed) + 1
    written = [p.slice_index for p in seen if p.labels_slice is not None]
    assert rejoined <= LAST and max(written) == rejoined - 1
    np.testing.assert_array_equal(after[rejoined:], before[rejoined:])
    assert before is not after  # previous untouched
    with pytest.raises(ValueError, match="previous"):
        next(propagate(model, image, boxes, changed={1: [18]}))


def test_cancel_keeps_finished_slices(data) -> None:
    image, truth = data
    out = np.full(truth.shape, 7, np.uint8)
    gen = propagate(Threshold(), image, {1: {15: box_of(truth, 15)}}, out=out)
    seen = [next(gen) for _ in range(4)]
    gen.close()
    written = [p.slice_index for p in seen if p.labels_slice is not None]
    assert written
    for z in written:
        np.testing.assert_array_equal(out[z], truth[z])
    others = [z for z in range(DEPTH) if z not in written]
    assert np.all(out[others] == 7)


def test_groups_encoded_once_and_second_object_decoder_only(data) -> None:
    image, truth = data
    model = Threshold(group=5)
    cache = EmbeddingCache()
    result = run(propagate(model, image, {1: {15: box_of(truth, 15)}}, cache=cache))
    np.testing.assert_array_equal(result.labels, truth)
    visited = range(FIRST - 1, LAST + 2)  # the walks read one empty slice past each end
    tiles = {z // 5 for z in visited}
    assert result.timings["windows_encoded"] == len(tiles)
    assert model.encoded == 5 * len(tiles)
    again = run(propagate(model, image, {2: {14: box_of(truth, 14)}}, cache=cache))
    assert again.timings["windows_encoded"] == 0 and model.encoded == 5 * len(tiles)
    np.testing.assert_array_equal(again.labels, 2 * truth)


def test_video_tracks_a_moving_object_and_reanchors() -> None:
    frames = np.zeros((12, S, S, 3), np.uint8)
    frames[..., 0] = 40
    truth = np.zeros((12, S, S), np.uint8)
    for t in range(12):
        r0, c0 = 10 + 2 * t, 8 + 3 * t  # moves 2 rows and 3 columns per frame
        frames[t, r0 : r0 + 12, c0 : c0 + 10] = 255
        truth[t, r0 : r0 + 12, c0 : c0 + 10] = 3
    config = cfg(margin_px=4)
    result = run(
        propagate(Threshold(), frames, {3: {0: box_of(truth, 0)}}, config=config, preset="rgb")
    )
    np.testing.assert_array_equal(result.labels, truth)
    # a margin smaller than the motion loses the object; a second box re-anchors the track
    small = cfg(margin_px=1)
    lost = run(propagate(Threshold(), frames, {3: {0: box_of(truth, 0)}}, config=small)).labels
    assert not np.array_equal(lost, truth)
    boxes = {3: {t: box_of(truth, t) for t in (0, 4, 8)}}
    anchored = run(propagate(Threshold(), frames, boxes, config=small)).labels
    for t in (0, 4, 8):
        np.testing.assert_array_equal(anchored[t], truth[t])


def test_errors(data) -> None:
    image, _ = data
    with pytest.raises(ValueError, match="outside the stack"):
        next(propagate(Threshold(), image, {1: {40: (1, 1, 5, 5)}}))
    with pytest.raises(ValueError, match=r"\(Y, X\)"):
        next(propagate(Threshold(), image, {}, masks={1: {3: np.ones((4, 4), bool)}}))
    with pytest.raises(ValueError, match="min_area_fraction"):
        PropagationConfig(min_area_fraction=1.5)


def test_next_box_does_not_collapse_with_max_shrink() -> None:
    m = np.zeros((40, 40), bool)
    m[18:22, 18:22] = True  # the model found only a small part of the object
    free = cfg(margin_px=2).next_box(m, (5, 5, 35, 35))
    assert free == (16, 16, 23, 23)
    held = cfg(margin_px=2, max_shrink_px=1).next_box(m, (5, 5, 35, 35))
    assert held == (6, 6, 34, 34)  # each side moved in by 1 pixel only
    grown = np.zeros((40, 40), bool)
    grown[2:39, 10:20] = True  # outward the box follows the mask (+ margin), clipped
    assert cfg(max_shrink_px=1).next_box(grown, (12, 12, 18, 18)) == (8, 0, 21, 39)
    assert cfg().next_box(np.zeros((5, 5), bool), None) is None


def test_follow_motion_keeps_a_fast_object() -> None:
    frames = np.zeros((10, S, S), np.float32)
    frames[:, 0, 0] = 0.2
    truth = np.zeros((10, S, S), np.uint8)
    for t in range(10):
        c0 = 4 + 5 * t  # 5 columns per frame: more than the 2 px margin
        frames[t, 20:30, c0 : c0 + 8] = 1.0
        truth[t, 20:30, c0 : c0 + 8] = 1
    boxes = {1: {0: box_of(truth, 0)}}
    # margin 3 < motion 5: the first step finds a part of the object (no velocity yet); the
    # plain walk then lags further behind every frame, the motion-following one catches up
    plain = cfg(margin_px=3)
    lost = run(propagate(Threshold(), frames, boxes, config=plain)).labels
    assert (lost[2:] != truth[2:]).any()
    moving = cfg(margin_px=3, follow_motion=True)
    tracked = run(propagate(Threshold(), frames, boxes, config=moving)).labels
    assert 0 < tracked[1].sum() < truth[1].sum()
    np.testing.assert_array_equal(tracked[2:], truth[2:])


def test_min_overlap_ends_a_walk_that_jumps() -> None:
    vol = np.zeros((26, S, S), np.float32)
    vol[:, 0, 0] = 0.2
    vol[:20, 20:30, 20:30] = 1.0
    vol[20:, 20:30, 26:36] = 1.0  # something else, half inside the walk's box
    boxes = {1: {5: (20, 20, 29, 29)}}
    free = run(propagate(Threshold(), vol, boxes)).labels
    assert free[20:].any()  # without the check the walk takes the neighbour
    checked = run(propagate(Threshold(), vol, boxes, config=cfg(min_overlap=0.5)))
    assert checked.extents == {1: (0, 19)}
    np.testing.assert_array_equal(checked.labels[:20], free[:20])


def test_between_keyframes_interpolate(data) -> None:
    image, truth = data
    boxes = {1: {8: box_of(truth, 8), 22: box_of(truth, 22)}}
    config = cfg(between_keyframes="interpolate")
    result = run(propagate(Threshold(), image, boxes, config=config))
    # the gap is the box run on interpolated boxes; outside the span the walks go on
    interp = run(iter_segment_boxes(Threshold(), image, {1: interpolate_keyframes(boxes[1])}))
    np.testing.assert_array_equal(result.labels[8:23], interp.labels[8:23])
    np.testing.assert_array_equal(result.labels[:8], truth[:8])
    np.testing.assert_array_equal(result.labels[23:], truth[23:])
    assert result.timings["decoded"] == 2 + 13 + (8 - FIRST + 1) + (LAST - 22 + 1)
    with pytest.raises(ValueError, match="between_keyframes"):
        PropagationConfig(between_keyframes="blend")


def test_default_config_on_the_phantom(data) -> None:
    # the tuned defaults (max_shrink_px=1, min_overlap=0.6, min_area_fraction=0.3, interpolated
    # gaps): the steep tips of this phantom (radius 5 -> 7.8 in one slice, IoU 0.41, 4 % of the
    # keyframe's area) end the walks one slice early
    image, truth = data
    result = run(iter_propagate(Threshold(), image, {1: {15: box_of(truth, 15)}}))
    np.testing.assert_array_equal(result.labels[FIRST + 1 : LAST], truth[FIRST + 1 : LAST])
    assert result.extents == {1: (FIRST + 1, LAST - 1)}


# ---------------------------------------------------------------------------- clicks (issue 17.5)
@pytest.fixture(scope="module")
def clicking():
    """A tiny random MA-SAM (supports_points) whose clicks change its masks; its mask logits
    are scaled up so that no probability sits within float16 rounding of the threshold
    (propagation stores probabilities as float16 crops)."""
    from napari_masam.model import config as masam_config
    from napari_masam.model import masam

    torch.manual_seed(0)
    config = dataclasses.replace(masam_config.MASAM_CONFIGS["tiny"], slices_per_group=3)
    model = masam.build_masam(config, num_classes=1).eval()
    with torch.no_grad():
        for emb in model.prompt_encoder.point_embeddings:
            emb.weight.normal_()
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(1000)
            mlp.layers[-1].bias.mul_(1000)
    return model


def test_clicks_make_a_keyframe_walked_from_like_its_mask(clicking) -> None:
    """A slice with box + clicks is decoded with both (the same mask as box mode with those
    clicks), and the walks start from that mask exactly as from a brush-fixed mask keyframe."""
    size = clicking.image_size
    rng = np.random.default_rng(3)
    stack = rng.random((9, size, size)).astype(np.float32)
    box, clicks = (6, 8, 50, 52), [(20, 30, 1), (40, 12, 0)]
    config = cfg(min_area_fraction=0.0, max_growth=1e6)  # walk the whole stack
    with_clicks = run(
        iter_propagate(clicking, stack, {1: {4: box}}, points={1: {4: clicks}}, config=config)
    )
    plain = run(iter_propagate(clicking, stack, {1: {4: box}}, config=config))
    boxed = run(
        iter_segment_boxes(clicking, stack, {1: {4: box}}, points={1: {4: clicks}}, windows="tiled")
    )
    np.testing.assert_array_equal(with_clicks.labels[4], boxed.labels[4])
    assert not np.array_equal(with_clicks.labels[4], plain.labels[4])  # the clicks matter
    as_mask = run(
        iter_propagate(clicking, stack, {}, masks={1: {4: boxed.labels[4] == 1}}, config=config)
    )
    np.testing.assert_array_equal(with_clicks.labels, as_mask.labels)
    assert with_clicks.labels[[3, 5]].any()  # it walked


def test_clicks_alone_make_a_keyframe_and_models_without_points_refuse(clicking, data) -> None:
    size = clicking.image_size
    stack = np.random.default_rng(4).random((5, size, size)).astype(np.float32)
    only = run(
        iter_propagate(
            clicking, stack, {}, points={2: {1: [(30, 30, 1)]}}, slice_ranges={2: (1, 1)}
        )
    )
    boxed = run(
        iter_segment_boxes(clicking, stack, {}, points={2: {1: [(30, 30, 1)]}}, windows="tiled")
    )
    assert only.object_ids == (2,) and boxed.labels[1].any()
    np.testing.assert_array_equal(only.labels, boxed.labels)
    from napari_masam.model.base import points_refusal

    image, truth = data
    model = Threshold()
    with pytest.raises(ValueError) as info:
        run(propagate(model, image, {1: {15: box_of(truth, 15)}}, points={1: {15: [(30, 34, 1)]}}))
    assert str(info.value) == points_refusal(model)


class EdgeShy(Threshold):
    """Under-segments like LiteMedSAM on small structures: object pixels within 3 px of the
    box's edge get probability 0.3 (below the mask threshold), the others 1."""

    def decode(self, embeddings, boxes_xyxy=None):
        idx = torch.arange(self.image_size, dtype=torch.float32)
        b = boxes_xyxy.float()
        inx = (idx >= b[:, 0:1] - 0.5) & (idx < b[:, 2:3] + 0.5)
        iny = (idx >= b[:, 1:2] - 0.5) & (idx < b[:, 3:4] + 0.5)
        deep_x = (idx >= b[:, 0:1] + 2.5) & (idx < b[:, 2:3] - 2.5)
        deep_y = (idx >= b[:, 1:2] + 2.5) & (idx < b[:, 3:4] - 2.5)
        obj = embeddings[:, 0] > 0.5
        inside = (iny[:, :, None] & inx[:, None, :]) & obj
        deep = (deep_y[:, :, None] & deep_x[:, None, :]) & obj
        p = torch.where(deep, 1.0, torch.where(inside, 0.3, 0.0)).clamp(1e-6, 1 - 1e-6)
        x = torch.log(p / (1 - p))
        return torch.stack([torch.zeros_like(x), x], dim=1)


def disc_stack() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A disc of constant radius 12 on slices FIRST..LAST, and its tight box."""
    rows, cols = np.mgrid[:S, :S]
    image = np.zeros((DEPTH, S, S), np.float32)
    image[:, 2:6, 2:6] = 0.2
    disc = (rows - 30) ** 2 + (cols - 34) ** 2 <= 12**2
    image[FIRST : LAST + 1][:, disc] = 1.0
    return image, mask_box(disc)  # type: ignore[return-value]


def test_box_threshold_keeps_an_under_segmenting_walk_on_the_object() -> None:
    """Grown from the mask alone, each box loses 1 px per side per slice (3 px shy edge - 2 px
    margin) and the walk dies; grown from the pixels above ``box_threshold`` it stays the object's
    box + margin on every slice of a constant cross-section."""
    image, box = disc_stack()
    plain = run(propagate(EdgeShy(), image, {1: {15: box}}, config=cfg(min_area_fraction=0.3)))
    fixed = run(
        propagate(
            EdgeShy(), image, {1: {15: box}}, config=cfg(min_area_fraction=0.3, box_threshold=0.2)
        )
    )
    assert fixed.extents[1] == (FIRST, LAST)
    first, last = plain.extents[1]
    assert first > FIRST + 3 and last < LAST - 3  # the plain walk collapsed
    # every walked slice got the same box (the disc's + 2 px margin): the box never drifted
    for z in [*range(FIRST, 15), *range(17, LAST + 1)]:
        np.testing.assert_array_equal(fixed.labels[z], fixed.labels[16])
    assert fixed.labels[16].sum() > plain.labels[16].sum()
    with pytest.raises(ValueError, match="box_threshold"):
        PropagationConfig(box_threshold=1.5)


class Scored(Threshold):
    """Threshold + an IoU estimate: the share of the slice's bright pixels inside the box (1
    when the box holds the whole object, less when it cuts it)."""

    predicts_iou = True

    def decode_scored(self, embeddings, boxes_xyxy):
        logits = self.decode(embeddings, boxes_xyxy)
        inside = (logits[:, 1] > 0).flatten(1).sum(1).float()
        total = (embeddings[:, 0] > 0.5).flatten(1).sum(1).float().clamp(min=1)
        return logits, inside / total


def test_between_keyframes_select_keeps_the_better_box(data) -> None:
    """With three keyframes on the non-linear phantom the interpolated boxes cut the object
    (it grows fast, then plateaus); "select" walks from both keyframes and keeps, per slice,
    the mask the model scores higher: here the whole object on every slice. A model without
    an IoU head falls back to interpolation exactly."""
    image, truth = data
    mid = (FIRST + LAST) // 2
    keys = {z: box_of(truth, z) for z in (FIRST, mid, LAST)}
    select = cfg(between_keyframes="select", margin_px=4)
    only = {1: (FIRST, LAST)}  # no outer walks: only keyframes and gaps are decoded
    got = run(propagate(Scored(), image, {1: keys}, config=select, slice_ranges=only))
    interp = run(
        propagate(
            Scored(), image, {1: keys}, config=cfg(between_keyframes="interpolate", margin_px=4)
        )
    )
    np.testing.assert_array_equal(got.labels > 0, truth > 0)
    assert (interp.labels > 0).sum() < (truth > 0).sum()  # interpolation really cuts it
    plain = run(propagate(Threshold(), image, {1: keys}, config=select))
    np.testing.assert_array_equal(plain.labels, interp.labels)
    # the gap walks meet in the middle: each gap slice was decoded once or twice, never more
    gap_slices = (mid - FIRST - 1) + (LAST - mid - 1)
    assert gap_slices <= got.timings["decoded"] - 3 <= 2 * gap_slices


class ScoredEdgeShy(EdgeShy):
    """EdgeShy + an IoU estimate: the share of the slice's object pixels its box holds."""

    predicts_iou = True

    def decode_scored(self, embeddings, boxes_xyxy):
        logits = self.decode(embeddings, boxes_xyxy)
        held = (logits[:, 1] > -5).flatten(1).sum(1).float()  # probability 0.3 and 1 alike
        total = (embeddings[:, 0] > 0.5).flatten(1).sum(1).float().clamp(min=1)
        return logits, held / total


def test_candidate_thresholds_keep_the_best_scored_box() -> None:
    """Each outward step also tries the box grown from the pixels above 0.2 and keeps the
    better-scored mask: the walk no longer collapses; a model without scores ignores it."""
    image, box = disc_stack()
    config = cfg(min_area_fraction=0.3, candidate_thresholds=(0.2,))
    got = run(propagate(ScoredEdgeShy(), image, {1: {15: box}}, config=config))
    assert got.extents[1] == (FIRST, LAST)
    unscored = run(propagate(EdgeShy(), image, {1: {15: box}}, config=config))
    plain = run(propagate(EdgeShy(), image, {1: {15: box}}, config=cfg(min_area_fraction=0.3)))
    np.testing.assert_array_equal(unscored.labels, plain.labels)
    assert plain.extents[1][0] > FIRST + 3
    with pytest.raises(ValueError, match="candidate_thresholds"):
        PropagationConfig(candidate_thresholds=(0.0,))


def test_select_gaps_of_any_width_and_never_across_an_empty_keyframe(data) -> None:
    """Gaps of 1 and 2 slices are covered exactly (one walk each side, meeting in the middle);
    a keyframe whose mask is empty (the object is absent there) is never bridged by the
    interpolation of its neighbours' boxes."""
    image, truth = data
    select = cfg(between_keyframes="select", margin_px=4)
    only = {1: (10, 15)}
    keys = {z: box_of(truth, z) for z in (10, 12, 15)}
    got = run(propagate(Scored(), image, {1: keys}, config=select, slice_ranges=only))
    np.testing.assert_array_equal(got.labels[10:16] > 0, truth[10:16] > 0)
    assert got.timings["decoded"] <= 3 + 2 * 3  # 3 keyframes, 3 gap slices, <= 2 boxes each
    empty = np.zeros(truth.shape[1:], bool)
    gapped = run(
        propagate(
            Scored(),
            image,
            {1: {FIRST: box_of(truth, FIRST), LAST: box_of(truth, LAST)}},
            masks={1: {15: empty}},
            config=select,
            slice_ranges={1: (FIRST, LAST)},
        )
    )
    assert not gapped.labels[11:21].any()  # the walks next to the empty keyframe find nothing
    np.testing.assert_array_equal(gapped.labels[FIRST:11] > 0, truth[FIRST:11] > 0)
    np.testing.assert_array_equal(gapped.labels[21 : LAST + 1] > 0, truth[21 : LAST + 1] > 0)
