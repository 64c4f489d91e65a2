"""The segmentation widget's controls, and the pure step from their values to a run request.

:func:`build_controls` makes the magicgui controls (one group per concern: model, run, commit,
export); :class:`ControlValues` is what they hold at one moment (read on the GUI thread);
:func:`request_from_controls` turns those values plus the prompts into a frozen
:class:`RunRequest` without touching any widget, so it is tested without a viewer.

Importing this module must stay light (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
)

from . import _layers

#: Model choice meaning "use the file(s) below" instead of a registry preset.
CHECKPOINT_CHOICE = "checkpoint file..."
#: Intensity choice meaning "whatever the loaded model was trained with".
MODEL_DEFAULT_PRESET = "model default"
#: Intensity choice that shows the CT level/width boxes.
CUSTOM_CT_PRESET = "custom CT window"
#: Target choice: commit into a new Labels layer.
NEW_LAYER_TARGET = "new Labels layer"

MODES = ("boxes", "automatic")

#: Files a ``masam_vit_*`` preset needs: Meta's SAM base checkpoint (exact released file name)
#: and the MA-SAM authors' checkpoint trained on that backbone.
SAM_BASE_FILES: dict[str, str] = {
    "masam_vit_b": "sam_vit_b_01ec64.pth",
    "masam_vit_l": "sam_vit_l_0b3195.pth",
    "masam_vit_h": "sam_vit_h_4b8939.pth",
}
SAM_BASE_SOURCE = "Meta's segment-anything release (github.com/facebookresearch/segment-anything)"
MASAM_SOURCE = "the MA-SAM authors' release (github.com/cchen-cc/MA-SAM)"

#: What automatic mode can do with each preset before it is loaded: "none" (no class head),
#: "untrained" (a class head with no trained weights), "checkpoint" (depends on the files).
#: Used until the model registry declares it (``ModelPreset.automatic``); a loaded model's own
#: ``supports_automatic`` always wins.
_AUTOMATIC_BY_PRESET: dict[str, str] = {
    "litemedsam": "none",
    "masam-lite": "untrained",
    "masam_vit_b": "checkpoint",
    "masam_vit_l": "checkpoint",
    "masam_vit_h": "checkpoint",
}


#: Whether a registry model takes point prompts, known before loading it (its
#: ``SegmentationModel.supports_points``; LiteMedSAM's "no" is measured, see
#: ``benchmarks/points_realdata.py``). A checkpoint file: unknown until loaded (the engine checks).
POINTS_BY_PRESET: dict[str, bool] = {
    "litemedsam": False,
    "masam-lite": False,
    "masam_vit_b": True,
    "masam_vit_l": True,
    "masam_vit_h": True,
}


def points_support(model_choice: str) -> bool | None:
    """True / False when the model choice is known to take point prompts or not, else None."""
    return POINTS_BY_PRESET.get(model_choice)


def automatic_support(model_choice: str) -> str:
    """``"none"``, ``"untrained"``, ``"checkpoint"`` or ``"unknown"`` for a model choice."""
    from .model.registry import MODEL_REGISTRY

    preset = MODEL_REGISTRY.get(model_choice)
    declared = getattr(preset, "automatic", None) if preset is not None else None
    if isinstance(declared, str):
        return declared
    return _AUTOMATIC_BY_PRESET.get(model_choice, "unknown")


def automatic_note(model_choice: str) -> str:
    """Why automatic mode is off or risky for ``model_choice`` ("" when nothing to say)."""
    support = automatic_support(model_choice)
    if support == "none":
        return (
            f"{model_choice} is box-prompted only (no class head): automatic mode needs an "
            "MA-SAM checkpoint with classes."
        )
    if support == "untrained":
        return (
            f"{model_choice}'s class head is untrained: automatic mode returns empty or "
            "meaningless labels (and is slow on a CPU) until you fine-tune it (Fine-tune panel)."
        )
    return ""


def path_or_none(value: Any) -> Path | None:
    """A FileEdit value as a path, or None when empty."""
    if value in (None, ""):
        return None
    path = Path(value)
    return None if str(path) in ("", ".") else path


@dataclass(frozen=True)
class ControlValues:
    """The widget's run controls at one moment (plain values, no widgets).

    Attributes
    ----------
    model : str
        Registry name or :data:`CHECKPOINT_CHOICE`.
    checkpoint, masam_checkpoint : Path or None
        The file pickers.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    preset : str
        Intensity choice (:data:`MODEL_DEFAULT_PRESET`, a preset name, or
        :data:`CUSTOM_CT_PRESET`).
    level, width : float
        Custom CT window (HU).
    mode : str
        ``"boxes"`` or ``"automatic"``.
    stride : int
        Automatic-mode window stride.
    propagate : bool
        Box mode: boxes are keyframes and objects are walked through the slices.
    first_slice, last_slice : int
        Inclusive slice range propagation never leaves.
    backend : str
        Inference backend (:data:`napari_masam.model.runtime.BACKENDS`): ``"auto"`` (a fast
        CPU runtime for LiteMedSAM when one is installed), ``"torch"`` (the reference),
        ``"onnxruntime"`` or ``"openvino"``.
    """

    model: str
    checkpoint: Path | None
    masam_checkpoint: Path | None
    device: str
    preset: str
    level: float = 40.0
    width: float = 400.0
    mode: str = "boxes"
    stride: int = 1
    propagate: bool = False
    first_slice: int = 0
    last_slice: int = -1
    backend: str = "auto"

    @property
    def model_key(self) -> tuple[str, str, str, str, str]:
        """Identity of the model selection: a loaded session is reused only for the same key
        (another model, file, device or backend loads the model again on the next run)."""
        return (
            self.model,
            str(self.checkpoint),
            str(self.masam_checkpoint),
            self.device,
            self.backend,
        )


@dataclass(frozen=True)
class RunRequest:
    """Everything one run needs, gathered on the GUI thread; the worker reads only this.

    Attributes
    ----------
    image : napari.layers.Image
        The layer segmented (its pixels are read in the worker).
    info : LayerStack
        The image as the engine's stack.
    mode : str
        ``"boxes"`` or ``"automatic"``.
    model_key : tuple
        :attr:`ControlValues.model_key`.
    source : napari_masam.checkpoints.ModelSource
        Where the model comes from (parsed once, here at the edge).
    device : str
    preset : IntensityPreset or None
        None = the model's own.
    stride : int
    boxes : mapping
        Object id -> slice -> ``(x0, y0, x1, y1)`` pixel box (inclusive), only the objects to
        compute in this run.
    slices : tuple of int
        Slices the engine will finish, in order (box mode: the boxed slices; propagation: the
        slice range, an upper bound of what the walks reach).
    propagate : bool
        Boxes are keyframes; objects are walked through the slices
        (:func:`napari_masam.propagation.iter_propagate`).
    masks : mapping
        Propagation: object id -> slice -> ``(Y, X)`` bool mask fixed by the user (keyframes).
    slice_ranges : mapping
        Propagation: object id -> inclusive ``(first, last)`` slice range.
    previous : ndarray or None
        Propagation correction: the preview labels before this run.
    changed : mapping
        Propagation correction: object id -> keyframe slices that changed.
    backend : str
        Inference backend asked for (one of :data:`napari_masam.model.runtime.BACKENDS`,
        lower-case); applied with :func:`napari_masam.model.runtime.with_backend` when the
        model is loaded.
    points : mapping
        Object id -> slice -> ``[(row, col, label), ...]`` clicks in the image's pixels (label
        1 positive, 0 negative), only the objects to compute in this run; the engine's
        ``points`` argument.
    """

    image: Any
    info: _layers.LayerStack
    mode: str
    model_key: tuple[str, ...]
    source: Any
    device: str
    preset: Any
    stride: int
    boxes: Mapping[int, Mapping[int, tuple[float, ...]]] = field(default_factory=dict)
    slices: tuple[int, ...] = ()
    propagate: bool = False
    masks: Mapping[int, Mapping[int, Any]] = field(default_factory=dict)
    slice_ranges: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    previous: Any = None
    changed: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    backend: str = "auto"
    points: Mapping[int, Mapping[int, tuple[tuple[float, float, int], ...]]] = field(
        default_factory=dict
    )

    @property
    def object_ids(self) -> tuple[int, ...]:
        """Objects computed by this run (box mode), ascending."""
        return tuple(sorted({int(k) for k in self.boxes} | {int(k) for k in self.points}))


def model_source(values: ControlValues) -> Any:
    """The :class:`napari_masam.checkpoints.ModelSource` that ``values`` select.

    Raises
    ------
    ValueError
        A preset that needs files, or the checkpoint choice, without a file (the message names
        the files and where they come from); see ``ModelSource.parse`` for the other cases.
    FileNotFoundError
        A chosen file does not exist.
    """
    from .checkpoints import ModelSource
    from .model.registry import MODEL_REGISTRY

    choice = values.model
    preset = MODEL_REGISTRY.get(choice)
    if preset is not None and not preset.needs_weights:
        return ModelSource.parse(choice)
    if values.checkpoint is None:
        if preset is not None:
            base = SAM_BASE_FILES.get(choice, "the SAM base checkpoint")
            what = (
                f"{choice} needs Meta's SAM base checkpoint {base} (from {SAM_BASE_SOURCE}) and "
                f"the authors' MA-SAM checkpoint (from {MASAM_SOURCE})"
            )
        else:
            what = "pick a napari-masam .safetensors file or a SAM base checkpoint"
        raise ValueError(f"No checkpoint file: {what}. Use the file pickers.")
    for path in (values.checkpoint, values.masam_checkpoint):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    if preset is not None:  # masam_vit_*: the authors' pair, backbone checked at load
        return ModelSource.parse(
            choice, sam_checkpoint=values.checkpoint, masam_checkpoint=values.masam_checkpoint
        )
    return ModelSource.parse(values.checkpoint, masam_checkpoint=values.masam_checkpoint)


def intensity_preset(values: ControlValues) -> Any:
    """The :class:`napari_masam.preprocess.IntensityPreset` chosen, or None (model default)."""
    from . import preprocess

    if values.preset == MODEL_DEFAULT_PRESET:
        return None
    if values.preset == CUSTOM_CT_PRESET:
        return preprocess.custom_ct_preset(float(values.level), float(values.width))
    return preprocess.INTENSITY_PRESETS[values.preset]


def request_from_controls(
    values: ControlValues,
    image: Any,
    info: _layers.LayerStack,
    boxes: Mapping[int, Mapping[int, tuple[float, ...]]] | None = None,
    *,
    masks: Mapping[int, Mapping[int, Any]] | None = None,
    previous: Any = None,
    changed: Mapping[int, Sequence[int]] | None = None,
    points: Mapping[int, Mapping[int, Sequence[Sequence[float]]]] | None = None,
) -> RunRequest:
    """Turn control values (and, in box mode, the prompts to compute) into a :class:`RunRequest`.

    Parameters
    ----------
    values : ControlValues
    image : napari.layers.Image
    info : LayerStack
        ``_layers.stack_from_layer(image)``.
    boxes : mapping, optional
        Object id -> slice -> pixel box (keyframes when ``values.propagate``); required
        (non-empty) in box mode.
    masks, previous, changed : optional
        Propagation keyframe masks and the correction loop's previous labels / changed
        keyframe slices (see :class:`RunRequest`).
    points : mapping, optional
        Object id -> slice -> ``[(row, col, label), ...]`` clicks (see :class:`RunRequest`).

    Raises
    ------
    ValueError
        Box mode without boxes, an empty slice range, an unknown backend; see also
        :func:`model_source`.
    """
    from .model.runtime import check_backend

    backend = check_backend(values.backend)
    source = model_source(values)
    boxes = {int(k): dict(v) for k, v in (boxes or {}).items()}
    clicks = {
        int(k): {
            int(z): tuple((float(p[0]), float(p[1]), int(p[2])) for p in v) for z, v in f.items()
        }
        for k, f in (points or {}).items()
    }
    n = info.n_slices
    propagate = values.mode == "boxes" and values.propagate and n > 1
    ranges: dict[int, tuple[int, int]] = {}
    if values.mode == "boxes":
        if not boxes and not masks and not clicks:
            raise ValueError("No boxes to segment: draw a rectangle around the object first.")
        if propagate:
            first = max(0, int(values.first_slice))
            last = n - 1 if values.last_slice < 0 else min(n - 1, int(values.last_slice))
            if first > last:
                raise ValueError(
                    f"Empty propagation range: slices {first}..{last}. Set 'from slice' at or "
                    "below 'to slice'."
                )
            ranges = {int(k): (first, last) for k in {*boxes, *(masks or {}), *clicks}}
            slices = tuple(range(first, last + 1))
        else:
            slices = tuple(
                sorted({int(z) for per_obj in (*boxes.values(), *clicks.values()) for z in per_obj})
            )
    else:
        boxes = {}
        clicks = {}
        slices = tuple(range(n))
    return RunRequest(
        image=image,
        info=info,
        mode=values.mode,
        model_key=values.model_key,
        source=source,
        device=values.device,
        preset=intensity_preset(values),
        stride=int(values.stride),
        boxes=boxes,
        slices=slices,
        propagate=propagate,
        masks={int(k): dict(v) for k, v in (masks or {}).items()} if propagate else {},
        slice_ranges=ranges,
        previous=previous if propagate else None,
        changed={int(k): tuple(int(z) for z in v) for k, v in (changed or {}).items()}
        if propagate
        else {},
        backend=backend,
        points=clicks,
    )


# ---------------------------------------------------------------------------------- controls
@dataclass(frozen=True)
class Controls:
    """The widget's magicgui controls, grouped (built by :func:`build_controls`)."""

    image: ComboBox
    model: ComboBox
    model_note: Label
    checkpoint: FileEdit
    masam_checkpoint: FileEdit
    device: ComboBox
    backend: ComboBox
    preset: ComboBox
    level: FloatSpinBox
    width: FloatSpinBox
    mode: RadioButtons
    stride: SpinBox
    prompts_btn: PushButton
    points_btn: PushButton
    object: SpinBox
    propagate: CheckBox
    first_slice: SpinBox
    last_slice: SpinBox
    keyframe_btn: PushButton
    precompute_btn: PushButton
    target: ComboBox
    policy: ComboBox
    run_btn: PushButton
    cancel_btn: PushButton
    commit_btn: PushButton
    buttons: Container
    progress: ProgressBar
    status: Label
    export_layer: ComboBox
    export_format: ComboBox
    export_btn: PushButton

    def values(self) -> ControlValues:
        """The run controls' current values."""
        return ControlValues(
            model=str(self.model.value),
            checkpoint=path_or_none(self.checkpoint.value),
            masam_checkpoint=path_or_none(self.masam_checkpoint.value),
            device=str(self.device.value),
            preset=str(self.preset.value),
            level=float(self.level.value),
            width=float(self.width.value),
            mode=str(self.mode.value),
            stride=int(self.stride.value),
            propagate=bool(self.propagate.value),
            first_slice=int(self.first_slice.value),
            last_slice=int(self.last_slice.value),
            backend=str(self.backend.value),
        )

    def in_order(self) -> list[Any]:
        """Top-to-bottom order in the dock."""
        return [
            self.image,
            self.model,
            self.model_note,
            self.checkpoint,
            self.masam_checkpoint,
            self.device,
            self.backend,
            self.preset,
            self.level,
            self.width,
            self.mode,
            self.stride,
            self.prompts_btn,
            self.points_btn,
            self.object,
            self.propagate,
            self.first_slice,
            self.last_slice,
            self.keyframe_btn,
            self.target,
            self.policy,
            self.buttons,
            self.progress,
            self.status,
        ]

    def export_row(self) -> list[Any]:
        """The export group (shown under the object table)."""
        return [self.export_layer, self.export_format, self.export_btn, self.precompute_btn]


