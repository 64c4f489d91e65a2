"""Training data: image + label stacks, their checks, the split and the slice groups (numpy only).

A *case* is one image stack with its label stack on the same grid: a CT/MRI volume ``(Z, Y, X)``
or a video clip ``(T, H, W, 3)`` uint8 with labels ``(T, H, W)``. Models see groups of D
neighbouring slices (frames); groups at the ends repeat the first/last slice (replicate padding,
as the authors' inference, spec section 7).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.formats import kind_of, stem_of, suffixes_for

logger = logging.getLogger(__name__)

#: NIfTI endings from THE format table (:mod:`napari_masam.io.formats`).
_NIFTI_SUFFIXES = suffixes_for("nifti")
_LABEL_MARKERS = ("_labels", "_label", "_seg", "_mask", "-labels", "-label", "-seg")


@dataclass(frozen=True, eq=False)
class TrainingCase:
    """One image stack and its labels, on the same grid.

    Attributes
    ----------
    image : array-like
        (Z, Y, X) grey volume (any real dtype, e.g. HU or MRI units) or (T, H, W, 3) uint8 RGB
        frames. Axis 0 is the slice/frame axis, in the display orientation of
        :mod:`napari_masam.io` (the same frame the segmentation path feeds).
    labels : array-like
        (Z, Y, X) integer labels, 0 = background, ``i`` = class ``i``.
    name : str
        Shown in errors and recorded in the model's provenance.
    """

    image: np.ndarray
    labels: np.ndarray
    name: str = "case"

    @property
    def depth(self) -> int:
        """Number of slices (frames)."""
        return int(self.labels.shape[0])

    @property
    def is_rgb(self) -> bool:
        """True for (T, H, W, 3) colour frames."""
        return self.image.ndim == 4


def _strip_nifti(path: Path) -> str:
    return stem_of(path)


def load_nifti_case(
    image_path: str | Path, label_path: str | Path, name: str | None = None
) -> TrainingCase:
    """Read an image and a label NIfTI file as a :class:`TrainingCase`.

    Both files go through :func:`napari_masam.io.nifti.read_nifti`, so they are in the same
    display orientation as the segmentation path feeds.

    Raises
    ------
    FileNotFoundError
        If a file does not exist.
    ValueError
        If the two files are not on the same voxel grid (shape or affine).
    """
    from ..io.nifti import read_nifti

    image_path, label_path = Path(image_path), Path(label_path)
    for path in (image_path, label_path):
        if not path.exists():
            raise FileNotFoundError(f"Training file {path} does not exist.")
    image = read_nifti(image_path, as_labels=False)
    labels = read_nifti(label_path, as_labels=True)
    image_data = np.asarray(image.data)
    label_data = np.asarray(labels.data)
    if image_data.shape[:3] != label_data.shape[:3]:
        raise ValueError(
            f"{label_path} has shape {label_data.shape} but its image {image_path} has "
            f"{image_data.shape}: labels must be drawn on the image's own grid."
        )
    if not np.allclose(np.asarray(image.affine), np.asarray(labels.affine), atol=1e-3):
        raise ValueError(
            f"{label_path} and {image_path} have different affines (voxel grids): resample the "
            "labels onto the image grid first."
        )
    return TrainingCase(image_data, label_data, name or _strip_nifti(image_path))


def _label_partner(image_path: Path, folder: Path) -> Path | None:
    stem = _strip_nifti(image_path)
    for marker in _LABEL_MARKERS:
        for suffix in _NIFTI_SUFFIXES:
            candidate = folder / f"{stem}{marker}{suffix}"
            if candidate.exists():
                return candidate
    return None


def find_nifti_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """Image/label file pairs in a folder.

    Two layouts are understood: the Medical Segmentation Decathlon / nnU-Net layout
    (``imagesTr/X.nii.gz`` with ``labelsTr/X.nii.gz``; a ``_0000`` channel suffix on the image
    is ignored) and a flat folder with ``X.nii.gz`` beside ``X_labels.nii.gz`` (or ``_label``,
    ``_seg``, ``_mask``).

    Raises
    ------
    FileNotFoundError
        If the folder does not exist or holds no pair.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Training folder {folder} does not exist.")
    pairs: list[tuple[Path, Path]] = []
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if images_dir.is_dir() and labels_dir.is_dir():
        for image in sorted(images_dir.iterdir()):
            if kind_of(image) != "nifti" or image.name.startswith("."):
                continue
            stem = _strip_nifti(image)
            stem = stem[:-5] if stem.endswith("_0000") else stem
            for suffix in _NIFTI_SUFFIXES:
                if (labels_dir / f"{stem}{suffix}").exists():
                    pairs.append((image, labels_dir / f"{stem}{suffix}"))
                    break
    else:
        for image in sorted(folder.iterdir()):
            if kind_of(image) != "nifti":
                continue
            if any(_strip_nifti(image).endswith(m) for m in _LABEL_MARKERS):
                continue
            partner = _label_partner(image, folder)
            if partner is not None:
                pairs.append((image, partner))
    if not pairs:
        raise FileNotFoundError(
            f"No image/label pairs in {folder}: use imagesTr/ + labelsTr/ with matching names, "
            "or X.nii.gz beside X_labels.nii.gz."
        )
    return pairs


