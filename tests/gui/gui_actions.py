"""What a person does in the viewer, shared by the GUI tests: open a file with our reader,
press a button, click or drag on the canvas (real Qt mouse events), run and wait."""

from __future__ import annotations

RUN_TIMEOUT_MS = 120_000


def open_nifti(viewer, path):
    """``path`` opened with napari-masam's reader; the one layer it gives (NIfTI metadata kept)."""
    layers = viewer.open(str(path), plugin="napari-masam")
    assert len(layers) == 1 and "nifti" in layers[0].metadata
    return layers[0]


def run_and_wait(qtbot, widget):
    """Start a run and wait for the widget's own finished handler (connected before the thread
    started: a worker that fails at once can emit ``finished`` before a waitSignal here could
    connect)."""
    worker = widget.run()
    assert worker is not None, widget._status.value
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    return worker


def click_button(qtbot, button) -> None:
    """A real left click on a magicgui PushButton."""
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button.native, Qt.MouseButton.LeftButton)


def canvas_pos(viewer, world_yx):
    """Canvas (widget) pixel position of a world (y, x) point in the 2-D view."""
    canvas = viewer.window._qt_viewer.canvas
    w, h = canvas._scene_canvas.size
    cy, cx = viewer.camera.center[-2:]
    zoom = viewer.camera.zoom
    return ((world_yx[1] - cx) * zoom + w / 2, (world_yx[0] - cy) * zoom + h / 2)