def _model_controls(
    image_choices: Any,
) -> tuple[ComboBox, ComboBox, Label, FileEdit, FileEdit, ComboBox, ComboBox]:
    from .devices import available_devices  # imports torch: only when the widget opens
    from .model.registry import DEFAULT_MODEL, MODEL_REGISTRY
    from .model.runtime import BACKENDS, available_backends

    image = ComboBox(
        label="image",
        choices=image_choices,
        nullable=True,
        tooltip="Image layer to segment: a (Z, Y, X) volume, a video (T, H, W, 3) or a 2D/RGB "
        "picture. Slices/frames are axis 0. Each prompts layer belongs to one image.",
    )
    names = [DEFAULT_MODEL, *[n for n in MODEL_REGISTRY if n != DEFAULT_MODEL]]
    model = ComboBox(
        label="model",
        choices=[*names, CHECKPOINT_CHOICE],
        value=DEFAULT_MODEL,
        tooltip="Model: "
        + "; ".join(f"{n}: {MODEL_REGISTRY[n].description}" for n in names)
        + f"; {CHECKPOINT_CHOICE}: a napari-masam .safetensors file, or a SAM base "
        "checkpoint + the authors' MA-SAM checkpoint.",
    )
    note = Label(label="", value="")
    note.tooltip = "What this model can and cannot do, said before any work starts."
    note.native.setWordWrap(True)
    checkpoint = FileEdit(
        label="checkpoint",
        mode="r",
        filter="Checkpoints (*.safetensors *.pth *.pt *.ckpt)",
        nullable=True,
        tooltip="Our single-file .safetensors checkpoint, or Meta's SAM base checkpoint "
        f"(sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth from {SAM_BASE_SOURCE}) "
        "of an MA-SAM pair.",
    )
    adapters = FileEdit(
        label="MA-SAM checkpoint",
        mode="r",
        filter="Checkpoints (*.pth *.pt *.safetensors)",
        nullable=True,
        tooltip=f"The authors' MA-SAM checkpoint (adapters, FacT, decoder; from {MASAM_SOURCE}) "
        "that goes with the SAM base checkpoint above. Leave empty for our single-file format.",
    )
    device = ComboBox(
        label="device",
        choices=available_devices(),
        value="auto",
        tooltip="Where the model runs; only devices present on this machine are listed. "
        "auto = CUDA, then Apple MPS, then CPU.",
    )
    installed = [b for b in available_backends() if b not in ("auto", "torch")]
    backend = ComboBox(
        label="backend",
        choices=list(BACKENDS),
        value="auto",
        tooltip="How LiteMedSAM runs on a CPU. auto: OpenVINO, else ONNX Runtime, else torch "
        "(the graph is exported and checked against torch once, on the first run: ~15-20 s); "
        "torch: the reference; onnxruntime / openvino: that runtime or an error. Other models "
        "and GPUs always run on torch. Installed runtimes: "
        + (", ".join(installed) or "none")
        + ". Changing it reloads the model on the next run; the status line says which "
        "backend is active.",
    )
    return image, model, note, checkpoint, adapters, device, backend


