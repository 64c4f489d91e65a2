"""The layer helpers of the widget, checked against brute-force references written here."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Image, Labels

from napari_masam import _layers


def _merge_reference(target: np.ndarray, result: np.ndarray, policy: str) -> np.ndarray:
    """Pixel-by-pixel statement of the three policies."""
    values = set(np.unique(result[result != 0]).tolist())
    out = target.copy()
    for idx in np.ndindex(target.shape):
        t, r = int(target[idx]), int(result[idx])
        if policy == "overwrite":
            if r:
                out[idx] = r
            elif t in values:
                out[idx] = 0
        elif policy == "keep":
            if t in values or t == 0:
                out[idx] = r  # own label replaced (or cleared), background filled
        elif policy == "empty" and t == 0 and r:
            out[idx] = r
    return out


@pytest.fixture
def slices() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    target = rng.choice([0, 0, 1, 5], size=(3, 12, 10)).astype(np.uint8)
    result = rng.choice([0, 0, 1, 2], size=(3, 12, 10)).astype(np.uint8)
    return target, result


@pytest.mark.parametrize("policy", list(_layers.COMMIT_POLICIES))
def test_merge_slice_matches_reference(slices, policy: str) -> None:
    target, result = slices
    values = np.unique(result[result != 0])
    for z in range(target.shape[0]):
        got = _layers.merge_slice(target[z], result[z], policy, values)
        np.testing.assert_array_equal(got, _merge_reference(target[z], result[z], policy))
    # the three policies really differ on this data
    outs = {
        p: _layers.merge_slice(target[0], result[0], p, values).tobytes()
        for p in ("keep", "overwrite", "empty")
    }
    assert len(set(outs.values())) == 3


@pytest.mark.parametrize("policy", list(_layers.COMMIT_POLICIES))
def test_commit_is_one_undo_step_and_only_touches_processed_slices(slices, policy: str) -> None:
    target, result = slices
    layer = Labels(target.copy())
    changed = _layers.commit_labels(layer, result, policy, slices=[0, 2])
    expected = target.copy()
    values = np.unique(result[result != 0])
    for z in (0, 2):
        expected[z] = _layers.merge_slice(target[z], result[z], policy, values)
    np.testing.assert_array_equal(layer.data, expected)
    assert changed == int((expected != target).sum()) > 0
    np.testing.assert_array_equal(layer.data[1], target[1])  # not processed: untouched
    layer.undo()  # ONE undo restores everything
    np.testing.assert_array_equal(layer.data, target)
    layer.redo()
    np.testing.assert_array_equal(layer.data, expected)


def test_commit_refuses_shape_mismatch_and_narrow_dtype() -> None:
    layer = Labels(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        _layers.commit_labels(layer, np.zeros((2, 4, 5), np.uint8), "keep")
    big = np.zeros((2, 4, 4), dtype=np.uint16)
    big[0, 0, 0] = 300
    with pytest.raises(ValueError, match="does not fit"):
        _layers.commit_labels(layer, big, "overwrite")
    with pytest.raises(ValueError, match="policy"):
        _layers.commit_labels(layer, np.zeros((2, 4, 4), np.uint8), "merge")
    assert not layer.data.any()


def test_volume_table_in_ml_uses_spacing() -> None:
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 3], size=(4, 9, 7)).astype(np.uint8)
    spacing = (2.5, 0.8, 0.6)
    rows = _layers.volume_table(labels, spacing, ["liver", "kidney", "spleen"])
    assert [r.label for r in rows] == [1, 3]
    assert [r.name for r in rows] == ["liver", "spleen"]
    for r in rows:
        n = int(np.count_nonzero(labels == r.label))
        assert r.voxels == n
        assert r.volume_ml == pytest.approx(n * 2.5 * 0.8 * 0.6 / 1000.0)
    assert _layers.volume_table(labels, spacing)[0].name == "label 1"


def test_class_colours_and_features_on_labels_layer() -> None:
    layer = Labels(np.array([[0, 1], [2, 3]], dtype=np.uint8))
    _layers.set_label_classes(layer, ["liver", "kidney", "spleen"], ["#ff0000", "#00ff00"])
    assert list(layer.features["class_name"]) == ["background", "liver", "kidney", "spleen"]
    assert list(layer.features["index"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(layer.colormap.map(1), [1, 0, 0, 1])
    np.testing.assert_allclose(layer.colormap.map(2), [0, 1, 0, 1])
    assert layer.colormap.map(0)[3] == 0  # background transparent
    # the third class had no colour: taken from the palette, not transparent
    assert layer.colormap.map(3)[3] == 1


@pytest.mark.parametrize(
    ("data", "rgb", "labels_shape", "n_slices", "is_2d"),
    [
        (np.zeros((5, 6, 7), np.float32), False, (5, 6, 7), 5, False),
        (np.zeros((6, 7), np.float32), False, (6, 7), 1, True),
        (np.zeros((4, 6, 7, 3), np.uint8), True, (4, 6, 7), 4, False),
        (np.zeros((6, 7, 4), np.uint8), True, (6, 7), 1, True),
    ],
)
def test_stack_from_layer(data, rgb, labels_shape, n_slices, is_2d) -> None:
    layer = Image(data, rgb=rgb, scale=(2.0,) * (data.ndim - int(rgb)))
    info = _layers.stack_from_layer(layer)
    assert info.labels_shape == labels_shape
    assert info.n_slices == n_slices and info.is_2d == is_2d and info.is_rgb == rgb
    assert info.stack.shape[0] == n_slices
    assert info.stack.shape[1:3] == labels_shape[-2:]
    if rgb:
        assert info.stack.shape[-1] == 3  # alpha dropped
    assert info.scale == (2.0,) * len(labels_shape)


def test_stack_from_layer_rejects_wrong_layers() -> None:
    with pytest.raises(TypeError, match="Image layer"):
        _layers.stack_from_layer(Labels(np.zeros((3, 4, 4), np.uint8)))
    with pytest.raises(ValueError, match="Split"):
        _layers.stack_from_layer(Image(np.zeros((2, 3, 4, 5), np.float32)))


def test_shapes_become_boxes_in_the_image_pixel_frame() -> None:
    """Rectangle, ellipse and polygon -> their bounding box in the image's pixels, through a
    prompts layer with another scale and translate than the image (world -> data mapping)."""
    from napari.layers import Shapes

    image = Image(np.zeros((5, 40, 50), np.float32), scale=(3.0, 0.5, 2.0), translate=(6, -4, 10))
    shapes = Shapes(ndim=3, scale=(1.0, 1.0, 1.0))  # data = world here

    def world(z, r, c):  # image pixel -> world, written independently of napari
        return [z * 3.0 + 6, r * 0.5 - 4, c * 2.0 + 10]

    rect = [world(1, 2, 3), world(1, 2, 13), world(1, 12, 13), world(1, 12, 3)]
    ellipse = [world(2, 5, 5), world(2, 5, 25), world(2, 15, 25), world(2, 15, 5)]
    polygon = [world(3, 10, 20), world(3, 30, 22), world(3, 20, 40), world(3, 12, 30)]
    line = [world(4, 1, 1), world(4, 9, 9)]
    shapes.add(
        [np.array(rect), np.array(ellipse), np.array(polygon), np.array(line)],
        shape_type=["rectangle", "ellipse", "polygon", "line"],
    )
    found = _layers.shapes_in_image_frame(shapes, image)
    assert found.skipped == ("line",) and found.mapped_slice is None
    assert found.object_ids == [1, 2, 3]
    expected = [((1, 2, 3), (12, 13)), ((2, 5, 5), (15, 25)), ((3, 10, 20), (30, 40))]
    for vertices, ((z, r0, c0), (r1, c1)) in zip(found.vertices_rc, expected, strict=True):
        np.testing.assert_allclose(vertices[:, 0], z, atol=1e-6)
        np.testing.assert_allclose(vertices[:, 1:].min(axis=0), [r0, c0], atol=1e-6)
        np.testing.assert_allclose(vertices[:, 1:].max(axis=0), [r1, c1], atol=1e-6)


def test_2d_shapes_over_a_volume_need_the_slice_on_screen() -> None:
    from napari.layers import Shapes

    image = Image(np.zeros((6, 20, 20), np.float32), scale=(2.0, 1.0, 1.0), translate=(-3, 0, 0))
    shapes = Shapes([np.array([[2, 3], [2, 9], [8, 9], [8, 3]], float)], shape_type="rectangle")
    with pytest.raises(ValueError, match="belong to no slice"):
        _layers.shapes_in_image_frame(shapes, image)
    # the viewer shows world z = 5 -> image slice (5 + 3) / 2 = 4
    found = _layers.shapes_in_image_frame(shapes, image, world_point=(5.0, 0.0, 0.0))
    assert found.mapped_slice == 4
    np.testing.assert_allclose(found.vertices_rc[0][:, 0], 4)
    np.testing.assert_allclose(found.vertices_rc[0][:, 1:].min(axis=0), [2, 3])


def test_write_objects_slice_replaces_only_the_recomputed_objects() -> None:
    layer = Labels(np.zeros((2, 4, 4), np.uint8))
    layer.data[0] = [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 0], [0, 0, 0, 0]]
    new = np.array([[0, 0, 0, 0], [0, 2, 2, 0], [0, 2, 2, 0], [0, 0, 0, 0]], np.uint8)
    _layers.write_objects_slice(layer, 0, new, [2], is_2d=False)
    expected = np.array([[1, 1, 0, 0], [1, 2, 2, 0], [3, 2, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(layer.data[0], expected)
    assert not layer.data[1].any()
    _layers.clear_objects(layer, [1], slices=[0])
    assert not (layer.data == 1).any() and (layer.data == 3).sum() == 1


def test_merge_label_classes_keeps_existing_classes() -> None:
    layer = Labels(np.zeros((3, 3), np.uint8))
    _layers.set_label_classes(layer, ["skull", "brain"], ["#111111", "#222222"])
    _layers.merge_label_classes(layer, {2: ("ventricle", "#00ff00"), 4: ("tumour", "#ff0000")})
    assert list(layer.features["class_name"]) == [
        "background",
        "skull",
        "ventricle",
        "label 3",
        "tumour",
    ]
    np.testing.assert_allclose(layer.colormap.map(2)[:3], [0, 1, 0])
    np.testing.assert_allclose(layer.colormap.map(4)[:3], [1, 0, 0])
    np.testing.assert_allclose(layer.colormap.map(1)[:3], [0x11 / 255] * 3)
