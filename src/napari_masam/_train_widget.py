"""The "Fine-tune" dock widget: train MA-SAM / MA-SAM-Lite from napari layers and use the result.

Pick an Image layer and the Labels layer drawn on it (or a folder of NIfTI pairs), name the
classes, choose epochs, press Train. Training runs :func:`napari_masam.training.iter_train` in a
napari thread worker (the GUI stays responsive), a small plot shows the loss of every step and
the validation Dice of every epoch, Cancel stops after the current step (the resume state is kept
in the output folder), and the best model is handed to the segmentation widget (its model
choice switches to the new checkpoint file).

Importing this module does not import torch (napari's startup stays fast).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from psygnal import Signal
from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

#: Where trained models go by default (one sub-folder per run).
DEFAULT_MODELS_DIR = Path.home() / ".napari-masam" / "models"
#: Folder choice meaning "use the layers above".
BACKBONE_CHOICES = ("masam-lite", "tiny", "vit_b", "vit_l", "vit_h")


class LossPlot(QWidget):
    """A minimal live plot: step losses (line) and validation mean Dice (dots, right axis 0..1).

    Plain QPainter, so no plotting package is needed.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.losses: list[float] = []
        self.dice: list[tuple[int, float]] = []  # (step, mean Dice)
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip(
            "Training loss per step (blue) and mean validation Dice per epoch (orange, 0..1)"
        )

    def clear(self) -> None:
        self.losses.clear()
        self.dice.clear()
        self.update()

    def add_loss(self, value: float) -> None:
        self.losses.append(float(value))
        self.update()

    def add_dice(self, step: int, value: float) -> None:
        self.dice.append((int(step), float(value)))
        self.update()

    def paintEvent(self, event: Any) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h, m = self.width(), self.height(), 6
        painter.fillRect(0, 0, w, h, QColor("#262930"))
        n = max(len(self.losses), 2)
        if self.losses:
            top = max(self.losses) or 1.0
            points = [
                QPointF(m + (w - 2 * m) * i / (n - 1), h - m - (h - 2 * m) * v / top)
                for i, v in enumerate(self.losses)
            ]
            painter.setPen(QPen(QColor("#4ea1ff"), 1.5))
            painter.drawPolyline(QPolygonF(points))
        painter.setPen(QPen(QColor("#ff9f40"), 5))
        for step, value in self.dice:
            x = m + (w - 2 * m) * (step - 1) / (n - 1)
            painter.drawPoint(QPointF(x, h - m - (h - 2 * m) * value))
        painter.end()


def _train_job(job: dict[str, Any]) -> Generator[Any, None, Any]:
    """Worker body: build the model, then drive :func:`iter_train` (closing it on abort)."""
    from . import _worker

    # torch/torchvision must come in through the guard (triton's LLVM vs Mesa's, see _worker)
    _worker.import_core()
    from .training import build_training_model, iter_train

    # read lazily held images (a video decodes here, not on the GUI thread)
    cases = [dataclasses.replace(c, image=np.asarray(c.image)) for c in job["cases"]]

    model = build_training_model(
        job["backbone"],
        job["num_classes"],
        sam_checkpoint=job["sam_checkpoint"],
        device=job["device"],
        seed=job["config"].seed,
    )
    gen = iter_train(
        model,
        cases,
        job["config"],
        output_dir=job["output_dir"],
        device=job["device"],
        resume=job["resume"],
    )
    stop = job["stop"]
    try:
        while True:
            try:
                progress = next(gen)
            except StopIteration as done:
                return done.value
            yield progress
            if stop.is_set():
                return None  # the finally below closes iter_train, which saves its state
    finally:
        gen.close()