def _intensity_controls() -> tuple[Any, ...]:
    """Intensity preset and the custom CT window."""
    from .preprocess import INTENSITY_PRESETS

    preset = ComboBox(
        label="intensity",
        choices=[MODEL_DEFAULT_PRESET, *INTENSITY_PRESETS, CUSTOM_CT_PRESET],
        value=MODEL_DEFAULT_PRESET,
        tooltip="Intensity normalisation. Filled with the model's training preset when the "
        "model loads; change it to use another CT window (HU) or MRI/min-max scaling.",
    )
    level = FloatSpinBox(
        label="CT level (HU)",
        value=40.0,
        min=-2000.0,
        max=4000.0,
        step=10.0,
        visible=False,
        tooltip="Centre of the custom CT window in Hounsfield units.",
    )
    width = FloatSpinBox(
        label="CT width (HU)",
        value=400.0,
        min=1.0,
        max=8000.0,
        step=10.0,
        visible=False,
        tooltip="Width of the custom CT window in Hounsfield units.",
    )
    return preset, level, width


def _prompt_controls() -> tuple[Any, ...]:
    """Mode, prompts, propagation and precompute controls."""
    mode = RadioButtons(
        label="mode",
        choices=MODES,
        value="boxes",
        orientation="horizontal",
        tooltip="boxes: draw rectangles (or ellipses/polygons: their bounding box) in the "
        "prompts layer on a few slices (keyframes are interpolated), one object per object id. "
        "automatic: every class of the model, no prompts (needs a model with a trained class "
        "head, e.g. an MA-SAM checkpoint).",
    )
    stride = SpinBox(
        label="stride",
        value=1,
        min=1,
        max=64,
        visible=False,
        tooltip="Automatic mode: step between the first slices of consecutive slice groups. "
        "1 = every slice in every position (best), larger = faster; at most the model's "
        "slices per group (5 for MA-SAM).",
    )
    prompts_btn = PushButton(
        text="Add prompts layer",
        tooltip="Create (or select) the prompts Shapes layer of the chosen image, in rectangle "
        "mode. Draw a box around the object on a few slices; slices between are interpolated.",
    )
    points_btn = PushButton(
        text="Add point prompts",
        tooltip="Create (or select) the chosen image's point prompts layer, in add mode: click "
        "on the object (green: positive) or on what it must not include (red: negative; the "
        "T key toggles what the next click adds). A click belongs to the object whose box "
        "contains it on that slice. Only models that take points (MA-SAM); LiteMedSAM does not "
        "(measured: clicks made its masks worse).",
    )
    obj = SpinBox(
        label="object id",
        value=1,
        min=1,
        max=254,
        tooltip="Object id of the next rectangles you draw (Alt-N: next object). Rectangles "
        "with the same id on different slices are keyframes of one object.",
    )
    propagate = CheckBox(
        label="propagate",
        value=True,
        tooltip="On: one box is enough. Each object is followed slice by slice (frame by frame) "
        "from its boxes until it ends, within 'from slice'..'to slice'; more boxes re-anchor it. "
        "Off: only boxed slices are segmented (boxes on two slices are interpolated between).",
    )
    first_slice = SpinBox(
        label="from slice",
        value=0,
        min=0,
        max=100000,
        tooltip="Propagation never goes below this slice/frame (axis 0 index).",
    )
    last_slice = SpinBox(
        label="to slice",
        value=0,
        min=0,
        max=100000,
        tooltip="Propagation never goes beyond this slice/frame (axis 0 index).",
    )
    keyframe_btn = PushButton(
        text="Use my fix as keyframe",
        tooltip="After fixing the current object on the slice on screen with napari's brush/"
        "eraser in the preview layer: make that mask a keyframe. Run then recomputes only the "
        "slices that depend on it; Ctrl+Z in the prompts layer restores the previous result.",
    )
    precompute_btn = PushButton(
        text="Precompute embeddings",
        tooltip="Encode every slice of the image now (in the background), so later boxes only "
        "run the fast decoder.",
    )
    return (
        mode,
        stride,
        prompts_btn,
        points_btn,
        obj,
        propagate,
        first_slice,
        last_slice,
        keyframe_btn,
        precompute_btn,
    )


