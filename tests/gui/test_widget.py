"""The dock widget in a real napari viewer (Xvfb): boxes, automatic mode, cancel, errors,
responsiveness."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from napari_masam import _layers
from napari_masam._widget import CHECKPOINT_CHOICE, NEW_LAYER_TARGET, SHORTCUTS

CLASS_NAMES = ("liver", "kidney", "spleen")  # as saved by conftest's tiny_masam_path
CLASS_COLORS = ("#aa3311", "#22bb44", "#3355ee")

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 120_000


def _rect(z: int, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
    return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)


def _open_nifti(viewer, path):
    layers = viewer.open(str(path), plugin="napari-masam")
    assert len(layers) == 1 and "nifti" in layers[0].metadata
    return layers[0]


def _run_and_wait(qtbot, widget):
    worker = widget.run()
    assert worker is not None, widget._status.value
    # Wait on the widget's own finished handler (connected before the thread started): a
    # worker that fails at once can emit `finished` before a waitSignal here could connect.
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    return worker


def _interpolated_box(z, za, box_a, zb, box_b):
    """Linear interpolation of xyxy corners, written independently of prompts.py."""
    t = (z - za) / (zb - za)
    return [(1 - t) * a + t * b for a, b in zip(box_a, box_b, strict=True)]


@pytest.mark.slow  # LiteMedSAM encodes 3 real slices on CPU (~5-25 s on 2 shared cores)
def test_boxes_on_two_slices_fill_the_interpolated_slices(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session, tmp_path
) -> None:
    viewer, widget = viewer_widget
    image = _open_nifti(viewer, small_nifti_path)
    data = np.asarray(image.data)
    assert widget._image.value is image
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)

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

    _run_and_wait(qtbot, widget)
    preview = widget.preview_layer
    assert preview is not None and preview.data.shape == data.shape
    np.testing.assert_allclose(preview.scale, image.scale)
    labels = np.asarray(preview.data)
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
    assert widget._table.visible  # a volume: table in mL
    assert "slices in" in widget._status.value

    # second object on the same volume: the cached embeddings make it decoder-only
    widget.next_object()
    assert prompts.feature_defaults[_layers.OBJECT_FEATURE][0] == 2
    rows, cols = np.nonzero(data[2] > 0)
    rc, cc = int(rows.mean()), int(cols.mean())
    prompts.add_rectangles(_rect(2, rc - 8, cc - 8, rc + 8, cc + 8))
    assert list(prompts.features[_layers.OBJECT_FEATURE]) == [1, 1, 2]
    session = widget.session
    _run_and_wait(qtbot, widget)
    assert widget.session is session  # model + cache reused, not reloaded
    timings = widget._last_result.timings
    assert timings["windows_encoded"] == 0 and timings["encode_s"] == 0, timings
    assert timings["cache_hits"] >= 3, timings
    assert set(np.unique(widget.preview_layer.data)) == {0, 1, 2}

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
    image = _open_nifti(viewer, small_nifti_path)
    widget._model.value = CHECKPOINT_CHOICE
    assert widget._checkpoint.visible
    widget._checkpoint.value = tiny_masam_path
    widget._device.value = "cpu"
    widget._mode.value = "automatic"
    widget._stride.value = 5

    _run_and_wait(qtbot, widget)
    preview = widget.preview_layer
    assert list(preview.features["class_name"]) == ["background", *CLASS_NAMES]
    for value, color in enumerate(CLASS_COLORS, start=1):
        rgb = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        np.testing.assert_allclose(preview.colormap.map(value)[:3], rgb, atol=1e-6)
    labels = np.asarray(preview.data)
    assert labels.shape == image.data.shape and labels.max() <= 3
    # the model's intensity preset filled the picker
    assert widget._preset.value == "mri"
    # volume table: spacing-aware, checked against an independent count
    if labels.any():
        spacing = np.asarray(image.scale)
        table = widget._table.value
        for row, idx in zip(table["data"], table["index"], strict=True):
            n = int(np.count_nonzero(labels == int(idx)))
            assert int(row[1]) == n
            assert float(row[2]) == pytest.approx(n * np.prod(spacing) / 1000, rel=1e-3, abs=1e-3)


def test_box_only_model_refuses_automatic_with_a_message(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session, monkeypatch
) -> None:
    viewer, widget = viewer_widget
    _open_nifti(viewer, small_nifti_path)
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
    image = _open_nifti(viewer, small_nifti_path)
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
    load_gaps = _timer_gaps_ms(lambda: _run_and_wait(qtbot, widget))
    # what this (shared, busy) machine gives an idle GUI thread, for the report
    idle_gaps = _timer_gaps_ms(lambda: qtbot.wait(1000))
    widget._stride.value = 1
    gaps = _timer_gaps_ms(lambda: _run_and_wait(qtbot, widget))
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
    image = _open_nifti(viewer, small_nifti_path)
    errors: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda m: errors.append(str(m)))

    # 1. a corrupt checkpoint: fails in the worker, reported, widget usable
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    widget._model.value = CHECKPOINT_CHOICE
    widget._checkpoint.value = bad
    widget._device.value = "cpu"
    widget._mode.value = "automatic"
    _run_and_wait(qtbot, widget)
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
    _run_and_wait(qtbot, widget)
    assert len(errors) == n_errors
    assert widget.preview_layer.data[2].any()


def test_commit_into_existing_layer_is_undoable_and_new_layer_keeps_classes(
    qtbot, viewer_widget, small_nifti_path, litemedsam_session
) -> None:
    viewer, widget = viewer_widget
    image = _open_nifti(viewer, small_nifti_path)
    widget._device.value = "cpu"
    widget.set_session(litemedsam_session)
    prompts = widget.add_prompts_layer()
    data = np.asarray(image.data)
    rows, cols = np.nonzero(data[3] > 0)
    prompts.add_rectangles(_rect(3, rows.min(), cols.min(), rows.max(), cols.max()))
    _run_and_wait(qtbot, widget)
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
