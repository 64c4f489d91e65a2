"""Intensity presets, resize geometry and orientation, checked against independent maths."""

from __future__ import annotations

import nibabel.orientations as nio
import numpy as np
import pytest
import torch

from napari_masam.preprocess import (
    INTENSITY_PRESETS,
    IntensityPreset,
    OrientationTransform,
    boxes_from_model_frame,
    boxes_to_model_frame,
    custom_ct_preset,
    labels_from_model_frame,
    labels_to_model_frame,
    normalize_group,
    normalize_slice,
    normalize_stack,
    orientation_transform,
    probabilities_to_grid,
    resize_info,
    resolve_preset,
    to_model_input,
    volume_window,
)

RNG = np.random.default_rng(7)


# -- intensities -------------------------------------------------------------------------------
def test_presets_match_the_authors() -> None:
    assert (INTENSITY_PRESETS["ct_abdomen"].low, INTENSITY_PRESETS["ct_abdomen"].high) == (
        -200,
        250,
    )
    assert (INTENSITY_PRESETS["ct_pancreas"].low, INTENSITY_PRESETS["ct_pancreas"].high) == (
        -50,
        200,
    )
    assert INTENSITY_PRESETS["mri"].percentile == 99
    assert not INTENSITY_PRESETS["rgb"].group_minmax
    assert all(INTENSITY_PRESETS[k].group_minmax for k in ("ct_abdomen", "mri", "minmax"))


def test_custom_ct_preset_and_errors() -> None:
    p = custom_ct_preset(40, 400)
    assert (p.low, p.high, p.kind) == (-160, 240, "ct")
    with pytest.raises(ValueError, match="width"):
        custom_ct_preset(40, 0)
    with pytest.raises(ValueError, match="kind"):
        IntensityPreset("x", "pet")
    with pytest.raises(ValueError, match="Unknown intensity preset"):
        resolve_preset("bone")
    assert resolve_preset(None, default="mri") is INTENSITY_PRESETS["mri"]


def test_ct_window_then_group_minmax() -> None:
    hu = RNG.integers(-1000, 1500, size=(5, 9, 11)).astype(np.int16)
    preset = INTENSITY_PRESETS["ct_abdomen"]
    window = volume_window(hu, preset)
    clipped = np.stack([normalize_slice(s, preset, window) for s in hu])
    np.testing.assert_array_equal(clipped, np.clip(hu, -200, 250).astype(np.float32))
    group = normalize_group(clipped, preset)
    expected = (clipped - clipped.min()) / (clipped.max() - clipped.min())
    np.testing.assert_allclose(group, expected, rtol=0, atol=1e-7)
    assert group.min() == 0 and group.max() == 1
    # a constant group (all air) becomes zeros, not NaN
    air = normalize_group(np.full((5, 4, 4), -200, np.float32), preset)
    assert np.all(air == 0)


def test_mri_percentile_clip() -> None:
    vol = RNG.gamma(2.0, 100.0, size=(6, 20, 20)).astype(np.float32)
    preset = INTENSITY_PRESETS["mri"]
    lo, hi = volume_window(vol, preset)
    assert lo == pytest.approx(vol.min())
    assert hi == pytest.approx(np.percentile(vol, 99))
    norm = normalize_stack(vol, preset)
    np.testing.assert_allclose(norm, (np.clip(vol, lo, hi) - lo) / (hi - lo), atol=1e-6)
    assert norm.max() == pytest.approx(1.0) and (norm == 1).mean() == pytest.approx(0.01, abs=0.003)


def test_rgb_divides_by_255_without_group_step() -> None:
    frames = RNG.integers(0, 256, size=(3, 4, 5, 3)).astype(np.uint8)
    preset = INTENSITY_PRESETS["rgb"]
    norm = normalize_stack(frames, preset)
    np.testing.assert_allclose(norm, frames / 255.0, atol=1e-7)
    np.testing.assert_array_equal(normalize_group(norm, preset), norm)


# -- resize ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "mode", "scaled"),
    [
        ((181, 217), "stretch", (256, 256)),
        ((181, 217), "longest_side", (214, 256)),  # 181 * 256 / 217 = 213.5 -> 214
        ((217, 181), "longest_side", (256, 214)),
        ((64, 64), "stretch", (64, 64)),
    ],
)
def test_resize_info(shape, mode, scaled) -> None:
    size = 64 if shape == (64, 64) else 256
    info = resize_info(shape, size, mode)
    assert info.scaled_yx == scaled
    assert info.is_identity == (shape == (64, 64))