def load_folder_cases(folder: str | Path) -> list[TrainingCase]:
    """Every pair of :func:`find_nifti_pairs` as :class:`TrainingCase` objects."""
    return [load_nifti_case(image, labels) for image, labels in find_nifti_pairs(folder)]


def load_video_case(
    video_path: str | Path, label_path: str | Path, name: str | None = None
) -> TrainingCase:
    """A video clip with a label stack (TIFF stack, ``.npy`` or NIfTI with one slice per frame).

    Raises
    ------
    FileNotFoundError
        If a file is missing.
    ValueError
        If the label stack does not have one (H, W) slice per frame.
    """
    from ..io.video import read_video

    video_path, label_path = Path(video_path), Path(label_path)
    for path in (video_path, label_path):
        if not path.exists():
            raise FileNotFoundError(f"Training file {path} does not exist.")
    frames = np.asarray(read_video(video_path))
    kind = kind_of(label_path)
    if kind == "tiff":
        import tifffile

        labels = tifffile.imread(label_path)
    elif label_path.name.lower().endswith(".npy"):  # a numpy array: no input kind of its own
        labels = np.load(label_path, allow_pickle=False)
    elif kind == "nifti":
        from ..io.nifti import read_nifti

        labels = np.asarray(read_nifti(label_path, as_labels=True).data)
    else:
        raise ValueError(f"Unsupported label file {label_path}: use .tif, .npy or .nii.gz.")
    if labels.shape != frames.shape[:3]:
        raise ValueError(
            f"{label_path} has shape {labels.shape} but {video_path} has frames of "
            f"{frames.shape[:3]} (T, H, W): one label slice per frame is needed."
        )
    return TrainingCase(frames, labels, name or video_path.stem)


