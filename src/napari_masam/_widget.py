"""The napari dock widget: automatic and box-prompted segmentation that never freezes the viewer.

Plugins > napari-masam > Segment. The widget is a thin shell over the headless core:

- it gathers the controls into one run configuration,
- loads the model once into a :class:`napari_masam.session.SegmentationSession` kept on the
  widget (model + embedding cache reused between runs, so a second box on the same volume costs
  only the decoder),
- runs the engine generator in napari's thread worker (:mod:`napari_masam._worker`) and streams
  finished slices into a *preview* Labels layer,
- commits the preview into a Labels layer of the user's choice with a preserve policy, as one
  undoable step.

Importing this module must stay light (no torch): the core is imported inside methods.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
    Table,
)

from . import _layers

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Shapes

logger = logging.getLogger(__name__)

#: Model choice meaning "use the file(s) below" instead of a registry preset.
CHECKPOINT_CHOICE = "checkpoint file..."
#: Intensity choice meaning "whatever the loaded model was trained with".
MODEL_DEFAULT_PRESET = "model default"
#: Intensity choice that shows the CT level/width boxes.
CUSTOM_CT_PRESET = "custom CT window"
#: Target choice: commit into a new Labels layer.
NEW_LAYER_TARGET = "new Labels layer"

#: Viewer key bindings (napari key strings) -> widget action; none clashes with napari's defaults.
SHORTCUTS: dict[str, str] = {
    "Alt-R": "run",
    "Alt-C": "cancel",
    "Alt-N": "next_object",
    "Alt-M": "commit",
}

_MODES = ("boxes", "automatic")


def _path_or_none(value: Any) -> Path | None:
    if value in (None, ""):
        return None
    path = Path(value)
    return None if str(path) in ("", ".") else path


@dataclass(frozen=True)
class SessionLoaded:
    """First item a run yields after loading a model in the worker; the GUI thread adopts it."""

    session: Any
    key: Any


class MASAMWidget(Container):
    """Dock widget: pick an image and a model, draw boxes or run automatically, commit.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose layers the widget reads and writes (napari passes it).

    Notes
    -----
    Shortcuts on the viewer: ``Alt-R`` run, ``Alt-C`` cancel, ``Alt-N`` next object (new
    rectangles get the next object id), ``Alt-M`` commit. Errors from the core become napari
    notifications; the widget stays usable after them.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True, scrollable=False)
        self.viewer = viewer
        self._session: Any = None  # SegmentationSession, loaded on first run
        self._session_key: tuple | None = None
        self._worker: Any = None
        self._stats: Any = None
        self._run_info: dict[str, Any] = {}
        self._last_result: Any = None
        self._preview: Labels | None = None
        self._prompts: Shapes | None = None
        self._preset_from_model = True
        self._setting_preset = False
        self._model_note = ""

        from napari.layers import Image, Labels

        from .model.registry import DEFAULT_MODEL, MODEL_REGISTRY

        self._Image, self._Labels = Image, Labels

        # --- controls -------------------------------------------------------------------
        self._image = ComboBox(
            label="image",
            choices=self._image_choices,
            nullable=True,
            tooltip="Image layer to segment: a (Z, Y, X) volume, a video (T, H, W, 3) or a 2D/RGB "
            "picture. Slices/frames are axis 0.",
        )
        names = [DEFAULT_MODEL, *[n for n in MODEL_REGISTRY if n != DEFAULT_MODEL]]
        self._model = ComboBox(
            label="model",
            choices=[*names, CHECKPOINT_CHOICE],
            value=DEFAULT_MODEL,
            tooltip="Model: "
            + "; ".join(f"{n}: {MODEL_REGISTRY[n].description}" for n in names)
            + f"; {CHECKPOINT_CHOICE}: a napari-masam .safetensors file, or a SAM base "
            "checkpoint + the authors' MA-SAM adapter checkpoint.",
        )
        self._checkpoint = FileEdit(
            label="checkpoint",
            mode="r",
            filter="Checkpoints (*.safetensors *.pth *.pt *.ckpt)",
            nullable=True,
            tooltip="Our single-file .safetensors checkpoint, or the SAM base checkpoint "
            "(sam_vit_b/l/h_*.pth) of an MA-SAM pair.",
        )
        self._masam_checkpoint = FileEdit(
            label="MA-SAM adapters",
            mode="r",
            filter="Checkpoints (*.pth *.pt *.safetensors)",
            nullable=True,
            tooltip="Optional: the authors' MA-SAM checkpoint (adapters, FacT, decoder) that goes "
            "with the SAM base checkpoint above. Leave empty for our single-file format.",
        )
        from . import _worker

        _worker.guard_gl_llvm_clash()  # before anything can import torchvision (see there)
        from .devices import available_devices  # imports torch: only when the widget opens

        self._device = ComboBox(
            label="device",
            choices=available_devices(),
            value="auto",
            tooltip="Where the model runs; only devices present on this machine are listed. "
            "auto = CUDA, then Apple MPS, then CPU.",
        )
        from .preprocess import INTENSITY_PRESETS

        self._preset = ComboBox(
            label="intensity",
            choices=[MODEL_DEFAULT_PRESET, *INTENSITY_PRESETS, CUSTOM_CT_PRESET],
            value=MODEL_DEFAULT_PRESET,
            tooltip="Intensity normalisation. Filled with the model's training preset when the "
            "model loads; change it to use another CT window (HU) or MRI/min-max scaling.",
        )
        self._level = FloatSpinBox(
            label="CT level (HU)",
            value=40.0,
            min=-2000.0,
            max=4000.0,
            step=10.0,
            visible=False,
            tooltip="Centre of the custom CT window in Hounsfield units.",
        )
        self._width = FloatSpinBox(
            label="CT width (HU)",
            value=400.0,
            min=1.0,
            max=8000.0,
            step=10.0,
            visible=False,
            tooltip="Width of the custom CT window in Hounsfield units.",
        )
        self._mode = RadioButtons(
            label="mode",
            choices=_MODES,
            value="boxes",
            orientation="horizontal",
            tooltip="boxes: draw rectangles in the 'prompts' layer on a few slices (keyframes are "
            "interpolated), one object per object id. automatic: every class of the model, no "
            "prompts (needs a model with a class head, e.g. an MA-SAM checkpoint).",
        )
        self._stride = SpinBox(
            label="stride",
            value=1,
            min=1,
            max=64,
            visible=False,
            tooltip="Automatic mode: step between the first slices of consecutive slice groups. "
            "1 = every slice in every position (best), larger = faster; at most the model's "
            "slices per group (5 for MA-SAM).",
        )
        self._prompts_btn = PushButton(
            text="Add prompts layer",
            tooltip="Create (or select) the 'prompts' Shapes layer over the image, in rectangle "
            "mode. Draw a box around the object on a few slices; slices between are interpolated.",
        )
        self._object = SpinBox(
            label="object id",
            value=1,
            min=1,
            max=254,
            tooltip="Object id of the next rectangles you draw (Alt-N: next object). Rectangles "
            "with the same id on different slices are keyframes of one object.",
        )
        self._target = ComboBox(
            label="commit to",
            choices=self._target_choices,
            tooltip="Where Commit writes the preview: a new Labels layer, or one of your Labels "
            "layers (undoable with Ctrl+Z on that layer). Runs only ever write the preview layer.",
        )
        self._policy = ComboBox(
            label="preserve",
            choices=[(text, key) for key, text in _layers.COMMIT_POLICIES.items()],
            value="keep",
            visible=False,
            tooltip="How Commit treats labels already in the target layer. replace these "
            "labels, keep others: the result's own label values are replaced, other labels stay. overwrite: the "
            "result wins everywhere it is foreground. only empty voxels: only background voxels "
            "are written, nothing is removed. Always one undo step (Ctrl+Z).",
        )
        self._run_btn = PushButton(text="Run (Alt-R)", tooltip="Segment the image (Alt-R).")
        self._cancel_btn = PushButton(
            text="Cancel (Alt-C)",
            enabled=False,
            tooltip="Stop after the current slice (Alt-C); slices already done stay in the preview.",
        )
        self._commit_btn = PushButton(
            text="Commit (Alt-M)",
            enabled=False,
            tooltip="Write the preview into the 'commit to' layer with the preserve policy (Alt-M).",
        )
        buttons = Container(
            widgets=[self._run_btn, self._cancel_btn, self._commit_btn],
            layout="horizontal",
            labels=False,
            label="",
        )
        self._progress = ProgressBar(
            label="progress",
            value=0,
            min=0,
            max=1,
            tooltip="Slices finished in the current run.",
        )
        self._status = Label(
            label="status", value="Ready. Pick an image and draw boxes, or switch to automatic."
        )
        self._status.tooltip = (
            "What the widget is doing; speed (slices/s) and time left while running."
        )
        self._status.native.setWordWrap(True)
        self._table = Table(
            label="volumes",
            visible=False,
            tooltip="Per-label volume of the preview in mL, from the voxel spacing (layer scale, mm).",
        )
        self._table.native.setMaximumHeight(140)
        self.extend(
            [
                self._image,
                self._model,
                self._checkpoint,
                self._masam_checkpoint,
                self._device,
                self._preset,
                self._level,
                self._width,
                self._mode,
                self._stride,
                self._prompts_btn,
                self._object,
                self._target,
                self._policy,
                buttons,
                self._progress,
                self._status,
                self._table,
            ]
        )

        # --- signals --------------------------------------------------------------------
        self._model.changed.connect(self._on_model_changed)
        self._device.changed.connect(lambda *_: self._mark_session_stale())
        self._checkpoint.changed.connect(lambda *_: self._mark_session_stale())
        self._masam_checkpoint.changed.connect(lambda *_: self._mark_session_stale())
        self._preset.changed.connect(self._on_preset_changed)
        self._mode.changed.connect(self._on_mode_changed)
        self._target.changed.connect(self._on_target_changed)
        self._object.changed.connect(self._on_object_changed)
        self._prompts_btn.changed.connect(lambda *_: self.add_prompts_layer())
        self._run_btn.changed.connect(lambda *_: self.run())
        self._cancel_btn.changed.connect(lambda *_: self.cancel())
        self._commit_btn.changed.connect(lambda *_: self.commit())
        for event in ("inserted", "removed", "reordered", "moved"):
            emitter = getattr(viewer.layers.events, event, None)
            if emitter is not None:
                emitter.connect(self._on_layers_changed)
        self._fit_width()
        self._bind_keys()
        self.native.destroyed.connect(self._unbind_keys_static(viewer))
        self._on_model_changed()
        self._on_layers_changed()

    def _fit_width(self) -> None:
        """Let the dock's width, not the longest text, decide the layout (no side scrolling)."""
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QComboBox, QScrollArea, QSizePolicy

        for combo in self.native.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.setMinimumContentsLength(10)
            combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self._status.native.setMinimumWidth(120)
        self._status.native.setSizePolicy(
            QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred
        )
        self._table.native.setMinimumWidth(120)
        root = self.root_native_widget
        if isinstance(root, QScrollArea):
            root.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
            root.setMinimumWidth(self.native.minimumSizeHint().width() + 20)

    # ------------------------------------------------------------------ layer choices
    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [
            (layer.name, layer) for layer in self.viewer.layers if isinstance(layer, self._Image)
        ]

    def _target_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        labels = [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, self._Labels) and layer is not self._preview
        ]
        return [(NEW_LAYER_TARGET, NEW_LAYER_TARGET), *labels]

    def _on_layers_changed(self, event: Any = None) -> None:
        if self._preview is not None and self._preview not in self.viewer.layers:
            self._preview = None
        if self._prompts is not None and self._prompts not in self.viewer.layers:
            self._prompts = None
        self._image.reset_choices()
        self._target.reset_choices()
        if self._image.value is None and self._image.choices:
            self._image.value = self._image.choices[-1]
        self._on_target_changed()

    # ------------------------------------------------------------------ control logic
    def _on_model_changed(self, *_: Any) -> None:
        from .model.registry import MODEL_REGISTRY

        choice = self._model.value
        preset = MODEL_REGISTRY.get(choice)
        needs_files = choice == CHECKPOINT_CHOICE or (preset is not None and preset.needs_weights)
        self._checkpoint.visible = needs_files
        self._masam_checkpoint.visible = needs_files
        if preset is not None and preset.needs_weights:
            self._checkpoint.label = "SAM checkpoint"
        else:
            self._checkpoint.label = "checkpoint"
        if self._preset_from_model:
            self._set_preset(MODEL_DEFAULT_PRESET)
        self._mark_session_stale()

    def _mark_session_stale(self) -> None:
        if self._session is not None and self._session_key != self._current_key():
            self._set_mode_enabled("automatic", True, "")
            self._model_note = ""

    def _set_preset(self, value: str) -> None:
        self._setting_preset = True
        try:
            self._preset.value = value
        finally:
            self._setting_preset = False

    def _on_preset_changed(self, *_: Any) -> None:
        custom = self._preset.value == CUSTOM_CT_PRESET
        self._level.visible = custom
        self._width.visible = custom
        if not self._setting_preset:
            self._preset_from_model = self._preset.value == MODEL_DEFAULT_PRESET

    def _on_mode_changed(self, *_: Any) -> None:
        automatic = self._mode.value == "automatic"
        self._stride.visible = automatic
        self._prompts_btn.visible = not automatic
        self._object.visible = not automatic

    def _on_target_changed(self, *_: Any) -> None:
        self._policy.visible = self._target.value not in (None, NEW_LAYER_TARGET)

    def _on_object_changed(self, *_: Any) -> None:
        if self._prompts is not None:
            _layers.set_current_object(self._prompts, int(self._object.value))

    def _set_mode_enabled(self, mode: str, enabled: bool, reason: str) -> None:
        """Grey out one mode's radio button (e.g. automatic for a box-only model)."""
        from qtpy.QtWidgets import QRadioButton

        for button in self._mode.native.findChildren(QRadioButton):
            if button.text() == mode:
                button.setEnabled(enabled)
                button.setToolTip(reason)
        if not enabled and self._mode.value == mode:
            others = [m for m in _MODES if m != mode]
            self._mode.value = others[0]

    # ------------------------------------------------------------------ keyboard
    def _bind_keys(self) -> None:
        ref = weakref.ref(self)
        for key, action in SHORTCUTS.items():

            def callback(_viewer: Any, _action: str = action) -> None:
                widget = ref()
                if widget is not None:
                    getattr(widget, _action)()

            callback.__doc__ = f"napari-masam: {action.replace('_', ' ')}"
            self.viewer.bind_key(key, callback, overwrite=True)

    @staticmethod
    def _unbind_keys_static(viewer: Any) -> Callable[..., None]:
        viewer_ref = weakref.ref(viewer)

        def unbind(*_: Any) -> None:
            v = viewer_ref()
            if v is None:
                return
            for key in SHORTCUTS:
                with contextlib.suppress(KeyError, ValueError, RuntimeError):
                    v.bind_key(key, None)

        return unbind

    # ------------------------------------------------------------------ public actions
    @property
    def is_running(self) -> bool:
        """Whether a segmentation worker is running."""
        return self._worker is not None

    @property
    def worker(self) -> Any:
        """The running :class:`napari_masam._worker.EngineWorker`, or None."""
        return self._worker

    @property
    def preview_layer(self) -> Labels | None:
        """The Labels layer runs stream into (created by the first run)."""
        return self._preview

    @property
    def prompts_layer(self) -> Shapes | None:
        """The Shapes layer holding box prompts, if created."""
        return self._prompts

    @property
    def session(self) -> Any:
        """The loaded :class:`napari_masam.session.SegmentationSession`, or None."""
        return self._session

    def set_session(self, session: Any) -> None:
        """Adopt an already loaded session for the current model/device selection.

        Scripts and tests can share one loaded model between widgets this way; the next run
        then starts without loading.
        """
        self._session, self._session_key = session, self._current_key()
        self._sync_model()

    def use_checkpoint(self, path: str | Path, masam_checkpoint: str | Path | None = None) -> None:
        """Select a checkpoint file as the model; the next run loads it from disk.

        Used by the Fine-tune widget to hand over a freshly trained model. The loaded session
        is dropped even when ``path`` is the file already selected: a retrained model is often
        written under the same name, and the old weights must not be reused. A run in progress
        finishes with the model it started with.

        Parameters
        ----------
        path : path-like
            Our single-file ``.safetensors`` checkpoint, or a SAM base checkpoint when
            ``masam_checkpoint`` is given.
        masam_checkpoint : path-like or None
            The authors' MA-SAM checkpoint that goes with a SAM base checkpoint.
        """
        self._model.value = CHECKPOINT_CHOICE
        self._checkpoint.value = Path(path)
        self._masam_checkpoint.value = None if masam_checkpoint is None else Path(masam_checkpoint)
        self._session, self._session_key = None, None
        self._set_mode_enabled("automatic", True, "")
        self._model_note = ""

    def add_prompts_layer(self) -> Shapes | None:
        """Create (or select) the prompts Shapes layer over the chosen image, rectangle mode."""
        image = self._image.value
        if image is None:
            self._error("Open an image first (File > Open, or File > Open Sample > napari-masam).")
            return None
        if self._prompts is not None and self._prompts in self.viewer.layers:
            self.viewer.layers.selection.active = self._prompts
            self._prompts.mode = "add_rectangle"
            return self._prompts
        try:
            self._prompts = _layers.create_prompts_layer(
                self.viewer, image, object_id=int(self._object.value)
            )
        except (TypeError, ValueError) as exc:
            self._error(str(exc))
            return None
        self._set_status(
            "Draw a rectangle around the object on a few slices (Alt-N: next object), then Run."
        )
        return self._prompts

    def next_object(self) -> int:
        """Rectangles drawn next belong to a new object id; returns that id."""
        self._object.value = min(int(self._object.value) + 1, self._object.max)
        self._set_status(f"Next rectangles are object {self._object.value}.")
        return int(self._object.value)

    def run(self) -> Any:
        """Start a run with the current settings; returns the worker (None if not started)."""
        if self._worker is not None:
            self._set_status("Already running: cancel first (Alt-C).")
            return None
        try:
            job = self._prepare_job()
        except (TypeError, ValueError, FileNotFoundError, ImportError) as exc:
            self._error(str(exc))
            return None
        return self._start(job)

    def cancel(self) -> None:
        """Ask the running worker to stop after the slice in progress."""
        if self._worker is None:
            return
        self._set_status("Cancelling after the current slice...")
        self._cancel_btn.enabled = False
        self._worker.quit()

    def commit(self) -> Labels | None:
        """Write the preview into the chosen target layer; returns the layer written."""
        preview = self._preview
        if self._worker is not None:
            self._set_status("Wait for the run to finish (or cancel it) before committing.")
            return None
        if preview is None or preview not in self.viewer.layers or not np.any(preview.data):
            self._error("Nothing to commit: run a segmentation first.")
            return None
        target = self._target.value
        info = self._run_info
        if target in (None, NEW_LAYER_TARGET):
            image_name = info.get("image_name", "image")
            layer = self.viewer.add_labels(
                np.array(preview.data, copy=True),
                name=f"{image_name} labels",
                scale=preview.scale,
                translate=preview.translate,
            )
            _layers.copy_geometry(preview, layer)
            names = preview.metadata.get("class_names", ())
            colors = preview.metadata.get("class_colors", ())
            if names:
                _layers.set_label_classes(layer, names, colors)
            self._target.reset_choices()
            self._set_status(f"Committed to new layer {layer.name!r}.")
            return layer
        try:
            changed = _layers.commit_labels(
                target,
                preview.data,
                self._policy.value,
                slices=info.get("slices"),
                is_2d=bool(info.get("is_2d", False)),
            )
        except (TypeError, ValueError) as exc:
            self._error(str(exc))
            return None
        if "class_names" in preview.metadata and not len(getattr(target.features, "columns", ())):
            _layers.set_label_classes(
                target, preview.metadata["class_names"], preview.metadata.get("class_colors", ())
            )
        self.viewer.layers.selection.active = target
        self._set_status(
            f"Committed {changed} voxels into {target.name!r} "
            f"({self._policy.value}); Ctrl+Z on that layer undoes it."
        )
        return target

    # ------------------------------------------------------------------ run internals
    def _current_key(self) -> tuple:
        return (
            self._model.value,
            str(_path_or_none(self._checkpoint.value)),
            str(_path_or_none(self._masam_checkpoint.value)),
            self._device.value,
        )

    def _model_source(self) -> tuple[Any, Path | None]:
        from .model.registry import MODEL_REGISTRY

        choice = self._model.value
        checkpoint = _path_or_none(self._checkpoint.value)
        adapters = _path_or_none(self._masam_checkpoint.value)
        preset = MODEL_REGISTRY.get(choice)
        if preset is not None and not preset.needs_weights:
            return choice, None
        if checkpoint is None:
            what = (
                f"{choice} needs the SAM base checkpoint (and the MA-SAM adapter checkpoint)"
                if preset is not None
                else "pick a checkpoint file"
            )
            raise ValueError(f"No checkpoint file: {what}. Use the 'checkpoint' file picker.")
        for path in (checkpoint, adapters):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
        return checkpoint, adapters

    def _intensity_preset(self) -> Any:
        from . import preprocess

        value = self._preset.value
        if value == MODEL_DEFAULT_PRESET:
            return None
        if value == CUSTOM_CT_PRESET:
            return preprocess.custom_ct_preset(float(self._level.value), float(self._width.value))
        return preprocess.INTENSITY_PRESETS[value]

    def _prepare_job(self) -> dict[str, Any]:
        """Collect the run configuration on the GUI thread (fast: no pixels are read)."""
        image = self._image.value
        if image is None:
            raise ValueError("No image layer: open a volume, video or picture first.")
        info = _layers.stack_from_layer(image)
        source, adapters = self._model_source()
        mode = self._mode.value
        job: dict[str, Any] = {
            "image": image,
            "info": info,
            "mode": mode,
            "key": self._current_key(),
            "source": source,
            "masam_checkpoint": adapters,
            "device": self._device.value,
            "preset": self._intensity_preset(),
            "stride": int(self._stride.value),
        }
        if mode == "boxes":
            prompts = self._find_prompts_layer()
            if prompts is None or len(prompts.data) == 0:
                raise ValueError(
                    "No boxes: click 'Add prompts layer' and draw a rectangle around the object "
                    "on one or more slices (or switch to automatic mode)."
                )
            boxes = self._boxes_from_prompts(prompts, image, info)
            if not boxes:
                raise ValueError(
                    f"No rectangles inside the image in layer {prompts.name!r}: draw them with "
                    "the rectangle tool over the image."
                )
            job["boxes"] = boxes
            job["slices"] = sorted({int(z) for per_obj in boxes.values() for z in per_obj})
        else:
            job["slices"] = list(range(info.n_slices))
        return job

    def _find_prompts_layer(self) -> Shapes | None:
        if self._prompts is not None and self._prompts in self.viewer.layers:
            return self._prompts
        from napari.layers import Shapes

        for layer in self.viewer.layers:
            if isinstance(layer, Shapes) and layer.name == _layers.PROMPTS_LAYER_NAME:
                self._prompts = layer
                return layer
        return None

    def _boxes_from_prompts(self, prompts: Shapes, image: Image, info: _layers.LayerStack) -> dict:
        from .prompts import boxes_from_shapes

        vertices, types, ids = _layers.rectangles_in_image_frame(prompts, image)
        if not vertices:
            return {}
        return boxes_from_shapes(
            vertices,
            types,
            object_ids=ids,
            image_shape=(info.n_slices, *info.labels_shape[-2:]),
        )

    def _ensure_preview(self, info: _layers.LayerStack, image: Image) -> Labels:
        """Zeroed preview layer over ``image`` (reused when the shape matches)."""
        preview = self._preview
        if preview is not None and preview in self.viewer.layers:
            if tuple(preview.data.shape) == info.labels_shape:
                preview.data[...] = 0
                preview.scale = info.scale
                preview.translate = info.translate
                preview.refresh()
                _layers.copy_geometry(image, preview)
                return preview
            self.viewer.layers.remove(preview)
        self._preview = _layers.new_labels_layer(self.viewer, info, _layers.PREVIEW_LAYER_NAME)
        _layers.copy_geometry(image, self._preview)
        self._preview.opacity = 0.6
        self._target.reset_choices()
        return self._preview

    def _start(self, job: dict[str, Any]) -> Any:
        from . import _worker

        info: _layers.LayerStack = job["info"]
        preview = self._ensure_preview(info, job["image"])
        self._table.visible = False
        self._run_info = {
            "image_name": job["image"].name,
            "is_2d": info.is_2d,
            "mode": job["mode"],
            "slices": set(),
            "planned": job["slices"],
            "spacing": info.spacing_zyx,
            "is_volume": info.is_volume,
            "started": time.perf_counter(),
        }
        self._stats = _worker.RunStats(total=len(job["slices"]))
        self._progress.max = max(1, len(job["slices"]))
        self._progress.value = 0
        # the worker gets a snapshot: it never touches the widget's session itself
        job["session"] = self._session if self._session_key == job["key"] else None
        self._set_status("Loading the model..." if job["session"] is None else "Running...")
        self._run_btn.enabled = False
        self._cancel_btn.enabled = True
        self._commit_btn.enabled = False
        # the preview is not user work, but make the first streamed slices visible on top
        preview.visible = True

        self._worker = _worker.start_engine_worker(
            lambda: self._engine_generator(job),
            on_progress=self._on_progress,
            on_returned=self._on_returned,
            on_errored=self._on_errored,
            on_finished=self._on_finished,
            on_aborted=self._on_aborted,
            total=len(job["slices"]),
            desc=f"MA-SAM {job['mode']}",
        )
        return self._worker

    def _engine_generator(self, job: dict[str, Any]) -> Any:
        """Runs in the worker thread: load the model if needed, then relay the engine.

        Touches no widget state: a newly loaded session goes to the GUI thread as a yielded
        :class:`SessionLoaded`, so a failed load leaves the previous working session in place.
        Finished slices stream into the preview, so the engine keeps no labels volume of its
        own (``keep_labels=False``): one (Z, Y, X) volume in memory, not three.
        """
        from . import _worker

        _worker.import_core()
        session = job["session"]
        if session is None:
            from .session import SegmentationSession

            session = SegmentationSession.from_source(
                job["source"], device=job["device"], masam_checkpoint=job["masam_checkpoint"]
            )
            yield SessionLoaded(session, job["key"])
        model = session.model
        info: _layers.LayerStack = job["info"]
        extra: dict[str, Any] = {"keep_labels": False}
        if getattr(session.device, "type", "cpu") == "cpu":
            # leave one core to the GUI thread: napari keeps drawing while the model runs
            extra["num_threads"] = gui_friendly_threads()
        if job["mode"] == "automatic":
            if not getattr(model, "supports_automatic", False):
                raise ValueError(
                    f"Model {model.metadata.name!r} is box-prompted only: it has no trained class "
                    "head for automatic mode. Draw boxes (mode: boxes) or load an MA-SAM "
                    "checkpoint with classes."
                )
            engine = session.iter_automatic(
                info.stack, preset=job["preset"], stride=job["stride"], **extra
            )
        else:
            if not getattr(model, "supports_boxes", True):
                raise ValueError(
                    f"Model {model.metadata.name!r} takes no box prompts; use automatic mode."
                )
            engine = session.iter_boxes(info.stack, job["boxes"], preset=job["preset"], **extra)
        return (yield from engine)

    # ------------------------------------------------------------------ worker callbacks (GUI)
    def _on_progress(self, progress: Any) -> None:
        if isinstance(progress, SessionLoaded):
            self._session, self._session_key = progress.session, progress.key
            return
        stats = self._stats
        if stats is None:
            return
        stats.done = int(getattr(progress, "done", stats.done) or 0)
        stats.total = int(getattr(progress, "total", 0) or stats.total)
        stats.elapsed_s = float(getattr(progress, "elapsed_s", 0.0) or 0.0)
        stats.stage = str(getattr(progress, "stage", "") or "")
        labels_slice = getattr(progress, "labels_slice", None)
        preview = self._preview
        if labels_slice is not None and preview is not None and preview in self.viewer.layers:
            z = int(progress.slice_index)
            _layers.write_slice(
                preview,
                z,
                labels_slice,
                is_2d=self._run_info.get("is_2d", False),
                dims=self.viewer.dims,
            )
            self._run_info["slices"].add(z)
        self._progress.max = max(1, stats.total)
        self._progress.value = min(stats.done, self._progress.max)
        self._set_status(stats.describe(), log=False)

    def _on_returned(self, result: Any) -> None:
        if result is None:  # cancelled: the generator returned nothing
            return
        self._last_result = result
        preview = self._preview
        info = self._run_info
        if preview is not None and preview in self.viewer.layers:
            # every finished slice already streamed into the preview (keep_labels=False)
            labels = np.asarray(preview.data)
            names, colors = _result_class_info(result, labels)
            _layers.set_label_classes(preview, names, colors)
            preview.refresh()
            info["slices"].update(info.get("planned", ()))
            self._update_volume_table(labels, names)
        seconds = time.perf_counter() - info.get("started", time.perf_counter())
        self._set_status(
            f"Done: {len(info.get('planned', ()))} slices in {seconds:.1f} s. "
            "Commit (Alt-M) to keep the result."
        )

    def _update_volume_table(self, labels: np.ndarray, names: Any) -> None:
        if not self._run_info.get("is_volume"):
            self._table.visible = False
            return
        rows = _layers.volume_table(labels, self._run_info["spacing"], names)
        if not rows:
            self._table.visible = False
            return
        self._table.value = {
            "data": [[r.name, str(r.voxels), f"{r.volume_ml:.3f}"] for r in rows],
            "index": [str(r.label) for r in rows],
            "columns": ["class", "voxels", "volume (mL)"],
        }
        self._table.read_only = True
        self._table.visible = True

    def _on_errored(self, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        if _is_out_of_memory(exc):
            message = (
                f"Out of memory: {message}. Try device 'cpu', a larger stride, a smaller region "
                "or close other programs using the GPU."
            )
        logger.error("napari-masam run failed", exc_info=exc)
        self._error(message)

    def _on_aborted(self) -> None:
        done = len(self._run_info.get("slices", ()))
        self._set_status(f"Cancelled: {done} finished slices kept in the preview.")

    def _on_finished(self) -> None:
        self._worker = None
        self._run_btn.enabled = True
        self._cancel_btn.enabled = False
        preview = self._preview
        self._commit_btn.enabled = preview is not None and preview in self.viewer.layers
        self._sync_model()

    def _sync_model(self) -> None:
        """After a load: grey out unsupported modes, fill the intensity preset from metadata."""
        session = self._session
        if session is None or self._session_key != self._current_key():
            return
        model = session.model
        # the engine takes strides 1..D (each slice must stay in some window)
        self._stride.max = max(1, int(getattr(model, "slices_per_group", 1)))
        if not getattr(model, "supports_automatic", True):
            self._set_mode_enabled(
                "automatic",
                False,
                f"{model.metadata.name} is box-prompted only (no class head): automatic mode needs "
                "an MA-SAM checkpoint with classes.",
            )
        else:
            self._set_mode_enabled("automatic", True, "")
        preset_name = getattr(model.metadata, "intensity_preset", None)
        if self._preset_from_model and preset_name in self._preset.choices:
            self._set_preset(preset_name)
            self._preset_from_model = True  # still follows the model until the user picks

    # ------------------------------------------------------------------ messages
    def _set_status(self, text: str, *, log: bool = True) -> None:
        self._status.value = text
        if log:
            logger.info("%s", text)

    def _error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._set_status(f"Error: {message}")
        show_error(message)


def gui_friendly_threads() -> int:
    """CPU threads for inference from the widget: all cores but one (at least 1).

    The GUI thread needs a core to stay responsive; with every core busy in torch (and the
    interpreter's GIL hand-over on top) the viewer stutters.
    """
    import os

    return max(1, (os.cpu_count() or 2) - 1)


def _result_class_info(result: Any, labels: np.ndarray) -> tuple[list[str], list[str]]:
    """Names/colours of label values ``1..max`` from a SegmentationResult.

    Automatic mode: class ``i`` is ``class_names[i - 1]``. Box mode: ``class_names[k]`` belongs to
    object id ``object_ids[k]`` (ids need not be contiguous).
    """
    names = tuple(getattr(result, "class_names", ()) or ())
    colors = tuple(getattr(result, "class_colors", ()) or ())
    object_ids = tuple(getattr(result, "object_ids", ()) or ())
    top = int(labels.max()) if labels.size else 0
    if getattr(result, "mode", "") == "boxes" and object_ids:
        by_id = {int(i): n for i, n in zip(object_ids, names, strict=False)}
        color_by_id = {int(i): c for i, c in zip(object_ids, colors, strict=False)}
        top = max(top, *object_ids)
        return (
            [by_id.get(i, f"object {i}") for i in range(1, top + 1)],
            [color_by_id.get(i, _layers.object_color(i)) for i in range(1, top + 1)],
        )
    return _layers.class_info_or_default(names, colors, range(top + 1))


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return "OutOfMemory" in name or "out of memory" in str(exc).lower()
