"""The Segment widget's backend setting (issue 15): torch stays the reference, a fast CPU runtime
is selectable, the status says which one runs, and the masks agree."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 180_000  # the first run on a runtime exports the graphs (~15-20 s, more if busy)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """One export cache for the whole test run: each runtime's graphs are exported once."""
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(autouse=True)
def _private_export_dir(export_dir, monkeypatch):
    from napari_masam.model.runtime import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(export_dir))


def _open_nifti(viewer, path):
    layers = viewer.open(str(path), plugin="napari-masam")
    assert len(layers) == 1
    return layers[0]


def _run_and_wait(qtbot, widget):
    worker = widget.run()
    assert worker is not None, widget._status.value
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def test_backend_goes_into_the_request_and_the_model_key(viewer_widget) -> None:
    from napari.layers import Image

    from napari_masam import _layers
    from napari_masam._widget_controls import ControlValues, request_from_controls
    from napari_masam.model.runtime import BACKENDS

    _viewer, widget = viewer_widget
    assert tuple(widget._backend.choices) == BACKENDS
    assert widget._backend.value == "auto" and widget._backend.tooltip
    assert widget.control_values().backend == "auto"
    widget._backend.value = "torch"
    assert widget.control_values().backend == "torch"

    image = Image(np.zeros((2, 8, 9), np.float32))
    info = _layers.stack_from_layer(image)
    values = ControlValues("litemedsam", None, None, "cpu", "mri", backend="OpenVINO")
    request = request_from_controls(values, image, info, {1: {0: (0, 0, 4, 4)}})
    assert request.backend == "openvino"  # checked and lower-cased at the edge
    torch_values = dataclasses.replace(values, backend="torch")
    assert values.model_key != torch_values.model_key  # another backend: another session
    with pytest.raises(ValueError, match="Unknown backend"):
        request_from_controls(
            dataclasses.replace(values, backend="tensorrt"), image, info, {1: {0: (0, 0, 4, 4)}}
        )


@pytest.mark.slow  # loads LiteMedSAM, exports it to a runtime once per test run (~20 s)
def test_torch_and_runtime_backends_from_the_combo_agree_on_a_real_slice(
    qtbot, viewer_widget, small_nifti_path, request
) -> None:
    from napari_masam.model.lite import LiteMedSAM
    from napari_masam.model.runtime import AUTO_ORDER, RuntimeLiteMedSAM, available_backends

    viewer, widget = viewer_widget
    image = _open_nifti(viewer, small_nifti_path)
    data = np.asarray(image.data)
    widget._device.value = "cpu"
    widget._propagate.value = False  # one boxed slice is all this test needs
    # every text the status line showed is also logged by the widget: collect them with a
    # handler on its own logger (independent of root handlers and other tests' logging setup)
    seen: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    widget_logger = logging.getLogger("napari_masam._widget")
    handler, old_level = _Collect(level=logging.INFO), widget_logger.level
    widget_logger.addHandler(handler)
    widget_logger.setLevel(logging.INFO)
    request.addfinalizer(lambda: widget_logger.removeHandler(handler))
    request.addfinalizer(lambda: widget_logger.setLevel(old_level))

    def statuses() -> list[str]:
        return seen

    z = 2  # the brain's bounding box on one real slice
    rows, cols = np.nonzero(data[z] > 0)
    prompts = widget.add_prompts_layer()
    prompts.add_rectangles(
        np.array(
            [
                [z, rows.min(), cols.min()],
                [z, rows.min(), cols.max()],
                [z, rows.max(), cols.max()],
                [z, rows.max(), cols.min()],
            ],
            dtype=float,
        )
    )

    widget._backend.value = "torch"
    _run_and_wait(qtbot, widget)
    torch_session = widget.session
    assert type(torch_session.model) is LiteMedSAM
    assert "Backend: torch" in widget._model_note.value
    assert any("Backend: torch" in s for s in statuses()), statuses()
    reference = np.array(widget.preview_layer.data[z], copy=True)
    assert 0.05 * reference.size < np.count_nonzero(reference) < reference.size  # a real mask
    assert not np.asarray(widget.preview_layer.data)[[0, 1, 3, 4, 5]].any()

    runtimes = [b for b in AUTO_ORDER if b in available_backends()]
    if not runtimes:
        pytest.skip("neither OpenVINO nor ONNX Runtime is installed")
    previous = torch_session
    for choice in (runtimes[0], "auto"):
        seen.clear()
        widget._backend.value = choice
        _run_and_wait(qtbot, widget)
        session = widget.session
        assert session is not previous, f"{choice}: the model was not reloaded"
        previous = session
        model = session.model
        assert isinstance(model, RuntimeLiteMedSAM), (choice, type(model))
        active = model.backend_info.backend
        assert active == runtimes[0]  # auto tries OpenVINO, then ONNX Runtime
        assert model.backend_info.requested == choice
        assert f"Backend: {active}" in widget._model_note.value, widget._model_note.value
        assert any(f"Backend: {active}" in s for s in statuses()), statuses()
        labels = np.asarray(widget.preview_layer.data[z])
        assert _dice(labels, reference) >= 0.99, (choice, _dice(labels, reference))
        assert set(np.unique(labels)) <= {0, 1}