def _commit_controls(target_choices: Any) -> tuple[Any, ...]:
    """Commit target/policy, the run buttons, progress and status."""
    target = ComboBox(
        label="commit to",
        choices=target_choices,
        tooltip="Where Commit writes the preview: a new Labels layer, or one of your Labels "
        "layers (undoable with Ctrl+Z on that layer). Runs only ever write the preview layer.",
    )
    policy = ComboBox(
        label="preserve",
        choices=[(text, key) for key, text in _layers.COMMIT_POLICIES.items()],
        value="keep",
        visible=False,
        tooltip="How Commit treats labels already in the target layer. replace these "
        "labels, keep others: the result's own label values are replaced, other labels stay. "
        "overwrite: the result wins everywhere it is foreground. only empty voxels: only "
        "background voxels are written, nothing is removed. Always one undo step (Ctrl+Z).",
    )
    run_btn = PushButton(
        text="Run",
        tooltip="Segment the image (Alt-R). Box mode adds to the preview: only objects whose "
        "boxes changed since their last run are recomputed.",
    )
    cancel_btn = PushButton(
        text="Cancel",
        enabled=False,
        tooltip="Stop after the current slice (Alt-C); the previous preview stays, slices "
        "already done in this run are kept.",
    )
    commit_btn = PushButton(
        text="Commit",
        enabled=False,
        tooltip="Write the preview into the 'commit to' layer with the preserve policy (Alt-M); "
        "object names and colours go with it.",
    )
    buttons = Container(
        widgets=[run_btn, cancel_btn, commit_btn], layout="horizontal", labels=False, label=""
    )
    progress = ProgressBar(
        label="progress", value=0, min=0, max=1, tooltip="Slices finished in the current run."
    )
    status = Label(
        label="status", value="Ready. Pick an image and draw boxes, or switch to automatic."
    )
    status.tooltip = "What the widget is doing; speed (slices/s) and time left while running."
    status.native.setWordWrap(True)
    return target, policy, run_btn, cancel_btn, commit_btn, buttons, progress, status


