"""From a user's stack to the model input and back: intensities, resize, orientation.

Every step is named after the frame it maps between:

* **stack frame**: the caller's array, ``(Z, Y, X)`` grey or ``(T, Y, X, 3)`` RGB, axis codes
  ``stack_orientation`` (napari-masam's readers give :data:`~napari_masam.model.base.
  DISPLAY_ORIENTATION`);
* **oriented frame**: the same voxels permuted/flipped into the axis codes the model was
  trained in (``model.metadata.orientation``, spec ``MASAM.md`` section 6);
* **model frame**: one oriented slice resized into the square ``S x S`` model input
  (``model.metadata.resize_mode``): ``"stretch"`` squashes the slice to ``S x S``;
  ``"longest_side"`` scales the longest side to ``S`` (aspect kept) and zero-pads bottom/right.

Intensity normalisation follows the MA-SAM authors (spec sections 6-7): a volume-level step
(CT window clip; MRI clip at the 99th percentile with the volume minimum as lower bound and
min-max to [0, 1]; plain min-max; RGB / 255) followed by a min-max of each group of
``slices_per_group`` slices to [0, 1] (not for RGB).

Pixel coordinates: pixel centres at integers (napari data coordinates, SAM), so pixel ``i``
covers ``[i - 0.5, i + 0.5)``. Resampling uses that convention (``align_corners=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Kinds of :class:`IntensityPreset`.
PRESET_KINDS = ("ct", "mri", "minmax", "rgb")
#: Resize modes of :attr:`ModelMetadata.resize_mode`.
RESIZE_MODES = ("stretch", "longest_side")


# ----------------------------------------------------------------------------------------------
# Intensities
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntensityPreset:
    """How raw voxel values become model intensities in [0, 1].

    Attributes
    ----------
    name : str
        Key in :data:`INTENSITY_PRESETS` (or a generated name for custom windows).
    kind : str
        ``"ct"``: clip to ``[low, high]`` HU, then per-group min-max;
        ``"mri"``: clip to ``[volume min, volume percentile(percentile)]``, min-max to [0, 1]
        per volume, then per-group min-max;
        ``"minmax"``: volume min-max to [0, 1], then per-group min-max;
        ``"rgb"``: divide by 255 (``low``/``high`` = 0/255), no per-group step.
    low, high : float or None
        Window bounds in raw units (HU for CT, 0/255 for RGB); None where computed per volume.
    percentile : float or None
        Upper clip percentile of ``"mri"`` (99 in the paper).
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    percentile: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in PRESET_KINDS:
            raise ValueError(
                f"IntensityPreset {self.name!r}: unknown kind {self.kind!r}; "
                f"choose one of {', '.join(PRESET_KINDS)}."
            )
        if self.kind == "ct" and (
            self.low is None or self.high is None or not self.high > self.low
        ):
            raise ValueError(
                f"CT preset {self.name!r} needs low < high (HU), got {self.low}..{self.high}."
            )
        if self.kind == "mri" and not (self.percentile and 0 < self.percentile <= 100):
            raise ValueError(
                f"MRI preset {self.name!r} needs a percentile in (0, 100], got {self.percentile}."
            )

    @property
    def group_minmax(self) -> bool:
        """Whether each group of slices is min-max scaled to [0, 1] (all kinds but RGB)."""
        return self.kind != "rgb"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (recorded in results and provenance sidecars)."""
        return asdict(self)

    def key(self) -> str:
        """Stable string identifying the preprocessing (used in cache keys)."""
        return f"{self.kind}:{self.name}:{self.low!r}:{self.high!r}:{self.percentile!r}"


#: Named presets; the widget's and the CLI's intensity choices.
INTENSITY_PRESETS: dict[str, IntensityPreset] = {
    p.name: p
    for p in (
        # BTCV abdomen window of the MA-SAM authors
        IntensityPreset("ct_abdomen", "ct", -200.0, 250.0),
        # MSD pancreas / tumour window of the MA-SAM authors
        IntensityPreset("ct_pancreas", "ct", -50.0, 200.0),
        IntensityPreset("mri", "mri", percentile=99.0),
        IntensityPreset("minmax", "minmax"),
        IntensityPreset("rgb", "rgb", 0.0, 255.0),
    )
}


def custom_ct_preset(level: float, width: float) -> IntensityPreset:
    """A CT window given as level/width in HU (clip to ``level -+ width / 2``).

    Raises
    ------
    ValueError
        If ``width`` is not positive.
    """
    if not width > 0:
        raise ValueError(f"CT window width must be positive (HU), got {width}.")
    low, high = float(level) - float(width) / 2.0, float(level) + float(width) / 2.0
    return IntensityPreset(f"ct_L{level:g}_W{width:g}", "ct", low, high)


def resolve_preset(
    preset: str | IntensityPreset | None, default: str = "minmax"
) -> IntensityPreset:
    """Turn a preset name, a preset or None (``default``, usually the model's) into a preset.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    if isinstance(preset, IntensityPreset):
        return preset
    name = default if preset is None else preset
    try:
        return INTENSITY_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown intensity preset {name!r}; choose one of {', '.join(INTENSITY_PRESETS)} "
            "or build one with custom_ct_preset(level, width)."
        ) from None


