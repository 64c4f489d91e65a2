"""What a run costs the GUI thread (issue 17 point 9, the freeze after the first run).

benchmarks/gui_freeze.py measured it: with software OpenGL every repaint of the docked panel
(progress bar, status line, napari's activity bar) composites the window (16-80 ms), and progress
items queued behind a busy GUI thread were drained one repaint each (1.6 s for 46 items); the
first Labels layer compiles its shaders (0.3-0.7 s). These tests pin the structure that keeps
that work small and early, without timing anything: numbers are repainted coalesced (while every
slice still lands in the preview), and the preview exists, shown in its final colours, before
the first result arrives.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from napari_masam import _widget, _worker

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 60_000
N_SLICES = 40


def _rect(z: int, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
    return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)


def _slice_labels(z: int) -> np.ndarray:
    """Object 1's (Y, X) mask on slice ``z``: a different stripe pattern per slice."""
    rows = np.arange(32)[:, None] + np.zeros((1, 32), dtype=int)
    return ((rows + z) % 3 == 0).astype(np.uint8)


def test_streamed_slices_repaint_the_numbers_coalesced_into_a_preview_made_at_start(
    qtbot, viewer_widget, monkeypatch
) -> None:
    from napari.utils.colormaps import DirectLabelColormap
    from qtpy.QtCore import Qt

    from napari_masam.inference import Progress

    viewer, widget = viewer_widget
    rng = np.random.default_rng(0)
    image = viewer.add_image(rng.normal(size=(N_SLICES, 32, 32)).astype(np.float32), name="vol")
    widget._image.value = image
    widget._propagate.value = False
    prompts = widget.add_prompts_layer()
    for z in (0, N_SLICES - 1):  # interpolated: every slice gets a box of object 1
        prompts.add_rectangles(_rect(z, 4, 4, 20, 20))

    def engine(request, session):  # the worker's engine: all slices at once, as a cache hit does
        total = len(request.slices)
        for k, z in enumerate(sorted(request.slices), start=1):
            yield Progress(k, total, 0.001 * k, z, _slice_labels(z), "boxes")
        return types.SimpleNamespace(timings={})

    monkeypatch.setattr(_widget.MASAMWidget, "_engine_generator", staticmethod(engine))
    # no repaint is due by the clock during the stream: only the first and the last numbers
    monkeypatch.setattr(_widget, "PROGRESS_REPAINT_S", 3600.0)
    statuses: list[str] = []
    bar_values: list[int] = []
    set_status = widget._set_status

    def status_spy(text: str, **kwargs) -> None:
        statuses.append(text)
        set_status(text, **kwargs)

    widget._set_status = status_spy  # every status line the widget writes
    widget._progress.changed.connect(lambda v: bar_values.append(int(v)))
    at_first_result: dict[str, object] = {}
    on_progress = widget._on_progress

    def spy(progress) -> None:
        if not at_first_result:
            preview = widget.preview_layer
            at_first_result["preview"] = preview
            at_first_result["visible"] = preview is not None and preview.visible
            at_first_result["colormap"] = None if preview is None else preview.colormap
            at_first_result["layers"] = len(viewer.layers)
        on_progress(progress)

    widget._on_progress = spy  # read by _start when it connects the worker
    qtbot.mouseClick(widget._run_btn.native, Qt.MouseButton.LeftButton)  # the real Run button
    assert widget.worker is not None, widget._status.value
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)

    preview = widget.preview_layer
    # every streamed slice is in the preview, voxel for voxel
    expected = np.stack([_slice_labels(z) for z in range(N_SLICES)])
    np.testing.assert_array_equal(np.asarray(preview.data), expected)
    # 40 progress items, but the numbers were painted twice: the first and the last
    counts = [s for s in statuses if f"/{N_SLICES} slices" in s]
    assert counts and counts[0].startswith(f"1/{N_SLICES} slices"), statuses
    assert len(counts) == 2 and counts[-1].startswith(f"{N_SLICES}/{N_SLICES} slices"), statuses
    assert [v for v in bar_values if v > 0] == [1, N_SLICES], bar_values
    assert widget._progress.value == N_SLICES == widget._progress.max
    assert statuses[-1].startswith(f"Done: {N_SLICES} slices"), statuses
    # the preview (first Labels draw: shader compile) was made at the start, visible and in its
    # final direct colours, not switched at the end of the run
    assert at_first_result["preview"] is preview and at_first_result["visible"]
    colormap = at_first_result["colormap"]
    assert isinstance(colormap, DirectLabelColormap)
    np.testing.assert_allclose(
        colormap.map(1)[:3], preview.colormap.map(1)[:3], atol=1e-6
    )  # object 1's colour did not change at the end
    assert colormap.map(0)[3] == 0
    assert at_first_result["layers"] == len(viewer.layers)  # nothing added at the end


def test_napari_activity_bar_is_repainted_coalesced_to_the_last_step() -> None:
    from napari_masam.inference import Progress

    class Bar:  # the part of napari's progress bar the worker drives
        def __init__(self) -> None:
            self.n, self.total, self.updates = 0, 0, []

        def update(self, k: int) -> None:
            self.n += k
            self.updates.append(self.n)

    bar, shown = Bar(), [float("-inf")]
    original = _worker.PBAR_REPAINT_S
    try:
        _worker.PBAR_REPAINT_S = 3600.0
        for k in range(1, N_SLICES + 1):
            _worker._update_pbar(bar, Progress(k, N_SLICES, 0.0), shown)
    finally:
        _worker.PBAR_REPAINT_S = original
    assert bar.updates == [1, N_SLICES] and bar.total == N_SLICES
