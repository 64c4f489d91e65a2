"""Point prompts in the dock widget (issue 17 point 5): real clicks on the canvas, the toggle key,
Run with clicks, and the measured refusal of a model that takes no points."""

from __future__ import annotations

import numpy as np
import pytest
from gui_actions import canvas_pos, click_button, open_nifti, run_and_wait

from napari_masam import _layers
from napari_masam._widget import CHECKPOINT_CHOICE

pytestmark = pytest.mark.gui


def _click_canvas(qtbot, viewer, world_yx) -> None:
    """A real left click (press + release, Qt mouse events) on the canvas."""
    from qtpy.QtCore import QPointF, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    native = viewer.window._qt_viewer.canvas.native
    left, none = Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton
    mods = Qt.KeyboardModifier.NoModifier
    pos = QPointF(*canvas_pos(viewer, world_yx))
    for kind, button, buttons in (
        (QMouseEvent.Type.MouseMove, none, none),
        (QMouseEvent.Type.MouseButtonPress, left, left),
        (QMouseEvent.Type.MouseButtonRelease, left, none),
    ):
        QApplication.sendEvent(native, QMouseEvent(kind, pos, pos, button, buttons, mods))
        qtbot.wait(30)


def _press_key(qtbot, viewer, key) -> None:
    """A real key press on the canvas (napari routes it to the active layer's key map)."""
    native = viewer.window._qt_viewer.canvas.native
    native.setFocus()
    qtbot.keyClick(native, key)
    qtbot.wait(30)


def _world(image, z, y, x):
    return np.asarray(image.data_to_world([z, y, x]))[-2:]


def test_clicks_are_positive_then_negative_and_run_uses_them(
    qtbot, viewer_widget, small_nifti_path, tiny_masam_path, monkeypatch
) -> None:
    from qtpy.QtCore import Qt

    from napari_masam.inference import run

    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    data = np.asarray(image.data)
    z = 3
    widget._model.value = CHECKPOINT_CHOICE
    widget._checkpoint.value = tiny_masam_path
    widget._device.value = "cpu"
    widget._preset.value = "mri"  # the checkpoint's own (loading it would switch to it)
    widget._propagate.value = False
    viewer.dims.set_point(0, image.data_to_world([z, 0, 0])[0])  # slice 3 on screen

    prompts = widget.add_prompts_layer()
    rows, cols = np.nonzero(data[z] > 0)
    box_rc = (rows.min(), cols.min(), rows.max(), cols.max())
    r0, c0, r1, c1 = (float(v) for v in box_rc)
    prompts.add_rectangles(np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]]))

    # the button makes the image's point layer, bound to it, active in add mode
    click_button(qtbot, widget._points_btn)
    points = viewer.layers.selection.active
    assert isinstance(points, widget._Points) and points.mode == "add"
    assert _layers.is_bound_to(points, image)
    assert tuple(points.units) == tuple(image.units)
    inside_a = (z, (r0 + r1) / 2, (c0 + c1) / 2)
    inside_b = (z, r0 + 0.25 * (r1 - r0), c0 + 0.2 * (c1 - c0))
    _click_canvas(qtbot, viewer, _world(image, *inside_a))
    _press_key(qtbot, viewer, Qt.Key.Key_T)  # the next click is negative
    assert _layers.next_point_prompt(points) == "negative"
    assert "negative" in widget._status.value
    _click_canvas(qtbot, viewer, _world(image, *inside_b))
    assert len(points.data) == 2, "the clicks did not add points"
    assert list(points.features[_layers.POINT_PROMPT_FEATURE]) == ["positive", "negative"]
    np.testing.assert_allclose(points.face_color[0, :3], [0, 0xE0 / 255, 0], atol=1e-6)
    np.testing.assert_allclose(points.face_color[1, :3], [1, 0x20 / 255, 0x20 / 255], atol=1e-6)
    # where the clicks landed, in the image's pixels (the layer shares its scale/translate)
    np.testing.assert_allclose(points.data[0], inside_a, atol=1.0)
    np.testing.assert_allclose(points.data[1], inside_b, atol=1.0)
    _press_key(qtbot, viewer, Qt.Key.Key_T)
    assert _layers.next_point_prompt(points) == "positive"

    # Run: the engine gets the clicks in the image's pixels (row, col, label) with the box
    import napari_masam.inference as inference

    calls: list[dict] = []
    real = inference.iter_segment_boxes

    def spy(model, stack, boxes, **kwargs):
        calls.append({"boxes": boxes, "points": kwargs.get("points")})
        return real(model, stack, boxes, **kwargs)

    monkeypatch.setattr(inference, "iter_segment_boxes", spy)
    run_and_wait(qtbot, widget)
    assert widget.session is not None and widget.session.model.supports_points
    assert viewer.layers.selection.active is points and points.mode == "add"
    box = (int(c0), int(r0), int(c1), int(r1))
    assert calls[-1]["boxes"] == {1: {z: box}}
    sent = calls[-1]["points"]
    assert set(sent) == {1} and set(sent[1]) == {z}
    expected = [
        (points.data[0][1], points.data[0][2], 1),
        (points.data[1][1], points.data[1][2], 0),
    ]
    np.testing.assert_allclose(np.array(sent[1][z], float), np.array(expected, float), atol=1e-9)
    # and the preview holds what the engine computes for those prompts
    labels = np.asarray(widget.preview_layer.data)
    session = widget.session
    headless = run(real(session.model, data, {1: {z: box}}, points=sent))
    np.testing.assert_array_equal(labels[z], headless.labels[z])
    assert [s for s in range(data.shape[0]) if labels[s].any()] == [z]

    # nothing changed: no recompute; one more click: the object is recomputed with 3 clicks
    assert widget.run() is None and "Nothing changed" in widget._status.value
    _click_canvas(qtbot, viewer, _world(image, z, r1 - 0.2 * (r1 - r0), c1 - 0.2 * (c1 - c0)))
    assert len(points.data) == 3
    run_and_wait(qtbot, widget)
    assert len(calls) == 2 and [p[2] for p in calls[-1]["points"][1][z]] == [1, 0, 1]


def test_a_model_without_points_says_what_was_measured(
    qtbot, viewer_widget, small_nifti_path, monkeypatch
) -> None:
    viewer, widget = viewer_widget
    errors: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda m: errors.append(str(m)))
    image = open_nifti(viewer, small_nifti_path)
    assert widget._model.value == "litemedsam"
    # the button refuses at once, with the measured reason (no model is loaded for that)
    click_button(qtbot, widget._points_btn)
    assert not any(isinstance(layer, widget._Points) for layer in viewer.layers)
    assert "Point prompts are not supported by model 'litemedsam'" in errors[-1]
    assert "0.708" in errors[-1] and "box prompts only" in errors[-1]
    # clicks (a hand-made Points layer) and no box: Run refuses before any work, with the reason
    widget.add_prompts_layer()
    viewer.add_points([[2, 20, 20]], name="clicks", scale=image.scale, translate=image.translate)
    assert widget.run() is None
    assert widget.worker is None and widget.session is None
    assert "Points layer 'clicks'" in errors[-1] and "0.629" in errors[-1]
