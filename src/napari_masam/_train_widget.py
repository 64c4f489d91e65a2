"""The "Fine-tune" dock widget: train MA-SAM / MA-SAM-Lite from napari layers and use the result.

Pick an Image layer and the Labels layer drawn on it (or a folder of NIfTI pairs), press Train.
Class names come from the labels layer's features table (or are typed); the run is sized for the
device unless epochs are set (a CPU run takes minutes). Training runs
:func:`napari_masam.training.iter_train` in a napari thread worker (the GUI stays responsive), a
small plot shows the loss of every step and the validation Dice of every epoch, the status line
shows the time left (measured from the steps taken), Cancel stops within the current step (the
resume state is kept in the output folder), and the best model is handed to the segmentation
widget (its model choice switches to the new checkpoint file).

Importing this module does not import torch (napari's startup stays fast).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
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

from .training.config import BACKBONES, defaults_for_device, format_duration

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

#: Where trained models go by default (one sub-folder per run).
DEFAULT_MODELS_DIR = Path.home() / ".napari-masam" / "models"
#: The backbone drop-down: what users can train (test configurations are not offered).
BACKBONE_CHOICES = BACKBONES
#: What "auto" means on a CPU (shown in the epochs tooltip).
CPU_DEFAULTS = defaults_for_device("cpu")


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


@dataclass(frozen=True)
class TrainJob:
    """Everything a fine-tuning run needs, gathered on the GUI thread (no pixels read).

    Attributes
    ----------
    backbone : str
        One of :data:`napari_masam.training.BACKBONES`.
    num_classes : int
    cases : tuple of TrainingCase
        Images may still be lazy (a video decodes in the worker).
    config : TrainingConfig
        With ``epochs``/``batch_size``/``max_steps_per_epoch`` from the controls or, for
        controls left on *auto*, replaced in the worker by the device's defaults.
    auto_size : bool
        Apply :func:`napari_masam.training.defaults_for_device` once the device is known.
    image_size : int or None
        MA-SAM-Lite input side (None: auto by device, or LiteMedSAM's 256 on a GPU).
    sam_checkpoint : Path or None
        Meta's SAM base (ViT backbones).
    start_checkpoint : Path or None
        One of our ``.safetensors`` models to continue from (replaces the backbone).
    output_dir : Path
    device : str
    resume : bool
    """

    backbone: str
    num_classes: int
    cases: tuple[Any, ...]
    config: Any
    auto_size: bool
    image_size: int | None
    sam_checkpoint: Path | None
    start_checkpoint: Path | None
    output_dir: Path
    device: str = "auto"
    resume: bool = False


def _train_job(job: TrainJob, stop: Any) -> Generator[Any, None, Any]:
    """Worker body: resolve the device, size the run for it, build the model, drive
    :func:`iter_train` (which checks ``stop`` inside every step)."""
    from . import _worker

    # torch/torchvision must come in through the guard (triton's LLVM vs Mesa's, see _worker)
    _worker.import_core()
    from .devices import resolve_device
    from .training import build_training_model, defaults_for_device, iter_train

    device = resolve_device(job.device)
    config, image_size = job.config, job.image_size
    if job.auto_size:
        sized = defaults_for_device(device.type)
        config = sized.apply(config)
        image_size = image_size or sized.image_size
    # read lazily held images (a video decodes here, not on the GUI thread)
    cases = [dataclasses.replace(c, image=np.asarray(c.image)) for c in job.cases]
    model = build_training_model(
        job.backbone,
        job.num_classes,
        sam_checkpoint=job.sam_checkpoint,
        init_checkpoint=job.start_checkpoint,
        device=device,
        seed=config.seed,
        image_size=image_size if job.backbone == "masam-lite" else None,
    )
    if stop.is_set():
        return None
    result = yield from iter_train(
        model,
        cases,
        config,
        output_dir=job.output_dir,
        device=device,
        resume=job.resume,
        should_stop=stop.is_set,
    )
    return None if result.cancelled else result


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
        self._names_from_layer = ""

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
            tooltip="Labels layer drawn on that image (same shape): 0 = background, i = class i. "
            "Class names are read from its features table (a 'name' or 'class' column).",
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
            tooltip="Comma-separated names of label 1, 2, ...; empty: the labels layer's "
            "features (name/class column), else 'class 1', 'class 2', ...",
        )
        self._backbone = ComboBox(
            label="backbone",
            choices=BACKBONE_CHOICES,
            value="masam-lite",
            tooltip="masam-lite: LiteMedSAM + 3D adapters (embedded weights, trainable on a CPU); "
            "vit_b/l/h: MA-SAM on Meta's SAM checkpoint (GPU recommended).",
        )
        self._sam_checkpoint = FileEdit(
            label="SAM checkpoint",
            mode="r",
            nullable=True,
            filter="Checkpoints (*.pth *.pt)",
            tooltip="Meta's SAM weights (sam_vit_b/l/h_*.pth), needed by the ViT backbones only.",
        )
        self._start = FileEdit(
            label="continue from",
            mode="r",
            nullable=True,
            filter="napari-masam models (*.safetensors)",
            tooltip="Optional: one of your fine-tuned models (.safetensors) to train further "
            "instead of the backbone (same class count).",
        )
        self._epochs = SpinBox(
            label="epochs",
            value=0,
            min=0,
            max=10000,
            tooltip="Passes over the data. 'auto': sized for the device (a few minutes on a CPU: "
            f"{CPU_DEFAULTS.epochs} epochs x {CPU_DEFAULTS.max_steps_per_epoch} steps at "
            f"{CPU_DEFAULTS.image_size} px; the full recipe on a GPU).",
        )
        self._epochs.native.setSpecialValueText("auto (by device)")
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
            text="Cancel",
            enabled=False,
            tooltip="Stop within the current step (the step in flight is dropped; resumable).",
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
                self._start,
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
        self._labels.changed.connect(self._names_from_labels_layer)
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

    def _names_from_labels_layer(self, layer: Any = None) -> None:
        """Fill the class names from the chosen labels layer's features (unless typed)."""
        names = layer_class_names(self._labels.value)
        typed = self._classes.value.strip()
        if typed and typed != self._names_from_layer:
            return  # the user's own names win
        text = ", ".join(names) if names else ""
        self._names_from_layer = text
        self._classes.value = text

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
        """The :class:`~napari_masam.training.TrainingConfig` the controls describe.

        Class names: the typed ones, else the labels layer's features (or properties).
        With epochs on *auto* the run-size fields stay at the recipe's and the worker applies
        the device's defaults.
        """
        from .training import TrainingConfig

        names = tuple(n.strip() for n in self._classes.value.split(",") if n.strip())
        if not names and self._labels.value is not None and not self._folder_path():
            names = layer_class_names(self._labels.value) or ()
        epochs = int(self._epochs.value)
        changes: dict[str, Any] = {"epochs": epochs} if epochs > 0 else {}
        return TrainingConfig(class_names=names, augment=bool(self._augment.value), **changes)

    def cases(self) -> list[Any]:
        """Training cases from the folder, or from the image + labels layers."""
        from .training import TrainingCase, load_folder_cases

        folder = self._folder_path()
        if folder is not None:
            return load_folder_cases(folder)
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

    def job(self) -> TrainJob:
        """The :class:`TrainJob` the controls describe (inputs checked; no pixels read).

        Raises
        ------
        ValueError, FileNotFoundError
            Missing layers or files, labels not fitting the image, too many classes.
        """
        from .training import check_cases

        config = self.training_config()
        cases = self.cases()
        declared = len(config.class_names) or None
        largest = check_cases(cases, declared)
        backbone = self._backbone.value
        sam = _path_or_none(self._sam_checkpoint.value)
        start = _path_or_none(self._start.value)
        if start is not None and not start.is_file():
            raise FileNotFoundError(f"The model to continue from, {start}, does not exist.")
        if backbone.startswith("vit") and sam is None and start is None:
            raise ValueError(f"Backbone {backbone} needs Meta's SAM checkpoint (pick the file).")
        return TrainJob(
            backbone=backbone,
            num_classes=declared or largest,
            cases=tuple(cases),
            config=config,
            auto_size=int(self._epochs.value) == 0,
            image_size=None,
            sam_checkpoint=sam,
            start_checkpoint=start,
            output_dir=Path(self._output.value),
            device="auto",
            resume=bool(self._resume.value),
        )

    def run(self) -> Any:
        """Check the inputs (errors shown at once), then start training in a worker."""
        if self._worker is not None:
            return self._worker
        try:
            job = self.job()
        except (ValueError, TypeError, FileNotFoundError) as exc:
            self._error(str(exc))
            return None
        import threading

        from . import _worker

        self._stop = stop = threading.Event()
        self.plot.clear()
        self._progress.value = 0
        self._steps_total = 0
        self._train_btn.enabled, self._cancel_btn.enabled = False, True
        self._set_status("preparing the model; the time left shows after the first step ...")
        # the generator is created here but runs (builds the model, reads images) in the worker
        worker = _worker.start_worker(
            lambda: _train_job(job, stop),
            on_progress=self._on_progress,
            on_returned=self._on_returned,
            on_errored=self._on_errored,
            on_finished=self._on_finished,
            desc="MA-SAM fine-tuning",
        )
        self._worker = worker
        return worker

    def cancel(self) -> None:
        """Stop within the current step; the run can be resumed from the output folder."""
        if self._worker is not None and self._stop is not None:
            self._set_status("cancelling ...")
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
    def _folder_path(self) -> Path | None:
        return _path_or_none(self._folder.value)

    def _on_progress(self, progress: Any) -> None:
        eta = f", about {format_duration(progress.eta_s)} left" if progress.eta_s else ""
        if progress.stage == "train":
            self.plot.add_loss(progress.loss)
            if progress.total_steps != self._steps_total:
                self._steps_total = progress.total_steps
                self._progress.max = progress.total_steps
            self._progress.value = progress.step
            self._set_status(
                f"epoch {progress.epoch}/{progress.epochs}, step {progress.step}/"
                f"{progress.total_steps}, loss {progress.loss:.4f}{eta}",
                log=progress.step == 1,
            )
        else:
            self.plot.add_dice(progress.step, progress.val_mean_dice or 0.0)
            dice = ", ".join(f"{k} {v:.2f}" for k, v in (progress.val_dice or {}).items())
            self._set_status(f"epoch {progress.epoch}: validation Dice {dice}{eta}")

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


def layer_class_names(layer: Any) -> tuple[str, ...] | None:
    """Class names of a Labels layer from its ``features`` table (or ``properties``).

    See :func:`napari_masam.training.class_names_from_table` for the columns looked at.
    """
    if layer is None:
        return None
    from .training import class_names_from_table

    for table in (getattr(layer, "features", None), getattr(layer, "properties", None)):
        if table is not None and len(table) and (names := class_names_from_table(table)):
            return names
    return None


def _path_or_none(value: Any) -> Path | None:
    if value is None or str(value) in ("", "."):
        return None
    return Path(value)