class TrainWidget(Container):
    """Dock widget that fine-tunes a model from an Image + Labels layer pair (or a folder).

    Parameters
    ----------
    viewer : napari.viewer.Viewer

    Attributes
    ----------
    trained : Signal(Path)
        Emitted with the best checkpoint's path when a run finishes.
    """

    trained = Signal(object)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True, scrollable=True)
        self.viewer = viewer
        self._worker: Any = None
        self._result: Any = None
        self._steps_total = 0
        self._stop: Any = None

        self._image = ComboBox(
            label="image",
            choices=self._layer_choices("Image"),
            nullable=True,
            tooltip="Image layer to learn from: a (Z, Y, X) volume or a (T, H, W, 3) video.",
        )
        self._labels = ComboBox(
            label="labels",
            choices=self._layer_choices("Labels"),
            nullable=True,
            tooltip="Labels layer drawn on that image (same shape): 0 = background, i = class i.",
        )
        self._folder = FileEdit(
            label="or folder",
            mode="d",
            nullable=True,
            tooltip="Instead of layers: a folder with imagesTr/ + labelsTr/ or X.nii.gz beside "
            "X_labels.nii.gz (cases are split into training/validation by case).",
        )
        self._classes = LineEdit(
            label="class names",
            value="",
            tooltip="Comma-separated names of label 1, 2, ...; empty: 'class 1', 'class 2', ...",
        )
        self._backbone = ComboBox(
            label="backbone",
            choices=BACKBONE_CHOICES,
            value="masam-lite",
            tooltip="masam-lite: LiteMedSAM + 3D adapters (embedded weights, trainable on a CPU); "
            "vit_b/l/h: MA-SAM on a SAM checkpoint (GPU recommended); tiny: for tests.",
        )
        self._sam_checkpoint = FileEdit(
            label="SAM checkpoint",
            mode="r",
            nullable=True,
            filter="Checkpoints (*.pth *.pt)",
            tooltip="Meta's SAM weights (sam_vit_b/l/h_*.pth), needed by the ViT backbones only.",
        )
        self._epochs = SpinBox(
            label="epochs", value=20, min=1, max=10000, tooltip="Passes over the data."
        )
        self._augment = CheckBox(
            label="augment",
            value=True,
            tooltip="Group-consistent rot90/flip, rotation, gamma, contrast (authors' recipe). "
            "Switch flips off in the config for left/right-specific classes.",
        )
        self._output = FileEdit(
            label="output folder",
            mode="d",
            value=str(DEFAULT_MODELS_DIR / time.strftime("run-%Y%m%d-%H%M%S")),
            tooltip="best.safetensors, last.safetensors, resume.pt and history.json go here.",
        )
        self._resume = CheckBox(
            label="resume", value=False, tooltip="Continue the run saved in the output folder."
        )
        self._train_btn = PushButton(text="Train", tooltip="Start fine-tuning in the background.")
        self._cancel_btn = PushButton(
            text="Cancel", enabled=False, tooltip="Stop after the current step (resumable)."
        )
        self._progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self._status = Label(label="status", value="pick an image and its labels")
        self.plot = LossPlot()
        self.extend(
            [
                self._image,
                self._labels,
                self._folder,
                self._classes,
                self._backbone,
                self._sam_checkpoint,
                self._epochs,
                self._augment,
                self._output,
                self._resume,
                self._train_btn,
                self._cancel_btn,
                self._progress,
                self._status,
            ]
        )
        self.native.layout().addWidget(self.plot)
        self._train_btn.clicked.connect(self.run)
        self._cancel_btn.clicked.connect(self.cancel)
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._refresh_layers)

    # -- layers ---------------------------------------------------------------------------
    def _layer_choices(self, kind: str) -> Any:
        def choices(_widget: Any = None) -> list[tuple[str, Any]]:
            return [
                (layer.name, layer) for layer in self.viewer.layers if type(layer).__name__ == kind
            ]

        return choices

    def _refresh_layers(self, event: Any = None) -> None:
        self._image.reset_choices()
        self._labels.reset_choices()

    # -- public ---------------------------------------------------------------------------
    @property
    def worker(self) -> Any:
        """The running napari worker, or None."""
        return self._worker

    @property
    def result(self) -> Any:
        """The :class:`~napari_masam.training.TrainingResult` of the last finished run."""
        return self._result

    def training_config(self) -> Any:
        """The :class:`~napari_masam.training.TrainingConfig` the controls describe."""
        from .training import TrainingConfig

        names = tuple(n.strip() for n in self._classes.value.split(",") if n.strip())
        return TrainingConfig(
            class_names=names, epochs=int(self._epochs.value), augment=bool(self._augment.value)
        )

    def cases(self) -> list[Any]:
        """Training cases from the folder, or from the image + labels layers."""
        from .training import TrainingCase, load_folder_cases

        if self._folder.value and str(self._folder.value) not in ("", "."):
            return load_folder_cases(self._folder.value)
        image, labels = self._image.value, self._labels.value
        if image is None or labels is None:
            raise ValueError("Pick an image layer and the labels layer drawn on it (or a folder).")
        from . import _layers

        info = _layers.stack_from_layer(image)
        data = np.asarray(labels.data[0] if labels.multiscale else labels.data)
        if info.is_2d:
            data = data[np.newaxis]
        # the image stays lazy here: reading it (decoding a video) happens in the worker
        return [TrainingCase(info.stack, data, image.name)]

    def run(self) -> Any:
        """Check the inputs (errors shown at once), then start training in a worker."""
        if self._worker is not None:
            return self._worker
        try:
            job = self._prepare_job()
        except (ValueError, TypeError, FileNotFoundError) as exc:
            self._error(str(exc))
            return None
        import threading

        from napari.qt.threading import create_worker

        self._stop = job["stop"] = threading.Event()
        self.plot.clear()
        self._progress.value = 0
        self._steps_total = 0
        worker = create_worker(_train_job, job, _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._train_btn.enabled, self._cancel_btn.enabled = False, True
        self._set_status("preparing the model ...")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop after the current step; the run can be resumed from the output folder."""
        if self._worker is not None and self._stop is not None:
            self._set_status("cancelling after this step ...")
            self._stop.set()

    def offer_to_segmentation_widget(self, path: Path) -> bool:
        """Select ``path`` as the model of an open segmentation widget; True if one was found."""
        from ._widget import MASAMWidget

        window = getattr(self.viewer, "window", None)
        docks = getattr(window, "dock_widgets", {}) if window is not None else {}
        for widget in list(docks.values()):
            if isinstance(widget, MASAMWidget):
                widget.use_checkpoint(path)
                return True
        return False

    # -- internals ------------------------------------------------------------------------
    def _prepare_job(self) -> dict[str, Any]:
        from .training import check_cases

        config = self.training_config()
        cases = self.cases()
        declared = len(config.class_names) or None
        largest = check_cases(cases, declared)
        backbone = self._backbone.value
        sam = self._sam_checkpoint.value
        sam = Path(sam) if sam and str(sam) not in ("", ".") else None
        if backbone.startswith("vit") and sam is None:
            raise ValueError(f"Backbone {backbone} needs Meta's SAM checkpoint (pick the file).")
        return {
            "backbone": backbone,
            "num_classes": declared or largest,
            "sam_checkpoint": sam,
            "cases": cases,
            "config": config,
            "output_dir": Path(self._output.value),
            "device": "auto",
            "resume": bool(self._resume.value),
        }

    def _on_progress(self, progress: Any) -> None:
        if progress.stage == "train":
            self.plot.add_loss(progress.loss)
            if progress.total_steps != self._steps_total:
                self._steps_total = progress.total_steps
                self._progress.max = progress.total_steps
            self._progress.value = progress.step
            self._set_status(
                f"epoch {progress.epoch}/{progress.epochs}, step {progress.step}/"
                f"{progress.total_steps}, loss {progress.loss:.4f}",
                log=False,
            )
        else:
            self.plot.add_dice(progress.step, progress.val_mean_dice or 0.0)
            dice = ", ".join(f"{k} {v:.2f}" for k, v in (progress.val_dice or {}).items())
            self._set_status(f"epoch {progress.epoch}: validation Dice {dice}")

    def _on_returned(self, result: Any) -> None:
        if result is None:
            self._set_status(f"cancelled; tick 'resume' to continue from {self._output.value}")
            return
        self._result = result
        path = result.best_path or result.last_path
        if path is None:
            return
        offered = self.offer_to_segmentation_widget(path)
        where = " (selected in the Segment widget)" if offered else ""
        self._set_status(f"done: best mean Dice {result.best_mean_dice:.3f}, {path}{where}")
        self.trained.emit(path)

    def _on_errored(self, exc: BaseException) -> None:
        self._error(f"Training failed: {exc}")

    def _on_finished(self) -> None:
        self._worker = None
        self._train_btn.enabled, self._cancel_btn.enabled = True, False

    def _set_status(self, text: str, *, log: bool = True) -> None:
        self._status.value = text
        if log:
            logger.info(text)

    def _error(self, message: str) -> None:
        self._status.value = message
        try:
            from napari.utils.notifications import show_error

            show_error(message)
        except Exception:  # pragma: no cover - notifications unavailable headless
            logger.error(message)
