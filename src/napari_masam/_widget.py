"""The napari dock widget: automatic and box-prompted segmentation that never freezes the viewer.

*Plugins > MA-SAM segmentation > Segment*. The widget is a thin shell over the headless core:

- its controls (:mod:`napari_masam._widget_controls`) turn into one frozen
  :class:`~napari_masam._widget_controls.RunRequest` through a pure function;
- it loads the model once into a :class:`napari_masam.session.SegmentationSession` kept on the
  widget (model + embedding cache reused between runs, so a second box on the same volume costs
  only the decoder), on the chosen backend (torch, the reference, or LiteMedSAM on a fast CPU
  runtime: ONNX Runtime / OpenVINO, :mod:`napari_masam.model.runtime`);
- it runs the engine generator in napari's thread worker (:mod:`napari_masam._worker`) and
  streams finished slices into a *preview* Labels layer. Box runs *add* to the preview: only
  objects whose prompts changed are recomputed (:mod:`napari_masam._widget_objects`), so a
  Cancel never wipes earlier objects;
- objects have editable names and colours (the object table) that go with Commit and Export;
- Commit writes the preview into a Labels layer of the user's choice with a preserve policy, as
  one undoable step; Export writes labels in the source image's format and grid
  (:mod:`napari_masam._widget_export`).

Each prompts layer is bound to one image (``layer.metadata``); prompts of another image are
refused with a message, never segmented silently on the wrong image. Importing this module must
stay light (no torch): the core is imported inside methods.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container

from . import _layers
from ._widget_controls import (
    CHECKPOINT_CHOICE,
    CUSTOM_CT_PRESET,
    MODEL_DEFAULT_PRESET,
    MODES,
    NEW_LAYER_TARGET,
    SAM_BASE_FILES,
    ControlValues,
    RunRequest,
    automatic_note,
    automatic_support,
    build_controls,
    path_or_none,
    points_support,
    request_from_controls,
)
from ._widget_export import (
    FORMATS_BY_SOURCE,
    LABELS_IMAGE_KEY,
    SUFFIXES,
    export_request,
    iter_export,
    source_kind,
)
from ._widget_objects import (
    ObjectRecord,
    ObjectTable,
    as_napari_table,
    changed_keyframes,
    changed_objects,
    measure,
    prompts_signature,
)

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Points, Shapes

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_CHOICE",
    "CUSTOM_CT_PRESET",
    "MODEL_DEFAULT_PRESET",
    "NEW_LAYER_TARGET",
    "SHORTCUTS",
    "MASAMWidget",
    "SessionLoaded",
    "gui_friendly_threads",
]

#: Viewer key bindings (napari key strings) -> widget action; none clashes with napari's defaults.
SHORTCUTS: dict[str, str] = {
    "Alt-R": "run",
    "Alt-C": "cancel",
    "Alt-N": "next_object",
    "Alt-M": "commit",
    "Alt-K": "mark_keyframe",
}

#: Least seconds between two repaints of the progress bar and status line while a run streams.
#: Each repaint of the docked panel costs a window composite on the GUI thread (measured 16 ms
#: idle, 35-80 ms while the model loads the CPU, with software OpenGL); progress items queued
#: behind a busy GUI thread used to be drained one repaint each, a 1.6 s freeze for 46 queued
#: items in the first propagation after napari starts (benchmarks/gui_freeze.py). Slices are
#: still written into the preview as they arrive; only the numbers are coalesced.
PROGRESS_REPAINT_S = 0.25

_MODES = MODES  # earlier name
_path_or_none = path_or_none  # earlier name


class NoBoxesError(ValueError):
    """There is no box to run: no prompts layer for the image, or no rectangle in it (clicks
    alone may still be prompts, for a model that takes them)."""


@dataclass(frozen=True)
class SessionLoaded:
    """First item a run yields after loading a model in the worker; the GUI thread adopts it."""

    session: Any
    key: Any


@dataclass
class _RunState:
    """What the GUI thread tracks about the run in flight."""

    request: RunRequest
    done_slices: set[int]
    started: float
    stats: Any
    note: str = ""
    before: np.ndarray | None = None  # preview before the run (one undo step after it)
    records_before: dict[int, ObjectRecord] | None = None


class MASAMWidget(Container):
    """Dock widget: pick an image and a model, draw boxes or run automatically, commit, export.

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
        # The controls live in a body inside a QScrollArea of our own: docked under other
        # widgets (or on a short screen) the panel scrolls instead of forcing its full height
        # on the window, which cropped the canvas. (magicgui's scrollable=True does not help:
        # napari docks ``widget.native``, the part inside magicgui's scroll area.)
        super().__init__(labels=False, scrollable=False)
        self.viewer = viewer
        self._session: Any = None  # SegmentationSession, loaded on first run
        self._session_key: tuple | None = None
        self._worker: Any = None
        self._export_worker: Any = None
        self._run: _RunState | None = None
        self._stats: Any = None
        self._last_result: Any = None
        self._preview: Labels | None = None
        self._prompts: Shapes | None = None
        self._point_prompts: Points | None = None
        self._clicking = False  # the point prompts layer was active when the run started
        self._preview_key: tuple | None = None
        self._objects: dict[int, ObjectRecord] = {}
        self._styles: dict[int, tuple[str, str]] = {}  # user-chosen (name, colour) per object
        self._preset_from_model = True
        self._setting_preset = False
        self._note = ""  # said with the next run's result (e.g. a 2-D layer mapped to a slice)
        self._keyframe_masks: dict[int, dict[int, np.ndarray]] = {}  # user-fixed slices
        self._undo_records: list[dict[int, ObjectRecord]] = []
        self._ask_export_path: Callable[[str, str], str | None] = self._export_dialog
        self._progress_shown_at = float("-inf")  # perf_counter of the last progress repaint

        from qtpy.QtCore import QTimer

        # shows coalesced progress numbers (see _show_progress); dies with the panel
        self._progress_timer = QTimer(self.native)
        self._progress_timer.setSingleShot(True)
        self._progress_timer.timeout.connect(self._show_progress)

        from napari.layers import Image, Labels, Points, Shapes

        self._Image, self._Labels, self._Shapes, self._Points = Image, Labels, Shapes, Points
        from . import _worker

        _worker.guard_gl_llvm_clash()  # before anything can import torchvision (see there)
        # the first preview layer would import pandas/scikit-image on the GUI thread at Run
        _layers.import_labels_dependencies()
        self._c = build_controls(self._image_choices, self._target_choices, self._export_choices)
        self._alias_controls()
        self._body = Container(widgets=self._c.in_order(), labels=True, label="")
        self._objects_table = ObjectTable(self._rename_object, self._recolor_object)
        self._objects_table.setVisible(False)
        self._export_box = Container(widgets=self._c.export_row(), labels=True, label="")
        self._body.native.layout().addWidget(self._objects_table)
        self._body.native.layout().addWidget(self._export_box.native)
        self.append(self._body)  # a magicgui child (choices, tooltips), shown in the scroll area
        self._scroll = self._make_scroll_area(self._body.native)
        self._connect_signals()
        self._fit_width()
        self._bind_keys()
        self.native.destroyed.connect(self._unbind_keys_static(viewer))
        self._on_model_changed()
        self._on_layers_changed()

    def _alias_controls(self) -> None:
        c = self._c
        self._image, self._model, self._model_note = c.image, c.model, c.model_note
        self._checkpoint, self._masam_checkpoint = c.checkpoint, c.masam_checkpoint
        self._device, self._preset, self._level, self._width = c.device, c.preset, c.level, c.width
        self._backend = c.backend
        self._points_btn = c.points_btn
        self._mode, self._stride, self._prompts_btn, self._object = (
            c.mode,
            c.stride,
            c.prompts_btn,
            c.object,
        )
        self._propagate, self._first_slice, self._last_slice = (
            c.propagate,
            c.first_slice,
            c.last_slice,
        )
        self._keyframe_btn, self._precompute_btn = c.keyframe_btn, c.precompute_btn
        self._target, self._policy = c.target, c.policy
        self._run_btn, self._cancel_btn, self._commit_btn = c.run_btn, c.cancel_btn, c.commit_btn
        self._progress, self._status = c.progress, c.status
        self._export_layer, self._export_format, self._export_btn = (
            c.export_layer,
            c.export_format,
            c.export_btn,
        )

    def _connect_signals(self) -> None:
        c = self._c
        c.model.changed.connect(self._on_model_changed)
        for control in (c.device, c.backend, c.checkpoint, c.masam_checkpoint):
            control.changed.connect(lambda *_: self._mark_session_stale())
        c.preset.changed.connect(self._on_preset_changed)
        c.mode.changed.connect(self._on_mode_changed)
        c.target.changed.connect(self._on_target_changed)
        c.object.changed.connect(self._on_object_changed)
        c.image.changed.connect(self._on_image_changed)
        c.export_layer.changed.connect(self._on_export_layer_changed)
        c.propagate.changed.connect(self._on_mode_changed)
        c.keyframe_btn.changed.connect(lambda *_: self.mark_keyframe())
        c.precompute_btn.changed.connect(lambda *_: self.precompute())
        c.prompts_btn.changed.connect(lambda *_: self.add_prompts_layer())
        c.points_btn.changed.connect(lambda *_: self.add_point_prompts_layer())
        c.run_btn.changed.connect(lambda *_: self.run())
        c.cancel_btn.changed.connect(lambda *_: self.cancel())
        c.commit_btn.changed.connect(lambda *_: self.commit())
        c.export_btn.changed.connect(lambda *_: self.export())
        for event in ("inserted", "removed", "reordered", "moved"):
            emitter = getattr(self.viewer.layers.events, event, None)
            if emitter is not None:
                emitter.connect(self._on_layers_changed)

    def _make_scroll_area(self, body: Any) -> Any:
        """Put ``body`` into a vertical-only scroll area that fills this widget."""
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QFrame, QScrollArea

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(body)  # reparents the body out of the plain layout
        scroll.setMinimumHeight(120)
        layout = self.native.layout()
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)
        return scroll

    def _fit_width(self) -> None:
        """Let the dock's width, not the longest text, decide the layout (no side scrolling)."""
        from qtpy.QtWidgets import QComboBox, QSizePolicy

        for widget in (self.native, self._export_box.native):
            for combo in widget.findChildren(QComboBox):
                combo.setSizeAdjustPolicy(
                    QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
                )
                combo.setMinimumContentsLength(10)
                combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        for label in (self._status, self._model_note):
            label.native.setMinimumWidth(120)
            label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        for button in (self._checkpoint, self._masam_checkpoint):
            with contextlib.suppress(AttributeError):
                button.line_edit.native.setMinimumWidth(60)
        self._fit_min_width()

    def _fit_min_width(self) -> None:
        """The scroll area is never narrower than the controls (controls shown later widen
        them), so nothing is clipped at the right edge; only the height scrolls."""
        scroll = getattr(self, "_scroll", None)
        if scroll is None:
            return
        body = self._body.native
        bar = scroll.verticalScrollBar().sizeHint().width()
        scroll.setMinimumWidth(body.minimumSizeHint().width() + bar + 2 * scroll.frameWidth())

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

    def _export_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [
            (layer.name, layer) for layer in self.viewer.layers if isinstance(layer, self._Labels)
        ]

    def reset_choices(self, *_: Any) -> None:
        """napari calls this on every layer change; magicgui rebuilds the mode buttons then, so
        the automatic-mode state is applied again."""
        super().reset_choices()
        self._apply_automatic_support()

    def _on_layers_changed(self, event: Any = None) -> None:
        if self._preview is not None and self._preview not in self.viewer.layers:
            self._preview = None
            self._objects.clear()
            self._preview_key = None
            self._show_objects()
        if self._prompts is not None and self._prompts not in self.viewer.layers:
            self._prompts = None
        self._image.reset_choices()
        self._target.reset_choices()
        self._export_layer.reset_choices()
        if self._image.value is None and self._image.choices:
            self._image.value = self._image.choices[-1]
        self._on_target_changed()
        self._on_export_layer_changed()

    # ------------------------------------------------------------------ control logic
    def _on_model_changed(self, *_: Any) -> None:
        from .model.registry import MODEL_REGISTRY

        choice = self._model.value
        preset = MODEL_REGISTRY.get(choice)
        needs_files = choice == CHECKPOINT_CHOICE or (preset is not None and preset.needs_weights)
        self._checkpoint.visible = needs_files
        self._masam_checkpoint.visible = needs_files
        if preset is not None and preset.needs_weights:
            base = SAM_BASE_FILES.get(choice, "sam_vit_*.pth")
            self._checkpoint.label = "SAM checkpoint"
            self._set_placeholder(self._checkpoint, f"Meta's SAM base file: {base}")
            self._set_placeholder(self._masam_checkpoint, "the authors' MA-SAM checkpoint (.pth)")
        else:
            self._checkpoint.label = "checkpoint"
            self._set_placeholder(
                self._checkpoint, "napari-masam .safetensors, or a SAM base sam_vit_*.pth"
            )
            self._set_placeholder(self._masam_checkpoint, "only with a SAM base checkpoint")
        if self._preset_from_model:
            self._set_preset(MODEL_DEFAULT_PRESET)
        self._mark_session_stale()
        self._apply_automatic_support()

    @staticmethod
    def _set_placeholder(file_edit: Any, text: str) -> None:
        with contextlib.suppress(AttributeError):
            file_edit.line_edit.native.setPlaceholderText(text)

    def _apply_automatic_support(self) -> None:
        """Say what automatic mode can do with the chosen model before any work starts."""
        choice = self._model.value
        support = automatic_support(choice)
        note = automatic_note(choice)
        session = self._session
        loaded = session is not None and self._session_key == self._current_key()
        if loaded and "automatic" not in _supported_modes(session.model):
            support = "none"
            note = (
                f"{session.model.metadata.name} is box-prompted only (no class head): "
                "automatic mode needs an MA-SAM checkpoint with classes."
            )
        if support == "checkpoint" and self._model.value in SAM_BASE_FILES:
            note = (
                f"Needs Meta's SAM base checkpoint {SAM_BASE_FILES[choice]} and the authors' "
                "MA-SAM checkpoint (file pickers below)."
            )
        self._set_mode_enabled("automatic", support != "none", note if support == "none" else "")
        if loaded:  # the model status line: which backend the loaded model really runs on
            note = (note + " " if note else "") + backend_line(session.model)
        self._model_note.value = note
        self._model_note.visible = bool(note)

    def _mark_session_stale(self) -> None:
        if self._session is not None and self._session_key != self._current_key():
            self._apply_automatic_support()

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
        self._points_btn.visible = not automatic
        self._object.visible = not automatic
        image = self._image.value
        stacked = image is not None and self._n_slices(image) > 1
        self._propagate.visible = not automatic and stacked
        # (from the values: reading .visible back is False while the dock is not shown yet)
        walking = not automatic and stacked and bool(self._propagate.value)
        for control in (self._first_slice, self._last_slice, self._keyframe_btn):
            control.visible = walking
        self._fit_min_width()
        if automatic and automatic_support(self._model.value) == "untrained":
            self._set_status(automatic_note(self._model.value))

    def _on_target_changed(self, *_: Any) -> None:
        self._policy.visible = self._target.value not in (None, NEW_LAYER_TARGET)

    def _on_object_changed(self, *_: Any) -> None:
        if self._prompts is not None:
            obj = int(self._object.value)
            _layers.set_current_object(self._prompts, obj, self._object_style(obj)[1])

    @staticmethod
    def _n_slices(image: Image) -> int:
        try:
            return _layers.stack_from_layer(image).n_slices
        except (TypeError, ValueError):
            return 1

    def _on_image_changed(self, *_: Any) -> None:
        image = self._image.value
        if image is not None:
            last = max(0, self._n_slices(image) - 1)
            self._first_slice.max = last
            self._last_slice.max = last
            self._first_slice.value = 0
            self._last_slice.value = last
        self._on_mode_changed()
        prompts = self._prompts
        if prompts is not None and image is not None and not _layers.is_bound_to(prompts, image):
            self._prompts = None  # the next run looks for this image's own prompts layer
        self._on_export_layer_changed()

    def _on_export_layer_changed(self, *_: Any) -> None:
        layer = self._export_layer.value
        image = self._image_for_labels(layer) if layer is not None else self._image.value
        kind = source_kind(image) if image is not None else "plain"
        formats = list(FORMATS_BY_SOURCE[kind])
        if list(self._export_format.choices) != formats:
            self._export_format.choices = []  # magicgui keeps old items first otherwise
            self._export_format.choices = formats
            self._export_format.value = formats[0]
        self._export_btn.enabled = layer is not None

    def _set_mode_enabled(self, mode: str, enabled: bool, reason: str) -> None:
        """Grey out one mode's radio button (e.g. automatic for a box-only model)."""
        from qtpy.QtWidgets import QRadioButton

        for button in self._mode.native.findChildren(QRadioButton):
            if button.text() == mode:
                button.setEnabled(enabled)
                button.setToolTip(reason)
        if not enabled and self._mode.value == mode:
            others = [m for m in MODES if m != mode]
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

    # ------------------------------------------------------------------ public state
    @property
    def is_running(self) -> bool:
        """Whether a segmentation or export worker is running."""
        return self._worker is not None or self._export_worker is not None

    @property
    def worker(self) -> Any:
        """The running segmentation :class:`napari_masam._worker.EngineWorker`, or None."""
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

    @property
    def objects(self) -> dict[int, ObjectRecord]:
        """The preview's objects (box mode) or classes (automatic mode), by label value."""
        return dict(self._objects)

    @property
    def object_table(self) -> ObjectTable:
        """The object table (names and colours editable)."""
        return self._objects_table

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
        self._apply_automatic_support()

    # ------------------------------------------------------------------ prompts
    def add_prompts_layer(self) -> Shapes | None:
        """Create (or select) the chosen image's prompts Shapes layer, in rectangle mode."""
        image = self._image.value
        if image is None:
            self._error("Open an image first (File > Open, or File > Open Sample > napari-masam).")
            return None
        existing = self._bound_prompts_layers(image)
        if existing:
            self._prompts = existing[-1]
            self._bind_prompts_keys(self._prompts)
            _layers.activate_for_drawing(self.viewer, self._prompts)
            return self._prompts
        taken = {layer.name for layer in self.viewer.layers}
        name = _layers.PROMPTS_LAYER_NAME
        if name in taken:
            name = f"{_layers.PROMPTS_LAYER_NAME} ({image.name})"
        obj = int(self._object.value)
        try:
            self._prompts = _layers.create_prompts_layer(self.viewer, image, name, object_id=obj)
        except (TypeError, ValueError) as exc:
            self._error(str(exc))
            return None
        _layers.set_current_object(self._prompts, obj, self._object_style(obj)[1])
        self._bind_prompts_keys(self._prompts)
        self._set_status(
            f"Draw a rectangle around the object on {image.name!r} (one slice is enough; more "
            "slices are interpolated; Alt-N: next object), then Run."
        )
        return self._prompts

    def add_point_prompts_layer(self) -> Points | None:
        """Create (or select) the chosen image's point prompts layer, in add mode.

        Clicks are positive (green) until the toggle key (:data:`_layers.TOGGLE_POINT_KEY`,
        "T", on that layer) switches the next clicks to negative (red) and back. Refused, with
        the measured reason, for a model that takes no points.
        """
        image = self._image.value
        if image is None:
            self._error("Open an image first (File > Open, or File > Open Sample > napari-masam).")
            return None
        supported = self._points_supported()
        if supported is False:
            self._error(self._points_refusal())
            return None
        existing = self._point_layers(image, bind=False)
        if existing:
            layer = existing[-1]
        else:
            taken = {layer.name for layer in self.viewer.layers}
            name = _layers.POINT_PROMPTS_LAYER_NAME
            if name in taken:
                name = f"{_layers.POINT_PROMPTS_LAYER_NAME} ({image.name})"
            try:
                layer = _layers.create_point_prompts_layer(self.viewer, image, name)
            except (TypeError, ValueError) as exc:
                self._error(str(exc))
                return None
        self._point_prompts = layer
        self._bind_point_keys(layer)
        _layers.activate_for_clicking(self.viewer, layer)
        self._set_status(
            f"Click on the object in {image.name!r}: the next click is "
            f"{_layers.next_point_prompt(layer)} ({_layers.TOGGLE_POINT_KEY} toggles positive/"
            "negative). A click belongs to the object whose box contains it; then Run."
        )
        return layer

    def _bind_point_keys(self, layer: Points) -> None:
        """The toggle key and Ctrl+Z (undo the last run) on a point prompts layer."""
        ref = weakref.ref(self)

        def toggle(points_layer: Any) -> None:
            kind = _layers.toggle_next_point_prompt(points_layer)
            widget = ref()
            if widget is not None:
                widget._set_status(
                    f"Next click: {kind} ({_layers.TOGGLE_POINT_KEY} toggles).", log=False
                )

        toggle.__doc__ = "napari-masam: toggle positive/negative for the next click"
        with contextlib.suppress(ValueError, TypeError):
            layer.bind_key(_layers.TOGGLE_POINT_KEY, toggle, overwrite=True)
        self._bind_prompts_keys(layer)

    def _point_layers(self, image: Image, *, bind: bool = True) -> list[Points]:
        """Points layers holding clicks for ``image``: those bound to it, and hand-made unbound
        ones (bound to it now when ``bind``; as a hand-made 'prompts' Shapes layer is). Layers
        bound to another image are never used on this one."""
        found = []
        for layer in self.viewer.layers:
            if not isinstance(layer, self._Points):
                continue
            if _layers.is_bound_to(layer, image):
                found.append(layer)
            elif _layers.prompts_image(layer) is None:
                if bind and len(layer.data):
                    _layers.bind_prompts(layer, image)
                found.append(layer)
        return found

    def _points_supported(self) -> bool | None:
        """Whether the model that would run takes point prompts: the loaded session's model
        when it is the chosen one, else what the choice is known to do (None: a checkpoint
        file, unknown until loaded; the engine then checks)."""
        session = self._session
        if session is not None and self._session_key == self._current_key():
            return bool(getattr(session.model, "supports_points", False))
        return points_support(str(self._model.value))

    def _points_refusal(self) -> str:
        """THE refusal text (``model.base.points_refusal``) for the model that would run."""
        session = self._session
        if session is not None and self._session_key == self._current_key():
            from .model.base import points_refusal

            return points_refusal(session.model)
        from .model import lite  # noqa: F401  (registers LiteMedSAM's measured reason)
        from .model.base import points_refusal_text

        choice = str(self._model.value)
        return points_refusal_text(choice, choice)

    def _points_for(
        self, image: Image, info: _layers.LayerStack, boxes: dict
    ) -> tuple[dict[int, dict[int, list[tuple[float, float, int]]]], str]:
        """The clicks of the image's point prompts layers, per object and slice, and a note.

        Each click goes to the object whose box contains it on that slice (nearest box centre
        if several: :func:`_layers.assign_points_to_objects`); a click inside no box goes to
        the current object id, decoded from points alone (models that take points decode
        clicks without a box, as SAM does).

        With a model that takes no points, the clicks are not used: the note and a warning say
        so with the measured reason (without any box, :meth:`_refuse_points` refuses the run).
        """
        layers = [layer for layer in self._point_layers(image) if len(layer.data)]
        if not layers:
            return {}, ""
        if self._points_supported() is False:
            # the boxes run; the clicks are not used, and the user is told why (never silent)
            from napari.utils.notifications import show_warning

            note = f"Points layer {layers[0].name!r} not used: {self._points_refusal()}"
            show_warning(note)
            return {}, note
        clicks: list[tuple[int, float, float, int]] = []
        outside = 0
        for layer in layers:
            found = _layers.points_in_image_frame(layer, image, world_point=self.viewer.dims.point)
            clicks += found.points_zyx
            outside += found.outside
        assigned, _ = _layers.assign_points_to_objects(
            clicks, boxes, default_object=int(self._object.value)
        )
        note = f"Ignored {outside} click(s) outside image {image.name!r}." if outside else ""
        return assigned, note

    def _bound_prompts_layers(self, image: Image) -> list[Shapes]:
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, self._Shapes) and _layers.is_bound_to(layer, image)
        ]

    def _find_prompts_layer(self, image: Image) -> Shapes:
        """The prompts layer of ``image`` (binding an unbound layer named 'prompts' to it).

        Raises
        ------
        ValueError
            No prompts for this image (says which image the existing prompts belong to, and
            whether there are points this model cannot use).
        """
        active = self.viewer.layers.selection.active
        bound = self._bound_prompts_layers(image)
        if active in bound:
            layer = active
        elif self._prompts in bound:
            layer = self._prompts
        elif bound:
            layer = bound[-1]
        else:
            layer = None
            for candidate in self.viewer.layers:
                if (
                    isinstance(candidate, self._Shapes)
                    and candidate.name == _layers.PROMPTS_LAYER_NAME
                    and _layers.prompts_image(candidate) is None
                ):
                    _layers.bind_prompts(candidate, image)  # a hand-made layer: now this image's
                    layer = candidate
        if layer is None:
            others = [
                (candidate.name, _layers.prompts_image(candidate)["name"])
                for candidate in self.viewer.layers
                if isinstance(candidate, self._Shapes)
                and _layers.prompts_image(candidate) is not None
            ]
            self._refuse_points(image)
            if others:
                where = "; ".join(f"{n!r} belongs to image {i!r}" for n, i in others)
                raise NoBoxesError(
                    f"No prompts for image {image.name!r}: {where}. Prompts are never used on "
                    f"another image: click 'Add prompts layer' to draw on {image.name!r}, or "
                    "pick the image those prompts belong to."
                )
            raise NoBoxesError(
                "No boxes: click 'Add prompts layer' and draw a rectangle around the object "
                "(or switch to automatic mode)."
            )
        if layer is not self._prompts:
            self._bind_prompts_keys(layer)
        self._prompts = layer
        return layer

    def _refuse_points(self, image: Image) -> None:
        """Points are prompts only for models that take them; say so (with the measured
        reason) instead of "No boxes"."""
        points = [layer for layer in self._point_layers(image, bind=False) if len(layer.data)]
        if not points or self._points_supported() is not False:
            return
        raise ValueError(
            f"Points layer {points[0].name!r}: {self._points_refusal()} ('Add prompts layer' "
            f"for {image.name!r})."
        )

    def _bind_prompts_keys(self, layer: Shapes) -> None:
        """Ctrl+Z in the prompts layer undoes the last run (the layer being drawn in stays
        active, so the preview's own Ctrl+Z would not be reached)."""
        ref = weakref.ref(self)

        def undo_run(_layer: Any) -> None:
            widget = ref()
            if widget is not None:
                widget.undo()

        undo_run.__doc__ = "napari-masam: undo the last run"
        with contextlib.suppress(ValueError, TypeError):
            layer.bind_key("Control-Z", undo_run, overwrite=True)

    def mark_keyframe(self) -> bool:
        """Make the current object's mask on the slice on screen (as fixed with the brush in
        the preview layer) a keyframe of its propagation; the next Run recomputes only the
        slices that depend on it. Returns False when refused."""
        preview, image = self._preview, self._image.value
        if preview is None or preview not in self.viewer.layers or image is None:
            self._error(
                "No preview yet: run a segmentation, fix a slice with the brush, then mark it."
            )
            return False
        obj = int(self._object.value)
        if preview.data.ndim == 2:
            z = 0
            mask = np.asarray(preview.data) == obj
        else:
            point = np.asarray(self.viewer.dims.point, dtype=float)[-preview.ndim :]
            z = int(np.round(preview.world_to_data(point)[0]))
            if not 0 <= z < preview.data.shape[0]:
                self._error(f"The slice on screen ({z}) is outside the preview.")
                return False
            mask = np.asarray(preview.data[z]) == obj
        if not mask.any():
            self._error(
                f"Object {obj} has no voxels on slice {z}: paint it there with label {obj} in the "
                f"preview layer (brush), or pick its object id, then mark the slice again."
            )
            return False
        self._keyframe_masks.setdefault(obj, {})[z] = mask
        self._set_status(
            f"Slice {z} is now a keyframe of object {obj} ({int(mask.sum())} voxels): Run "
            "recomputes only the slices that depend on it (Ctrl+Z in the prompts layer undoes)."
        )
        return True

    def precompute(self) -> Any:
        """Encode every slice of the chosen image in the background (embedding cache), so later
        boxes run the decoder only. Returns the worker (None if not started)."""
        if self._worker is not None:
            self._set_status("Already running: cancel first (Alt-C).")
            return None
        try:
            image = self._image.value
            if image is None:
                raise ValueError("No image layer: open a volume, video or picture first.")
            info = _layers.stack_from_layer(image)
            values = replace(self.control_values(), mode="automatic")
            request = replace(request_from_controls(values, image, info), mode="precompute")
        except (TypeError, ValueError, FileNotFoundError, ImportError) as exc:
            self._error(str(exc))
            return None
        return self._start(request)

    def next_object(self) -> int:
        """Rectangles drawn next belong to a new object id; returns that id."""
        self._object.value = min(int(self._object.value) + 1, self._object.max)
        self._set_status(f"Next rectangles are object {self._object.value}.")
        return int(self._object.value)

    # ------------------------------------------------------------------ run
    def run(self) -> Any:
        """Start a run with the current settings; returns the worker (None if not started).

        Box mode adds to the preview: objects whose boxes did not change since their last run
        keep their voxels and are not recomputed; objects whose boxes were deleted leave it.
        """
        if self._worker is not None:
            self._set_status("Already running: cancel first (Alt-C).")
            return None
        try:
            request = self._prepare_request()
        except (TypeError, ValueError, FileNotFoundError, ImportError) as exc:
            self._error(str(exc))
            return None
        if request is None:
            return None
        return self._start(request)

    def control_values(self) -> ControlValues:
        """The run controls' current values."""
        return self._c.values()

    def _preview_identity(self, values: ControlValues, image: Image) -> tuple:
        """Runs with the same identity add to one preview; another image/model/preset or mode
        starts a new one."""
        return (
            str(image.unique_id),
            values.model_key,
            values.preset,
            values.level,
            values.width,
            values.mode,
        )

    def _prepare_request(self) -> RunRequest | None:
        """Collect the run request on the GUI thread (fast: no pixels are read)."""
        image = self._image.value
        if image is None:
            raise ValueError("No image layer: open a volume, video or picture first.")
        info = _layers.stack_from_layer(image)
        values = self.control_values()
        if values.mode == "automatic":
            request = request_from_controls(values, image, info)
            if automatic_support(values.model) == "untrained":
                from napari.utils.notifications import show_warning

                show_warning(automatic_note(values.model))  # said before the long run starts
            return request
        propagate = values.propagate and info.n_slices > 1
        try:
            boxes, note = self._boxes_for(image, info, interpolate=not propagate)
        except NoBoxesError:
            # clicks alone are prompts for a model that takes points (MA-SAM); any other box
            # problem (boxes outside the image...) is the user's to see
            clicking = any(len(layer.data) for layer in self._point_layers(image, bind=False))
            if not clicking or self._points_supported() is False:
                raise
            boxes, note = {}, ""
        points, points_note = self._points_for(image, info, boxes)
        note = " ".join(n for n in (note, points_note) if n)
        identity = self._preview_identity(values, image)
        same_preview = identity == self._preview_key and self._preview is not None
        records = self._objects if same_preview else {}
        masks = self._keyframe_masks if propagate and same_preview else {}
        probe = request_from_controls(values, image, info, boxes, masks=masks, points=points)
        signatures = {
            obj: prompts_signature(
                boxes.get(obj, {}),
                probe.masks.get(obj),
                probe.slice_ranges.get(obj),
                points.get(obj),
            )
            for obj in {*boxes, *probe.masks, *points}
        }
        recompute, removed = changed_objects(records, signatures)
        if removed and same_preview:
            _layers.clear_objects(self._preview, removed)
            for obj in removed:
                self._objects.pop(obj, None)
                self._keyframe_masks.pop(obj, None)
            self._refresh_objects()
        if not recompute:
            self._set_status(
                "Nothing changed since the last run: the preview is up to date"
                + (f" ({len(removed)} deleted object(s) removed)." if removed else ".")
            )
            return None
        self._note = note
        if len(boxes) == 1 and propagate and sum(len(v) for v in boxes.values()) == 1:
            self._note = (note + " " if note else "") + (
                "One box is enough: the object is followed through the slices."
            )
        chosen_boxes = {k: boxes[k] for k in recompute if k in boxes}
        chosen_masks = {k: probe.masks[k] for k in recompute if k in probe.masks}
        chosen_points = {k: points[k] for k in recompute if k in points}
        if not propagate:
            return request_from_controls(values, image, info, chosen_boxes, points=chosen_points)
        # correction loop: objects whose keyframes were only added or changed recompute the
        # slices that depend on them; the others (new, keyframe removed, range moved) whole
        previous = None
        changed: dict[int, tuple[int, ...]] = {}
        if same_preview and records:
            previous = np.array(self._preview.data, copy=True)
            for obj in recompute:
                old = records[obj].signature if obj in records else None
                slices, whole = changed_keyframes(old, signatures[obj])
                if whole:
                    previous[previous == obj] = 0
                    slices, _ = changed_keyframes(None, signatures[obj])
                changed[obj] = slices
        return request_from_controls(
            values,
            image,
            info,
            chosen_boxes,
            masks=chosen_masks,
            previous=previous,
            changed=changed or None,
            points=chosen_points,
        )

    def _boxes_for(
        self, image: Image, info: _layers.LayerStack, *, interpolate: bool = True
    ) -> tuple[dict, str]:
        """All objects' per-slice boxes from the image's prompts layer (keyframes only when
        ``interpolate`` is False), and a note for the status (2-D layer mapped to the slice
        on screen, shapes skipped)."""
        from .prompts import boxes_from_rectangles

        prompts = self._find_prompts_layer(image)
        found = _layers.shapes_in_image_frame(prompts, image, world_point=self.viewer.dims.point)
        if not found.vertices_rc and not self._keyframe_masks:
            self._refuse_points(image)
            skipped = f" ({', '.join(found.skipped)} enclose no region)" if found.skipped else ""
            raise NoBoxesError(
                f"No boxes in layer {prompts.name!r}{skipped}: draw a rectangle (or an ellipse "
                "or polygon: its bounding box is used) around the object."
            )
        boxes = boxes_from_rectangles(
            found.vertices_rc,
            found.object_ids,
            image_shape=(info.n_slices, *info.labels_shape[-2:]),
            interpolate=interpolate,
        )
        if not boxes and not self._keyframe_masks:
            raise ValueError(
                f"No boxes inside image {image.name!r} in layer {prompts.name!r}: draw them over "
                "the image."
            )
        notes = []
        if found.mapped_slice is not None:
            notes.append(
                f"2-D layer {prompts.name!r}: its boxes are put on slice {found.mapped_slice} "
                "(the slice on screen)."
            )
        if found.skipped:
            notes.append(f"Skipped {len(found.skipped)} line/path shape(s).")
        return boxes, " ".join(notes)

    def _ensure_preview(self, request: RunRequest) -> Labels:
        """The preview layer over the request's image; emptied when the preview identity
        changed (another image, model, preset or mode), kept otherwise."""
        info, image = request.info, request.image
        identity = self._preview_identity(self.control_values(), image)
        preview = self._preview
        if preview is not None and preview in self.viewer.layers:
            if tuple(preview.data.shape) == info.labels_shape and identity == self._preview_key:
                return preview
            if tuple(preview.data.shape) == info.labels_shape:
                preview.data[...] = 0
                preview.scale = info.scale
                preview.translate = info.translate
                if info.units:
                    preview.units = info.units
                preview.refresh()
                _layers.copy_geometry(image, preview)
                preview.metadata[LABELS_IMAGE_KEY] = _layers.image_binding(image)
                self._objects.clear()
                self._preview_key = identity
                return preview
            self.viewer.layers.remove(preview)
        self._objects.clear()
        self._preview = _layers.new_labels_layer(self.viewer, info, _layers.PREVIEW_LAYER_NAME)
        _layers.copy_geometry(image, self._preview)
        self._preview.metadata[LABELS_IMAGE_KEY] = _layers.image_binding(image)
        self._preview.opacity = 0.6
        # Class colours from the start: switching a shown Labels layer from napari's cyclic
        # colours to a direct colormap recompiles its shader on the next paint (measured 0.3-2
        # s with software OpenGL), which used to land at the end of the first run. Now it
        # happens here, while the worker is still loading the model.
        ids = sorted({*request.boxes, *request.masks, *request.points}) or [1]
        styles = {i: self._object_style(i) for i in range(1, max(ids) + 1)}
        _layers.set_label_classes(
            self._preview, [n for n, _ in styles.values()], [c for _, c in styles.values()]
        )
        self._preview_key = identity
        self._target.reset_choices()
        self._export_layer.reset_choices()
        return self._preview

    def _start(self, request: RunRequest) -> Any:
        from . import _worker

        precompute = request.mode == "precompute"
        preview = None if precompute else self._ensure_preview(request)
        self._stats = _worker.RunStats(total=len(request.slices))
        note, self._note = self._note, ""
        self._run = _RunState(request, set(), time.perf_counter(), self._stats, note)
        if preview is not None:
            self._run.before = np.array(preview.data, copy=True)
            self._run.records_before = dict(self._objects)
        self._progress.max = max(1, len(request.slices))
        self._progress.value = 0
        self._progress_timer.stop()
        self._progress_shown_at = float("-inf")
        # the worker gets a snapshot: it never touches the widget's session itself
        session = self._session if self._session_key == request.model_key else None
        if session is None:
            self._set_status(
                "Loading the model..."
                + (
                    " (the first load on a CPU runtime exports and checks it once: ~20 s)"
                    if request.backend != "torch"
                    else ""
                )
            )
        elif request.mode == "boxes":
            ids = set(request.boxes) | set(request.masks) | set(request.points)
            kept = len(set(self._objects) - ids)
            self._set_status(
                f"Running {len(ids)} object(s)"
                + (" (propagating)" if request.propagate else "")
                + (f"; {kept} unchanged object(s) kept." if kept > 0 else "...")
            )
        elif precompute:
            self._set_status("Precomputing embeddings...")
        else:
            self._set_status("Running...")
        self._run_btn.enabled = False
        self._precompute_btn.enabled = False
        self._cancel_btn.enabled = True
        self._commit_btn.enabled = False
        if preview is not None:
            preview.visible = True
        active = self.viewer.layers.selection.active
        if isinstance(active, self._Points) and _layers.is_bound_to(active, request.image):
            self._point_prompts = active
        self._clicking = active is not None and active is self._point_prompts
        self._keep_prompts_active()
        self._worker = _worker.start_worker(
            lambda: self._engine_generator(request, session),
            on_progress=self._on_progress,
            on_returned=self._on_returned,
            on_errored=self._on_errored,
            on_finished=self._on_finished,
            on_aborted=self._on_aborted,
            total=len(request.slices),
            desc=f"MA-SAM {request.mode}",
        )
        return self._worker

    def _keep_prompts_active(self) -> None:
        """Box mode: the prompts layer stays the active layer in drawing mode (the next drag
        draws a box instead of panning or painting the preview); when the run started from the
        point prompts layer, that layer stays active in add mode (the next click adds a
        point)."""
        points = self._point_prompts
        if self._clicking and points is not None and points in self.viewer.layers:
            active = self.viewer.layers.selection.active
            ours = active is None or active is self._preview or active is points
            if ours and (active is not points or points.mode in ("pan_zoom", "transform")):
                _layers.activate_for_clicking(self.viewer, points)
            return
        prompts = self._prompts
        if self._mode.value != "boxes" or prompts is None or prompts not in self.viewer.layers:
            return
        active = self.viewer.layers.selection.active
        ours = active is None or active is self._preview or active is prompts
        if ours and (active is not prompts or prompts.mode in ("pan_zoom", "transform")):
            _layers.activate_for_drawing(self.viewer, prompts)

    @staticmethod
    def _engine_generator(request: RunRequest, session: Any) -> Any:
        """Runs in the worker thread: load the model if needed, then relay the engine.

        Touches no widget state: a newly loaded session goes to the GUI thread as a yielded
        :class:`SessionLoaded`, so a failed load leaves the previous working session in place.
        Finished slices stream into the preview, so the engine keeps no labels volume of its
        own (``keep_labels=False``), except propagation, whose result is the whole labels
        volume (the correction loop starts from the previous one).
        """
        from . import _worker

        _worker.import_core()
        if session is None:
            session = load_session(request)
            yield SessionLoaded(session, request.model_key)
        from .inference import check_mode

        info = request.info
        extra: dict[str, Any] = {"preset": request.preset}
        if request.points:  # clicks (the engine refuses them, with the reason, for box-only models)
            extra["points"] = {k: dict(v) for k, v in request.points.items()}
        if getattr(session.device, "type", "cpu") == "cpu":
            # leave one core to the GUI thread: napari keeps drawing while the model runs
            extra["num_threads"] = gui_friendly_threads()
        if request.mode == "precompute":
            return (yield from session.iter_precompute(info.stack, windows="tiled", **extra))
        if request.mode == "automatic":
            check_mode(session.model, "automatic")
            extra.pop("points", None)
            engine = session.iter_automatic(
                info.stack, stride=request.stride, keep_labels=False, **extra
            )
        elif request.propagate:
            check_mode(session.model, "propagate")
            engine = session.iter_propagate(
                info.stack,
                dict(request.boxes),
                masks=dict(request.masks) or None,
                slice_ranges=dict(request.slice_ranges) or None,
                previous=request.previous,
                changed={k: list(v) for k, v in request.changed.items()} or None,
                **extra,
            )
        else:
            check_mode(session.model, "boxes")
            engine = session.iter_boxes(info.stack, dict(request.boxes), keep_labels=False, **extra)
        return (yield from engine)

    # ------------------------------------------------------------------ worker callbacks (GUI)
    def _on_progress(self, progress: Any) -> None:
        if isinstance(progress, SessionLoaded):
            self._session, self._session_key = progress.session, progress.key
            self._set_status(f"Model loaded; {backend_line(progress.session.model)} Running...")
            self._apply_automatic_support()
            return
        stats, run = self._stats, self._run
        if stats is None or run is None:
            return
        stats.done = int(getattr(progress, "done", stats.done) or 0)
        stats.total = int(getattr(progress, "total", 0) or stats.total)
        stats.elapsed_s = float(getattr(progress, "elapsed_s", 0.0) or 0.0)
        stats.stage = str(getattr(progress, "stage", "") or "")
        labels_slice = getattr(progress, "labels_slice", None)
        preview = self._preview
        if labels_slice is not None and preview is not None and preview in self.viewer.layers:
            z = int(progress.slice_index)
            if run.request.propagate:  # complete labels of the slice (all objects)
                _layers.write_slice(
                    preview, z, labels_slice, is_2d=run.request.info.is_2d, dims=self.viewer.dims
                )
            elif run.request.mode == "boxes":
                _layers.write_objects_slice(
                    preview,
                    z,
                    labels_slice,
                    run.request.object_ids,
                    is_2d=run.request.info.is_2d,
                    dims=self.viewer.dims,
                )
            else:
                _layers.write_slice(
                    preview, z, labels_slice, is_2d=run.request.info.is_2d, dims=self.viewer.dims
                )
            run.done_slices.add(z)
        # the numbers are repainted at most every PROGRESS_REPAINT_S (the last one at once)
        waited = time.perf_counter() - self._progress_shown_at
        if (stats.total > 0 and stats.done >= stats.total) or waited >= PROGRESS_REPAINT_S:
            self._show_progress()
        elif not self._progress_timer.isActive():
            self._progress_timer.start(max(1, int(1000 * (PROGRESS_REPAINT_S - waited))))

    def _show_progress(self, *, status: bool = True) -> None:
        """Paint the run's progress bar (and status line) with the latest numbers."""
        self._progress_timer.stop()
        stats = self._stats
        if stats is None or self._run is None:
            return
        self._progress_shown_at = time.perf_counter()
        top = max(1, stats.total)
        if self._progress.max != top:
            self._progress.max = top
        value = min(stats.done, top)
        if self._progress.value != value:
            self._progress.value = value
        if status:
            self._set_status(stats.describe(), log=False)

    def _end_progress(self) -> None:
        """The run ended: no late repaint of the numbers; the bar shows where it got."""
        if self._progress_timer.isActive():
            self._show_progress(status=False)

    def _object_style(self, obj: int, default_name: str | None = None) -> tuple[str, str]:
        """(name, colour) of label ``obj``: the user's choice, else the record's, else the
        default (``object k`` and the palette colour)."""
        if obj in self._styles:
            return self._styles[obj]
        if obj in self._objects:
            return self._objects[obj].name, self._objects[obj].color
        return default_name or f"object {obj}", _layers.object_color(obj)

    def _on_returned(self, result: Any) -> None:
        self._end_progress()
        run = self._run
        if result is None or run is None:  # cancelled: the generator returned nothing
            return
        request = run.request
        if request.mode == "precompute":
            seconds = time.perf_counter() - run.started
            self._set_status(
                f"Embeddings of {len(request.slices)} slices ready in {seconds:.1f} s: boxes on "
                f"{request.image.name!r} now run the decoder only."
            )
            return
        self._last_result = result
        preview = self._preview
        if preview is None or preview not in self.viewer.layers:
            return
        if request.propagate:
            self._adopt_propagation(result, preview)
        elif request.mode == "boxes":
            for obj in request.object_ids:
                per_slice = request.boxes.get(obj, {})
                clicks = request.points.get(obj, {})
                slices = set(per_slice) | set(clicks)
                old = self._objects.get(obj)
                stale = set(old.slices if old else ()) - slices
                if stale:  # slices the object's new prompts no longer reach
                    _layers.clear_objects(preview, [obj], stale)
                name, color = self._object_style(obj)
                signature = prompts_signature(per_slice, points_by_slice=clicks)
                self._objects[obj] = ObjectRecord(
                    obj, name, color, signature, tuple(sorted(slices))
                )
        else:
            top = int(np.asarray(preview.data).max(initial=0))
            names, colors = _result_class_info(result, np.asarray(preview.data))
            self._objects = {
                i: ObjectRecord(i, *self._styles.get(i, (names[i - 1], colors[i - 1])))
                for i in range(1, max(top, len(names)) + 1)
            }
        self._refresh_objects()
        seconds = time.perf_counter() - run.started
        ids = set(request.boxes) | set(request.masks) | set(request.points)
        kept = len(set(self._objects) - ids) if request.mode == "boxes" else 0
        covered = ""
        if request.propagate:
            extents = getattr(result, "extents", {}) or {}
            covered = "; ".join(f"object {k}: slices {a}-{b}" for k, (a, b) in extents.items())
        done = len(run.done_slices) if request.propagate else len(request.slices)
        self._set_status(
            f"Done: {done} slices in {seconds:.1f} s"
            + (f" ({covered})" if covered else "")
            + (f" ({kept} unchanged object(s) kept)" if kept > 0 else "")
            + ". Commit (Alt-M) to keep the result."
            + (f" {run.note}" if run.note else "")
        )

    def _adopt_propagation(self, result: Any, preview: Labels) -> None:
        """Take a propagation result: the whole labels volume (previous voxels of other objects
        kept by the engine), and a record per walked object."""
        run = self._run
        request = run.request
        labels = getattr(result, "labels", None)
        if labels is not None and tuple(labels.shape[-2:]) == tuple(preview.data.shape[-2:]):
            data = np.asarray(labels)
            preview.data[...] = data[0] if preview.data.ndim == 2 and data.ndim == 3 else data
            preview.refresh()
        extents = getattr(result, "extents", {}) or {}
        for obj in set(request.boxes) | set(request.masks) | set(request.points):
            name, color = self._object_style(obj)
            first, last = extents.get(obj, request.slice_ranges.get(obj, (0, -1)))
            signature = prompts_signature(
                request.boxes.get(obj, {}),
                self._keyframe_masks.get(obj),
                request.slice_ranges.get(obj),
                request.points.get(obj),
            )
            self._objects[obj] = ObjectRecord(
                obj, name, color, signature, tuple(range(int(first), int(last) + 1))
            )

    def _refresh_objects(self) -> None:
        """Measure the objects in the preview, name/colour the preview, fill the table."""
        preview = self._preview
        if preview is None or preview not in self.viewer.layers or not self._objects:
            self._show_objects()
            return
        image = self._image_for_labels(preview)
        info = _layers.stack_from_layer(image) if image is not None else None
        spacing = info.spacing_zyx if info is not None and _is_physical(image, info) else None
        sizes = measure(np.asarray(preview.data), self._objects, spacing)
        for obj, (zs, voxels, ml) in sizes.items():
            self._objects[obj] = replace(
                self._objects[obj], covered=zs, voxels=voxels, volume_ml=ml
            )
        table = as_napari_table(self._objects)
        _layers.set_label_classes(preview, table["names"], table["colors"])
        preview.refresh()
        self._show_objects()

    def _show_objects(self) -> None:
        self._objects_table.show_records(self._objects)
        self._fit_min_width()

    def _rename_object(self, obj: int, name: str) -> None:
        record = self._objects[obj]
        self._styles[obj] = (name, record.color)
        self._objects[obj] = replace(record, name=name)
        self._restyle()

    def _recolor_object(self, obj: int, color: str) -> None:
        record = self._objects[obj]
        self._styles[obj] = (record.name, color)
        self._objects[obj] = replace(record, color=color)
        if self._prompts is not None and self._prompts in self.viewer.layers:
            _layers.color_object_shapes(self._prompts, obj, color)
            if obj == int(self._object.value):
                _layers.set_current_object(self._prompts, obj, color)
        self._restyle()

    def _restyle(self) -> None:
        preview = self._preview
        if preview is not None and preview in self.viewer.layers and self._objects:
            table = as_napari_table(self._objects)
            _layers.set_label_classes(preview, table["names"], table["colors"])
            preview.refresh()
        self._show_objects()

    def _on_errored(self, exc: BaseException) -> None:
        self._end_progress()
        message = str(exc) or type(exc).__name__
        if _is_out_of_memory(exc):
            message = (
                f"Out of memory: {message}. Try device 'cpu', a larger stride, a smaller region "
                "or close other programs using the GPU."
            )
        logger.error("napari-masam run failed", exc_info=exc)
        self._mark_partial()
        self._error(message)

    def _mark_partial(self) -> None:
        """After a cancel or error: objects of the run may be half updated; they keep their
        names/colours and are recomputed by the next run (no signature)."""
        run = self._run
        if run is None or run.request.mode != "boxes":
            return
        for obj in run.request.object_ids:
            per_slice = set(run.request.boxes.get(obj, {})) | set(run.request.points.get(obj, {}))
            old = self._objects.get(obj)
            done = run.done_slices & per_slice
            if old is None and not done:
                continue  # never reached the preview
            name, color = self._object_style(obj)
            slices = tuple(sorted(set(old.slices if old else ()) | done))
            self._objects[obj] = ObjectRecord(obj, name, color, None, slices)
        self._refresh_objects()

    def _on_aborted(self) -> None:
        self._end_progress()
        run = self._run
        done = len(run.done_slices) if run is not None else 0
        self._mark_partial()
        self._set_status(
            f"Cancelled: {done} slice(s) of this run are in the preview; everything else from "
            "earlier runs is kept."
        )

    def _on_finished(self) -> None:
        self._end_progress()
        self._worker = None
        self._record_undo_step()
        self._run_btn.enabled = True
        self._precompute_btn.enabled = True
        self._cancel_btn.enabled = False
        preview = self._preview
        self._commit_btn.enabled = preview is not None and preview in self.viewer.layers
        self._sync_model()
        self._keep_prompts_active()

    def _record_undo_step(self) -> None:
        """Turn what the run wrote into the preview into ONE undo step of the preview layer
        (streaming writes bypass napari's history), and remember the objects before it."""
        run, preview = self._run, self._preview
        if (
            run is None
            or run.before is None
            or preview is None
            or preview not in self.viewer.layers
        ):
            return
        before = run.before
        run.before = None
        if before.shape != preview.data.shape:
            return
        after = np.array(preview.data, copy=True)
        where = np.nonzero(after != before)
        if not where[0].size:
            return
        preview.data[...] = before
        with preview.block_history():
            preview.data_setitem(where, after[where], refresh=False)
        preview.refresh()
        self._undo_records.append(run.records_before or {})
        del self._undo_records[:-8]  # napari keeps a bounded history too

    def undo(self) -> bool:
        """Restore the preview (and its objects) as they were before the last run.

        Bound to Ctrl+Z in the prompts layer. Returns False when there is nothing to undo.
        """
        preview = self._preview
        if self._worker is not None or preview is None or not self._undo_records:
            self._set_status("Nothing to undo.")
            return False
        preview.undo()
        self._objects = self._undo_records.pop()
        self._refresh_objects()
        self._set_status("Undone: the preview is back to before the last run.")
        return True

    def _sync_model(self) -> None:
        """After a load: grey out unsupported modes, fill the intensity preset from metadata."""
        session = self._session
        if session is None or self._session_key != self._current_key():
            return
        model = session.model
        # the engine takes strides 1..D (each slice must stay in some window)
        self._stride.max = max(1, int(getattr(model, "slices_per_group", 1)))
        self._apply_automatic_support()
        preset_name = getattr(model.metadata, "intensity_preset", None)
        if self._preset_from_model and preset_name in self._preset.choices:
            self._set_preset(preset_name)
            self._preset_from_model = True  # still follows the model until the user picks

    def cancel(self) -> None:
        """Ask the running worker to stop after the slice in progress."""
        if self._worker is None:
            return
        self._set_status("Cancelling after the current slice...")
        self._cancel_btn.enabled = False
        self._worker.quit()

    # ------------------------------------------------------------------ commit
    def _classes_of_preview(self) -> dict[int, tuple[str, str]]:
        values = np.unique(np.asarray(self._preview.data)) if self._preview is not None else []
        return {int(v): self._object_style(int(v)) for v in values if v != 0}

    def commit(self) -> Labels | None:
        """Write the preview into the chosen target layer; returns the layer written.

        Object names and colours go with it: a new layer gets all of them, an existing layer
        keeps its own classes and gets the committed objects' names and colours added.
        """
        preview = self._preview
        if self._worker is not None:
            self._set_status("Wait for the run to finish (or cancel it) before committing.")
            return None
        if preview is None or preview not in self.viewer.layers or not np.any(preview.data):
            self._error("Nothing to commit: run a segmentation first.")
            return None
        target = self._target.value
        classes = self._classes_of_preview()
        image = self._image_for_labels(preview)
        if target in (None, NEW_LAYER_TARGET):
            image_name = image.name if image is not None else "image"
            kwargs: dict[str, Any] = {"units": preview.units}
            layer = self.viewer.add_labels(
                np.array(preview.data, copy=True),
                name=f"{image_name} labels",
                scale=preview.scale,
                translate=preview.translate,
                **kwargs,
            )
            _layers.copy_geometry(preview, layer)
            if LABELS_IMAGE_KEY in preview.metadata:
                layer.metadata[LABELS_IMAGE_KEY] = preview.metadata[LABELS_IMAGE_KEY]
            _layers.merge_label_classes(layer, classes)
            self._target.reset_choices()
            self._export_layer.reset_choices()
            self._export_layer.value = layer
            self._set_status(f"Committed to new layer {layer.name!r}.")
            self._keep_prompts_active()
            return layer
        slices = None
        if self._objects and all(r.signature is not None for r in self._objects.values()):
            slices = sorted({z for r in self._objects.values() for z in r.slices})
        try:
            changed = _layers.commit_labels(
                target,
                preview.data,
                self._policy.value,
                slices=slices,
                is_2d=preview.data.ndim == 2,
            )
        except (TypeError, ValueError) as exc:
            self._error(str(exc))
            return None
        _layers.merge_label_classes(target, classes)
        target.refresh()
        self._export_layer.value = target
        self._set_status(
            f"Committed {changed} voxels into {target.name!r} "
            f"({self._policy.value}); Ctrl+Z on that layer undoes it."
        )
        return target

    # ------------------------------------------------------------------ export
    def _image_for_labels(self, labels: Any) -> Image | None:
        """The image a Labels layer was made over: its recorded binding, else the chosen image
        when the shapes agree, else the only image of that shape."""
        if labels is None:
            return None
        images = [layer for layer in self.viewer.layers if isinstance(layer, self._Image)]
        bound = labels.metadata.get(LABELS_IMAGE_KEY)
        if isinstance(bound, dict):
            for image in images:
                if str(image.unique_id) == bound.get("id"):
                    return image
        shape = tuple(np.shape(labels.data))

        def fits(image: Image) -> bool:
            with contextlib.suppress(TypeError, ValueError):
                return _layers.stack_from_layer(image).labels_shape == shape
            return False

        chosen = self._image.value
        if chosen is not None and fits(chosen):
            return chosen
        fitting = [image for image in images if fits(image)]
        return fitting[0] if len(fitting) == 1 else None

    def _export_dialog(self, fmt: str, suggested: str) -> str | None:
        """Ask where to write (a folder name for PNG masks); None when cancelled."""
        from qtpy.QtWidgets import QFileDialog

        if SUFFIXES[fmt] == "":
            path, _ = QFileDialog.getSaveFileName(
                self.native, "Export PNG masks into folder", suggested, "Folder (*)"
            )
        else:
            suffix = SUFFIXES[fmt]
            path, _ = QFileDialog.getSaveFileName(
                self.native, f"Export labels as {fmt}", suggested, f"{fmt} (*{suffix})"
            )
        return path or None

    def export(self, path: str | Path | None = None) -> Any:
        """Write the chosen labels layer in the source image's format and grid.

        Parameters
        ----------
        path : path-like, optional
            Target file (folder for PNG masks); default: ask with a save dialog.

        Returns
        -------
        Path or worker or None
            The written path (NIfTI, TIFF: written at once), the export worker (PNG masks,
            overlay mp4: written in a thread), or None when refused or cancelled.
        """
        layer = self._export_layer.value
        fmt = self._export_format.value
        if layer is None:
            self._error("Nothing to export: commit a result or pick a Labels layer to export.")
            return None
        image = self._image_for_labels(layer)
        if image is None:
            self._error(
                f"Cannot tell which image labels {layer.name!r} belong to (shape "
                f"{tuple(np.shape(layer.data))}): pick that image in the 'image' drop-down."
            )
            return None
        if path is None:
            suggested = f"{layer.name.replace(' ', '_')}{SUFFIXES[fmt]}"
            path = self._ask_export_path(fmt, suggested)
            if not path:
                return None
        try:
            request = export_request(layer, image, fmt, path)
        except (TypeError, ValueError) as exc:
            self._error(str(exc))
            return None
        if SUFFIXES[fmt] in (".nii.gz", ".tif"):
            from .inference import run as drain

            try:
                written = drain(iter_export(request))
            except (OSError, TypeError, ValueError) as exc:
                self._error(f"Export failed: {exc}")
                return None
            self._set_status(f"Exported {layer.name!r} to {written}.")
            return written
        return self._start_export(request, layer.name)

    def _start_export(self, request: Any, name: str) -> Any:
        from . import _worker

        total = int(request.labels.shape[0]) if request.labels.ndim == 3 else 1
        self._export_btn.enabled = False
        self._set_status(f"Exporting {name!r} as {request.fmt}...")

        def progress(done: int) -> None:
            self._set_status(f"Exporting {name!r}: {done}/{total} frames", log=False)

        def returned(path: Any) -> None:
            self._set_status(f"Exported {name!r} to {path}.")

        def errored(exc: BaseException) -> None:
            logger.error("napari-masam export failed", exc_info=exc)
            self._error(f"Export failed: {exc}")

        def finished() -> None:
            self._export_worker = None
            self._export_btn.enabled = self._export_layer.value is not None

        self._export_worker = _worker.start_worker(
            lambda: iter_export(request),
            on_progress=progress,
            on_returned=returned,
            on_errored=errored,
            on_finished=finished,
            total=total,
            desc=f"Export {request.fmt}",
        )
        return self._export_worker

    # ------------------------------------------------------------------ run internals
    def _current_key(self) -> tuple:
        return self.control_values().model_key

    # ------------------------------------------------------------------ messages
    def _set_status(self, text: str, *, log: bool = True) -> None:
        self._status.value = text
        if log:
            logger.info("%s", text)

    def _error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._set_status(f"Error: {message}")
        show_error(message)


