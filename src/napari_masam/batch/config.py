"""Settings of a batch (shared by every job) and the segmentation request of one stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io.boxes import BoxFile
from .source import ModelSpec

#: Output formats for frame stacks (videos, TIFF stacks); NIfTI inputs always give NIfTI.
FRAME_FORMATS = ("png", "tiff", "mp4-overlay")
FORMAT_CHOICES = ("auto", "nifti", *FRAME_FORMATS)
MODE_CHOICES = ("auto", "boxes")

#: ``{object_id: {slice: (x0, y0, x1, y1)}}`` pixel boxes of a stack (max edge inclusive).
BoxesDict = dict[int, dict[int, tuple[int, int, int, int]]]


@dataclass(frozen=True)
class BatchConfig:
    """Settings of a batch run, shared by every job (picklable: sent to Dask workers).

    Attributes
    ----------
    model : ModelSpec
    output_dir : Path
        Folder for all outputs (created if missing).
    mode : str or None
        ``"auto"`` (prompt-free), ``"boxes"``, or None: boxes when ``boxes`` is given, else
        automatic when the model supports it, else boxes.
    boxes : Path or None
        Box file used for every input, or a folder holding ``<stem>.json``/``<stem>.csv`` per
        input (formats of :mod:`napari_masam.io.boxes`).
    box_file : BoxFile or None
        ``boxes`` already parsed (when it is one file): jobs use it instead of reading it again.
    preset : str or None
        Intensity preset name (None: the model's own); unknown names are refused here.
    stride : int
        Step between D-slice windows (1 = the authors' exhaustive windows).
    batch_size : int or None
        Windows per forward pass (None: the engine's default).
    output_format : str
        One of :data:`FORMAT_CHOICES`; ``"auto"``: NIfTI for NIfTI, TIFF for TIFF stacks, PNG for
        videos. Frame formats apply to videos and TIFF stacks; NIfTI inputs always give NIfTI.
    overwrite : bool
        Redo jobs whose outputs are up to date, and replace outputs napari-masam cannot prove
        it wrote (a user's own file of the output's name).
    chunk_frames : int
        Frames per streamed video chunk (memory ~ ``chunk_frames + 2 (D - 1)`` frames).
    propagate : bool
        Boxes mode only: the boxes are keyframes that the engine's propagation walks from
        (:func:`napari_masam.propagation.iter_propagate`) instead of boxes interpolated between
        keyframes; an object's ``last_slice`` in the box file bounds its walk. Videos are then
        read lazily as a whole (not in chunks).
    """

    model: ModelSpec
    output_dir: Path
    mode: str | None = None
    boxes: Path | None = None
    preset: str | None = None
    stride: int = 1
    batch_size: int | None = None
    output_format: str = "auto"
    overwrite: bool = False
    chunk_frames: int = 64
    box_file: BoxFile | None = None
    propagate: bool = False

    def __post_init__(self) -> None:
        from ..preprocess import INTENSITY_PRESETS

        if self.mode is not None and self.mode not in MODE_CHOICES:
            raise ValueError(f"mode {self.mode!r}: choose one of {', '.join(MODE_CHOICES)}.")
        if self.output_format not in FORMAT_CHOICES:
            raise ValueError(
                f"format {self.output_format!r}: choose one of {', '.join(FORMAT_CHOICES)}."
            )
        if self.preset is not None and self.preset not in INTENSITY_PRESETS:
            raise ValueError(
                f"--preset {self.preset!r}: unknown; choose one of {', '.join(INTENSITY_PRESETS)}."
            )
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}.")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}.")
        if self.propagate and (self.mode == "auto" or self.boxes is None):
            raise ValueError(
                "--propagate walks from box keyframes: it needs --boxes FILE_OR_FOLDER and "
                "box mode (not --mode auto)"
            )
        if self.boxes is not None and not Path(self.boxes).exists():
            raise FileNotFoundError(f"--boxes {self.boxes}: no such file or folder.")

    def settings(self) -> dict[str, object]:
        """JSON-able settings that change the outputs (part of the resume match)."""
        return {
            "mode": self.mode,
            "preset": self.preset,
            "stride": self.stride,
            "batch_size": self.batch_size,
            "output_format": self.output_format,
            "propagate": self.propagate,
        }


@dataclass(frozen=True)
class SegmentationRequest:
    """What to run on one stack (or one chunk of a video): the engine call, fully resolved.

    Attributes
    ----------
    mode : str
        ``"auto"`` or ``"boxes"`` (resolved against the model).
    preset : str or None
        Intensity preset name (None: the model's).
    stride : int
    batch_size : int or None
    boxes : dict or None
        ``{object_id: {slice: xyxy}}`` in pixel indices of the stack (boxes mode).
    window : (float, float) or None
        Volume-level intensity window computed once for the whole input (videos streamed in
        chunks), or None: the engine computes it from the stack it is given.
    propagate : bool
        ``boxes`` are keyframes to propagate from (boxes mode).
    slice_ranges : dict or None
        ``{object_id: (first, last)}`` inclusive limits of a propagation.
    """

    mode: str
    preset: str | None = None
    stride: int = 1
    batch_size: int | None = None
    boxes: BoxesDict | None = None
    window: tuple[float, float] | None = None
    propagate: bool = False
    slice_ranges: dict[int, tuple[int, int]] | None = None

    def __hash__(self) -> int:  # boxes is a dict: hash what identifies the run
        return hash(
            (self.mode, self.preset, self.stride, self.batch_size, self.window, self.propagate)
        )