def needs_volume_window(preset: IntensityPreset) -> bool:
    """Whether the volume-level step changes anything.

    A min-max window followed by the per-group min-max is redundant (an affine map that the
    group step undoes), and computing it would read the whole stack (decode a whole video)
    before the first slice is segmented.
    """
    return not (preset.kind == "minmax" and preset.group_minmax)


def volume_window(stack: Any, preset: IntensityPreset) -> tuple[float, float]:
    """The volume-level clip window ``(low, high)`` in raw units.

    Parameters
    ----------
    stack : array-like
        (Z, Y, X) or (T, Y, X, 3), any numeric dtype. For ``"minmax"`` it is read slice by slice;
        for ``"mri"`` it is read whole (a percentile needs all voxels).
    preset : IntensityPreset

    Returns
    -------
    (float, float)
        CT: the preset's HU bounds; MRI: (volume min, volume percentile); minmax: (min, max);
        RGB: (0, 255). Non-finite voxels (NaN, +-Inf) are left out (see
        :data:`NON_FINITE_POLICY`); ``(0, 0)`` when no voxel is finite.

    Notes
    -----
    Compute it once per input and pass it to the engine's ``window=`` parameter when an input
    is segmented in pieces (a video in chunks): the labels then do not depend on the chunking.

    Raises
    ------
    TypeError
        For complex or non-numeric stacks (:func:`check_stack_dtype`).
    """
    if preset.kind in ("ct", "rgb"):
        return float(preset.low), float(preset.high)  # type: ignore[arg-type]
    check_stack_dtype(stack)
    if preset.kind == "mri":
        data = _finite_values(np.asarray(stack))
        if data.size == 0:
            return 0.0, 0.0
        return float(data.min()), float(np.percentile(data, preset.percentile))
    lows, highs = [], []
    for z in range(len(stack)):
        s = _finite_values(np.asarray(stack[z]))
        if s.size:
            lows.append(s.min())
            highs.append(s.max())
    if not lows:
        return 0.0, 0.0
    return float(min(lows)), float(max(highs))


