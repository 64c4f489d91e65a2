"""The headless engine: whole stacks through a :class:`SegmentationModel`, as generators.

Three modes, one machinery:

* :func:`iter_segment_automatic`: prompt-free multi-class labels, the MA-SAM authors' whole-volume
  procedure (spec ``MASAM.md`` section 7);
* :func:`iter_segment_boxes`: one label per object from per-slice box prompts;
* :func:`iter_propagate` (:mod:`napari_masam.propagation`, re-exported here): whole objects from a
  few keyframe boxes/masks, walking through slices or frames, with a correction loop.

Both are plain generators: they yield :class:`Progress` (one per finished slice, with that
slice's labels) and ``return`` a :class:`SegmentationResult` (``StopIteration.value``; see
:func:`run`). Cancelling = ``generator.close()``: slices yielded so far (and written into
``out``) stay as they were; nothing else is touched. The stack is read slice by slice (an
array-like such as a lazy video reader works), and only a band of slices is kept, so memory
does not grow with the depth beyond the output labels.

Frames: the stack ``(Z, Y, X)`` grey or ``(T, Y, X, 3)`` RGB (``(T, Y, X, 4)``: alpha dropped)
in axis codes ``stack_orientation`` (default: the model's, i.e. no reorientation); results are
on that same grid. Boxes follow :mod:`napari_masam.prompts`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .io._common import label_dtype_for
from .palette import label_color
from .preprocess import (
    IntensityPreset,
    OrientationTransform,
    ResizeInfo,
    StackPipeline,
    probabilities_to_grid,
    resolve_preset,
)
from .prompts import check_boxes_in_stack, check_points_in_stack

if TYPE_CHECKING:
    import torch

    from .cache import EmbeddingCache
    from .model.base import SegmentationModel

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Upper bound of the automatic batch size (windows per forward pass).
MAX_BATCH_WINDOWS = 32

#: Values of ``iter_segment_boxes(windows=...)``: which group each boxed slice is encoded in.
BOX_WINDOWS = ("centred", "tiled")


# ----------------------------------------------------------------------------------------------
# Public records
# ----------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """One step of an ``iter_*`` generator.

    Attributes
    ----------
    done : int
        Slices finished so far.
    total : int
        Slices that will be finished (all slices in automatic mode, slices with a box in box
        mode).
    elapsed_s : float
        Seconds since the generator started.
    slice_index : int or None
        Stack index of the slice just finished.
    labels_slice : ndarray or None
        (Y, X) labels of that slice on the stack's grid (uint8 or uint16).
    stage : str
        ``"automatic"`` or ``"boxes"``.
    """

    done: int
    total: int
    elapsed_s: float
    slice_index: int | None = None
    labels_slice: np.ndarray | None = None
    stage: str = ""

    @property
    def fraction(self) -> float:
        """``done / total`` (1.0 for an empty job)."""
        return self.done / self.total if self.total else 1.0

    @property
    def slices_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate (None before the first slice)."""
        rate = self.slices_per_s
        return (self.total - self.done) / rate if rate > 0 else None


@dataclass
class SegmentationResult:
    """What a finished ``iter_*`` generator returns.

    Attributes
    ----------
    labels : ndarray or None
        (Z, Y, X) uint8 (uint16 for >= 255 classes/object ids) on the stack's grid; 0 =
        background, ``i`` = class ``i`` (automatic) or object id ``i`` (boxes). None when
        ``keep_labels=False`` and no ``out`` was given. In box mode, slices without a box are 0.
    class_names, class_colors : tuple of str
        From the model metadata (automatic) or ``object <id>`` names (boxes).
    preset : IntensityPreset
    model_name : str
    mode : str
        ``"automatic"``, ``"boxes"`` or ``"propagate"``.
    stride : int or None
        Window stride (automatic).
    timings : dict
        ``total_s``, ``encode_s``, ``decode_s``, ``windows_encoded``, ``cache_hits``, ...
    preprocessing : dict
        JSON-able: preset, volume window, orientation transform, resize, slices per group.
    object_ids : tuple of int
        Box and propagate modes: the objects segmented.
    extents : dict
        Propagate mode: object id -> inclusive (first, last) slice the object covers.
    """

    labels: np.ndarray | None
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    preset: IntensityPreset
    model_name: str
    mode: str
    stride: int | None
    timings: dict[str, float] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    object_ids: tuple[int, ...] = ()
    extents: dict[int, tuple[int, int]] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """JSON-able record for sidecars (everything but the labels)."""
        return {
            "mode": self.mode,
            "model_name": self.model_name,
            "class_names": list(self.class_names),
            "class_colors": list(self.class_colors),
            "stride": self.stride,
            "object_ids": list(self.object_ids),
            "extents": {str(k): list(v) for k, v in self.extents.items()},
            "preprocessing": self.preprocessing,
            "timings": self.timings,
        }