def test_to_model_input_grey_and_rgb() -> None:
    grey = RNG.random((2, 30, 40)).astype(np.float32)
    t, info = to_model_input(grey, 64, "longest_side")
    assert t.shape == (2, 3, 64, 64) and t.dtype == torch.float32
    assert info.scaled_yx == (48, 64)
    assert torch.equal(t[:, 0], t[:, 2])  # grey copied to the 3 channels
    assert torch.all(t[:, :, 48:] == 0)  # zero padding at the bottom
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    # the content is a (bicubic) resample of the slice: its mean is kept closely
    assert float(t[0, 0, :48].mean()) == pytest.approx(float(grey[0].mean()), abs=0.01)
    rgb = RNG.random((1, 16, 16, 3)).astype(np.float32)
    t, info = to_model_input(rgb, 16, "stretch")
    assert info.is_identity
    np.testing.assert_array_equal(t[0].numpy(), rgb[0].transpose(2, 0, 1))


def test_boxes_to_model_frame_exact() -> None:
    info = resize_info((32, 32), 64, "stretch")  # scale 2
    box = np.array([[3, 4, 10, 12]])
    # pixels 3..10 cover [2.5, 10.5] -> [5.5, 21.5] in model pixels -> 6..21 inclusive
    np.testing.assert_array_equal(boxes_to_model_frame(box, info), [[6, 8, 21, 25]])
    info = resize_info((181, 217), 256, "longest_side")
    boxes = RNG.integers(0, 180, size=(20, 4)).astype(np.float64)
    back = boxes_from_model_frame(boxes_to_model_frame(boxes, info), info)
    np.testing.assert_allclose(back, boxes, atol=1e-4)


@pytest.mark.parametrize("mode", ["stretch", "longest_side"])
def test_labels_round_trip_nearest(mode) -> None:
    labels = RNG.integers(0, 4, size=(2, 181, 217)).astype(np.uint8)
    info = resize_info(labels.shape[1:], 256, mode)  # upsampling: nearest round trip is exact
    model = labels_to_model_frame(labels, info)
    assert model.shape == (2, 256, 256) and model.dtype == np.uint8
    np.testing.assert_array_equal(labels_from_model_frame(model, info), labels)