def _finite_values(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself for integer data, else its finite values (flattened when any is not)."""
    if arr.dtype.kind != "f":
        return arr
    finite = np.isfinite(arr)
    return arr if finite.all() else arr[finite]


def normalize_slice(
    slice_: np.ndarray, preset: IntensityPreset, window: tuple[float, float] | None
) -> np.ndarray:
    """The volume-level step on one slice.

    Parameters
    ----------
    slice_ : ndarray
        (Y, X) or (Y, X, 3) raw values.
    preset : IntensityPreset
    window : (float, float) or None
        From :func:`volume_window`; None when :func:`needs_volume_window` is False (the raw
        values are returned as float32 for the group step).

    Returns
    -------
    ndarray
        float32, same shape: CT clipped HU; other kinds ``(clip(x) - low) / (high - low)`` in
        [0, 1] (zeros when ``high == low``).
    """
    if window is None:
        return np.asarray(slice_, dtype=np.float32)
    low, high = np.float32(window[0]), np.float32(window[1])
    x = np.clip(np.asarray(slice_, dtype=np.float32), low, high)
    if preset.kind == "ct":
        return x
    span = np.float32(high - low)
    if span <= 0:
        return np.zeros_like(x)
    return (x - low) / span


def normalize_stack(stack: Any, preset: IntensityPreset) -> np.ndarray:
    """The volume-level step on a whole stack (convenience; the engine works slice by slice).

    Returns
    -------
    ndarray
        float32 (Z, Y, X) or (Z, Y, X, 3), see :func:`normalize_slice`.
    """
    window = volume_window(stack, preset) if needs_volume_window(preset) else None
    return np.stack(
        [normalize_slice(np.asarray(stack[z]), preset, window) for z in range(len(stack))]
    )


def normalize_group(group: np.ndarray, preset: IntensityPreset) -> np.ndarray:
    """The per-group step of the authors: min-max of the whole group to [0, 1].

    Parameters
    ----------
    group : ndarray
        (D, Y, X) or (D, Y, X, 3) float32 output of :func:`normalize_slice`.

    Returns
    -------
    ndarray
        float32 ``(g - g.min()) / (g.max() - g.min())`` (zeros for a constant group); unchanged
        for RGB presets.
    """
    g = np.asarray(group, dtype=np.float32)
    if not preset.group_minmax:
        return g
    return minmax_with(g, g.min(), g.max())


def minmax_with(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(x - low) / (high - low)`` in float32 (zeros when ``high <= low``)."""
    low32, high32 = np.float32(low), np.float32(high)
    span = np.float32(high32 - low32)
    if not span > 0:
        return np.zeros_like(x, dtype=np.float32)
    return (x.astype(np.float32, copy=False) - low32) / span


# ----------------------------------------------------------------------------------------------
# Resize between a slice and the model input
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResizeInfo:
    """Geometry of one slice inside the square model input.

    Attributes
    ----------
    shape_yx : (int, int)
        (Y, X) of the slice in the oriented frame.
    image_size : int
        S, the side of the model input.
    resize_mode : str
        ``"stretch"`` or ``"longest_side"``.
    scaled_yx : (int, int)
        Size of the image content in the model input: (S, S) for stretch; the longest side
        scaled to S for longest_side (rest is zero padding at the bottom/right).
    """

    shape_yx: tuple[int, int]
    image_size: int
    resize_mode: str
    scaled_yx: tuple[int, int]

    @property
    def scale_yx(self) -> tuple[float, float]:
        """Model pixels per slice pixel along (Y, X)."""
        return (self.scaled_yx[0] / self.shape_yx[0], self.scaled_yx[1] / self.shape_yx[1])

    @property
    def is_identity(self) -> bool:
        """True when the slice is already the model input (no resampling, no padding)."""
        return self.scaled_yx == self.shape_yx == (self.image_size, self.image_size)


def resize_info(shape_yx: Sequence[int], image_size: int, resize_mode: str) -> ResizeInfo:
    """Geometry for a slice of ``shape_yx`` (Y, X) pixels; see :class:`ResizeInfo`.

    Raises
    ------
    ValueError
        For an unknown ``resize_mode`` or an empty slice.
    """
    y, x = int(shape_yx[0]), int(shape_yx[1])
    if y < 1 or x < 1:
        raise ValueError(f"Cannot resize an empty slice of shape {(y, x)}.")
    if resize_mode == "stretch":
        scaled = (image_size, image_size)
    elif resize_mode == "longest_side":
        scale = image_size / max(y, x)
        scaled = (max(1, int(y * scale + 0.5)), max(1, int(x * scale + 0.5)))
    else:
        raise ValueError(
            f"Unknown resize_mode {resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}."
        )
    return ResizeInfo((y, x), int(image_size), resize_mode, scaled)


def resize_slices_torch(images: torch.Tensor, size_yx: Sequence[int]) -> torch.Tensor:
    """Bicubic resampling of (N, K, Y, X) float32 images to (N, K, *size_yx), pixel centres
    kept (``align_corners=False``), antialiased when shrinking; not clamped."""
    import torch.nn.functional as F

    size = (int(size_yx[0]), int(size_yx[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(
        images, size=size, mode="bicubic", align_corners=False, antialias=shrinking
    )


def resize_to_model_torch(images: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """Resample images into the model input square.

    Parameters
    ----------
    images : Tensor
        (N, K, Y, X) float32 (K channels).
    info : ResizeInfo

    Returns
    -------
    Tensor
        (N, K, S, S) float32; bicubic (antialiased when shrinking), zero padding bottom/right
        for ``longest_side``. Not clamped (bicubic may overshoot; the caller clamps).
    """
    import torch.nn.functional as F

    if info.is_identity:
        return images
    sy, sx = info.scaled_yx
    images = resize_slices_torch(images, (sy, sx))
    s = info.image_size
    if (sy, sx) != (s, s):
        images = F.pad(images, (0, s - sx, 0, s - sy))
    return images


def to_model_input(
    slices: np.ndarray, image_size: int, resize_mode: str
) -> tuple[torch.Tensor, ResizeInfo]:
    """Normalised slices -> the model input of one group.

    Parameters
    ----------
    slices : ndarray
        (D, Y, X) grey or (D, Y, X, 3) RGB float32 in [0, 1] (after :func:`normalize_group`).
    image_size : int
    resize_mode : str

    Returns
    -------
    (Tensor, ResizeInfo)
        (D, 3, S, S) float32 in [0, 1] (grey copied into the 3 channels) and the geometry.
    """
    import torch

    arr = np.asarray(slices, dtype=np.float32)
    if arr.ndim == 3:
        t = torch.from_numpy(np.ascontiguousarray(arr))[:, None]  # D x 1 x Y x X
    elif arr.ndim == 4 and arr.shape[-1] == 3:
        t = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))  # D x 3 x Y x X
    else:
        raise ValueError(f"Expected (D, Y, X) or (D, Y, X, 3) slices, got shape {arr.shape}.")
    info = resize_info(t.shape[-2:], image_size, resize_mode)
    t = resize_slices_torch(t, info.scaled_yx)
    return torch.from_numpy(pad_to_model(t.numpy(), info)), info


def pad_to_model(x: np.ndarray, info: ResizeInfo) -> np.ndarray:
    """The last step of every model input: clamp, zero-pad to ``S x S``, grey to 3 channels.

    Parameters
    ----------
    x : ndarray
        (D, K, sy, sx) float32 in [0, 1] up to resampling overshoot, already resized to
        ``info.scaled_yx`` (K = 1 grey or 3 RGB).
    info : ResizeInfo

    Returns
    -------
    ndarray
        (D, 3, S, S) float32: clamped to [0, 1] when the slice was resampled (bicubic may
        overshoot), padded bottom/right with zeros, grey repeated into the 3 channels.
    """
    x = np.asarray(x, dtype=np.float32)
    if not info.is_identity:
        x = np.clip(x, 0.0, 1.0)
    s = info.image_size
    sy, sx = x.shape[-2:]
    if (sy, sx) != (s, s):
        x = np.pad(x, ((0, 0), (0, 0), (0, s - sy), (0, s - sx)))
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x)


def probabilities_to_grid(probs: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """Model-frame maps -> the slice grid, bilinear.

    Parameters
    ----------
    probs : Tensor
        (N, K, h, w) float32 maps over the model input square (h = w; h may differ from S,
        e.g. a low-resolution decoder output).
    info : ResizeInfo

    Returns
    -------
    Tensor
        (N, K, Y, X) float32: the padding cropped away (``longest_side``), then bilinear
        resampling with pixel centres at integers (``align_corners=False``). Probabilities are
        resampled (not labels), so the argmax boundary falls between pixels of the model frame.
    """
    import torch.nn.functional as F

    s = info.image_size
    if probs.shape[-2:] != (s, s):
        probs = F.interpolate(probs, size=(s, s), mode="bilinear", align_corners=False)
    sy, sx = info.scaled_yx
    probs = probs[..., :sy, :sx]
    if (sy, sx) != info.shape_yx:
        probs = F.interpolate(probs, size=info.shape_yx, mode="bilinear", align_corners=False)
    return probs


def logits_to_slice(logits: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """(N, C + 1, h, w) logits -> (N, C + 1, Y, X) float32 class probabilities on the slice grid."""
    return probabilities_to_grid(logits.float().softmax(dim=1), info)


def labels_to_model_frame(labels: np.ndarray, info: ResizeInfo) -> np.ndarray:
    """Label slices -> model frame, nearest neighbour (pixel centres), zero padding.

    Parameters
    ----------
    labels : ndarray
        (N, Y, X) integer labels.

    Returns
    -------
    ndarray
        (N, S, S) same dtype.
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(labels).astype(np.float32))[:, None]
    sy, sx = info.scaled_yx
    if (sy, sx) != info.shape_yx:
        t = F.interpolate(t, size=(sy, sx), mode="nearest-exact")
    s = info.image_size
    t = F.pad(t, (0, s - sx, 0, s - sy))
    return t[:, 0].numpy().astype(np.asarray(labels).dtype)


def labels_from_model_frame(labels: np.ndarray, info: ResizeInfo) -> np.ndarray:
    """Model-frame label maps (N, h, w) -> (N, Y, X) on the slice grid, nearest neighbour."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(labels)
    t = torch.from_numpy(arr.astype(np.float32))[:, None]
    s = info.image_size
    if t.shape[-2:] != (s, s):
        t = F.interpolate(t, size=(s, s), mode="nearest-exact")
    sy, sx = info.scaled_yx
    t = t[..., :sy, :sx]
    if (sy, sx) != info.shape_yx:
        t = F.interpolate(t, size=info.shape_yx, mode="nearest-exact")
    return t[:, 0].numpy().astype(arr.dtype)


def boxes_to_model_frame(boxes_xyxy: np.ndarray, info: ResizeInfo) -> np.ndarray:
    """Slice-pixel boxes -> model-input-pixel boxes.

    Parameters
    ----------
    boxes_xyxy : ndarray
        (N, 4) ``(col_min, row_min, col_max, row_max)`` pixel indices of the slice, max edge
        inclusive.
    info : ResizeInfo

    Returns
    -------
    ndarray
        (N, 4) float32 in model-input pixels, max inclusive: the box's pixel extent
        ``[x0 - 0.5, x1 + 0.5]`` is scaled exactly, i.e. ``x0' = x0 * sx`` and
        ``x1' = (x1 + 1) * sx - 1`` (identity when ``sx == 1``).
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    sy, sx = info.scale_yx
    out = np.empty_like(b)
    out[:, 0] = b[:, 0] * sx
    out[:, 1] = b[:, 1] * sy
    out[:, 2] = (b[:, 2] + 1.0) * sx - 1.0
    out[:, 3] = (b[:, 3] + 1.0) * sy - 1.0
    return out.astype(np.float32)


def boxes_from_model_frame(boxes_xyxy: np.ndarray, info: ResizeInfo) -> np.ndarray:
    """Inverse of :func:`boxes_to_model_frame` ((N, 4) float32, slice pixels)."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    sy, sx = info.scale_yx
    out = np.empty_like(b)
    out[:, 0] = b[:, 0] / sx
    out[:, 1] = b[:, 1] / sy
    out[:, 2] = (b[:, 2] + 1.0) / sx - 1.0
    out[:, 3] = (b[:, 3] + 1.0) / sy - 1.0
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Orientation
# ----------------------------------------------------------------------------------------------
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


@dataclass(frozen=True)
class OrientationTransform:
    """Permutation + flips from the stack's axis codes to the model's.

    Attributes
    ----------
    perm : (int, int, int)
        Oriented axis ``i`` is stack axis ``perm[i]`` (axis 0 = slices).
    flip : (bool, bool, bool)
        Whether oriented axis ``i`` runs opposite to its stack axis.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    @property
    def keeps_slice_axis(self) -> bool:
        """True when oriented slices are stack slices (in-plane transform + slice order only)."""
        return self.perm[0] == 0

    def to_model(self, arr: np.ndarray) -> np.ndarray:
        """Stack-frame (Z, Y, X[, 3]) array -> oriented frame (a view)."""
        arr = np.asarray(arr)
        extra = tuple(range(3, arr.ndim))
        out = arr.transpose(self.perm + extra)
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis)
        return out

    def from_model(self, arr: np.ndarray) -> np.ndarray:
        """Oriented (Z, Y, X[, ...]) array -> stack frame (a view)."""
        arr = np.asarray(arr)
        for axis, f in enumerate(self.flip):
            if f:
                arr = np.flip(arr, axis)
        inverse = tuple(int(i) for i in np.argsort(self.perm))
        extra = tuple(range(3, arr.ndim))
        return arr.transpose(inverse + extra)

    def oriented_shape(self, shape_zyx: Sequence[int]) -> tuple[int, int, int]:
        """(Z, Y, X) of the oriented frame for a stack of ``shape_zyx``."""
        return tuple(int(shape_zyx[p]) for p in self.perm)  # type: ignore[return-value]

    def slice_to_model(self, z: int, depth: int) -> int:
        """Stack slice index -> oriented slice index (needs :attr:`keeps_slice_axis`)."""
        return depth - 1 - z if self.flip[0] else z

    def slice_from_model(self, z: int, depth: int) -> int:
        """Oriented slice index -> stack slice index (needs :attr:`keeps_slice_axis`)."""
        return depth - 1 - z if self.flip[0] else z

    def inplane_to_model(self, slice_: np.ndarray) -> np.ndarray:
        """Stack slice (Y, X[, 3]) -> oriented slice (needs :attr:`keeps_slice_axis`)."""
        out = np.asarray(slice_)
        if self.perm[1] == 2:
            out = out.swapaxes(0, 1)
        if self.flip[1]:
            out = out[::-1]
        if self.flip[2]:
            out = out[:, ::-1]
        return out

    def inplane_from_model(self, slice_: np.ndarray) -> np.ndarray:
        """Oriented slice (Y, X[, ...]) -> stack slice (needs :attr:`keeps_slice_axis`)."""
        out = np.asarray(slice_)
        if self.flip[1]:
            out = out[::-1]
        if self.flip[2]:
            out = out[:, ::-1]
        if self.perm[1] == 2:
            out = out.swapaxes(0, 1)
        return out

    def box_to_model(self, box_xyxy: Sequence[float], shape_yx: Sequence[int]) -> np.ndarray:
        """A stack-slice box -> the oriented slice (needs :attr:`keeps_slice_axis`).

        Parameters
        ----------
        box_xyxy : sequence of 4 numbers
            Inclusive pixel indices in the stack slice.
        shape_yx : (int, int)
            (Y, X) of the stack slice.

        Returns
        -------
        ndarray
            (4,) float64 XYXY inclusive in the oriented slice.
        """
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        rows, cols = (y0, y1), (x0, x1)
        ny, nx = int(shape_yx[0]), int(shape_yx[1])
        if self.perm[1] == 2:
            rows, cols = cols, rows
            ny, nx = nx, ny
        if self.flip[1]:
            rows = (ny - 1 - rows[1], ny - 1 - rows[0])
        if self.flip[2]:
            cols = (nx - 1 - cols[1], nx - 1 - cols[0])
        return np.array([cols[0], rows[0], cols[1], rows[1]], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"perm": list(self.perm), "flip": list(self.flip)}


def _check_codes(codes: str, what: str) -> str:
    codes = codes.upper()
    if len(codes) != 3 or any(c not in _OPPOSITE for c in codes):
        raise ValueError(
            f"{what} orientation {codes!r} is not three axis codes from R/L, A/P, S/I "
            "(e.g. 'SPL' for napari-masam's display orientation)."
        )
    pairs = {frozenset((c, _OPPOSITE[c])) for c in codes}
    if len(pairs) != 3:
        raise ValueError(f"{what} orientation {codes!r} names one anatomical axis twice.")
    return codes


def orientation_transform(
    stack_orientation: str | None, model_orientation: str | None
) -> OrientationTransform:
    """The transform that brings a stack in ``stack_orientation`` to ``model_orientation``.

    Parameters
    ----------
    stack_orientation, model_orientation : str or None
        Axis codes of (Z, Y, X): the direction each index grows to (``"SPL"`` = slices to
        Superior, rows to Posterior, columns to patient Left). Empty or None on either side
        (video, photographs, orientation-free models) means no transform.

    Raises
    ------
    ValueError
        For malformed codes.
    """
    if not stack_orientation or not model_orientation:
        return OrientationTransform()
    stack_codes = _check_codes(stack_orientation, "Stack")
    model_codes = _check_codes(model_orientation, "Model")
    perm: list[int] = []
    flip: list[bool] = []
    for code in model_codes:
        for j, c in enumerate(stack_codes):
            if c == code or c == _OPPOSITE[code]:
                perm.append(j)
                flip.append(c != code)
                break
    return OrientationTransform(tuple(perm), tuple(flip))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# The pipeline: stack slice -> model input (pixels and boxes), one road for every caller
# ----------------------------------------------------------------------------------------------
#: Axis codes of the grey stacks the readers give (= ``napari_masam.model.base.
#: DISPLAY_ORIENTATION``, repeated here so that preprocessing imports no torch).
DISPLAY_ORIENTATION = "SPL"

#: What happens to NaN / +-Inf voxels (recorded in results as ``preprocessing["non_finite"]``).
NON_FINITE_POLICY = "replace_with_slice_finite_min"


def stack_geometry(stack: Any) -> tuple[tuple[int, int, int], bool]:
    """``((Z, Y, X), is_rgb)`` of a grey ``(Z, Y, X)`` or RGB(A) ``(T, Y, X, 3|4)`` stack.

    Raises
    ------
    ValueError
        For any other shape (the message says how to stack a single 2-D image).
    """
    shape = tuple(int(s) for s in (stack.shape if hasattr(stack, "shape") else np.shape(stack)))
    if len(shape) == 3:
        return shape, False  # type: ignore[return-value]
    if len(shape) == 4 and shape[-1] in (3, 4):
        return shape[:3], True  # type: ignore[return-value]
    raise ValueError(
        f"Expected a stack (Z, Y, X) or an RGB stack (T, Y, X, 3), got shape {shape}; add a "
        "leading axis for a single 2D image (image[None])."
    )


def check_stack_dtype(stack: Any) -> None:
    """Refuse stacks whose values have no single intensity: complex and non-numeric dtypes.

    Raises
    ------
    TypeError
        For complex data (with advice: segment ``np.abs(stack)`` (magnitude, e.g. MRI) or
        ``stack.real`` explicitly) and for non-numeric dtypes (object, strings).
    """
    dtype = getattr(stack, "dtype", None)
    if dtype is None:
        return
    kind = np.dtype(dtype).kind
    if kind == "c":
        raise TypeError(
            f"The stack holds complex values ({np.dtype(dtype)}); segmentation needs one "
            "intensity per voxel. Pass np.abs(stack) (magnitude, usual for MRI) or stack.real "
            "explicitly."
        )
    if kind not in "biuf":
        raise TypeError(
            f"The stack has dtype {np.dtype(dtype)}, not numbers; convert it to a numeric array."
        )


def replace_non_finite(slice_: np.ndarray) -> tuple[np.ndarray, int]:
    """Apply :data:`NON_FINITE_POLICY` to one slice.

    Parameters
    ----------
    slice_ : ndarray
        (Y, X) or (Y, X, 3) raw values.

    Returns
    -------
    (ndarray, int)
        The slice with every NaN/+-Inf voxel replaced by the minimum finite value of the slice
        (0 when no voxel is finite), and the number of voxels replaced. Integer slices are
        returned unchanged (count 0). The minimum is the value that is least likely to create
        an edge: outside-the-head NaN masks become background, as zeros would.
    """
    arr = np.asarray(slice_)
    if arr.dtype.kind != "f":
        return arr, 0
    finite = np.isfinite(arr)
    if finite.all():
        return arr, 0
    n = int(finite.size - np.count_nonzero(finite))
    fill = arr[finite].min() if finite.any() else 0
    return np.where(finite, arr, fill).astype(arr.dtype, copy=False), n


@dataclass(frozen=True)
class PreparedSlice:
    """One slice after the volume-level step and the resize (not yet group-scaled or padded).

    Attributes
    ----------
    pixels : ndarray
        (K, sy, sx) float32 (K = 1 grey, 3 RGB) at ``ResizeInfo.scaled_yx``.
    low, high : numpy.float32
        Min and max of the slice after the volume-level step (before resizing): the group
        min-max takes them over the group's slices.
    digest : str or None
        Content digest of the raw slice (cache keys), when requested.
    non_finite : int
        Voxels replaced under :data:`NON_FINITE_POLICY`.
    """

    pixels: np.ndarray
    low: np.float32
    high: np.float32
    digest: str | None
    non_finite: int = 0


class StackPipeline:
    """THE road from a user's stack to model inputs (pixels and boxes), slice by slice.

    The segmentation engine, training and the benchmarks all read stacks through this class:
    stack frame -> oriented frame (:class:`OrientationTransform`) -> non-finite policy
    (:func:`replace_non_finite`) -> volume-level intensity step (:func:`normalize_slice` with
    one window per input, :func:`volume_window`) -> resize to the model square
    (:func:`resize_slices_torch`) -> group min-max (:func:`minmax_with`) -> clamp/pad/3
    channels (:func:`pad_to_model`). Boxes take :meth:`box_to_model`, labels
    :meth:`labels_input`.

    Parameters
    ----------
    stack : array-like
        (Z, Y, X) grey or (T, Y, X, 3|4) RGB(A) in ``stack_orientation``; read one slice at a
        time unless the orientation reslices across the slice axis.
    image_size, slices_per_group : int
        S and D of the model.
    resize_mode : str
        :data:`RESIZE_MODES`.
    model_orientation : str or None
        Axis codes the model was trained in (``ModelMetadata.orientation``).
    preset : IntensityPreset
    stack_orientation : str or None
        Axis codes of the stack. None: :data:`DISPLAY_ORIENTATION` (``"SPL"``, what the
        napari-masam readers give) for grey stacks, ``""`` (no transform) for RGB stacks; a
        model trained in another orientation then gets its slices reoriented.
    window : (float, float) or None
        Volume-level window in raw units, computed once per input; None: computed here by
        :func:`volume_window` when :func:`needs_volume_window` (pass it when one input is
        segmented in pieces).
    hash_slices : bool
        Compute :attr:`PreparedSlice.digest` (for embedding cache keys).

    Raises
    ------
    ValueError
        For a shape that is not a stack, an empty stack or bad orientation codes.
    TypeError
        For complex or non-numeric stacks.

    Attributes
    ----------
    stack_shape : (int, int, int)
        (Z, Y, X) of the stack; ``shape`` is the oriented one, ``depth = shape[0]``.
    group, front : int
        D and the replicate-padded slices before the first one (``(D - 1) // 2``).
    info : ResizeInfo
    non_finite : int
        Voxels replaced so far in the slices read.
    """

    def __init__(
        self,
        stack: Any,
        *,
        image_size: int,
        slices_per_group: int,
        resize_mode: str,
        model_orientation: str | None,
        preset: IntensityPreset,
        stack_orientation: str | None = None,
        window: tuple[float, float] | None = None,
        hash_slices: bool = False,
    ) -> None:
        self.stack = stack
        self.preset = preset
        self.stack_shape, self.rgb = stack_geometry(stack)
        if self.stack_shape[0] < 1:
            raise ValueError("The stack has no slices.")
        check_stack_dtype(stack)
        if stack_orientation is None:
            # what every napari-masam reader gives: the display orientation for grey volumes;
            # RGB stacks (video, photographs) have no anatomical axes
            stack_orientation = "" if self.rgb else DISPLAY_ORIENTATION
        self.model_orientation = model_orientation
        self.transform: OrientationTransform = orientation_transform(
            stack_orientation, model_orientation
        )
        self.shape = self.transform.oriented_shape(self.stack_shape)
        self.depth = self.shape[0]
        self.group = int(slices_per_group)
        self.front = (self.group - 1) // 2
        self.info: ResizeInfo = resize_info(self.shape[1:], int(image_size), resize_mode)
        self._oriented: np.ndarray | None = None
        if not self.transform.keeps_slice_axis:
            # reslicing across the slice axis needs the whole stack (documented)
            self._oriented = self.transform.to_model(np.asarray(stack))
        if window is not None:
            low, high = (float(v) for v in window)
            if not (np.isfinite(low) and np.isfinite(high)) or high < low:
                raise ValueError(f"window must be two finite numbers low <= high, got {window}.")
            self.window: tuple[float, float] | None = (low, high)
        else:
            self.window = volume_window(stack, preset) if needs_volume_window(preset) else None
        self.hash_slices = hash_slices
        self.non_finite = 0
        self._counted: set[int] = set()
        self._buffer: dict[int, PreparedSlice] = {}

    @classmethod
    def for_model(
        cls,
        model: Any,
        stack: Any,
        *,
        preset: str | IntensityPreset | None = None,
        stack_orientation: str | None = None,
        window: tuple[float, float] | None = None,
        hash_slices: bool = False,
    ) -> StackPipeline:
        """The pipeline of a :class:`~napari_masam.model.base.SegmentationModel` (its image
        size, group size, resize mode, orientation and default preset)."""
        meta = model.metadata
        return cls(
            stack,
            image_size=int(model.image_size),
            slices_per_group=int(model.slices_per_group),
            resize_mode=meta.resize_mode,
            model_orientation=meta.orientation,
            preset=resolve_preset(preset, default=meta.intensity_preset),
            stack_orientation=stack_orientation,
            window=window,
            hash_slices=hash_slices,
        )

    # -- pixels ----------------------------------------------------------------------------
    def raw_slice(self, z: int) -> np.ndarray:
        """Oriented slice ``z`` as stored, (Y, X) or (Y, X, 3) (alpha dropped)."""
        if self._oriented is not None:
            s = np.asarray(self._oriented[z])
        else:
            zs = self.transform.slice_from_model(z, self.depth)
            s = self.transform.inplane_to_model(np.asarray(self.stack[zs]))
        if self.rgb and s.shape[-1] == 4:
            s = s[..., :3]
        return s

    def prepared(self, z: int) -> PreparedSlice:
        """Oriented slice ``z`` after the non-finite policy, volume step and resize (buffered
        until :meth:`release_below` / :meth:`keep_only`)."""
        hit = self._buffer.get(z)
        if hit is not None:
            return hit
        import torch

        raw, replaced = replace_non_finite(self.raw_slice(z))
        if replaced and z not in self._counted:
            self._counted.add(z)
            self.non_finite += replaced
            logger.warning(
                "Slice %d: %d non-finite voxels (NaN/Inf) replaced by the slice's finite "
                "minimum (policy %s).",
                z,
                replaced,
                NON_FINITE_POLICY,
            )
        digest = None
        if self.hash_slices:
            from .cache import hash_array

            digest = hash_array(raw)
        norm = normalize_slice(raw, self.preset, self.window)
        chw = norm.transpose(2, 0, 1) if norm.ndim == 3 else norm[None]
        low, high = np.float32(norm.min()), np.float32(norm.max())
        sy, sx = self.info.scaled_yx
        if (sy, sx) != self.info.shape_yx:
            # resize before the group min-max: both are affine/linear, so the order only moves
            # float rounding, and each slice is resized once instead of once per window
            t = torch.from_numpy(np.ascontiguousarray(chw))[None]
            chw = resize_slices_torch(t, (sy, sx))[0].numpy()
        prep = PreparedSlice(
            np.ascontiguousarray(chw, dtype=np.float32), low, high, digest, replaced
        )
        self._buffer[z] = prep
        return prep

    def release_below(self, z: int) -> None:
        """Forget prepared slices before oriented slice ``z``."""
        for k in [k for k in self._buffer if k < z]:
            del self._buffer[k]

    def keep_only(self, needed: set[int]) -> None:
        """Forget prepared slices not in ``needed``."""
        for k in [k for k in self._buffer if k not in needed]:
            del self._buffer[k]

    def members(self, start: int) -> tuple[int, ...]:
        """Oriented slices of the group starting at padded index ``start`` (replicate pad):
        the group centred on oriented slice ``start`` (its row :attr:`front`)."""
        return tuple(min(max(start - self.front + d, 0), self.depth - 1) for d in range(self.group))

    def group_input(self, members: Sequence[int]) -> np.ndarray:
        """(D, 3, S, S) float32 model input of one group: per-group min-max, clamp, pad."""
        preps = [self.prepared(m) for m in members]
        x = np.stack([p.pixels for p in preps])  # D x K x sy x sx
        if self.preset.group_minmax:
            low = min(p.low for p in preps)
            high = max(p.high for p in preps)
            x = minmax_with(x, low, high)
        return pad_to_model(x, self.info)

    # -- boxes and labels ------------------------------------------------------------------
    def box_to_model(self, box_xyxy: Sequence[float]) -> np.ndarray:
        """An inclusive box of a stack slice -> (4,) float32 box of the model input."""
        b = self.transform.box_to_model(box_xyxy, self.stack_shape[1:])
        return boxes_to_model_frame(b[None], self.info)[0]

    def labels_input(self, labels: Any, members: Sequence[int]) -> np.ndarray:
        """Training targets of a group: (D, S, S) labels of ``labels`` (the stack's grid,
        (Z, Y, X)) at the oriented slices ``members``, nearest neighbour, zero padding."""
        lab = self.transform.to_model(np.asarray(labels))
        return labels_to_model_frame(np.stack([lab[m] for m in members]), self.info)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (results' ``preprocessing``)."""
        return {
            "preset": self.preset.to_dict(),
            "volume_window": None if self.window is None else list(self.window),
            "stack_orientation_transform": self.transform.to_dict(),
            "model_orientation": self.model_orientation,
            "resize_mode": self.info.resize_mode,
            "image_size": self.info.image_size,
            "slices_per_group": self.group,
            "group_padding": "replicate",
            "non_finite": {"policy": NON_FINITE_POLICY, "voxels": int(self.non_finite)},
        }