def _export_controls(export_choices: Any) -> tuple[Any, ...]:
    """The export group."""
    export_layer = ComboBox(
        label="export",
        choices=export_choices,
        nullable=True,
        tooltip="Labels layer to export (e.g. the committed labels).",
    )
    export_format = ComboBox(
        label="as",
        choices=[],
        tooltip="File format: the source image's own (NIfTI with the image's header and grid; "
        "for a video: PNG masks in the EndoVis layout, a TIFF stack, or an overlay mp4).",
    )
    export_btn = PushButton(
        text="Export...",
        tooltip="Write the chosen labels layer in the source image's format and grid. (napari's "
        "File > Save uses the writer of the filter selected in its dialog, whatever ending you "
        "type; this button always writes the image's format.)",
    )
    return export_layer, export_format, export_btn


def build_controls(image_choices: Any, target_choices: Any, export_choices: Any) -> Controls:
    """Make the widget's controls (values, tooltips, visibility); no signals are connected.

    Parameters
    ----------
    image_choices, target_choices, export_choices : callable
        magicgui choice callbacks for the image, commit-target and export-layer drop-downs.
    """
    image, model, note, checkpoint, adapters, device, backend = _model_controls(image_choices)
    preset, level, width = _intensity_controls()
    (
        mode,
        stride,
        prompts_btn,
        points_btn,
        obj,
        propagate,
        first_slice,
        last_slice,
        keyframe_btn,
        precompute_btn,
    ) = _prompt_controls()
    target, policy, run_btn, cancel_btn, commit_btn, buttons, progress, status = _commit_controls(
        target_choices
    )
    export_layer, export_format, export_btn = _export_controls(export_choices)
    return Controls(
        image=image,
        model=model,
        model_note=note,
        checkpoint=checkpoint,
        masam_checkpoint=adapters,
        device=device,
        backend=backend,
        preset=preset,
        level=level,
        width=width,
        mode=mode,
        stride=stride,
        prompts_btn=prompts_btn,
        points_btn=points_btn,
        object=obj,
        propagate=propagate,
        first_slice=first_slice,
        last_slice=last_slice,
        keyframe_btn=keyframe_btn,
        precompute_btn=precompute_btn,
        target=target,
        policy=policy,
        run_btn=run_btn,
        cancel_btn=cancel_btn,
        commit_btn=commit_btn,
        buttons=buttons,
        progress=progress,
        status=status,
        export_layer=export_layer,
        export_format=export_format,
        export_btn=export_btn,
    )