def check_cases(cases: Sequence[TrainingCase], num_classes: int | None = None) -> int:
    """Check shapes, dtypes and label values of training cases before any training starts.

    Parameters
    ----------
    cases : sequence of TrainingCase
    num_classes : int or None
        Declared number of foreground classes; None accepts any label value.

    Returns
    -------
    int
        The largest label value found.

    Raises
    ------
    ValueError
        Empty case list, image/label shape mismatch, non-integer or negative labels, label
        values above ``num_classes``, or no foreground in any case.
    TypeError
        If an element is not a :class:`TrainingCase`.
    """
    if len(cases) == 0:
        raise ValueError("No training cases given: pass at least one image with its labels.")
    largest = 0
    for case in cases:
        if not isinstance(case, TrainingCase):
            raise TypeError(f"Expected TrainingCase objects, got {type(case).__name__}.")
        image, labels = case.image, case.labels
        if image.ndim == 3 or (image.ndim == 4 and image.shape[-1] == 3):
            pass
        else:
            raise ValueError(
                f"Case {case.name!r}: image of shape {image.shape} is neither (Z, Y, X) grey nor "
                "(T, H, W, 3) RGB."
            )
        if labels.ndim != 3 or tuple(labels.shape) != tuple(image.shape[:3]):
            raise ValueError(
                f"Case {case.name!r}: labels of shape {tuple(labels.shape)} do not match the "
                f"image's {tuple(image.shape[:3])}: labels must be on the image's grid "
                "(same slices, rows and columns)."
            )
        values = np.asarray(labels)
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                raise ValueError(f"Case {case.name!r}: labels hold non-integer values.")
        elif values.dtype.kind == "b":
            values = values.astype(np.uint8)
        elif values.dtype.kind not in "iu":
            raise ValueError(
                f"Case {case.name!r}: labels of dtype {values.dtype} are not integers."
            )
        if values.size and values.min() < 0:
            raise ValueError(f"Case {case.name!r}: labels hold negative values ({values.min()}).")
        top = int(values.max()) if values.size else 0
        if num_classes is not None and top > num_classes:
            extra = np.unique(values[values > num_classes])[:10]
            raise ValueError(
                f"Case {case.name!r}: label values {extra.tolist()} exceed the {num_classes} "
                "declared classes; declare more class names or relabel."
            )
        largest = max(largest, top)
    if largest == 0:
        raise ValueError(
            "No foreground in any training case (all labels are 0): annotate at least one "
            "structure before training."
        )
    return largest


