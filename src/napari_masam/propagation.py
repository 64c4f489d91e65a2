"""One prompt, the whole object: propagation of box/mask keyframes through slices and frames.

The same engine serves volumes (slices) and videos (frames), and every model kind: a model is
asked only for prompted masks of single slices (``encode`` + ``decode``; ``decode_scored`` where
the model scores its masks, ``decode`` with clicks on clicked keyframes), so LiteMedSAM
(D = 1) and 5-slice MA-SAM work alike; for D > 1 the stack is cut into non-overlapping groups of
D slices (the ``"tiled"`` windows of :func:`napari_masam.inference.iter_segment_boxes`) and each
group is encoded once, whichever walk needs it first; with an
:class:`~napari_masam.cache.EmbeddingCache` the rows are shared with box runs and with later
objects (a second object on the same stack costs decoder time only).

Algorithm (per object)
----------------------
1. **Keyframes** are the slices that carry a user prompt: a box (segmented with the model), clicks
   (with or without a box; decoded with them, for models with ``supports_points``) or a mask (a
   slice the user fixed with the brush, taken as is).
2. **Walks**: from every keyframe, one walk goes up and one goes down, slice by slice. The box
   of the next slice is the bounding box of the mask just found grown by
   :attr:`PropagationConfig.margin_px` / :attr:`~PropagationConfig.margin_fraction`
   (:func:`napari_masam.prompts.expand_box`). A walk ends at the next keyframe (exclusive), at
   the object's slice range (``slice_ranges``; never past it) or at the stack's end, or earlier
   when the **object ends** (:class:`PropagationConfig`): the mask's area drops below
   ``min_area_fraction`` x the area of the walk's keyframe mask (or below ``min_area_px``), or
   grows by more than ``max_growth`` x the previous slice's area in one step (a leak into a
   neighbouring structure), or (``min_overlap`` > 0) overlaps the previous slice's mask by
   less than that IoU (the walk jumped to something else). The slice where it ends and every
   slice after it get nothing from that walk. Options for harder cases: ``max_shrink_px``
   (the box may shrink only slowly, so one under-segmented slice does not make the walk
   collapse onto a part of the object) and ``follow_motion`` (video: the box moves with the
   object's velocity). The defaults and the measured alternatives are in
   ``benchmarks/propagation_realdata.py``.
3. **Between two keyframes** ``k1 < k2``: by default (``between_keyframes="select"``) a walk
   goes from each keyframe to the middle of the gap, and on every slice the model decodes both
   the walk's box (grown from the previous slice's mask) and the linear interpolation of the two
   keyframe boxes, keeping the mask whose predicted IoU (the model's IoU head,
   :meth:`~napari_masam.model.base.SegmentationModel.decode_scored`) is higher; no stop check
   applies inside a gap (the object goes on to the next keyframe). For a model without a trained
   IoU head, ``"select"`` is ``"interpolate"``: each slice is prompted with the interpolated box
   and walks only go outwards from the outermost keyframes. With ``"walk"`` both walks cover
   every slice; slice ``z`` takes the probability ``w1 * p1 + w2 * p2`` with inverse-distance
   weights ``w1 = (k2 - z) / (k2 - k1)``, ``w2 = (z - k1) / (k2 - k1)`` (a walk that ended
   before ``z`` contributes ``p = 0``). The weights change by ``1 / (k2 - k1)`` per slice, so
   there is no seam where the walks meet; next to a keyframe its own walk dominates.
4. **Labels**: pixels with probability > ``threshold``; where objects overlap, the most
   probable object wins (as in box mode).

Streaming and cancel: all walks advance in lockstep (one slice per walk and step, decoded in
one batch); a slice is final, written to the target and yielded as soon as no walk can still
reach it. Closing the generator keeps every slice yielded so far.

Correction loop: given the labels of an earlier run (``previous``) and the keyframes that
changed (``changed``: a redrawn box, or a brush-fixed mask marked as keyframe), only what
depends on them is recomputed: the changed keyframe itself, the gaps between it and its
neighbouring keyframes (both walks again, decoder only when the embeddings are cached) and,
beyond the outermost keyframe, the outward walk until its new mask equals the previous mask of
that object on a slice (from there on the walk would repeat itself: it is deterministic given
a slice's mask) or the object ends (then the object's older voxels beyond are removed). Every
other voxel of ``previous`` is kept bit for bit.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .io._common import label_dtype_for
from .prompts import check_boxes_in_stack, clip_box, expand_box, interpolate_keyframes, mask_box

if TYPE_CHECKING:
    import torch

    from .cache import EmbeddingCache
    from .inference import Progress, SegmentationResult, _Engine
    from .model.base import SegmentationModel
    from .preprocess import IntensityPreset

#: Probabilities below this are stored as 0 between walk steps (memory: only the region of an
#: object's probability map above it is kept per pending slice).
_PROB_FLOOR = 0.01


@dataclass(frozen=True)
class PropagationConfig:
    """How a walk derives the next prompt and decides that the object ended.

    The defaults were chosen on real data (``benchmarks/propagation_realdata.py``, Colin27 +
    AAL putamen, caudate, thalamus, hippocampus (left), embedded LiteMedSAM; second stop, with
    interpolated gaps): against plain
    walks blended between keyframes (``max_shrink_px=None, min_overlap=0, min_area_fraction=
    0.1, between_keyframes="walk"``) they raise the mean 3-D Dice of one box + propagation
    from 0.30 to 0.49 and of three keyframes + propagation from 0.36 to 0.60, and cut the
    leakage outside the structure's slices from up to 38 % to under 4 %. On all eight AAL
    structures and the ch2bet brain, ``between_keyframes="select"`` raised the mean Dice of
    three keyframes + propagation from 0.590 (``"interpolate"``) to 0.633 (brain 0.535 ->
    0.835; the eight structures -0.015 .. +0.078). Measured and left off by default:
    ``box_threshold=0.1`` (and 0.25) and ``candidate_thresholds`` let one-box walks run past
    the structure (leakage up to 0.37-0.44). For videos use
    ``margin_fraction=0.25, follow_motion=True, min_overlap=0.3`` (they act on the outward
    walks; "select" gaps between two boxed frames apply no motion shift and no stop check).

    Attributes
    ----------
    margin_px : float
        Each side of the next slice's box is the previous mask's bounding box moved out by
        ``max(margin_px, margin_fraction * side)`` pixels.
    margin_fraction : float
        See ``margin_px`` (fraction of the box's width/height).
    min_area_fraction : float
        The object ended when a slice's mask has fewer pixels than this fraction of the walk's
        keyframe mask.
    min_area_px : int
        ... or fewer than this many pixels (absolute floor; an empty mask always ends a walk).
    max_growth : float
        The walk ended (leaked) when a slice's mask has more than ``max_growth`` times the
        pixels of the previous slice's mask.
    max_shrink_px : float or None
        Each side of the next box moves inward by at most this many pixels per slice (outward
        it follows the mask freely); None: the box is the grown mask box. Keeps a walk from
        collapsing onto a part of the object when the model under-segments one slice.
    follow_motion : bool
        Shift the next box by the displacement of the mask's centroid over the last step
        (constant-velocity prediction), for objects that move between frames.
    min_overlap : float
        The walk ended (jumped to something else) when the IoU of a slice's mask with the
        previous slice's mask (shifted by the predicted motion with ``follow_motion``) is below
        this; 0 disables the check.
    between_keyframes : {"select", "interpolate", "walk"}
        Between two keyframes: ``"select"`` (a walk from each keyframe to the middle of the
        gap, each slice keeping the better-scored of the walk's box and the interpolated box;
        ``"interpolate"`` for a model without ``predicts_iou``), ``"interpolate"`` (each slice
        prompted with the linear interpolation of the two keyframe boxes, a mask keyframe
        counting as its bounding box; walks only go outwards from the outermost keyframes) or
        ``"walk"`` (both walks over the whole gap, blended by distance).
    box_threshold : float or None
        The next box is grown from the pixels whose probability exceeds this (None: the mask
        itself, i.e. the run's ``threshold``). A value below the mask threshold counters a
        model that under-segments inside its box (the box would otherwise shrink slice after
        slice); the walk's mask, its stop checks and the labels keep the run's threshold.
    candidate_thresholds : tuple of float
        With a model that scores its masks (``predicts_iou``), each step of an outward walk
        also decodes the boxes grown from the pixels above each of these probabilities and
        keeps the mask with the highest predicted IoU (empty: one box per step).
    """

    margin_px: float = 2.0
    margin_fraction: float = 0.0
    min_area_fraction: float = 0.3
    min_area_px: int = 4
    max_growth: float = 3.0
    max_shrink_px: float | None = 1.0
    follow_motion: bool = False
    min_overlap: float = 0.6
    between_keyframes: str = "select"
    box_threshold: float | None = None
    candidate_thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.margin_px < 0 or self.margin_fraction < 0:
            raise ValueError(
                f"Margins must be >= 0, got {self.margin_px} px / {self.margin_fraction}."
            )
        if not 0 <= self.min_area_fraction < 1:
            raise ValueError(f"min_area_fraction must be in [0, 1), got {self.min_area_fraction}.")
        if self.min_area_px < 1:
            raise ValueError(f"min_area_px must be >= 1, got {self.min_area_px}.")
        if not self.max_growth > 1:
            raise ValueError(f"max_growth must be > 1, got {self.max_growth}.")
        if self.between_keyframes not in ("walk", "interpolate", "select"):
            raise ValueError(
                "between_keyframes must be 'walk', 'interpolate' or 'select', got "
                f"{self.between_keyframes!r}."
            )
        if not 0 <= self.min_overlap < 1:
            raise ValueError(f"min_overlap must be in [0, 1), got {self.min_overlap}.")
        if any(not 0 < t < 1 for t in self.candidate_thresholds):
            raise ValueError(
                f"candidate_thresholds must lie in (0, 1), got {self.candidate_thresholds}."
            )
        if self.box_threshold is not None and not 0 < self.box_threshold < 1:
            raise ValueError(f"box_threshold must be in (0, 1) or None, got {self.box_threshold}.")
        if self.max_shrink_px is not None and self.max_shrink_px < 0:
            raise ValueError(f"max_shrink_px must be >= 0 or None, got {self.max_shrink_px}.")

    def next_box(
        self,
        mask_yx: np.ndarray,
        previous_box: Sequence[float] | None,
        shift_yx: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[int, int, int, int] | None:
        """The prompt of the next slice from the mask just found (None for an empty mask).

        ``shift_yx``: predicted motion (rows, columns) added to the box (``follow_motion``)."""
        box = mask_box(mask_yx)
        if box is None:
            return None
        dy, dx = shift_yx if self.follow_motion else (0.0, 0.0)
        moved = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
        try:
            grown = expand_box(
                moved,
                mask_yx.shape,
                margin_px=self.margin_px,
                margin_fraction=self.margin_fraction,
            )
        except ValueError:  # predicted to leave the image
            return None
        if self.max_shrink_px is None or previous_box is None:
            return grown
        s = float(self.max_shrink_px)
        px0, py0, px1, py1 = (float(v) for v in previous_box)
        px0, px1, py0, py1 = px0 + dx, px1 + dx, py0 + dy, py1 + dy
        return clip_box(
            (
                min(grown[0], px0 + s),
                min(grown[1], py0 + s),
                max(grown[2], px1 - s),
                max(grown[3], py1 - s),
            ),
            mask_yx.shape,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (results' ``preprocessing["propagation"]``)."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Internal records
# ----------------------------------------------------------------------------------------------
_KEEP = "keep"  # contribution marker: the object's previous voxels stay on this slice


@dataclass
class _Crop:
    """A probability map stored as its bounding region above :data:`_PROB_FLOOR` (float16)."""

    y0: int
    x0: int
    values: np.ndarray  # h x w float16

    @classmethod
    def of(cls, prob: np.ndarray) -> _Crop | None:
        box = mask_box(prob > _PROB_FLOOR)
        if box is None:
            return None
        x0, y0, x1, y1 = box
        return cls(y0, x0, prob[y0 : y1 + 1, x0 : x1 + 1].astype(np.float16))

    def add_into(self, full: np.ndarray, weight: float) -> None:
        h, w = self.values.shape
        full[self.y0 : self.y0 + h, self.x0 : self.x0 + w] += weight * self.values.astype(
            np.float32
        )


@dataclass
class _Walk:
    oid: int
    origin: int
    step: int  # +1 up, -1 down (stack slice order)
    pos: int  # next slice to visit
    limit: int  # last slice it may visit (inclusive)
    gap: tuple[int, int] | None  # (k1, k2) when it walks between two keyframes
    compare: bool  # correction mode outer walk: stop where the mask equals the previous one
    box: tuple[int, int, int, int] | None = None
    ref_area: int = 0
    prev_area: int = 0
    centroid: tuple[float, float] | None = None
    shift: tuple[float, float] = (0.0, 0.0)
    mask: np.ndarray | None = None  # previous slice's mask (min_overlap only)
    active: bool = True
    select: bool = False  # gap walk of "select": best of its box and the interpolated box
    alternatives: list[Any] = field(default_factory=list)  # candidate_thresholds boxes

    def weight(self, z: int) -> float:
        if self.gap is None:
            return 1.0
        k1, k2 = self.gap
        near_other = (k2 - z) if self.origin == k1 else (z - k1)
        return near_other / (k2 - k1)

    def remaining(self) -> range:
        return range(self.pos, self.limit + self.step, self.step)


@dataclass
class _SliceState:
    """What is still expected / already known for one slice."""

    expected: dict[int, int] = field(default_factory=dict)  # oid -> contributions expected
    parts: dict[int, list[tuple[float, Any]]] = field(default_factory=dict)  # oid -> (w, crop)
    written: bool = False  # at least one object will be (re)written here

    def pending(self) -> int:
        return sum(n - len(self.parts.get(oid, ())) for oid, n in self.expected.items())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _shifted(mask: np.ndarray, shift_yx: tuple[float, float]) -> np.ndarray:
    """``mask`` moved by the rounded (rows, cols) shift, zeros where it comes from outside."""
    dy, dx = (round(float(v)) for v in shift_yx)
    if dy == 0 and dx == 0:
        return mask
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------
def _keyframes(
    boxes: Mapping[int, Mapping[int, Sequence[float]]],
    masks: Mapping[int, Mapping[int, np.ndarray]] | None,
    stack_shape: tuple[int, int, int],
) -> dict[int, dict[int, Any]]:
    """oid -> {slice: ("box", xyxy) | ("mask", (Y, X) bool)}; masks win over boxes (clicked
    slices become ``("prompted", (probability, box or None))`` in
    :meth:`_PropagationRun.resolve_points`)."""
    out: dict[int, dict[int, Any]] = {}
    for oid, per in check_boxes_in_stack(boxes, stack_shape).items():
        for z, b in per.items():
            out.setdefault(oid, {})[z] = ("box", b)
    for oid, per in (masks or {}).items():
        oid = int(oid)
        if oid < 1:
            raise ValueError(f"Object ids must be positive integers, got {oid}.")
        for z, m in per.items():
            z = int(z)
            if not 0 <= z < stack_shape[0]:
                raise ValueError(
                    f"Object {oid} has a mask keyframe on slice {z}, outside the stack's "
                    f"{stack_shape[0]} slices."
                )
            arr = np.asarray(m)
            if arr.shape != tuple(stack_shape[1:]):
                raise ValueError(
                    f"Object {oid}, slice {z}: a mask keyframe must be (Y, X) = "
                    f"{tuple(stack_shape[1:])}, got {arr.shape}."
                )
            out.setdefault(oid, {})[z] = ("mask", arr.astype(bool))
    return {oid: dict(sorted(per.items())) for oid, per in sorted(out.items())}


def _keyframe_box(kind: str, value: Any, threshold: float) -> tuple[int, int, int, int] | None:
    """The box a keyframe stands for in interpolation: the user's box, else its mask's box."""
    if kind == "box":
        return value
    if kind == "prompted":
        prob, box = value
        return box if box is not None else mask_box(prob > threshold)
    return mask_box(value)


def _object_range(
    oid: int, keys: Sequence[int], slice_ranges: Mapping[int, Sequence[int]] | None, depth: int
) -> tuple[int, int]:
    rng = None if slice_ranges is None else slice_ranges.get(oid)
    if rng is None:
        return 0, depth - 1
    first, last = (int(v) for v in rng)
    first, last = min(first, last), max(first, last)
    first, last = max(first, 0), min(last, depth - 1)
    outside = [k for k in keys if not first <= k <= last]
    if outside:
        raise ValueError(
            f"Object {oid}: keyframes on slices {outside} lie outside its slice range "
            f"{first}..{last}; widen the range or remove those prompts."
        )
    return first, last


def _plan(
    keys: Sequence[int],
    first: int,
    last: int,
    changed: set[int] | None,
    oid: int,
    gap_mode: str = "walk",
) -> tuple[list[int], list[_Walk], set[int], list[int]]:
    """Seeds to compute, walks to run, keyframes to (re)write and gap slices to segment with
    interpolated boxes (``gap_mode`` "interpolate") for one object; "select" gaps get one
    walk from each keyframe up to the middle of the gap.

    ``changed`` None: a fresh run (every keyframe, gap and outer walk)."""
    keys = sorted(keys)
    fresh = changed is None
    changed = set(keys) if fresh else {k for k in changed if k in keys}
    walks: list[_Walk] = []
    seeds: set[int] = set(changed)
    if keys[0] in changed and keys[0] > first:
        walks.append(_Walk(oid, keys[0], -1, keys[0] - 1, first, None, not fresh))
    if keys[-1] in changed and keys[-1] < last:
        walks.append(_Walk(oid, keys[-1], +1, keys[-1] + 1, last, None, not fresh))
    gaps: list[int] = []
    for k1, k2 in itertools.pairwise(keys):
        if k2 - k1 < 2 or not (k1 in changed or k2 in changed):
            continue
        if gap_mode == "interpolate":
            gaps += range(k1 + 1, k2)
            continue
        seeds |= {k1, k2}
        if gap_mode == "select":
            half = (k1 + k2) // 2
            walks.append(_Walk(oid, k1, +1, k1 + 1, half, None, False, select=True))
            if half + 1 <= k2 - 1:
                walks.append(_Walk(oid, k2, -1, k2 - 1, half + 1, None, False, select=True))
            continue
        walks.append(_Walk(oid, k1, +1, k1 + 1, k2 - 1, (k1, k2), False))
        walks.append(_Walk(oid, k2, -1, k2 - 1, k1 + 1, (k1, k2), False))
    return sorted(seeds), walks, set(changed), gaps


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class _Embeddings:
    """Tiled-group embeddings by oriented slice: each group of D slices encoded once per run
    (kept while walks need it; the run's cache, if any, keeps rows for later runs)."""

    def __init__(self, eng: _Engine) -> None:
        self.eng = eng
        self._tiles: OrderedDict[int, torch.Tensor] = OrderedDict()

    def rows(self, stack_slices: Sequence[int], keep: int) -> torch.Tensor:
        """(N, E, g, g) embeddings of the given stack slices (encoding missing groups)."""
        import torch

        eng = self.eng
        oriented = [eng.transform.slice_to_model(z, eng.depth) for z in stack_slices]
        tiles = sorted({z - z % eng.group for z in oriented})
        missing = [t for t in tiles if t not in self._tiles]
        for b in range(0, len(missing), eng.batch_size):
            batch = missing[b : b + eng.batch_size]
            emb = eng.embeddings([eng.members(t + eng.front) for t in batch], None)
            emb = emb.reshape(len(batch), eng.group, *emb.shape[1:])
            for j, t in enumerate(batch):
                self._tiles[t] = emb[j]
        for t in tiles:
            self._tiles.move_to_end(t)
        while len(self._tiles) > max(keep, len(tiles)):
            self._tiles.popitem(last=False)
        eng.keep_only(
            {m for t in self._tiles for m in eng.members(t + eng.front)}
        )  # prepared slices of live groups only
        return torch.stack([self._tiles[z - z % eng.group][z % eng.group] for z in oriented])


def _decode(
    eng: _Engine,
    emb: _Embeddings,
    jobs: Sequence[tuple[int, tuple[int, int, int, int]]],
    keep: int,
    scored: bool = False,
) -> Any:
    """Foreground probabilities (N, Y, X) float32 on the stack grid of (slice, box) jobs;
    ``scored``: also the model's predicted IoU (N,) or None (``(probs, scores)``)."""
    import torch

    from .preprocess import probabilities_to_grid

    if not jobs:
        empty = np.zeros((0, *eng.stack_shape[1:]), np.float32)
        return (empty, None) if scored else empty
    rows = emb.rows([z for z, _ in jobs], keep)
    boxes = torch.from_numpy(np.stack([eng.box_to_model(b) for _, b in jobs])).to(rows.device)
    scores = None
    if scored:
        logits, scores_t = eng.decode_scored(rows, boxes)
        scores = None if scores_t is None else scores_t.float().cpu().numpy()
    else:
        logits = eng.decode(rows, boxes)  # N x C+1 x h x w
    fg = 1.0 - logits.float().softmax(dim=1)[:, :1]
    fg = probabilities_to_grid(fg, eng.info)[:, 0].cpu().numpy()  # N x Y x X (oriented)
    probs = np.stack([np.ascontiguousarray(eng.transform.inplane_from_model(p)) for p in fg])
    return (probs, scores) if scored else probs


def _decode_prompted(
    eng: _Engine, emb: _Embeddings, jobs: Sequence[tuple[int, int, Any, list]], keep: int
) -> np.ndarray:
    """Foreground probabilities (N, Y, X) of (object, slice, box or None, clicks) jobs."""
    from .preprocess import probabilities_to_grid

    rows = emb.rows([z for _, z, _, _ in jobs], keep)
    boxes = [None if box is None else eng.box_to_model(box) for _, _, box, _ in jobs]
    points = [eng.points_to_model(pts) for _, _, _, pts in jobs]
    logits = eng.decode_prompts(rows, boxes, points)
    fg = 1.0 - logits.float().softmax(dim=1)[:, :1]
    fg = probabilities_to_grid(fg, eng.info)[:, 0].cpu().numpy()
    return np.stack([np.ascontiguousarray(eng.transform.inplane_from_model(p)) for p in fg])


def _checked_points(
    model: SegmentationModel,
    points: Mapping[int, Mapping[int, Sequence[Sequence[float]]]] | None,
    stack_shape: tuple[int, int, int],
) -> dict[int, dict[int, list]]:
    """The validated clicks (object -> slice -> [(y, x, label)]); ValueError for a model
    without point prompts (:func:`napari_masam.model.base.points_refusal`) or bad points
    (:func:`napari_masam.prompts.check_points_in_stack`)."""
    if not points:
        return {}
    from .model.base import points_refusal
    from .prompts import check_points_in_stack

    clicks = check_points_in_stack(points, stack_shape)
    if clicks and not getattr(model, "supports_points", False):
        raise ValueError(points_refusal(model))
    return {oid: dict(frames) for oid, frames in clicks.items() if frames}


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def _checked_previous(previous: Any, stack_shape: tuple[int, int, int]) -> np.ndarray | None:
    """``previous`` as an array of the stack's shape (ValueError otherwise), or None."""
    if previous is None:
        return None
    previous = np.asarray(previous)
    if previous.shape != stack_shape:
        raise ValueError(f"previous labels have shape {previous.shape}, expected {stack_shape}.")
    return previous


class _PropagationRun:
    """The state of one :func:`iter_propagate` run: the engine, the per-object walks, the
    contributions each pending slice still waits for, the labels target and the finished-slice
    bookkeeping. :func:`iter_propagate` drives it: :meth:`plan`, :meth:`open_target`,
    :meth:`seed`, then :meth:`step` until no walk is active, yielding :meth:`finished` after
    each phase, and :meth:`result` at the end."""

    def __init__(
        self,
        eng: _Engine,
        keyframes: dict[int, dict[int, Any]],
        config: PropagationConfig,
        previous: np.ndarray | None,
        threshold: float,
        t_start: float,
    ) -> None:
        self.eng = eng
        self.keyframes = keyframes
        self.config = config
        self.previous = previous
        self.thr = float(threshold)
        self.t_start = t_start
        self.shape_yx = eng.stack_shape[1:]
        self.seeds: list[tuple[int, int]] = []  # (oid, slice)
        self.walks: list[_Walk] = []
        self.states: dict[int, _SliceState] = {}
        self.rewrite: dict[int, set[int]] = {}  # oid -> keyframes (re)written
        self.gap_jobs: list[tuple[int, int, tuple[int, int, int, int]]] = []  # interpolated
        self.gap_empty: list[tuple[int, int]] = []
        self.completed: list[int] = []  # slices whose every expected contribution arrived
        self.done = 0
        self.total = 0
        self.keep_tiles = 2
        self.dtype: Any = None
        self.target: Any = None
        self.emb = _Embeddings(eng)
        self.changed_sets: dict[int, set[int]] | None = None  # oid -> changed keyframes
        self.interp: dict[int, dict[int, Any]] = {}  # oid -> slice -> interpolated box

    @classmethod
    def start(
        cls,
        model: SegmentationModel,
        stack: Any,
        boxes: Mapping[int, Mapping[int, Sequence[float]]],
        masks: Mapping[int, Mapping[int, np.ndarray]] | None,
        previous: Any,
        changed: Mapping[int, Sequence[int]] | None,
        config: PropagationConfig | None,
        threshold: float,
        num_threads: int | None,
        points: Mapping[int, Mapping[int, Sequence[Sequence[float]]]] | None = None,
        **engine_options: Any,
    ) -> _PropagationRun:
        """Check the arguments, start the engine and read the keyframes (ValueError as
        documented in :func:`iter_propagate`)."""
        from .inference import _start_engine

        if changed is not None and previous is None:
            raise ValueError("changed keyframes need the previous labels (previous=...).")
        config = PropagationConfig() if config is None else config
        t_start = time.perf_counter()
        eng = _start_engine(
            "propagate", model, stack, num_threads, same_slice_axis=True, **engine_options
        )
        keyframes = _keyframes(boxes, masks, eng.stack_shape)
        clicks = _checked_points(model, points, eng.stack_shape)
        run = cls(
            eng, keyframes, config, _checked_previous(previous, eng.stack_shape), threshold, t_start
        )
        run.changed_sets = (
            None if changed is None else {int(o): {int(z) for z in zs} for o, zs in changed.items()}
        )
        run.resolve_points(clicks, num_threads)
        return run

    def resolve_points(
        self, clicks: Mapping[int, Mapping[int, list]], num_threads: int | None
    ) -> None:
        """Decode every keyframe slice that carries clicks (with its box, if any) and make it a
        ``("prompted", (probability, box or None))`` keyframe; a mask keyframe on the same slice
        wins (the user's pixels are final). Slices of an object whose clicks are its only
        prompt there become keyframes."""
        from .inference import _torch_threads

        jobs: list[tuple[int, int, Any, list]] = []
        for oid, frames in clicks.items():
            for z, pts in frames.items():
                kind, value = self.keyframes.get(oid, {}).get(z, ("box", None))
                if kind == "mask":
                    continue
                jobs.append((oid, z, value, pts))
        if not jobs:
            return
        eng = self.eng
        n = max(1, eng.batch_size)
        with _torch_threads(num_threads), eng.compute():
            for b in range(0, len(jobs), n):
                chunk = jobs[b : b + n]
                probs = _decode_prompted(eng, self.emb, chunk, self.keep_tiles)
                eng.timings["decoded"] = eng.timings.get("decoded", 0) + len(chunk)
                for (oid, z, box, _), prob in zip(chunk, probs, strict=True):
                    self.keyframes.setdefault(oid, {})[z] = ("prompted", (prob, box))
        self.keyframes = {
            oid: dict(sorted(per.items())) for oid, per in sorted(self.keyframes.items())
        }

    # -- plan -----------------------------------------------------------------------------------
    def _expect(self, oid: int, z: int, written: bool) -> None:
        st = self.states.setdefault(z, _SliceState())
        st.expected[oid] = st.expected.get(oid, 0) + 1
        if written:
            st.written = True

    def _plan_gaps(self, oid: int, per: Mapping[int, Any], gaps: Sequence[int]) -> None:
        """Interpolated-box jobs for the gap slices of one object (``interpolate`` mode)."""
        interpolated = self._interpolated(oid, per)
        for z in gaps:
            if z in interpolated:
                self.gap_jobs.append((oid, z, interpolated[z]))
            else:  # next to an empty mask keyframe: nothing to interpolate from
                self.gap_empty.append((oid, z))
            self._expect(oid, z, True)

    def _interpolated(self, oid: int, per: Mapping[int, Any]) -> dict[int, Any]:
        """The keyframe boxes of one object interpolated over its gaps (cached per object)."""
        if oid not in self.interp:
            key_boxes = {z: _keyframe_box(kind, v, self.thr) for z, (kind, v) in per.items()}
            out: dict[int, Any] = {z: b for z, b in key_boxes.items() if b is not None}
            # pair by pair: never across a keyframe whose mask is empty (the object is absent
            # there, nothing to interpolate from)
            for z1, z2 in itertools.pairwise(sorted(key_boxes)):
                if key_boxes[z1] is not None and key_boxes[z2] is not None:
                    out.update(interpolate_keyframes({z1: key_boxes[z1], z2: key_boxes[z2]}))
            self.interp[oid] = out
        return self.interp[oid]

    def gap_mode(self) -> str:
        """``between_keyframes``; "select" needs a model that predicts its masks' IoU, else
        it is "interpolate"."""
        mode = self.config.between_keyframes
        if mode == "select" and not self.scores_masks:
            return "interpolate"
        return mode

    def plan(self, slice_ranges: Mapping[int, Sequence[int]] | None) -> None:
        """Seeds, walks and expected contributions of every object to (re)compute."""
        depth, changed_sets = self.eng.stack_shape[0], self.changed_sets
        gap_mode = self.gap_mode()
        for oid, per in self.keyframes.items():
            if changed_sets is not None and oid not in changed_sets:
                continue
            first, last = _object_range(oid, list(per), slice_ranges, depth)
            s, w, kf, gaps = _plan(
                list(per),
                first,
                last,
                None if changed_sets is None else changed_sets[oid],
                oid,
                gap_mode,
            )
            if any(walk.select for walk in w):
                self._interpolated(oid, per)
            self.seeds += [(oid, z) for z in s]
            self.walks += w
            self.rewrite[oid] = kf
            if gaps:
                self._plan_gaps(oid, per, gaps)
            for z in kf:
                self._expect(oid, z, True)
            for walk in w:
                for z in walk.remaining():
                    self._expect(oid, z, False)

    def open_target(self, out: Any, keep_labels: bool) -> None:
        """The labels target (dtype for every object id) and the run's counters."""
        previous = self.previous
        prev_max = 0 if previous is None else int(previous.max(initial=0))
        self.dtype = label_dtype_for(max(max(self.rewrite, default=0), prev_max))
        if previous is not None and out is None:
            self.target = (
                previous.astype(np.promote_types(previous.dtype, self.dtype))
                if keep_labels
                else None
            )
        else:
            self.target = self.eng.labels_target(out, keep_labels, self.dtype)
        self.total = len(self.states)
        self.keep_tiles = 2 * max(1, len(self.walks)) + 2
        self.eng.timings.setdefault("decoded", 0)  # keyframes decoded with clicks count

    # -- contributions --------------------------------------------------------------------------
    def contribute(self, oid: int, z: int, weight: float, crop: Any) -> None:
        st = self.states.get(z)
        if st is None or oid not in st.expected:
            return
        st.parts.setdefault(oid, []).append((weight, crop))
        if st.pending() == 0:
            self.completed.append(z)

    def end_walk(self, walk: _Walk, marker: Any) -> None:
        """Close a walk: its remaining slices (from ``pos``) get ``marker`` (None: nothing from
        this walk; _KEEP: the object's previous voxels stay)."""
        for z in walk.remaining():
            self.contribute(walk.oid, z, walk.weight(z), marker)
        walk.active = False

    def _decode(
        self, jobs: Sequence[tuple[int, tuple[int, int, int, int]]], scored: bool = False
    ) -> Any:
        return _decode(self.eng, self.emb, jobs, self.keep_tiles, scored)

    # -- keyframes ------------------------------------------------------------------------------
    def seed(self, num_threads: int | None) -> None:
        """Keyframe masks (boxes decoded, masks as they are), interpolated gaps, walk starts."""
        from .inference import _torch_threads

        eng, keyframes = self.eng, self.keyframes
        seed_masks: dict[tuple[int, int], np.ndarray] = {}
        box_jobs = [(oid, z) for oid, z in self.seeds if keyframes[oid][z][0] == "box"]
        n = max(1, eng.batch_size)
        with _torch_threads(num_threads), eng.compute():
            for b in range(0, len(box_jobs), n):
                chunk = box_jobs[b : b + n]
                p = self._decode([(z, keyframes[o][z][1]) for o, z in chunk])
                eng.timings["decoded"] += len(chunk)
                for (oid, z), pz in zip(chunk, p, strict=True):
                    seed_masks[(oid, z)] = pz
            for b in range(0, len(self.gap_jobs), n):
                chunk_g = self.gap_jobs[b : b + n]
                p = self._decode([(z, box) for _, z, box in chunk_g])
                eng.timings["decoded"] += len(chunk_g)
                for (oid, z, _), pz in zip(chunk_g, p, strict=True):
                    self.contribute(oid, z, 1.0, _Crop.of(pz))
        for oid, z in self.gap_empty:
            self.contribute(oid, z, 1.0, None)
        for oid, z in self.seeds:
            kind, value = keyframes[oid][z]
            if kind == "mask":
                prob = value.astype(np.float32)
            elif kind == "prompted":
                prob = value[0]
            else:
                prob = seed_masks[(oid, z)]
            seed_masks[(oid, z)] = prob
            if z in self.rewrite[oid]:
                self.contribute(oid, z, 1.0, _Crop.of(prob))
        for walk in self.walks:
            self._start_walk(walk, seed_masks[(walk.oid, walk.origin)])

    @property
    def scores_masks(self) -> bool:
        """Whether the model scores its masks (:attr:`SegmentationModel.predicts_iou`)."""
        return bool(getattr(self.eng.model, "predicts_iou", False))

    def _alternatives(
        self,
        prob: np.ndarray,
        box: Any,
        previous_box: Any,
        shift: tuple[float, float],
    ) -> list[Any]:
        """The ``candidate_thresholds`` boxes of the next step (distinct, other than ``box``)."""
        if box is None or not self.scores_masks:
            return []
        out: list[Any] = []
        for t in self.config.candidate_thresholds:
            alt = self.config.next_box(prob > t, previous_box, shift)
            if alt is not None and alt != box and alt not in out:
                out.append(alt)
        return out

    def _box_mask(self, prob: np.ndarray, m: np.ndarray) -> np.ndarray:
        """The pixels the next box is grown from (``box_threshold``; default the mask)."""
        bt = self.config.box_threshold
        return m if bt is None or bt == self.thr else prob > bt

    def _start_walk(self, walk: _Walk, prob: np.ndarray) -> None:
        """Reference area, centroid and first box of a walk from its keyframe's probability."""
        config = self.config
        m = prob > self.thr
        area = int(m.sum())
        box = mask_box(m)
        if box is None or area < config.min_area_px:
            if walk.select:  # the interpolated boxes still reach the gap's slices
                walk.box = None
                return
            self.end_walk(walk, None)
            return
        walk.ref_area = walk.prev_area = area
        walk.centroid = _centroid(m)
        walk.mask = m if config.min_overlap > 0 else None
        kind, value = self.keyframes[walk.oid][walk.origin]
        user_box = value if kind == "box" else value[1] if kind == "prompted" else None
        walk.box = config.next_box(self._box_mask(prob, m), user_box)
        if not walk.select:
            walk.alternatives = self._alternatives(prob, walk.box, user_box, (0.0, 0.0))
        if walk.box is None and not walk.select:
            self.end_walk(walk, None)

    # -- lockstep walks -------------------------------------------------------------------------
    def step(self, num_threads: int | None) -> bool:
        """Advance every active walk by one slice (one decoder batch); False when none is."""
        from .inference import _torch_threads

        active = [w for w in self.walks if w.active]
        if not active:
            return False
        jobs: list[tuple[int, Any]] = []
        owner: list[int] = []  # index into active of each job
        for i, w in enumerate(active):
            if w.box is not None:
                jobs.append((w.pos, w.box))
                owner.append(i)
            guess = self.interp.get(w.oid, {}).get(w.pos) if w.select else None
            if guess is not None and guess != w.box:
                jobs.append((w.pos, guess))
                owner.append(i)
            for alt in w.alternatives if self.scores_masks else ():
                jobs.append((w.pos, alt))
                owner.append(i)
        scored = any(w.select or w.alternatives for w in active) and self.scores_masks
        with _torch_threads(num_threads), self.eng.compute():
            probs, scores = (
                self._decode(jobs, scored=True) if scored else (self._decode(jobs), None)
            )
        self.eng.timings["decoded"] += len(jobs)
        for i, walk in enumerate(active):
            mine = [j for j, o in enumerate(owner) if o == i]
            if not mine:  # a select walk with neither a mask box nor an interpolated box
                self.end_walk(walk, None)
                continue
            if scores is not None:
                best = max(mine, key=lambda j: scores[j])
            else:  # no scores: a select walk takes the interpolated box (the "interpolate" rule)
                best = mine[-1] if walk.select else mine[0]
            walk.box = jobs[best][1]  # the box actually used: the next one grows from it
            if walk.select:
                self._advance_select(walk, probs[best])
            else:
                self._advance(walk, probs[best])
        return True

    def _advance_select(self, walk: _Walk, prob: np.ndarray) -> None:
        """A "select" gap walk's step: the chosen mask is the slice's, no stop check (the
        object goes on to the next keyframe); the next box is grown from it."""
        self.contribute(walk.oid, walk.pos, 1.0, _Crop.of(prob))
        m = prob > self.thr
        walk.pos += walk.step
        if (walk.pos - walk.limit) * walk.step > 0:
            walk.active = False
            return
        walk.box = (
            self.config.next_box(self._box_mask(prob, m), walk.box)
            if m.sum() >= self.config.min_area_px
            else None
        )

    def _stop_marker(self, walk: _Walk, m: np.ndarray, area: int) -> tuple[bool, Any]:
        """Whether the walk ends on its current slice given its mask ``m`` there, and the
        marker its remaining slices get (None or _KEEP)."""
        config = self.config
        floor = max(config.min_area_px, config.min_area_fraction * walk.ref_area)
        if area < floor or area > config.max_growth * walk.prev_area:
            return True, None
        if (
            walk.mask is not None
            and _iou(_shifted(walk.mask, walk.shift if config.follow_motion else (0.0, 0.0)), m)
            < config.min_overlap
        ):
            return True, None
        if (
            walk.compare
            and self.previous is not None
            and np.array_equal(m, np.asarray(self.previous[walk.pos]) == walk.oid)
        ):
            return True, _KEEP
        return False, None

    def _advance(self, walk: _Walk, prob: np.ndarray) -> None:
        """One walk's step: stop, or contribute ``prob`` and move the box to the next slice."""
        z = walk.pos
        m = prob > self.thr
        area = int(m.sum())
        stop, marker = self._stop_marker(walk, m, area)
        if stop:
            self.end_walk(walk, marker)
            return
        self.contribute(walk.oid, z, walk.weight(z), _Crop.of(prob))
        walk.prev_area = area
        c = _centroid(m)
        shift = (0.0, 0.0)
        if walk.centroid is not None:
            shift = (c[0] - walk.centroid[0], c[1] - walk.centroid[1])
        walk.centroid = c
        walk.shift = shift
        if walk.mask is not None:
            walk.mask = m
        walk.pos += walk.step
        previous_box = walk.box
        walk.box = self.config.next_box(self._box_mask(prob, m), previous_box, shift)
        walk.alternatives = self._alternatives(prob, walk.box, previous_box, shift)
        if (walk.pos - walk.limit) * walk.step > 0:
            walk.active = False
        elif walk.box is None:  # the object is predicted to leave the image
            self.end_walk(walk, None)

    # -- finished slices ------------------------------------------------------------------------
    def finished(self) -> Generator[Progress, None, None]:
        """Combine, write and report every slice whose contributions all arrived."""
        ready = sorted(self.completed)
        self.completed.clear()
        for z in ready:
            self.done += 1
            yield self._finish(z)

    def _previous_slice(self, z: int) -> np.ndarray:
        if self.previous is not None:
            return np.asarray(self.previous[z])
        return np.zeros(self.shape_yx, self.dtype)

    def _combine(self, st: _SliceState, labels: np.ndarray) -> None:
        """Weighted walk probabilities per object into ``labels`` (in place): the object's old
        voxels are cleared, the most probable object above the threshold wins a free pixel."""
        probs: list[np.ndarray] = []
        ids: list[int] = []
        for oid, parts in st.parts.items():
            if any(c is _KEEP for _, c in parts):
                continue  # the walk reached the previous result: this object is unchanged here
            labels[labels == oid] = 0
            full = np.zeros(self.shape_yx, np.float32)
            for weight, crop in parts:
                if crop is not None:
                    crop.add_into(full, weight)
            probs.append(full)
            ids.append(oid)
        if probs:
            p = np.stack(probs)
            best = p.max(axis=0)
            winner = np.asarray(ids)[p.argmax(axis=0)]
            free = labels == 0
            labels[free & (best > self.thr)] = winner[free & (best > self.thr)]

    def _finish(self, z: int) -> Progress:
        from .inference import Progress

        st = self.states.pop(z)
        base = self._previous_slice(z)
        dtype = self.dtype
        labels = base.astype(dtype, copy=True) if base.dtype != dtype else base.copy()
        self._combine(st, labels)
        changed_here = not np.array_equal(labels, base)
        if self.target is not None and (changed_here or (st.written and self.previous is None)):
            self.target[z] = labels
        return Progress(
            self.done,
            self.total,
            time.perf_counter() - self.t_start,
            z,
            labels if (changed_here or st.written) else None,
            "propagate",
        )

    # -- result ---------------------------------------------------------------------------------
    def result(self, model: SegmentationModel) -> SegmentationResult:
        from .inference import SegmentationResult, object_color

        eng, keyframes = self.eng, self.keyframes
        extents: dict[int, tuple[int, int]] = {}
        if self.target is not None:
            present = np.asarray(self.target)
            for oid in sorted(set(self.rewrite) | set(keyframes)):
                zs = np.flatnonzero((present == oid).any(axis=(1, 2)))
                if zs.size:
                    extents[oid] = (int(zs[0]), int(zs[-1]))
        eng.timings["total_s"] = time.perf_counter() - self.t_start
        preprocessing = eng.preprocessing()
        preprocessing["propagation"] = self.config.to_dict()
        all_ids = tuple(sorted(keyframes))
        return SegmentationResult(
            labels=self.target,
            class_names=tuple(f"object {oid}" for oid in all_ids),
            class_colors=tuple(object_color(oid) for oid in all_ids),
            preset=eng.preset,
            model_name=model.metadata.name,
            mode="propagate",
            stride=None,
            timings=dict(eng.timings),
            preprocessing=preprocessing,
            object_ids=all_ids,
            extents=extents,
        )


def iter_propagate(
    model: SegmentationModel,
    stack: Any,
    boxes: Mapping[int, Mapping[int, Sequence[float]]],
    *,
    masks: Mapping[int, Mapping[int, np.ndarray]] | None = None,
    points: Mapping[int, Mapping[int, Sequence[Sequence[float]]]] | None = None,
    slice_ranges: Mapping[int, Sequence[int]] | None = None,
    config: PropagationConfig | None = None,
    previous: np.ndarray | None = None,
    changed: Mapping[int, Sequence[int]] | None = None,
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
    window: tuple[float, float] | None = None,
) -> Generator[Progress, None, SegmentationResult]:
    """Segment whole objects from a few keyframe prompts by walking through the stack.

    See the module docstring for the algorithm, the stop criterion and how walks meet.

    Parameters
    ----------
    model : SegmentationModel
        With ``supports_boxes`` (:func:`napari_masam.inference.check_mode` ``"propagate"``).
    stack : array-like
        (Z, Y, X) grey volume or (T, Y, X, 3) uint8 RGB video; read slice by slice.
    boxes : mapping object id -> mapping slice -> xyxy
        Keyframe boxes (inclusive pixels, :mod:`napari_masam.prompts`); NOT interpolated: one
        box per object is enough. Cut to the slice; outside the stack: ValueError.
    masks : mapping object id -> mapping slice -> (Y, X) bool, or None
        Keyframe masks (slices fixed by the user); kept as they are and walked from like a box
        keyframe. A mask wins over a box (and clicks) on the same slice.
    points : mapping object id -> mapping slice -> sequence of (y, x, label), or None
        Click prompts in stack pixels (row, col; label 1 positive, 0 negative), for models with
        ``supports_points`` (:func:`napari_masam.prompts.check_points_in_stack`). A slice with
        clicks is a keyframe of its object, decoded with its box (if any) and the clicks; the
        walks from it derive boxes from its mask as from any keyframe.
    slice_ranges : mapping object id -> (first, last), or None
        Inclusive slices an object may occupy (default: the whole stack): no walk leaves it.
    config : PropagationConfig or None
    previous : ndarray or None
        (Z, Y, X) labels of an earlier run (correction loop; needs ``changed``).
    changed : mapping object id -> slices, or None
        The keyframes of each object that changed since ``previous``. Objects not named keep
        their voxels; see the module docstring for what is recomputed.
    preset, device, cache, stack_orientation, keep_labels, autocast, num_threads, window
        As :func:`napari_masam.inference.iter_segment_boxes`.
    batch_size : int or None
        Groups encoded per forward pass.
    out : array-like or None
        (Z, Y, X) target, written on the slices that change (with ``previous``: also the
        result's base, e.g. ``out=previous`` to correct in place).
    threshold : float
        Probability above which a pixel belongs to an object.

    Yields
    ------
    Progress
        ``stage="propagate"``, one per finished slice in completion order (not stack order):
        ``labels_slice`` is the slice's complete new labels (all objects), or None where
        nothing changed on it (e.g. slices a walk could have reached but did not).
        ``total`` counts the slices walks may reach (an upper bound).

    Returns
    -------
    SegmentationResult
        ``mode="propagate"``; ``extents`` = object id -> (first, last) slice it covers;
        ``timings["windows_encoded"]`` = encoder calls (groups), ``timings["decoded"]`` = masks
        decoded; ``preprocessing["propagation"]`` = the config.

    Raises
    ------
    ValueError
        For a model without box prompts, points for a model without point prompts (the
        measured reason), prompts outside the stack or a keyframe outside the
        object's range, ``previous`` with another shape, ``changed`` without ``previous``, or a
        slice-reordering orientation.
    """
    run = _PropagationRun.start(
        model,
        stack,
        boxes,
        masks,
        previous,
        changed,
        config,
        threshold,
        num_threads,
        points=points,
        preset=preset,
        device=device,
        cache=cache,
        stack_orientation=stack_orientation,
        batch_size=batch_size,
        autocast=autocast,
        window=window,
    )
    run.plan(slice_ranges)
    run.open_target(out, keep_labels)
    was_training = model.training
    if was_training:
        model.eval()
    try:
        run.seed(num_threads)
        yield from run.finished()
        while run.step(num_threads):
            yield from run.finished()
    finally:
        if was_training:
            model.train()
    return run.result(model)