def test_probabilities_to_grid_crops_padding_and_resamples() -> None:
    info = resize_info((10, 20), 20, "longest_side")  # content rows 0..9, padding rows 10..19
    probs = torch.zeros(1, 2, 20, 20)
    probs[:, 1, :10] = 1.0
    probs[:, 0, 10:] = 1.0  # padding says class 0: must be cropped away
    out = probabilities_to_grid(probs, info)
    assert out.shape == (1, 2, 10, 20)
    assert torch.all(out[:, 1] == 1)
    # low-resolution decoder output (h = S / 4) is upsampled bilinearly first
    low = torch.rand(1, 3, 5, 5)
    full = probabilities_to_grid(low, resize_info((20, 20), 20, "stretch"))
    ref = torch.nn.functional.interpolate(low, size=(20, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, ref)


# -- orientation -------------------------------------------------------------------------------
@pytest.mark.parametrize("stack", ["SPL", "IPL", "SAR", "SLP", "IAR", "LPS", "PSR", "RAS"])
def test_orientation_matches_nibabel(stack) -> None:
    arr = RNG.random((4, 5, 6))
    tr = orientation_transform(stack, "SPL")
    ornt = nio.ornt_transform(nio.axcodes2ornt(tuple(stack)), nio.axcodes2ornt(("S", "P", "L")))
    expected = nio.apply_orientation(arr, ornt)
    np.testing.assert_array_equal(tr.to_model(arr), expected)
    np.testing.assert_array_equal(tr.from_model(tr.to_model(arr)), arr)
    assert tr.is_identity == (stack == "SPL")


@pytest.mark.parametrize("stack", ["SPL", "IPL", "SAR", "SLP", "IAR", "ILA"])
def test_inplane_and_boxes_follow_the_transform(stack) -> None:
    arr = RNG.random((3, 7, 9))
    tr = orientation_transform(stack, "SPL")
    assert tr.keeps_slice_axis
    oriented = tr.to_model(arr)
    for z in range(3):
        zm = tr.slice_to_model(z, 3)
        np.testing.assert_array_equal(tr.inplane_to_model(arr[z]), oriented[zm])
        np.testing.assert_array_equal(tr.inplane_from_model(oriented[zm]), arr[z])
        assert tr.slice_from_model(zm, 3) == z
    # a box marks the same pixels before and after
    box = (2, 1, 5, 3)
    mask = np.zeros((7, 9), bool)
    mask[1:4, 2:6] = True
    x0, y0, x1, y1 = tr.box_to_model(box, (7, 9)).astype(int)
    mask_model = np.zeros_like(tr.inplane_to_model(mask))
    mask_model[y0 : y1 + 1, x0 : x1 + 1] = True
    np.testing.assert_array_equal(tr.inplane_to_model(mask), mask_model)


def test_orientation_errors_and_video() -> None:
    assert orientation_transform("", "SPL") == OrientationTransform()
    assert orientation_transform("SPL", "") == OrientationTransform()
    with pytest.raises(ValueError, match="axis codes"):
        orientation_transform("SPX", "SPL")
    with pytest.raises(ValueError, match="twice"):
        orientation_transform("SIL", "SPL")


def test_minmax_volume_step_is_redundant_before_the_group_step() -> None:
    from napari_masam.preprocess import (
        INTENSITY_PRESETS,
        needs_volume_window,
        normalize_group,
        normalize_slice,
        volume_window,
    )

    preset = INTENSITY_PRESETS["minmax"]
    assert preset.group_minmax and not needs_volume_window(preset)
    assert needs_volume_window(INTENSITY_PRESETS["mri"])
    rng = np.random.default_rng(3)
    stack = rng.integers(-1000, 3000, size=(5, 17, 23)).astype(np.int16)
    window = volume_window(stack, preset)
    with_window = normalize_group(
        np.stack([normalize_slice(s, preset, window) for s in stack]), preset
    )
    without = normalize_group(np.stack([normalize_slice(s, preset, None) for s in stack]), preset)
    np.testing.assert_allclose(without, with_window, atol=1e-6)
    assert without.min() == 0.0 and without.max() == 1.0


# -- the one pipeline --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["stretch", "longest_side"])
def test_stack_pipeline_equals_the_step_functions(mode) -> None:
    from napari_masam.preprocess import StackPipeline, normalize_group

    vol = RNG.normal(0, 150, size=(6, 40, 52)).astype(np.int16)
    preset = INTENSITY_PRESETS["ct_abdomen"]
    pipe = StackPipeline(
        vol,
        image_size=32,
        slices_per_group=3,
        resize_mode=mode,
        model_orientation=None,
        preset=preset,
    )
    members = pipe.members(0)
    assert members == (0, 0, 1)  # replicate padding in front
    x = pipe.group_input(members)
    group = normalize_group(normalize_stack(vol, preset)[list(members)], preset)
    ref, info = to_model_input(group, 32, mode)
    assert x.shape == (3, 3, 32, 32) and info == pipe.info
    # resize before or after the (affine) group min-max: float rounding only
    np.testing.assert_allclose(x, ref.numpy(), atol=2e-5)
    b = pipe.box_to_model((4, 5, 20, 30))
    np.testing.assert_array_equal(b, boxes_to_model_frame(np.array([[4, 5, 20, 30]]), info)[0])
    labels = np.zeros(vol.shape, np.uint8)
    labels[1, 10:20, 5:9] = 2
    np.testing.assert_array_equal(
        pipe.labels_input(labels, members), labels_to_model_frame(labels[list(members)], info)
    )
    assert pipe.to_dict()["non_finite"]["voxels"] == 0


def test_non_finite_policy_and_dtype_checks() -> None:
    from napari_masam.preprocess import check_stack_dtype, replace_non_finite

    s = np.array([[np.nan, 2.0], [np.inf, -1.0]], np.float32)
    out, n = replace_non_finite(s)
    assert n == 2 and out.tolist() == [[-1.0, 2.0], [-1.0, -1.0]]
    allbad, n = replace_non_finite(np.full((2, 2), np.nan))
    assert n == 4 and not allbad.any()
    ints = np.arange(4).reshape(2, 2)
    assert replace_non_finite(ints)[0] is ints
    vol = np.stack([s, s * 0 + 5])
    assert volume_window(vol, INTENSITY_PRESETS["minmax"]) == (-1.0, 5.0)
    lo, hi = volume_window(vol, INTENSITY_PRESETS["mri"])
    assert lo == -1.0 and np.isfinite(hi)
    with pytest.raises(TypeError, match="complex"):
        check_stack_dtype(np.zeros((2, 2, 2), np.complex128))
    with pytest.raises(TypeError, match="numeric"):
        check_stack_dtype(np.zeros((2, 2, 2), object))


def test_pipeline_default_orientation_is_the_display_one() -> None:
    from napari_masam.preprocess import DISPLAY_ORIENTATION, StackPipeline

    grey = np.zeros((3, 8, 10), np.float32)
    kw = dict(
        image_size=16, slices_per_group=1, resize_mode="stretch", preset=INTENSITY_PRESETS["minmax"]
    )
    # a model trained on transposed display slices gets them transposed, slice axis kept
    pipe = StackPipeline(grey, model_orientation="SLP", **kw)
    assert (
        DISPLAY_ORIENTATION == "SPL"
        and pipe.transform.perm == (0, 2, 1)
        and pipe.shape == (3, 10, 8)
    )
    assert StackPipeline(grey, model_orientation="SPL", **kw).transform.is_identity
    assert StackPipeline(grey, model_orientation="", **kw).transform.is_identity
    rgb = np.zeros((3, 8, 10, 3), np.uint8)
    assert StackPipeline(rgb, model_orientation="SLP", **kw).transform.is_identity  # video: none
    explicit = StackPipeline(grey, model_orientation="SLP", stack_orientation="SLP", **kw)
    assert explicit.transform.is_identity


def test_default_cache_dir_is_per_user() -> None:
    from napari_masam.cache import default_cache_dir

    d = default_cache_dir()
    assert d.name == "embeddings" and d.parent.name == "napari-masam"