def split_cases(
    cases: Sequence[TrainingCase],
    val_fraction: float,
    slab_thickness: int,
    seed: int,
) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Training and validation cases, split by case, never by slice.

    With two or more cases, ``round(val_fraction * n)`` (at least 1, at most n - 1) randomly
    chosen cases are held out. With a single case the stack is cut into slabs of
    ``slab_thickness`` slices and every k-th slab (``k = round(1 / val_fraction)``, starting with
    the k-th; the last slab when there are fewer than k) is held out; each slab becomes its own
    case, so a training group never reaches into a validation slab (its ends are
    replicate-padded instead) and validation slices are never seen during training.

    Raises
    ------
    ValueError
        If a single case is too thin for two slabs.
    """
    if len(cases) >= 2:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(cases))
        n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
        val_idx = set(order[:n_val].tolist())
        train = [c for i, c in enumerate(cases) if i not in val_idx]
        val = [c for i, c in enumerate(cases) if i in val_idx]
        return train, val
    (case,) = cases
    slabs = slab_cases(case, slab_thickness)
    if len(slabs) < 2:
        raise ValueError(
            f"Case {case.name!r} has {case.depth} slices, too few to hold out a slab of "
            f"{slab_thickness}: give a validation case, or a thinner slab_thickness."
        )
    every = max(2, round(1.0 / val_fraction))
    held = {i for i in range(len(slabs)) if i % every == every - 1} or {len(slabs) - 1}
    val = [s for i, s in enumerate(slabs) if i in held]
    train = [s for i, s in enumerate(slabs) if i not in held]
    return train, val


def slab_cases(case: TrainingCase, thickness: int) -> list[TrainingCase]:
    """Cut ``case`` along axis 0 into consecutive slabs of ``thickness`` slices (the last may be
    thinner), each a case named ``"name[z0:z1]"``."""
    if thickness < 1:
        raise ValueError(f"slab thickness must be >= 1 (got {thickness}).")
    out = []
    for z0 in range(0, case.depth, thickness):
        z1 = min(case.depth, z0 + thickness)
        out.append(TrainingCase(case.image[z0:z1], case.labels[z0:z1], f"{case.name}[{z0}:{z1}]"))
    return out


def group_slice_indices(center: int, depth: int, group: int) -> np.ndarray:
    """Slice indices of the group of ``group`` slices around ``center`` in a stack of ``depth``.

    Indices run ``center - (group - 1) // 2 .. center - (group - 1) // 2 + group - 1`` clipped to
    the stack: replicate padding at both ends (the windows of the segmentation engine).
    """
    start = center - (group - 1) // 2
    return np.clip(np.arange(start, start + group), 0, depth - 1)


def select_groups(
    cases: Sequence[TrainingCase],
    group: int,
    empty_group_share: float,
    rng: np.random.Generator,
    *,
    only_foreground: bool = False,
) -> np.ndarray:
    """The training groups worth learning from, as (case index, centre slice) rows.

    Every slice centres one group. Groups whose slices hold foreground are all kept; groups
    without any are subsampled so that they make up at most ``empty_group_share`` of the result
    (``only_foreground`` drops them all).

    Returns
    -------
    ndarray
        (G, 2) int64, sorted.
    """
    full, empty = [], []
    for index, case in enumerate(cases):
        labels = np.asarray(case.labels)
        has_fg = labels.reshape(labels.shape[0], -1).max(axis=1) > 0
        for z in range(case.depth):
            target = full if has_fg[group_slice_indices(z, case.depth, group)].any() else empty
            target.append((index, z))
    if only_foreground or empty_group_share <= 0 or not empty:
        n_empty = 0
    elif empty_group_share >= 1:
        n_empty = len(empty)
    else:
        n_empty = min(len(empty), int(empty_group_share / (1 - empty_group_share) * len(full)))
    chosen = list(full)
    if n_empty:
        picks = rng.choice(len(empty), size=n_empty, replace=False)
        chosen += [empty[i] for i in sorted(picks.tolist())]
    if not chosen:
        raise ValueError("No training groups with foreground: the training split has no labels.")
    return np.array(sorted(chosen), dtype=np.int64).reshape(-1, 2)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class pooled over all voxels given.

    Parameters
    ----------
    pred, truth : ndarray
        Integer label arrays of the same shape.
    num_classes : int

    Returns
    -------
    ndarray
        (num_classes,) float64; NaN for a class absent from both.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"Prediction shape {pred.shape} differs from truth {truth.shape}.")
    out = np.full(num_classes, np.nan)
    for c in range(1, num_classes + 1):
        p, t = pred == c, truth == c
        denom = int(p.sum()) + int(t.sum())
        if denom:
            out[c - 1] = 2.0 * int(np.logical_and(p, t).sum()) / denom
    return out


#: Columns of a labels table that may hold class names, in order of preference.
NAME_COLUMNS = ("name", "class_name", "class", "label_name", "names", "classes")
#: Columns that may give each row's label value (else row ``i`` is label ``i``).
VALUE_COLUMNS = ("index", "label", "value", "label_value")


def class_names_from_table(table: Any, num_classes: int | None = None) -> tuple[str, ...] | None:
    """Class names of labels 1..C from a per-label table (napari ``Labels.features``/``properties``).

    Parameters
    ----------
    table : mapping of column -> sequence, or a pandas DataFrame
        One row per label. The names come from the first of :data:`NAME_COLUMNS` present
        (case-insensitive); the label value of each row from the first of
        :data:`VALUE_COLUMNS` holding integers, else the row number (napari: "the first row
        corresponds to the background label").
    num_classes : int or None
        C; None: the largest labelled value with a name.

    Returns
    -------
    tuple of str or None
        ``names[i - 1]`` for label ``i``; a label without a (non-empty) name gets
        ``"class i"``. None when the table has no name column or names no foreground label.
    """
    if table is None:
        return None
    columns = {str(k).lower(): k for k in (table.keys() if hasattr(table, "keys") else [])}
    name_key = next((columns[c] for c in NAME_COLUMNS if c in columns), None)
    if name_key is None:
        return None
    names = [None if v is None else str(v).strip() for v in list(table[name_key])]
    values = list(range(len(names)))
    for column in VALUE_COLUMNS:
        if column in columns and columns[column] != name_key:
            raw = np.asarray(list(table[columns[column]]))
            if raw.size == len(names) and np.issubdtype(raw.dtype, np.integer):
                values = [int(v) for v in raw]
                break
    by_value = {
        v: n for v, n in zip(values, names) if v > 0 and n and n.lower() not in ("nan", "none")
    }
    if not by_value:
        return None
    count = num_classes if num_classes is not None else max(by_value)
    return tuple(by_value.get(i, f"class {i}") for i in range(1, count + 1))