def run(generator: Generator[Any, Any, T], on_yield: Callable[[Any], None] | None = None) -> T:
    """Drive an ``iter_*`` generator to the end and return its result (THE drain helper).

    Parameters
    ----------
    generator : Generator
    on_yield : callable or None
        Called with every yielded item (e.g. a progress printer).
    """
    while True:
        try:
            item = next(generator)
        except StopIteration as stop:
            return stop.value
        if on_yield is not None:
            on_yield(item)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def default_batch_size(model: SegmentationModel, device: torch.device) -> int:
    """Windows per forward pass: on CPU the model's ``preferred_batch_size`` if it declares one,
    else 1 (compute bound; batching only costs memory); on a GPU,
    what fits in about half the free memory at a rough 4 kB per input pixel per slice
    (ViT activations), between 1 and :data:`MAX_BATCH_WINDOWS`."""
    import torch

    if device.type != "cuda":
        # a model may declare what suits its runtime on CPUs (e.g. an ONNX/OpenVINO backend)
        preferred = getattr(model, "preferred_batch_size", None)
        return int(preferred) if preferred else 1
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except Exception:  # pragma: no cover - old drivers
        return 1
    per_window = 4096 * model.image_size**2 * model.slices_per_group
    return int(max(1, min(MAX_BATCH_WINDOWS, (free // 2) // per_window)))


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Engine(StackPipeline):
    """Per-run state shared by every mode: the stack's :class:`StackPipeline` plus the model,
    device, cache keys and timings."""

    def __init__(
        self,
        model: SegmentationModel,
        stack: Any,
        *,
        preset: str | IntensityPreset | None,
        device: Any,
        cache: EmbeddingCache | None,
        stack_orientation: str | None,
        batch_size: int | None,
        autocast: bool,
        window: tuple[float, float] | None = None,
    ) -> None:
        import torch

        from .devices import resolve_device

        meta = model.metadata
        super().__init__(
            stack,
            image_size=int(model.image_size),
            slices_per_group=int(model.slices_per_group),
            resize_mode=meta.resize_mode,
            model_orientation=meta.orientation,
            preset=resolve_preset(preset, default=meta.intensity_preset),
            stack_orientation=stack_orientation,
            window=window,
            hash_slices=cache is not None,
        )
        self.model = model
        param = next(model.parameters(), None)
        current = param.device if param is not None else torch.device("cpu")
        self.device = current if device is None else resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device != current:
            model.to(self.device)
        self.batch_size = int(batch_size) if batch_size else default_batch_size(model, self.device)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.autocast = autocast
        self.cache = cache
        self.timings: dict[str, float] = {
            "encode_s": 0.0,
            "decode_s": 0.0,
            "windows_encoded": 0,
            "cache_hits": 0,
        }
        if cache is not None:
            from .cache import model_identity

            self._key_base = (
                model_identity(model),
                self.preset.key(),
                repr(self.window),
                self.info.image_size,
                self.info.resize_mode,
                self.group,
            )

    # -- model -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Inference mode + autocast, entered only between yields (never across one)."""
        import torch

        from .devices import autocast_context

        with torch.inference_mode(), autocast_context(self.device, enabled=self.autocast):
            yield

    def key(self, members: Sequence[int], row: int) -> str:
        from .cache import make_key

        digests = tuple(self.prepared(m).digest for m in members)
        return make_key(*self._key_base, digests, row)

    def embeddings(
        self, windows: Sequence[Sequence[int]], rows: Sequence[int] | None
    ) -> torch.Tensor:
        """Embeddings of the given rows of each window, window-major.

        Parameters
        ----------
        windows : sequence of member tuples
        rows : sequence of int or None
            Rows of each group wanted (None: all D rows).

        Returns
        -------
        Tensor
            (len(windows) * len(rows), E, g, g) on the engine's device.
        """
        import torch

        wanted = list(range(self.group)) if rows is None else list(rows)
        found: list[list[torch.Tensor] | None] = [None] * len(windows)
        keys: list[list[str]] = []
        if self.cache is not None:
            for i, members in enumerate(windows):
                k = [self.key(members, r) for r in wanted]
                keys.append(k)
                values = [self.cache.get(kk) for kk in k]
                if all(v is not None for v in values):
                    found[i] = [v.to(self.device) for v in values]  # type: ignore[union-attr]
                    self.timings["cache_hits"] += 1
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            images = np.stack([self.group_input(windows[i]) for i in missing])
            x = torch.from_numpy(images).to(self.device)  # B x D x 3 x S x S
            t0 = time.perf_counter()
            emb = self.model.encode(x)  # B*D x E x g x g
            self.timings["encode_s"] += time.perf_counter() - t0
            self.timings["windows_encoded"] += len(missing)
            emb = emb.reshape(len(missing), self.group, *emb.shape[1:])
            for j, i in enumerate(missing):
                found[i] = [emb[j, r] for r in wanted]
                if self.cache is not None:
                    for r, kk in zip(wanted, keys[i]):
                        self.cache.put(kk, emb[j, r])
        return torch.stack([e for f in found for e in f])  # type: ignore[union-attr]

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The model's logits for embeddings (N, E, g, g), boxes (N, 4) or None and points
        (:func:`points_batch`) or None; timed."""
        t0 = time.perf_counter()
        if points is None:
            logits = self.model.decode(embeddings, boxes)
        else:
            coords, labels = points
            points = (coords.to(embeddings.device), labels.to(embeddings.device))
            logits = self.model.decode(embeddings, boxes, points)
        self.timings["decode_s"] += time.perf_counter() - t0
        return logits

    def decode_scored(
        self, embeddings: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Box logits and the model's predicted IoU (N,) or None
        (:meth:`~napari_masam.model.base.SegmentationModel.decode_scored`); timed."""
        t0 = time.perf_counter()
        logits, scores = self.model.decode_scored(embeddings, boxes)
        self.timings["decode_s"] += time.perf_counter() - t0
        return logits, scores

    def points_to_model(self, points: Sequence[Sequence[float]]) -> np.ndarray:
        """Points of a stack slice -> (P, 3) float32 ``[x, y, label]`` of the model input.

        The same orientation and resize the engine applies to the slice's pixels and boxes
        (:func:`points_to_model_frame`).
        """
        return points_to_model_frame(points, self.transform, self.stack_shape[1:], self.info)

    def decode_prompts(
        self,
        embeddings: torch.Tensor,
        boxes: Sequence[np.ndarray | None],
        points: Sequence[np.ndarray | None] | None = None,
    ) -> torch.Tensor:
        """Logits of one prompt set per embedding row, rows with and without a box mixed.

        Parameters
        ----------
        embeddings : Tensor
            (N, E, g, g), one row per prompt set.
        boxes : sequence of ndarray or None
            Per row a (4,) model-frame box (:meth:`box_to_model`) or None (points alone).
        points : sequence of ndarray or None, or None
            Per row (P, 3) ``[x, y, label]`` model-frame points (:meth:`points_to_model`) or
            None.

        Returns
        -------
        Tensor
            (N, C + 1, h, w) logits in row order. SAM's prompt encoder takes boxes for all
            rows of a call or none, so boxed and box-free rows are decoded in two calls.
        """
        import torch

        rows_points = list(points) if points is not None else [None] * len(boxes)
        boxed = [i for i, b in enumerate(boxes) if b is not None]
        free = [i for i, b in enumerate(boxes) if b is None]
        out: torch.Tensor | None = None
        for index, with_boxes in ((boxed, True), (free, False)):
            if not index:
                continue
            idx = torch.as_tensor(index, device=embeddings.device)
            boxes_t = (
                torch.from_numpy(np.stack([boxes[i] for i in index]).astype(np.float32)).to(
                    embeddings.device
                )
                if with_boxes
                else None
            )
            logits = self.decode(
                embeddings.index_select(0, idx),
                boxes_t,
                points_batch([rows_points[i] for i in index]),
            )
            if out is None:
                out = logits.new_empty((len(boxes), *logits.shape[1:]))
            out[idx] = logits
        if out is None:
            raise ValueError("Nothing to decode: no prompt rows.")
        return out

    def preprocessing(self) -> dict[str, Any]:
        return self.to_dict()

    def labels_target(self, out: Any, keep_labels: bool, dtype: np.dtype) -> Any:
        if out is not None:
            if tuple(np.shape(out))[:3] != self.stack_shape:
                raise ValueError(
                    f"out has shape {np.shape(out)}, expected {self.stack_shape} (the stack's "
                    "(Z, Y, X))."
                )
            return out
        if keep_labels:
            return np.zeros(self.stack_shape, dtype=dtype)
        return None


def points_to_model_frame(
    points: Sequence[Sequence[float]],
    transform: OrientationTransform,
    shape_yx: Sequence[int],
    info: ResizeInfo,
) -> np.ndarray:
    """Point prompts of a stack slice -> the model input's pixel frame.

    Parameters
    ----------
    points : sequence of (y, x, label)
        (row, col) pixel indices of the stack slice (pixel centres at integers), label 1
        positive / 0 negative (validated by :func:`napari_masam.prompts.check_points_in_stack`).
    transform : OrientationTransform
        Stack -> model orientation (in-plane part; needs ``keeps_slice_axis``).
    shape_yx : (int, int)
        (Y, X) of the stack slice.
    info : ResizeInfo
        Geometry of the oriented slice in the model input.

    Returns
    -------
    ndarray
        (P, 3) float32 ``[x, y, label]``: XY pixel indices of the model input (x = column, the
        frame of ``boxes_xyxy``), the label unchanged. A pixel centre maps to the centre of the
        pixel's footprint in the model input: ``x' = (x + 0.5) * sx - 0.5`` (the extent
        ``[x - 0.5, x + 0.5]`` scales exactly, as :func:`~napari_masam.preprocess.
        boxes_to_model_frame` scales a box's extent).
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    rows, cols = p[:, 0].copy(), p[:, 1].copy()
    ny, nx = int(shape_yx[0]), int(shape_yx[1])
    if transform.perm[1] == 2:  # in-plane transpose
        rows, cols = cols, rows
        ny, nx = nx, ny
    if transform.flip[1]:
        rows = ny - 1 - rows
    if transform.flip[2]:
        cols = nx - 1 - cols
    sy, sx = info.scale_yx
    out = np.empty_like(p)
    out[:, 0] = (cols + 0.5) * sx - 0.5
    out[:, 1] = (rows + 0.5) * sy - 0.5
    out[:, 2] = p[:, 2]
    return out.astype(np.float32)


def points_batch(
    rows: Sequence[np.ndarray | None],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row model-frame points -> the ``points`` argument of ``SegmentationModel.decode``.

    Parameters
    ----------
    rows : sequence of ndarray or None
        One entry per decoded row: (P_i, 3) ``[x, y, label]`` from :meth:`_Engine.
        points_to_model` or None / empty (no points on that row).

    Returns
    -------
    (Tensor, Tensor) or None
        coords (N, P, 2) float32 and labels (N, P) int64, padded to the longest row with label
        -1 at (0, 0) (the model ignores padding); None when no row has a point.
    """
    import torch

    sizes = [0 if r is None else int(np.asarray(r).reshape(-1, 3).shape[0]) for r in rows]
    longest = max(sizes, default=0)
    if longest == 0:
        return None
    coords = np.zeros((len(rows), longest, 2), np.float32)
    labels = np.full((len(rows), longest), -1, np.int64)
    for i, (r, k) in enumerate(zip(rows, sizes)):
        if k:
            arr = np.asarray(r, dtype=np.float32).reshape(-1, 3)
            coords[i, :k] = arr[:, :2]
            labels[i, :k] = arr[:, 2].astype(np.int64)
    return torch.from_numpy(coords), torch.from_numpy(labels)


def _check_model(model: Any) -> None:
    from .model.base import SegmentationModel

    if not isinstance(model, SegmentationModel):
        raise TypeError(
            f"Expected a napari_masam SegmentationModel, got {type(model).__name__}; build one "
            "with napari_masam.build_model or napari_masam.load_model."
        )


#: Modes of :func:`check_mode`: prompt-free, box per slice, box/mask keyframes + propagation.
MODES = ("automatic", "boxes", "propagate")


def supported_modes(model: Any) -> tuple[str, ...]:
    """The :data:`MODES` that ``model`` can run (``supports_automatic`` / ``supports_boxes``;
    propagation needs box prompts)."""
    out = []
    if getattr(model, "supports_automatic", False):
        out.append("automatic")
    if getattr(model, "supports_boxes", False):
        out += ["boxes", "propagate"]
    return tuple(out)


def check_mode(model: Any, mode: str) -> None:
    """THE "can this model run this mode" check (engine, CLI, widgets and training use it).

    Parameters
    ----------
    model : SegmentationModel
    mode : str
        One of :data:`MODES` (``"auto"`` is accepted for ``"automatic"``).

    Raises
    ------
    TypeError
        If ``model`` is not a :class:`~napari_masam.model.base.SegmentationModel`.
    ValueError
        For an unknown mode or one the model cannot run (the message says what to use).
    """
    _check_model(model)
    mode = "automatic" if mode == "auto" else mode
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    if mode in supported_modes(model):
        return
    if mode == "automatic":
        raise ValueError(
            f"Model {model.metadata.name!r} has no automatic (prompt-free) head; use box prompts "
            "(iter_segment_boxes) or a multi-class MA-SAM checkpoint."
        )
    raise ValueError(
        f"Model {model.metadata.name!r} does not take box prompts; use automatic mode."
    )


def _start_engine(
    mode: str,
    model: Any,
    stack: Any,
    num_threads: int | None,
    *,
    same_slice_axis: bool = False,
    **engine_kwargs: Any,
) -> _Engine:
    """The shared preamble of every mode: :func:`check_mode`, then the run's :class:`_Engine`
    under the run's torch thread count. ``same_slice_axis``: the mode prompts slices of the
    stack, so the model's slice axis must be the stack's (ValueError otherwise)."""
    check_mode(model, mode)
    with _torch_threads(num_threads):
        eng = _Engine(model, stack, **engine_kwargs)
    if same_slice_axis and not eng.transform.keeps_slice_axis:
        raise ValueError(
            f"Mode {mode!r} prompts slices of the stack, so the stack's slice axis must be the "
            "model's slice axis; reorient the stack first (stack transform "
            f"{eng.transform.to_dict()})."
        )
    return eng


# ----------------------------------------------------------------------------------------------
# Automatic mode
# ----------------------------------------------------------------------------------------------
def window_starts(depth: int, group: int, stride: int) -> list[int]:
    """Padded start indices of the windows of :func:`iter_segment_automatic`.

    The stack is replicate-padded by ``(D - 1) // 2`` slices in front and ``D // 2`` behind
    (2 and 2 for D = 5, as the authors), giving ``depth`` windows at stride 1; at stride ``s``
    every ``s``-th window, plus the last one so that the end is covered.
    """
    if not 1 <= stride <= group:
        raise ValueError(
            f"stride must be between 1 and the model's slices per group ({group}), got {stride}."
        )
    starts = list(range(0, depth, stride))
    if starts[-1] != depth - 1:
        starts.append(depth - 1)
    return starts


def iter_segment_automatic(
    model: SegmentationModel,
    stack: Any,
    *,
    preset: str | IntensityPreset | None = None,
    stride: int = 1,
    batch_size: int | None = None,
    device: Any = None,
    cache: EmbeddingCache | None = None,
    stack_orientation: str | None = None,
    out: Any = None,
    keep_labels: bool = True,
    autocast: bool = True,
    num_threads: int | None = None,
    window: tuple[float, float] | None = None,
) -> Generator[Progress, None, SegmentationResult]:
    """Prompt-free multi-class segmentation of a whole stack, slice by slice as they finish.

    The MA-SAM authors' procedure (spec section 7) for a model with D = ``slices_per_group``:
    the stack is padded by repeating its first slice ``(D - 1) // 2`` times and its last slice
    ``D // 2`` times (2 and 2 for D = 5); windows of D consecutive padded slices start at every
    padded index (stride 1), each is intensity-normalised as a group and encoded; the softmax
    maps of its D rows are added to the slices they show (rows showing a padding copy are
    dropped, as the authors crop their padded prediction). Each slice's probability is the mean
    over the windows holding it (up to D), resampled bilinearly to the slice grid; the label is
    the argmax. D = 1 models: plain per-slice segmentation.

    With ``stride`` s (1..D) only every s-th window is run (plus the last one): each slice then
    averages the (about D / s) windows that hold it, all with equal weight, so the encoder cost
    drops by s at the price of less through-plane averaging (s = D: non-overlapping groups).

    Streaming: windows run in order and a slice is final (yielded, then its probabilities are
    freed) as soon as no later window holds it, so only about ``D + batch_size * stride``
    slices of probabilities and inputs are alive at any time.

    Parameters
    ----------
    model : SegmentationModel
        With ``supports_automatic``.
    stack : array-like
        (Z, Y, X) grey or (T, Y, X, 3) uint8 RGB; read one slice at a time (``stack[z]``).
    preset : str, IntensityPreset or None
        Intensity preset (default: ``model.metadata.intensity_preset``).
    stride : int
        Window stride, 1 (the authors) .. D.
    batch_size : int or None
        Windows per forward pass (default :func:`default_batch_size`).
    device : str, torch.device or None
        Where to run (the model is moved there); None: where the model is.
    cache : EmbeddingCache or None
        Reuse/store the embeddings of every window row (then a later box run on the same stack
        finds its embeddings here).
    stack_orientation : str or None
        Axis codes of the stack. None: ``"SPL"`` (the readers' display orientation) for grey
        stacks, ``""`` (none) for RGB ones (:class:`~napari_masam.preprocess.StackPipeline`);
        slices are reoriented when the model declares another orientation.
    out : array-like or None
        Preallocated (Z, Y, X) target written slice by slice (e.g. a memmap or a napari Labels
        layer's data); returned as ``result.labels``.
    keep_labels : bool
        Without ``out``: allocate and return the full label volume (False: only yield slices).
    autocast : bool
        Mixed precision on GPUs (:func:`napari_masam.devices.autocast_context`).
    num_threads : int or None
        torch intra-op threads during the run (restored afterwards); None: leave as is.
    window : (float, float) or None
        Precomputed volume-level intensity window in raw units
        (:func:`napari_masam.preprocess.volume_window`, once per input); None: computed here.
        Pass it when one input is segmented in pieces (video chunks) so that the labels do not
        depend on the pieces.

    Notes
    -----
    Stack values: complex stacks are refused (TypeError); NaN/+-Inf voxels are replaced by the
    finite minimum of their slice before the intensity window
    (:data:`napari_masam.preprocess.NON_FINITE_POLICY`), counted, logged as a warning and
    recorded in ``result.preprocessing["non_finite"]``.

    Yields
    ------
    Progress
        One per finished slice, in order of completion (stack order unless the model's
        orientation reverses the slice axis).

    Returns
    -------
    SegmentationResult

    Raises
    ------
    ValueError
        If the model has no automatic head, the stride is out of range or the stack is not a
        stack.
    """
    import torch

    t_start = time.perf_counter()
    eng = _start_engine(
        "automatic",
        model,
        stack,
        num_threads,
        preset=preset,
        device=device,
        cache=cache,
        stack_orientation=stack_orientation,
        batch_size=batch_size,
        autocast=autocast,
        window=window,
    )
    depth, group, front = eng.depth, eng.group, eng.front
    starts = window_starts(depth, group, int(stride))
    dtype = label_dtype_for(model.num_classes)
    target = eng.labels_target(out, keep_labels, dtype)
    oriented_labels = None
    if not eng.transform.keeps_slice_axis:
        # reslicing: oriented slices are not stack slices; collect, map back at the end
        oriented_labels = np.zeros(eng.shape, dtype=dtype)
    acc: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    next_final = 0
    done = 0
    was_training = model.training
    if was_training:
        model.eval()
    try:
        for b in range(0, len(starts), eng.batch_size):
            batch = starts[b : b + eng.batch_size]
            windows = [eng.members(w) for w in batch]
            with _torch_threads(num_threads), eng.compute():
                emb = eng.embeddings(windows, None)
                logits = eng.decode(emb, None)  # B*D x C+1 x h x w
                probs = logits.float().softmax(dim=1).cpu().numpy()
            for i, w in enumerate(batch):
                for d in range(group):
                    z = w + d - front
                    if not 0 <= z < depth:
                        continue  # a replicate-padding copy: dropped
                    row = probs[i * group + d]
                    if z in acc:
                        acc[z] += row
                        counts[z] += 1
                    else:
                        acc[z] = row.copy()
                        counts[z] = 1
            del probs
            following = starts[b + eng.batch_size] if b + eng.batch_size < len(starts) else None
            final_upto = depth if following is None else min(depth, following - front)
            while next_final < final_upto:
                z = next_final
                mean = acc.pop(z) / np.float32(counts.pop(z))
                with _torch_threads(num_threads), torch.inference_mode():
                    grid = probabilities_to_grid(torch.from_numpy(mean)[None], eng.info)
                    labels = grid.argmax(dim=1)[0].numpy().astype(dtype)
                del mean
                next_final += 1
                done += 1
                if oriented_labels is not None:
                    oriented_labels[z] = labels
                    yield Progress(
                        done, depth, time.perf_counter() - t_start, None, None, "automatic"
                    )
                    continue
                zs = eng.transform.slice_from_model(z, depth)
                labels = np.ascontiguousarray(eng.transform.inplane_from_model(labels))
                if target is not None:
                    target[zs] = labels
                yield Progress(done, depth, time.perf_counter() - t_start, zs, labels, "automatic")
            if following is not None:
                eng.release_below(eng.members(following)[0])
    finally:
        if was_training:
            model.train()
    if oriented_labels is not None:
        if target is None:
            target = np.ascontiguousarray(eng.transform.from_model(oriented_labels))
        else:
            target[...] = eng.transform.from_model(oriented_labels)
    eng.timings["total_s"] = time.perf_counter() - t_start
    meta = model.metadata
    return SegmentationResult(
        labels=target,
        class_names=tuple(meta.class_names),
        class_colors=tuple(meta.class_colors),
        preset=eng.preset,
        model_name=meta.name,
        mode="automatic",
        stride=int(stride),
        timings=dict(eng.timings),
        preprocessing=eng.preprocessing(),
    )


# ----------------------------------------------------------------------------------------------
# Box mode
# ----------------------------------------------------------------------------------------------
def object_color(object_id: int) -> str:
    """``#rrggbb`` colour of object ``object_id`` (>= 1): that of label ``object_id``
    (:func:`napari_masam.palette.label_color`), so a prompt and its mask share a colour."""
    return label_color(object_id)


def _boxes_by_slice(
    boxes: Mapping[int, Mapping[int, Sequence[float]]], stack_shape: tuple[int, int, int]
) -> dict[int, list[tuple[int, tuple[int, int, int, int]]]]:
    """Slice -> [(object id, clipped box)], validated by :func:`prompts.check_boxes_in_stack`."""
    per: dict[int, list[tuple[int, tuple[int, int, int, int]]]] = {}
    for oid, frames in check_boxes_in_stack(boxes, stack_shape).items():
        for z, box in frames.items():
            per.setdefault(z, []).append((oid, box))
    return dict(sorted(per.items()))


def _prompts_by_slice(
    model: Any,
    boxes: Mapping[int, Mapping[int, Sequence[float]]],
    points: Mapping[int, Mapping[int, Sequence[Sequence[float]]]] | None,
    stack_shape: tuple[int, int, int],
) -> tuple[dict[int, list[tuple[int, Any]]], dict[int, dict[int, list]]]:
    """Slice -> [(object id, clipped box or None)] and the validated points (object -> slice ->
    [(y, x, label)]); a box-free entry is an object with points only on that slice.

    Raises
    ------
    ValueError
        Points for a model without ``supports_points`` (the measured reason), or invalid
        boxes/points (:func:`prompts.check_boxes_in_stack`, :func:`prompts.
        check_points_in_stack`).
    """
    from .model.base import points_refusal

    per: dict[int, list[tuple[int, Any]]] = {
        z: list(items) for z, items in _boxes_by_slice(boxes, stack_shape).items()
    }
    if not points:
        return per, {}
    clicks = check_points_in_stack(points, stack_shape)
    if not clicks:
        return per, {}
    if not getattr(model, "supports_points", False):
        raise ValueError(points_refusal(model))
    for oid, frames in clicks.items():
        for z in frames:
            owners = [o for o, _ in per.get(z, [])]
            if oid not in owners:
                per.setdefault(z, []).append((oid, None))  # points alone on this slice
    return dict(sorted(per.items())), clicks


def iter_segment_boxes(
    model: SegmentationModel,
    stack: Any,
    boxes: Mapping[int, Mapping[int, Sequence[float]]],
    *,
    preset: str | IntensityPreset | None = None,
    device: Any = None,
    cache: EmbeddingCache | None = None,
    stack_orientation: str | None = None,
    batch_size: int | None = None,
    out: Any = None,
    keep_labels: bool = True,
    threshold: float = 0.5,
    autocast: bool = True,
    num_threads: int | None = None,
    windows: str = "centred",
    window: tuple[float, float] | None = None,
    points: Mapping[int, Mapping[int, Sequence[Sequence[float]]]] | None = None,
) -> Generator[Progress, None, SegmentationResult]:
    """Box-prompted segmentation: one label per object on every slice that has its box.

    Parameters
    ----------
    model : SegmentationModel
        With ``supports_boxes``.
    stack : array-like
        (Z, Y, X) grey or (T, Y, X, 3) uint8 RGB.
    boxes : mapping object id -> mapping slice -> xyxy
        Inclusive pixel boxes of the stack's slices (:mod:`napari_masam.prompts`; keyframes
        already interpolated). Boxes sticking out of the slice are cut to it; a box on a slice
        outside the stack or wholly outside its slice raises ValueError
        (:func:`napari_masam.prompts.check_boxes_in_stack`). Object ids are the label values.
    preset, device, stack_orientation, out, keep_labels, autocast, num_threads, window
        As :func:`iter_segment_automatic` (the same non-finite policy applies).
    cache : EmbeddingCache or None
        Embeddings of each slice are looked up here first and stored after encoding, so further
        boxes on the same stack run only the decoder.
    batch_size : int or None
        Groups (windows) encoded per forward pass.
    threshold : float
        Foreground probability above which a pixel belongs to an object.
    windows : {"centred", "tiled"}
        Which group of D slices each boxed slice is encoded in (see Notes). ``"centred"``
        (default) costs D slice encodes per boxed slice, ``"tiled"`` about one.
    points : mapping object id -> mapping slice -> sequence of (y, x, label), or None
        Point prompts (clicks) in stack pixels (row, col; pixel centres at integers), label
        1 = positive (part of the object), 0 = negative (not part of it); validated by
        :func:`napari_masam.prompts.check_points_in_stack`. A point belongs to its object's box
        on that slice (decoded together). Only models with ``supports_points`` take points
        (ValueError with the measured reason otherwise, before any work). Points on a slice
        where their object has no box are decoded alone (SAM's click-only prompt).

    Notes
    -----
    Group choice for D > 1 models. ``"centred"`` (default): slice ``z`` is encoded in the
    window centred on it (slices ``z - (D-1)//2 .. z + D//2``, replicate-padded at the stack
    ends, intensities normalised per group) -- the same window the automatic mode's stride-1
    pass runs, so its embeddings are shared through the cache -- and only the row of ``z`` is
    decoded with the box. It is the default because every slice then sees both its neighbours,
    as in the authors' training (a slice at the edge of a group is never the centre there).
    ``"tiled"``: the stack is cut into non-overlapping groups ``0..D-1, D..2D-1, ...`` in the
    model's slice order (stack order unless the orientation reverses the slice axis), the last
    one replicate-padded at the end as the automatic mode pads; each group holding a boxed
    slice is encoded once and every boxed slice is decoded from its row there, so N consecutive
    boxed slices cost about N slice encodes instead of N * D. Embeddings are cached per group
    row under the group's slice contents and the row, so a tiled group and the automatic or
    centred window with the same members share entries. The object probability is ``1 - p(background)`` (``sigmoid(x)`` for a binary
    ``[0, x]`` model), resampled bilinearly to the slice grid; where boxes of several objects
    overlap, the pixel goes to the object with the highest probability. Slices without a box are
    not yielded and stay 0 (``out`` keeps its contents there).

    Yields
    ------
    Progress
        One per slice with at least one box, in stack order.

    Returns
    -------
    SegmentationResult
    """
    import torch

    if windows not in BOX_WINDOWS:
        raise ValueError(f"windows must be one of {BOX_WINDOWS}, got {windows!r}.")
    t_start = time.perf_counter()
    eng = _start_engine(
        "boxes",
        model,
        stack,
        num_threads,
        preset=preset,
        device=device,
        cache=cache,
        stack_orientation=stack_orientation,
        batch_size=batch_size,
        autocast=autocast,
        window=window,
        same_slice_axis=True,
    )
    per_slice, clicks = _prompts_by_slice(model, boxes, points, eng.stack_shape)
    object_ids = tuple(sorted({oid for items in per_slice.values() for oid, _ in items}))
    dtype = label_dtype_for(max(object_ids, default=0))
    target = eng.labels_target(out, keep_labels, dtype)
    total = len(per_slice)
    depth, front, group = eng.depth, eng.front, eng.group
    # units: (padded window start, [(stack slice, row of that slice in the window), ...])
    units: list[tuple[int, list[tuple[int, int]]]] = []
    if windows == "centred":
        wanted = [front]
        for zs in per_slice:
            units.append((eng.transform.slice_to_model(zs, depth), [(zs, front)]))
    else:
        wanted = list(range(group))
        tiles: dict[int, list[tuple[int, int]]] = {}
        for zs in per_slice:
            z = eng.transform.slice_to_model(zs, depth)
            tiles.setdefault(z - z % group, []).append((zs, z % group))
        # padded start = tile start + front: members(start + front) = tile start .. + D - 1
        units = sorted(((t + front, items) for t, items in tiles.items()), key=lambda u: u[1][0])
    done = 0
    was_training = model.training
    if was_training:
        model.eval()
    try:
        for b in range(0, len(units), eng.batch_size):
            batch = [item for _, items in units[b : b + eng.batch_size] for item in items]
            groups = [eng.members(start) for start, _ in units[b : b + eng.batch_size]]
            # row of each boxed slice in the (len(groups) * len(wanted)) embeddings
            emb_rows = [
                j * len(wanted) + wanted.index(r)
                for j, (_, items) in enumerate(units[b : b + eng.batch_size])
                for _, r in items
            ]
            box_rows: list[np.ndarray | None] = []
            point_rows: list[np.ndarray | None] = []
            owners: list[int] = []
            for i, (zs, _) in enumerate(batch):
                for oid, box in per_slice[zs]:
                    box_rows.append(None if box is None else eng.box_to_model(box))
                    here = clicks.get(oid, {}).get(zs)
                    point_rows.append(eng.points_to_model(here) if here else None)
                    owners.append(emb_rows[i])
            with _torch_threads(num_threads), eng.compute():
                emb = eng.embeddings(groups, wanted)  # B * len(wanted) x E x g x g
                index = torch.as_tensor(owners, device=emb.device)
                if clicks:
                    logits = eng.decode_prompts(emb.index_select(0, index), box_rows, point_rows)
                else:
                    boxes_t = torch.from_numpy(np.stack(box_rows)).to(emb.device)  # type: ignore[arg-type]
                    logits = eng.decode(emb.index_select(0, index), boxes_t)  # N x C+1 x h x w
                fg = 1.0 - logits.float().softmax(dim=1)[:, :1]
                fg = probabilities_to_grid(fg, eng.info)[:, 0].cpu()  # N x Y x X
            for i, (zs, _) in enumerate(batch):
                rows = [k for k, o in enumerate(owners) if o == emb_rows[i]]
                ids = np.array([oid for oid, _ in per_slice[zs]])
                p = fg[rows]
                best, arg = p.max(dim=0)
                labels = np.where(best.numpy() > threshold, ids[arg.numpy()], 0).astype(dtype)
                labels = np.ascontiguousarray(eng.transform.inplane_from_model(labels))
                if target is not None:
                    target[zs] = labels
                done += 1
                yield Progress(done, total, time.perf_counter() - t_start, zs, labels, "boxes")
            following = units[b + eng.batch_size : b + 2 * eng.batch_size]
            eng.keep_only({m for start, _ in following for m in eng.members(start)})
    finally:
        if was_training:
            model.train()
    eng.timings["total_s"] = time.perf_counter() - t_start
    return SegmentationResult(
        labels=target,
        class_names=tuple(f"object {oid}" for oid in object_ids),
        class_colors=tuple(object_color(oid) for oid in object_ids),
        preset=eng.preset,
        model_name=model.metadata.name,
        mode="boxes",
        stride=None,
        timings=dict(eng.timings),
        preprocessing=eng.preprocessing(),
        object_ids=object_ids,
    )


# ----------------------------------------------------------------------------------------------
# Precompute
# ----------------------------------------------------------------------------------------------
def iter_precompute(
    model: SegmentationModel,
    stack: Any,
    cache: EmbeddingCache,
    *,
    slices: Sequence[int] | None = None,
    windows: str = "tiled",
    preset: str | IntensityPreset | None = None,
    device: Any = None,
    stack_orientation: str | None = None,
    batch_size: int | None = None,
    autocast: bool = True,
    num_threads: int | None = None,
    window: tuple[float, float] | None = None,
) -> Generator[Progress, None, dict[str, float]]:
    """Fill ``cache`` with the embeddings later box or propagation runs will ask for.

    Run it while the user looks at the image (the widget) or before a batch of prompts: later
    :func:`iter_segment_boxes` / :func:`~napari_masam.propagation.iter_propagate` runs with the
    same model, stack, preset and ``window`` then need the decoder only.

    Parameters
    ----------
    model : SegmentationModel
    stack : array-like
        (Z, Y, X) or (T, Y, X, 3), as for the other modes.
    cache : EmbeddingCache
        Where the rows go (e.g. ``session.cache``; a ``directory`` keeps them across sessions).
    slices : sequence of int or None
        Stack slices to cover (default: all).
    windows : {"tiled", "centred"}
        The groups to encode: ``"tiled"`` (what propagation and ``windows="tiled"`` box runs
        use; one encode per D slices) or ``"centred"`` (the default box windows; one encode per
        slice, of its centred group). Identical for D = 1 models.
    preset, device, stack_orientation, batch_size, autocast, num_threads, window
        As :func:`iter_segment_boxes`; they must match the later runs for the keys to match.

    Yields
    ------
    Progress
        ``stage="precompute"``, one per group encoded (``slice_index`` = its first stack slice,
        ``labels_slice`` None). Closing the generator keeps what was stored.

    Returns
    -------
    dict
        The engine timings (``windows_encoded``, ``cache_hits``, ``encode_s``, ``total_s``).
    """
    if windows not in BOX_WINDOWS:
        raise ValueError(f"windows must be one of {BOX_WINDOWS}, got {windows!r}.")
    t_start = time.perf_counter()
    eng = _start_engine(
        "boxes",
        model,
        stack,
        num_threads,
        preset=preset,
        device=device,
        cache=cache,
        stack_orientation=stack_orientation,
        batch_size=batch_size,
        autocast=autocast,
        window=window,
    )
    depth, group, front = eng.depth, eng.group, eng.front
    wanted = range(eng.stack_shape[0]) if slices is None else sorted({int(z) for z in slices})
    starts: list[int] = []  # padded window starts, in order
    for zs in wanted:
        if not 0 <= zs < eng.stack_shape[0]:
            raise ValueError(f"Slice {zs} is outside the stack's {eng.stack_shape[0]} slices.")
        z = eng.transform.slice_to_model(zs, depth) if eng.transform.keeps_slice_axis else zs
        start = (z - z % group + front) if windows == "tiled" else z
        if start not in starts:
            starts.append(start)
    rows = None if windows == "tiled" else [front]
    was_training = model.training
    if was_training:
        model.eval()
    try:
        for b in range(0, len(starts), eng.batch_size):
            batch = starts[b : b + eng.batch_size]
            groups = [eng.members(start) for start in batch]
            with _torch_threads(num_threads), eng.compute():
                eng.embeddings(groups, rows)
            eng.keep_only(set())
            for start in batch:
                first = eng.members(start)[0] if windows == "tiled" else start
                zs = (
                    eng.transform.slice_from_model(first, depth)
                    if eng.transform.keeps_slice_axis
                    else first
                )
                yield Progress(
                    starts.index(start) + 1,
                    len(starts),
                    time.perf_counter() - t_start,
                    zs,
                    None,
                    "precompute",
                )
    finally:
        if was_training:
            model.train()
    eng.timings["total_s"] = time.perf_counter() - t_start
    return dict(eng.timings)


def __getattr__(name: str) -> Any:
    # propagation builds on this module; re-exported lazily to avoid an import cycle
    if name in ("iter_propagate", "PropagationConfig"):
        from . import propagation

        return getattr(propagation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
