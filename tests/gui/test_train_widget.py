"""The Fine-tune dock widget in a real viewer: trains from layers, plots, hands the model over."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 180_000


def _phantom(depth: int = 20, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    _z, y, x = np.mgrid[:depth, :size, :size].astype(np.float32)
    labels = np.zeros((depth, size, size), np.uint8)
    labels[(y - 22) ** 2 + (x - 22) ** 2 < 14**2] = 1
    labels[(np.abs(y - 46) < 10) & (np.abs(x - 44) < 12)] = 2
    image = np.where(labels == 1, 200.0, np.where(labels == 2, 100.0, 20.0))
    return (image + rng.normal(0, 10, labels.shape)).astype(np.float32), labels


def test_module_import_does_not_import_torch() -> None:
    code = "import sys, napari_masam._train_widget; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def tiny_start(tmp_path_factory) -> Path:
    """A random tiny MA-SAM (2 classes) saved in our format: the test model enters the widget
    through 'continue from', since test configurations are offered in no menu."""
    import torch

    from napari_masam.checkpoints import save_checkpoint
    from napari_masam.training import build_training_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("start") / "tiny_start.safetensors"
    return save_checkpoint(build_training_model("tiny", 2, seed=0), path)


@pytest.fixture
def two_widgets(make_napari_viewer):
    from napari_masam._train_widget import TrainWidget
    from napari_masam._widget import MASAMWidget

    viewer = make_napari_viewer(show=True)
    segment = MASAMWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    trainer = TrainWidget(viewer)
    viewer.window.add_dock_widget(trainer, name="Fine-tune")
    return viewer, segment, trainer


def test_trains_from_layers_plots_and_offers_the_model(
    qtbot, two_widgets, tiny_start, tmp_path
) -> None:
    from napari_masam._widget import CHECKPOINT_CHOICE
    from napari_masam.checkpoints import load_checkpoint

    viewer, segment, trainer = two_widgets
    image, labels = _phantom()
    image_layer = viewer.add_image(image, name="ct")
    labels_layer = viewer.add_labels(labels, name="ct labels")
    trainer._image.value = image_layer
    trainer._labels.value = labels_layer
    trainer._start.value = tiny_start
    trainer._classes.value = "disk, box"
    trainer._epochs.value = 1
    trainer._output.value = tmp_path / "run"
    paths = []
    trainer.trained.connect(paths.append)
    worker = trainer.run()
    assert worker is not None
    # the widget's own finished handler clears _worker (connected before the thread started)
    qtbot.waitUntil(lambda: trainer._worker is None, timeout=RUN_TIMEOUT_MS)
    result = trainer.result
    assert result is not None and result.best_path == tmp_path / "run" / "best.safetensors"
    assert paths == [result.best_path]
    # 20 slices -> slabs of 10: one training slab (10 groups, batch 2 -> 5 steps), one held out
    assert len(trainer.plot.losses) == 5 and len(trainer.plot.dice) == 1
    assert trainer.plot.losses == pytest.approx(result.step_losses)
    assert segment._model.value == CHECKPOINT_CHOICE
    assert str(segment._checkpoint.value) == str(result.best_path)
    assert load_checkpoint(result.best_path).metadata.class_names == ("disk", "box")
    assert trainer._train_btn.enabled and not trainer._cancel_btn.enabled


def test_bad_labels_are_reported_before_any_worker(two_widgets) -> None:
    viewer, _, trainer = two_widgets
    image, labels = _phantom()
    trainer._image.value = viewer.add_image(image, name="ct")
    trainer._labels.value = viewer.add_labels(labels[:, :, :60], name="wrong grid")
    assert trainer.run() is None
    assert trainer.worker is None
    assert "do not match" in trainer._status.value


def _automatic_enabled(segment) -> bool:
    from qtpy.QtWidgets import QRadioButton

    (button,) = [
        b for b in segment._mode.native.findChildren(QRadioButton) if b.text() == "automatic"
    ]
    return button.isEnabled()


def test_use_checkpoint_selects_the_file_and_drops_the_loaded_session(
    two_widgets, tmp_path
) -> None:
    from napari_masam._widget import CHECKPOINT_CHOICE

    _viewer, segment, trainer = two_widgets
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"")
    segment.use_checkpoint(path, masam_checkpoint=tmp_path / "adapters.pth")
    assert segment._model.value == CHECKPOINT_CHOICE
    assert Path(segment._checkpoint.value) == path
    assert Path(segment._masam_checkpoint.value) == tmp_path / "adapters.pth"
    # a loaded box-only model greys out automatic mode
    box_only = SimpleNamespace(
        slices_per_group=1,
        supports_automatic=False,
        metadata=SimpleNamespace(name="old", intensity_preset="minmax"),
    )
    session = SimpleNamespace(model=box_only, device=SimpleNamespace(type="cpu"))
    segment.set_session(session)
    assert segment.session is session and not _automatic_enabled(segment)
    # the same file name again (a retrained model): the old session must not be reused
    assert trainer.offer_to_segmentation_widget(path) is True
    assert segment.session is None
    assert _automatic_enabled(segment)
    assert segment._model.value == CHECKPOINT_CHOICE and Path(segment._checkpoint.value) == path
    assert segment._masam_checkpoint.value is None


def test_offer_without_a_segmentation_widget_returns_false(make_napari_viewer, tmp_path) -> None:
    from napari_masam._train_widget import TrainWidget

    viewer = make_napari_viewer()
    trainer = TrainWidget(viewer)
    viewer.window.add_dock_widget(trainer, name="Fine-tune")
    assert trainer.offer_to_segmentation_widget(tmp_path / "best.safetensors") is False


def test_lazy_images_are_read_in_the_worker_not_on_the_gui_thread(two_widgets) -> None:
    import dask.array as da

    viewer, _segment, trainer = two_widgets
    image, labels = _phantom(depth=6)
    lazy = da.from_array(image, chunks=(1, 64, 64))  # as a video layer holds its frames
    trainer._image.value = viewer.add_image(lazy, name="lazy")
    trainer._labels.value = viewer.add_labels(labels, name="lazy labels")
    (case,) = trainer.cases()
    assert not isinstance(case.image, np.ndarray)  # nothing decoded on the GUI thread
    np.testing.assert_array_equal(np.asarray(case.image), image)


def _wait_idle(qtbot, trainer) -> None:
    qtbot.waitUntil(lambda: trainer._worker is None, timeout=RUN_TIMEOUT_MS)


def test_backbone_menu_offers_no_test_configurations(two_widgets) -> None:
    from napari_masam.training import BACKBONES, TEST_BACKBONES

    _viewer, _segment, trainer = two_widgets
    assert tuple(trainer._backbone.choices) == BACKBONES
    assert not set(trainer._backbone.choices) & set(TEST_BACKBONES)


@pytest.mark.parametrize("table", ["features", "properties"])
def test_class_names_come_from_the_labels_layer(two_widgets, table) -> None:
    viewer, _segment, trainer = two_widgets
    image, labels = _phantom(depth=6)
    trainer._image.value = viewer.add_image(image, name="ct")
    # rows in another order than the values, and the background row named too
    columns = {"index": [2, 0, 1], "name": ["box", "background", "disk"]}
    layer = viewer.add_labels(labels, name="named", **{table: columns})
    trainer._labels.value = layer
    assert trainer._classes.value == "disk, box"
    assert trainer.training_config().class_names == ("disk", "box")
    assert trainer.job().num_classes == 2
    # names the user typed win over the layer's
    trainer._classes.value = "liver, spleen"
    trainer._labels.value = None
    trainer._labels.value = layer
    assert trainer.training_config().class_names == ("liver", "spleen")


def test_auto_run_size_follows_the_device_and_shows_the_time_left(
    qtbot, two_widgets, tiny_start, tmp_path
) -> None:
    from napari_masam.training import defaults_for_device

    viewer, _segment, trainer = two_widgets
    image, labels = _phantom()
    trainer._image.value = viewer.add_image(image, name="ct")
    trainer._labels.value = viewer.add_labels(labels, name="ct labels")
    trainer._start.value = tiny_start
    trainer._output.value = tmp_path / "run"
    assert trainer._epochs.value == 0  # 'auto (by device)'
    job = trainer.job()
    assert job.auto_size and dataclasses.is_dataclass(job)
    statuses: list[str] = []
    worker = trainer.run()
    # read the status line each time the widget has handled a progress report
    worker.yielded.connect(lambda _progress: statuses.append(trainer._status.value))
    _wait_idle(qtbot, trainer)
    result = trainer.result
    cpu = defaults_for_device("cpu")  # the tests run on the CPU
    # 20 slices -> one training slab of 10 groups; batch 1 capped at 8 steps per epoch
    assert len(result.history) == cpu.epochs
    assert len(result.step_losses) == cpu.epochs * min(10, cpu.max_steps_per_epoch)
    step_lines = [s for s in statuses if s.startswith("epoch") and "step" in s]
    assert step_lines and all(" left" in s for s in step_lines)


def test_cancel_right_after_train_runs_no_step(qtbot, two_widgets, tiny_start, tmp_path) -> None:
    viewer, _segment, trainer = two_widgets
    image, labels = _phantom()
    trainer._image.value = viewer.add_image(image, name="ct")
    trainer._labels.value = viewer.add_labels(labels, name="ct labels")
    trainer._start.value = tiny_start
    trainer._epochs.value = 50
    trainer._output.value = tmp_path / "run"
    assert trainer.run() is not None
    trainer._cancel_btn.clicked.emit()  # Cancel pressed while the model is still being built
    _wait_idle(qtbot, trainer)
    assert trainer.plot.losses == []  # the run stopped before finishing any step
    assert "cancelled" in trainer._status.value
    assert trainer.result is None
    assert trainer._train_btn.enabled and not trainer._cancel_btn.enabled