def load_session(request: RunRequest) -> Any:
    """Load the model ``request`` selects on its device and backend, with the per-user
    embedding cache (in the worker thread: the first ONNX export of a runtime backend takes
    ~15-20 s, later loads find it in the export cache).

    Raises
    ------
    ModuleNotFoundError
        A runtime backend named explicitly is not installed (the message says what to install).
    ValueError, FileNotFoundError
        See :meth:`napari_masam.checkpoints.ModelSource.load`.
    """
    from .devices import resolve_device
    from .model.runtime import with_backend
    from .session import SegmentationSession

    device = resolve_device(request.device)
    model = request.source.load(device)
    # only a torch LiteMedSAM on a CPU changes; other models come back as they are
    model = with_backend(model, request.backend)
    return SegmentationSession(model, device, cache_dir=_embedding_cache_dir())


def backend_line(model: Any) -> str:
    """``"Backend: <napari_masam.model.runtime.backend_info(model).describe()>."``"""
    from .model.runtime import backend_info

    return f"Backend: {backend_info(model).describe()}."


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


def _embedding_cache_dir() -> Path | None:
    """The per-user on-disk embedding cache shared with ``napari-masam precompute`` (keys are
    content + model + preprocessing, so reopening an image does not encode it again)."""
    from . import cache

    finder = getattr(cache, "default_cache_dir", None)
    if finder is None:
        from .cli import default_cache_dir as finder
    try:
        return Path(finder())
    except (OSError, ImportError):  # no usable cache folder: memory only
        return None


def _is_physical(image: Any, info: _layers.LayerStack) -> bool:
    """Whether volumes in mL make sense: a grey volume whose spacing is in mm (our reader's
    ``physical_unit``; else napari's layer units)."""
    if not info.is_volume:
        return False
    if "physical_unit" in image.metadata:
        return image.metadata["physical_unit"] == "mm"
    return bool(info.units) and all(u in ("millimeter", "mm") for u in info.units)


def _supported_modes(model: Any) -> tuple[str, ...]:
    """The engine's one "can this model run this mode" answer (imports the core lazily)."""
    from .inference import supported_modes

    return supported_modes(model)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return "OutOfMemory" in name or "out of memory" in str(exc).lower()
