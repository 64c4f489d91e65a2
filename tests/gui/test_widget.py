"""The dock widget in a real napari viewer (Xvfb): boxes, automatic mode, cancel, errors,
responsiveness."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
from gui_actions import canvas_pos, click_button, open_nifti, run_and_wait

from napari_masam import _layers
from napari_masam._widget import CHECKPOINT_CHOICE, NEW_LAYER_TARGET, SHORTCUTS

CLASS_NAMES = ("liver", "kidney", "spleen")  # as saved by conftest's tiny_masam_path
CLASS_COLORS = ("#aa3311", "#22bb44", "#3355ee")

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 120_000


def _rect(z: int, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
    return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)


def _interpolated_box(z, za, box_a, zb, box_b):
    """Linear interpolation of xyxy corners, written independently of prompts.py."""
    t = (z - za) / (zb - za)
    return [(1 - t) * a + t * b for a, b in zip(box_a, box_b, strict=True)]


@pytest.mark.slow  # LiteMedSAM encodes 3 real slices on CPU (~5-25 s on 2 shared cores)
def test_boxes_on_two_slices_fill_the_interpolated_slices(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session, tmp_path
) -> None:
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    data = np.asarray(image.data)
    assert widget._image.value is image
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)
    widget._propagate.value = False  # keyframes interpolated (propagation: its own test)

    prompts = widget.add_prompts_layer()
    assert prompts is not None and prompts.mode == "add_rectangle"
    np.testing.assert_allclose(prompts.scale, image.scale)
    np.testing.assert_allclose(prompts.translate, image.translate)
    # the brain's bounding box on the two keyframe slices (rows, cols in image pixels)
    za, zb = 1, 3
    boxes = {}
    for z in (za, zb):
        rows, cols = np.nonzero(data[z] > 0)
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        prompts.add_rectangles(_rect(z, r0, c0, r1, c1))
        boxes[z] = (c0, r0, c1, r1)  # xyxy
    assert list(prompts.features[_layers.OBJECT_FEATURE]) == [1, 1]

    run_and_wait(qtbot, widget)
    preview = widget.preview_layer
    assert preview is not None and preview.data.shape == data.shape
    np.testing.assert_allclose(preview.scale, image.scale)
    labels = np.array(preview.data, copy=True)
    for z in range(data.shape[0]):
        mask = labels[z] == 1
        if not za <= z <= zb:
            assert not mask.any(), f"slice {z} is outside the keyframes but got labels"
            continue
        x0, y0, x1, y1 = _interpolated_box(z, za, boxes[za], zb, boxes[zb])
        rows, cols = np.nonzero(mask)
        assert rows.size > 0.2 * (x1 - x0) * (y1 - y0), f"slice {z}: too little segmented"
        # every labelled pixel lies in the (interpolated) box, up to rounding
        assert rows.min() >= y0 - 1 and rows.max() <= y1 + 1
        assert cols.min() >= x0 - 1 and cols.max() <= x1 + 1
        # LiteMedSAM outlines the bright brain in its box: mostly brain voxels
        assert (data[z][mask] > 0).mean() > 0.8
    assert set(np.unique(labels)) == {0, 1}
    assert list(preview.features["class_name"]) == ["background", "object 1"]
    assert not widget.object_table.isHidden()  # a volume: the object table shows mL
    record = widget.objects[1]
    n1 = int(np.count_nonzero(labels == 1))
    assert record.voxels == n1
    assert record.volume_ml == pytest.approx(n1 * np.prod(image.scale) / 1000, rel=1e-6)
    assert "slices in" in widget._status.value

    # second object on the same volume: the cached embeddings make it decoder-only
    widget.next_object()
    assert prompts.feature_defaults[_layers.OBJECT_FEATURE][0] == 2
    rows, cols = np.nonzero(data[2] > 0)
    rc, cc = int(rows.mean()), int(cols.mean())
    prompts.add_rectangles(_rect(2, rc - 8, cc - 8, rc + 8, cc + 8))
    assert list(prompts.features[_layers.OBJECT_FEATURE]) == [1, 1, 2]
    session = widget.session
    run_and_wait(qtbot, widget)
    assert widget.session is session  # model + cache reused, not reloaded
    timings = widget._last_result.timings
    assert timings["windows_encoded"] == 0 and timings["encode_s"] == 0, timings
    assert timings["cache_hits"] >= 1, timings
    # the run added object 2 only: object 1 was not recomputed and kept its voxels
    assert tuple(widget._last_result.object_ids) == (2,)
    after = np.asarray(widget.preview_layer.data)
    assert set(np.unique(after)) == {0, 1, 2}
    np.testing.assert_array_equal(after == 1, (labels == 1) & (after != 2))

    # committed labels keep the source file's geometry: saved through the plugin's writer
    # they land on the original grid and header, not on an identity affine
    committed = widget.commit()
    assert committed is not None and committed is not widget.preview_layer
    out = committed.save(str(tmp_path / "committed.nii.gz"), plugin="napari-masam")
    source, saved = nib.load(small_nifti_path), nib.load(out[0])
    assert saved.shape == source.shape
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(
        np.unique(np.asarray(saved.dataobj)), np.unique(np.asarray(committed.data))
    )


def test_automatic_mode_names_the_classes(
    qtbot, viewer_widget, small_nifti_path, tiny_masam_path
) -> None:
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    widget._model.value = CHECKPOINT_CHOICE
    assert widget._checkpoint.visible
    widget._checkpoint.value = tiny_masam_path
    widget._device.value = "cpu"
    widget._mode.value = "automatic"
    widget._stride.value = 5

    run_and_wait(qtbot, widget)
    preview = widget.preview_layer
    assert list(preview.features["class_name"]) == ["background", *CLASS_NAMES]
    for value, color in enumerate(CLASS_COLORS, start=1):
        rgb = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        np.testing.assert_allclose(preview.colormap.map(value)[:3], rgb, atol=1e-6)
    labels = np.asarray(preview.data)
    assert labels.shape == image.data.shape and labels.max() <= 3
    # the model's intensity preset filled the picker
    assert widget._preset.value == "mri"
    # object table: one row per class, spacing-aware volumes checked against a count
    spacing = np.asarray(image.scale)
    assert sorted(widget.objects) == [1, 2, 3]
    for value, record in widget.objects.items():
        n = int(np.count_nonzero(labels == value))
        assert record.name == CLASS_NAMES[value - 1] and record.voxels == n
        assert record.volume_ml == pytest.approx(n * np.prod(spacing) / 1000, rel=1e-6)


def test_box_only_model_refuses_automatic_with_a_message(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session, monkeypatch
) -> None:
    viewer, widget = viewer_widget
    open_nifti(viewer, small_nifti_path)
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)
    # after the model is known the automatic button is greyed out with the reason
    from qtpy.QtWidgets import QRadioButton

    buttons = {b.text(): b for b in widget._mode.native.findChildren(QRadioButton)}
    assert not buttons["automatic"].isEnabled()
    assert "box" in buttons["automatic"].toolTip()
    assert widget._mode.value == "boxes"


def test_cancel_halfway_keeps_finished_slices_and_user_layer(
    qtbot, viewer_widget, small_nifti_path, tiny_masam_path
) -> None:
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    mine = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mine")
    mine.data[:, 5:15, 5:15] = 7
    before = np.array(mine.data, copy=True)
    widget._model.value = CHECKPOINT_CHOICE
    widget._checkpoint.value = tiny_masam_path
    widget._device.value = "cpu"
    widget._mode.value = "automatic"
    widget._target.value = mine  # commit target chosen, but nothing is committed
    streamed = {}

    def on_progress(progress):
        if getattr(progress, "labels_slice", None) is not None:  # skip SessionLoaded
            streamed[progress.slice_index] = np.array(progress.labels_slice)
            if len(streamed) == 2:
                widget.cancel()

    worker = widget.run()
    worker.yielded.connect(on_progress)
    errored = []
    worker.errored.connect(errored.append)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    assert not errored
    n = image.data.shape[0]
    assert 2 <= len(streamed) < n, "cancel did not stop the run early"
    preview = np.asarray(widget.preview_layer.data)
    for z, labels_slice in streamed.items():
        np.testing.assert_array_equal(preview[z], labels_slice)
    np.testing.assert_array_equal(mine.data, before)
    assert "Cancelled" in widget._status.value
    assert widget._run_btn.enabled  # usable again


def _timer_gaps_ms(run) -> np.ndarray:
    """Gaps between ticks of a 20 ms QTimer on the GUI thread while ``run()`` executes."""
    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    try:
        run()
    finally:
        timer.stop()
    return np.diff(ticks) * 1000


def test_gui_thread_stays_responsive_during_a_run(
    qtbot, viewer_widget, ch2bet_path, tiny_masam_path, record_property
) -> None:
    import nibabel as nib

    viewer, widget = viewer_widget
    # 40 real slices (2 mm in-plane) so that the run lasts long enough to measure
    volume = np.asarray(nib.load(str(ch2bet_path)).dataobj[::2, ::2, 60:100], dtype=np.float32)
    viewer.add_image(np.moveaxis(volume, -1, 0), scale=(1.0, 2.0, 2.0), name="brain")
    widget._model.value = CHECKPOINT_CHOICE
    widget._checkpoint.value = tiny_masam_path
    widget._device.value = "cpu"
    widget._mode.value = "automatic"
    widget._stride.value = 2
    # first run: loads the checkpoint in the worker and creates the preview layer
    load_gaps = _timer_gaps_ms(lambda: run_and_wait(qtbot, widget))
    # what this (shared, busy) machine gives an idle GUI thread, for the report
    idle_gaps = _timer_gaps_ms(lambda: qtbot.wait(1000))
    widget._stride.value = 1
    gaps = _timer_gaps_ms(lambda: run_and_wait(qtbot, widget))
    n = int(widget._last_result.timings.get("windows_encoded", 0))
    summary = (
        f"GUI timer during a {n}-window run: {gaps.size} ticks, max gap {gaps.max():.0f} ms, "
        f"p95 {np.percentile(gaps, 95):.0f} ms; first run incl. loading: max "
        f"{load_gaps.max():.0f} ms; idle: max {idle_gaps.max():.0f} ms"
    )
    print(summary)
    record_property("gui_timer", summary)
    assert gaps.size > 20
    # Goals (p95 < 100 ms, max < 400 ms) relative to what this machine gives an idle GUI thread,
    # so a busy shared CI machine does not fail them; a model on the GUI thread blocks it for
    # whole seconds and fails them anyway.
    idle_p95, idle_max = np.percentile(idle_gaps, 95), idle_gaps.max()
    assert np.percentile(gaps, 95) < max(100, 3 * idle_p95), summary
    assert gaps.max() < max(400, 3 * idle_max), summary
    assert load_gaps.max() < max(1000, 5 * idle_max), summary


def test_errors_become_notifications_and_the_widget_stays_usable(
    qtbot, viewer_widget, small_nifti_path, tmp_path, litemedsam_session, monkeypatch
) -> None:
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    errors: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda m: errors.append(str(m)))

    # 1. a corrupt checkpoint: fails in the worker, reported, widget usable
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    widget._model.value = CHECKPOINT_CHOICE
    widget._checkpoint.value = bad
    widget._device.value = "cpu"
    widget._mode.value = "automatic"
    run_and_wait(qtbot, widget)
    assert len(errors) == 1 and "broken.safetensors" in errors[0], errors
    assert widget._status.value.startswith("Error")
    assert widget._run_btn.enabled and widget.session is None

    # 2. boxes mode without any rectangle: refused before any thread starts
    widget._model.value = "litemedsam"
    widget.set_session(litemedsam_session)
    widget._mode.value = "boxes"
    assert widget.run() is None
    assert "rectangle" in errors[-1]

    # 3. a Labels layer is not an image
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="not an image")
    assert image in widget._image.choices and labels not in widget._image.choices
    with pytest.raises(TypeError, match="Image layer"):
        _layers.stack_from_layer(labels)

    # 4. still usable: a real run afterwards succeeds
    prompts = widget.add_prompts_layer()
    prompts.add_rectangles(_rect(2, 10, 10, 40, 40))
    n_errors = len(errors)
    run_and_wait(qtbot, widget)
    assert len(errors) == n_errors
    assert widget.preview_layer.data[2].any()


def test_commit_into_existing_layer_is_undoable_and_new_layer_keeps_classes(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session
) -> None:
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)
    prompts = widget.add_prompts_layer()
    data = np.asarray(image.data)
    rows, cols = np.nonzero(data[3] > 0)
    prompts.add_rectangles(_rect(3, rows.min(), cols.min(), rows.max(), cols.max()))
    run_and_wait(qtbot, widget)
    preview = np.array(widget.preview_layer.data, copy=True)
    assert preview[3].any()

    mine = viewer.add_labels(np.zeros(data.shape, np.uint8), name="mine", scale=image.scale)
    mine.data[3, :10, :10] = 5
    before = np.array(mine.data, copy=True)
    widget._target.value = mine
    assert widget._policy.visible
    widget._policy.value = "empty"
    assert widget.commit() is mine
    expected = before.copy()
    write = (preview != 0) & (before == 0)
    expected[write] = preview[write]
    np.testing.assert_array_equal(mine.data, expected)
    mine.undo()
    np.testing.assert_array_equal(mine.data, before)

    widget._target.value = NEW_LAYER_TARGET
    new = widget.commit()
    assert new is not None and new is not widget.preview_layer
    np.testing.assert_array_equal(new.data, preview)
    assert list(new.features["class_name"]) == ["background", "object 1"]


def test_shortcuts_are_bound_and_every_control_has_a_tooltip(viewer_widget) -> None:
    viewer, widget = viewer_widget
    for key in SHORTCUTS:
        assert key in {str(k) for k in viewer.keymap} or any(
            key.replace("-", "+") in str(k) for k in viewer.keymap
        ), key
    before = int(widget._object.value)
    action = next(k for k, a in SHORTCUTS.items() if a == "next_object")
    bound = {str(k): f for k, f in viewer.keymap.items()}
    func = bound.get(action) or next(f for k, f in bound.items() if "N" in k and "Alt" in k)
    func(viewer)
    assert widget._object.value == before + 1

    def controls(container):
        from magicgui.widgets import Container

        for w in container:
            if isinstance(w, Container) and not w.tooltip:
                yield from controls(w)
            else:
                yield w

    missing = [w.label or w.name for w in controls(widget) if not w.tooltip]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# issue 17: export, additive runs, object table, focus and binding, shapes, honest modes, units
# ---------------------------------------------------------------------------------------------


def _drag_on_canvas(qtbot, viewer, world_a, world_b) -> None:
    """Press, move and release the left mouse button on the canvas (real Qt mouse events)."""
    from qtpy.QtCore import QPointF, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    native = viewer.window._qt_viewer.canvas.native
    left, none = Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton
    mods = Qt.KeyboardModifier.NoModifier

    def send(kind, world, button, buttons):
        pos = QPointF(*canvas_pos(viewer, world))
        QApplication.sendEvent(native, QMouseEvent(kind, pos, pos, button, buttons, mods))
        qtbot.wait(30)  # napari handles one move per event-loop turn, as with a real mouse

    send(QMouseEvent.Type.MouseButtonPress, world_a, left, left)
    for t in np.linspace(0.2, 1.0, 5):
        mid = [a + t * (b - a) for a, b in zip(world_a, world_b, strict=True)]
        send(QMouseEvent.Type.MouseMove, mid, none, left)
    send(QMouseEvent.Type.MouseButtonRelease, world_b, left, none)
    qtbot.wait(50)


def test_export_button_writes_nifti_on_the_image_grid_and_header(
    qtbot, viewer_widget, small_nifti_path, tmp_path
) -> None:
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    display = np.asarray(image.data)
    mine = viewer.add_labels((display > np.percentile(display, 70)).astype(np.uint8), name="mine")
    mine.data[display > np.percentile(display, 90)] = 2
    widget._export_layer.value = mine
    assert widget._export_format.value == "NIfTI (image's header)"
    asked = []

    def ask(fmt, suggested):
        asked.append((fmt, suggested))
        return str(tmp_path / "mine_export")  # no suffix typed: .nii.gz is added

    widget._ask_export_path = ask
    click_button(qtbot, widget._export_btn)
    assert asked and asked[0][1].endswith(".nii.gz")
    out = tmp_path / "mine_export.nii.gz"
    assert out.is_file(), widget._status.value
    source, saved = nib.load(small_nifti_path), nib.load(out)
    # the image's own grid, voxel order and header, checked against the source file itself
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
    assert saved.shape == source.shape
    file_values = np.asarray(source.dataobj)
    expected = (file_values > np.percentile(file_values, 70)).astype(np.uint8)
    expected[file_values > np.percentile(file_values, 90)] = 2
    np.testing.assert_array_equal(np.asarray(saved.dataobj), expected)
    assert str(out) in widget._status.value


def test_export_video_masks_and_overlay_from_the_widget(qtbot, viewer_widget, tmp_path) -> None:
    from napari_masam.io.export import read_png_masks

    viewer, widget = viewer_widget
    video_path = tmp_path / "clip.mp4"
    import imageio.v3 as iio

    frames = np.zeros((6, 48, 64, 3), np.uint8)
    frames[..., 1] = 90  # dull green background
    iio.imwrite(video_path, frames, fps=10, codec="libx264", plugin="pyav")
    (video,) = viewer.open(str(video_path), plugin="napari-masam")
    assert "video" in video.metadata
    labels = np.zeros((6, 48, 64), np.uint8)
    labels[:, 10:30, 20:50] = 1
    labels[3:, 30:40, 5:15] = 2
    layer = viewer.add_labels(labels, name="tracked")
    from napari_masam import _layers as layers_mod

    layers_mod.set_label_classes(layer, ["tool", "tissue"], ["#ff0000", "#0000ff"])
    widget._export_layer.value = layer
    assert list(widget._export_format.choices) == [
        "PNG masks (EndoVis)",
        "TIFF stack",
        "overlay mp4",
    ]
    widget._export_format.value = "PNG masks (EndoVis)"
    widget._ask_export_path = lambda fmt, s: str(tmp_path / "masks")
    click_button(qtbot, widget._export_btn)
    qtbot.waitUntil(lambda: widget._export_worker is None, timeout=60_000)
    np.testing.assert_array_equal(read_png_masks(tmp_path / "masks"), labels)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir())[0] == "frame000.png"

    widget._export_format.value = "overlay mp4"
    widget._ask_export_path = lambda fmt, s: str(tmp_path / "overlay.mp4")
    click_button(qtbot, widget._export_btn)
    qtbot.waitUntil(lambda: widget._export_worker is None, timeout=60_000)
    overlay = iio.imread(tmp_path / "overlay.mp4", plugin="pyav")
    assert overlay.shape == (6, 48, 64, 3)
    tool = overlay[:, 14:26, 25:45].reshape(-1, 3).mean(axis=0)
    assert tool[0] > tool[2] + 40 and tool[0] > 100  # the tool is red (its colour), not white
    tissue = overlay[4, 32:38, 7:13].reshape(-1, 3).mean(axis=0)
    assert tissue[2] > tissue[0] + 40


def test_runs_add_to_the_preview_cancel_keeps_it_and_names_survive_commit(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session
) -> None:
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    data = np.asarray(image.data)
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)
    widget._propagate.value = False
    prompts = widget.add_prompts_layer()
    rows, cols = np.nonzero(data[2] > 0)
    prompts.add_rectangles(_rect(2, rows.min(), cols.min(), rows.max(), cols.max()))
    run_and_wait(qtbot, widget)
    first = np.array(widget.preview_layer.data, copy=True)
    assert (first[2] == 1).sum() > 100

    # object 2 on four slices; cancel after its first slice streamed
    widget.next_object()
    rc, cc = int(rows.mean()), int(cols.mean())
    prompts.add_rectangles(_rect(0, rc - 10, cc - 10, rc + 10, cc + 10))
    prompts.add_rectangles(_rect(5, rc - 10, cc - 10, rc + 10, cc + 10))
    worker = widget.run()
    assert tuple(sorted(worker_boxes := widget._run.request.boxes)) == (2,), worker_boxes
    streamed = []

    def on_progress(progress):
        if getattr(progress, "labels_slice", None) is not None:
            streamed.append(progress.slice_index)
            widget.cancel()

    worker.yielded.connect(on_progress)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    after_cancel = np.asarray(widget.preview_layer.data)
    assert "Cancelled" in widget._status.value
    # object 1 from the earlier run is still there, voxel for voxel (except under object 2)
    np.testing.assert_array_equal(after_cancel == 1, (first == 1) & (after_cancel != 2))
    assert (after_cancel == 1).sum() > 100

    # the next run recomputes only the unfinished object 2, on all its slices
    run_and_wait(qtbot, widget)
    assert tuple(widget._last_result.object_ids) == (2,)
    final = np.array(widget.preview_layer.data, copy=True)
    assert all((final[z] == 2).any() for z in range(6)), "object 2 misses slices"
    assert widget.objects[2].covered == tuple(range(6))

    # the object table: rename object 2 and give it a colour, as a user edits the cells
    table = widget.object_table
    row = next(r for r in range(table.rowCount()) if table.item(r, 0).text() == "2")
    table.item(row, 1).setText("ventricle")
    table.item(row, 2).setText("#00ff00")
    assert widget.objects[2].name == "ventricle" and widget.objects[2].color == "#00ff00"
    np.testing.assert_allclose(widget.preview_layer.colormap.map(2)[:3], [0, 1, 0], atol=1e-6)
    ids = np.asarray(prompts.features[_layers.OBJECT_FEATURE])
    np.testing.assert_allclose(prompts.edge_color[ids == 2][:, :3], [[0, 1, 0]] * 2, atol=1e-6)

    # commit into an existing layer that already has a class: both objects get names+colours
    # (the units check below is about our layers; the user's layer gets the image's too)
    mine = viewer.add_labels(
        np.zeros(data.shape, np.uint8), name="mine", scale=image.scale, units=image.units
    )
    mine.data[0, :3, :3] = 3
    _layers.set_label_classes(mine, ["a", "b", "skull"], ["#111111", "#222222", "#123456"])
    widget._target.value = mine
    widget._policy.value = "keep"
    click_button(qtbot, widget._commit_btn)
    assert set(np.unique(mine.data)) == {0, 1, 2, 3}
    assert list(mine.features["class_name"]) == ["background", "object 1", "ventricle", "skull"]
    np.testing.assert_allclose(mine.colormap.map(2)[:3], [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(mine.colormap.map(3)[:3], [0x12 / 255, 0x34 / 255, 0x56 / 255])
    # units are the image's on every layer we added: napari has one world unit
    assert viewer.layers.extent.units is not None
    assert tuple(widget.preview_layer.units) == tuple(image.units)
    assert tuple(prompts.units) == tuple(image.units)


def test_prompts_stay_active_for_drawing_and_belong_to_their_image(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session, monkeypatch
) -> None:
    viewer, widget = viewer_widget
    errors: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda m: errors.append(str(m)))
    image = open_nifti(viewer, small_nifti_path)
    data = np.asarray(image.data)
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)
    prompts = widget.add_prompts_layer()
    rows, cols = np.nonzero(data[3] > 0)
    prompts.add_rectangles(_rect(3, rows.min(), cols.min(), rows.max(), cols.max()))
    viewer.dims.set_point(0, image.data_to_world([3, 0, 0])[0])  # slice 3 on screen
    run_and_wait(qtbot, widget)
    assert viewer.layers.selection.active is prompts
    assert prompts.mode == "add_rectangle"
    # the next drag on the canvas draws a box (it does not pan)
    scale = np.asarray(image.scale)[-2:]
    translate = np.asarray(image.translate)[-2:]
    a = np.array([10.0, 10.0]) * scale + translate
    b = np.array([30.0, 40.0]) * scale + translate
    center = tuple(viewer.camera.center)
    _drag_on_canvas(qtbot, viewer, a, b)
    assert len(prompts.data) == 2, "the drag did not draw a rectangle"
    assert tuple(viewer.camera.center) == center
    drawn = np.asarray(prompts.data[-1])
    np.testing.assert_allclose(drawn[:, 0], 3)
    np.testing.assert_allclose(drawn[:, 1:].min(axis=0), [10, 10], atol=1.5)
    np.testing.assert_allclose(drawn[:, 1:].max(axis=0), [30, 40], atol=1.5)

    # another image: the first image's prompts are not used on it
    other = viewer.add_image(data[::-1].copy(), name="other", scale=image.scale)
    widget._image.value = other
    assert widget.run() is None
    assert "belongs to image" in errors[-1] and image.name in errors[-1], errors


def test_2d_shapes_over_a_volume_use_the_slice_on_screen_and_ellipses_are_boxes(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session, monkeypatch
) -> None:
    viewer, widget = viewer_widget
    errors: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda m: errors.append(str(m)))
    image = open_nifti(viewer, small_nifti_path)
    data = np.asarray(image.data)
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)
    widget._propagate.value = False

    # points are not boxes, and this model takes no points: said plainly
    viewer.add_points([[2, 30, 30]], name="clicks", scale=image.scale)
    assert widget.run() is None
    assert "not supported" in errors[-1] and "litemedsam" in errors[-1], errors

    # a hand-made 2-D layer named "prompts" holding an ellipse, with slice 4 on screen
    rows, cols = np.nonzero(data[4] > 0)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    corners = np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], dtype=float)
    world = corners * np.asarray(image.scale)[-2:] + np.asarray(image.translate)[-2:]
    viewer.add_shapes([world], shape_type="ellipse", name="prompts")
    viewer.dims.set_point(0, image.data_to_world([4, 0, 0])[0])  # slice 4 on screen
    run_and_wait(qtbot, widget)
    labels = np.asarray(widget.preview_layer.data)
    assert [z for z in range(data.shape[0]) if labels[z].any()] == [4]
    assert "slice 4" in widget._status.value or "slice 4" in str(widget._last_result)
    ys, xs = np.nonzero(labels[4])
    assert ys.min() >= r0 - 1 and ys.max() <= r1 + 1 and xs.min() >= c0 - 1 and xs.max() <= c1 + 1
    assert (data[4][labels[4] > 0] > 0).mean() > 0.8


def test_automatic_mode_is_said_impossible_before_any_work(viewer_widget, monkeypatch) -> None:
    from qtpy.QtWidgets import QRadioButton

    viewer, widget = viewer_widget
    assert widget.session is None  # nothing loaded yet

    def automatic_button():
        return next(
            b for b in widget._mode.native.findChildren(QRadioButton) if b.text() == "automatic"
        )

    widget._model.value = "litemedsam"
    assert not automatic_button().isEnabled()
    assert "box-prompted only" in automatic_button().toolTip()
    widget._model.value = "masam-lite"
    assert automatic_button().isEnabled()
    widget._mode.value = "automatic"
    assert "untrained" in widget._model_note.value and not widget._model_note.native.isHidden()
    assert "untrained" in widget._status.value
    # Run warns before any work (the request is built, nothing loaded yet)
    warnings: list[str] = []
    monkeypatch.setattr(
        "napari.utils.notifications.show_warning", lambda m: warnings.append(str(m))
    )
    viewer.add_image(np.zeros((3, 16, 16), np.float32), name="vol")
    assert widget._prepare_request() is not None
    assert warnings and "untrained" in warnings[0]
    assert widget.session is None
    widget._model.value = "masam_vit_b"
    assert widget._checkpoint.visible and widget._masam_checkpoint.visible
    placeholder = widget._checkpoint.line_edit.native.placeholderText()
    assert "sam_vit_b_01ec64.pth" in placeholder
    assert "MA-SAM" in widget._masam_checkpoint.line_edit.native.placeholderText()
    assert "sam_vit_b_01ec64.pth" in widget._model_note.value
    assert "sam_vit_b_01ec64.pth" in widget._checkpoint.tooltip


def test_docked_widget_scrolls_instead_of_cropping_the_canvas(viewer_widget) -> None:
    from qtpy.QtWidgets import QDockWidget, QScrollArea

    viewer, widget = viewer_widget
    viewer.add_image(np.zeros((5, 32, 32), np.float32), name="vol")  # shows the propagate group
    assert widget._propagate.visible and widget._first_slice.visible
    # what napari really docks (widget.native) holds a scroll area with all the controls
    dock = widget.native.parentWidget()
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    assert dock is not None
    scrolls = widget.native.findChildren(QScrollArea)
    assert scrolls and widget._run_btn.native in scrolls[0].widget().findChildren(
        type(widget._run_btn.native)
    )
    content = scrolls[0].widget().sizeHint().height()
    assert content > 400  # the panel is tall...
    assert dock.minimumSizeHint().height() < 300  # ...but the dock can be short: it scrolls
    # ...and never narrower than its content: nothing is clipped at the right edge
    assert scrolls[0].minimumWidth() >= scrolls[0].widget().minimumSizeHint().width()


def test_request_from_controls_is_pure_and_typed(tmp_path) -> None:
    import dataclasses

    from napari.layers import Image

    from napari_masam._widget_controls import ControlValues, RunRequest, request_from_controls

    image = Image(np.zeros((4, 8, 9), np.float32), scale=(2.0, 1.0, 1.0))
    info = _layers.stack_from_layer(image)
    values = ControlValues("litemedsam", None, None, "cpu", "mri", mode="boxes")
    boxes = {3: {1: (0, 0, 4, 4), 2: (1, 1, 5, 5)}, 1: {0: (0, 0, 2, 2)}}
    request = request_from_controls(values, image, info, boxes)
    assert isinstance(request, RunRequest) and dataclasses.is_dataclass(request)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.mode = "automatic"  # type: ignore[misc]
    assert request.object_ids == (1, 3) and request.slices == (0, 1, 2)
    assert request.source.kind == "preset" and request.source.name == "litemedsam"
    assert request.preset.name == "mri" and not request.propagate
    walk = dataclasses.replace(values, propagate=True, first_slice=1, last_slice=2)
    walking = request_from_controls(walk, image, info, boxes)
    assert walking.propagate and walking.slices == (1, 2)
    assert walking.slice_ranges == {1: (1, 2), 3: (1, 2)}
    with pytest.raises(ValueError, match="Empty propagation range"):
        request_from_controls(
            dataclasses.replace(walk, first_slice=3, last_slice=1), image, info, boxes
        )
    auto = request_from_controls(dataclasses.replace(values, mode="automatic"), image, info)
    assert auto.slices == (0, 1, 2, 3) and not auto.boxes
    with pytest.raises(ValueError, match="No boxes"):
        request_from_controls(values, image, info, {})
    needs = dataclasses.replace(values, model="masam_vit_b")
    with pytest.raises(ValueError, match=r"sam_vit_b_01ec64\.pth"):
        request_from_controls(needs, image, info, boxes)


def test_one_box_propagates_a_brush_fix_reruns_dependent_slices_and_ctrl_z_restores(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session, monkeypatch
) -> None:
    import functools

    from qtpy.QtCore import Qt

    from napari_masam import propagation

    # On this brain-filling crop LiteMedSAM's masks of neighbouring slices overlap less than
    # the default stop criterion asks (min_overlap 0.6, chosen on AAL structures), so the walk
    # would end on the boxed slice; this test is about the widget's flow, not that criterion.
    monkeypatch.setattr(
        propagation,
        "PropagationConfig",
        functools.partial(propagation.PropagationConfig, min_overlap=0.3),
    )
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    data = np.asarray(image.data)
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)
    assert widget._propagate.visible and widget._propagate.value  # on by default for stacks
    prompts = widget.add_prompts_layer()
    rows, cols = np.nonzero(data[2] > 0)
    prompts.add_rectangles(_rect(2, rows.min(), cols.min(), rows.max(), cols.max()))
    run_and_wait(qtbot, widget)
    assert widget._last_result.mode == "propagate"
    first = np.array(widget.preview_layer.data, copy=True)
    covered = [z for z in range(data.shape[0]) if (first[z] == 1).any()]
    assert len(covered) >= 3 and 2 in covered, covered  # one box, several slices
    assert widget.objects[1].covered == tuple(covered)
    n = int((first == 1).sum())
    assert widget.objects[1].voxels == n
    assert widget.objects[1].volume_ml == pytest.approx(n * np.prod(image.scale) / 1000)

    # brush fix on slice 3 in the preview (erase the left half of the object), keyframe, rerun
    fixed = first[3].copy()
    _, xs = np.nonzero(fixed == 1)
    fixed[:, : int(np.median(xs))] = 0
    widget.preview_layer.data[3] = fixed
    viewer.dims.set_point(0, image.data_to_world([3, 0, 0])[0])
    assert widget.mark_keyframe()
    run_and_wait(qtbot, widget)
    second = np.array(widget.preview_layer.data, copy=True)
    np.testing.assert_array_equal(second[3], fixed)  # the fix is kept as drawn
    # slices on the other side of the prompted slice 2 do not depend on the fix: bit-identical
    for z in range(0, 2):
        np.testing.assert_array_equal(second[z], first[z])
    assert "Done" in widget._status.value

    # Ctrl+Z (the prompts layer is the active layer) restores the object before the rerun
    assert viewer.layers.selection.active is prompts
    viewer.window._qt_viewer.canvas.native.setFocus()
    qtbot.keyClick(
        viewer.window._qt_viewer.canvas.native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier
    )
    qtbot.wait(50)
    restored = np.asarray(widget.preview_layer.data)
    restored_3 = restored[3]
    np.testing.assert_array_equal(restored_3, fixed)  # undo goes back to before the rerun...
    np.testing.assert_array_equal(
        np.delete(restored, 3, axis=0), np.delete(first, 3, axis=0)
    )  # ...where only the brush fix differs from the first result


def test_precompute_button_fills_the_cache_so_a_box_only_decodes(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session
) -> None:
    viewer, widget = viewer_widget
    image = open_nifti(viewer, small_nifti_path)
    from napari_masam.session import SegmentationSession

    # a fresh cache on the shared model: nothing of this image is encoded yet
    session = SegmentationSession(litemedsam_session.model, litemedsam_session.device)
    widget._device.value = "cpu"
    widget.set_session(session)
    click_button(qtbot, widget._precompute_btn)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    assert "Embeddings of 6 slices ready" in widget._status.value, widget._status.value
    assert len(session.cache) >= 6
    data = np.asarray(image.data)
    prompts = widget.add_prompts_layer()
    rows, cols = np.nonzero(data[4] > 0)
    prompts.add_rectangles(_rect(4, rows.min(), cols.min(), rows.max(), cols.max()))
    run_and_wait(qtbot, widget)
    assert widget._last_result.timings["windows_encoded"] == 0
