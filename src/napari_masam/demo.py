"""The quick-start demo's core: the sample volume, a CT phantom, and boxes derived from them.

Headless and napari-free; ``napari-masam demo`` (:mod:`napari_masam.cli`) drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batch import input_kind, input_stem
from .io.boxes import save_boxes_file
from .io.sample_data import CTPhantom
from .prompts import mask_box
from .weights import file_sha256

#: Demo prompts for the bundled Colin27 T1 sample (``data/colin27_t1_2mm.nii.gz``, identified by
#: its sha256): ONE box around the brain on display slice 40, from which ``napari-masam demo``
#: propagates through the whole brain (:func:`napari_masam.propagation.iter_propagate`). The box
#: is the bounding box (XYXY, display slice pixels, inclusive) of the same subject's brain mask
#: (mricron's ``ch2bet.nii.gz`` taken to the sample's 2 mm grid by the sample's own recipe),
#: ``(11, 10, 79, 97)`` on that slice, padded by 3 pixels. Measured with LiteMedSAM (OpenVINO):
#: brain Dice 0.855 over the whole volume, 65 of the brain's 75 slices labelled; the three
#: keyframes 38/40/42 padded alike gave 0.856 and the same slices, so one box is enough.
DEMO_SAMPLE_SHA256 = "10421d0bd493c3121c4a7a509d56a30a9e57f9f44cf64634450afcadc932fd64"
DEMO_SAMPLE_BOXES: dict[int, dict[int, tuple[float, float, float, float]]] = {
    1: {40: (8, 7, 82, 100)}
}


def sample_volume_path() -> Path | None:
    """The bundled sample NIfTI volume (``napari_masam/data``), or None."""
    data = Path(__file__).parent / "data"
    if not data.is_dir():
        return None
    candidates = sorted(p for p in data.iterdir() if input_kind(p) == "nifti")
    volumes = [p for p in candidates if not _looks_like_labels(p.name)]
    return (volumes or candidates or [None])[0]


def _looks_like_labels(name: str) -> bool:
    lower = name.lower()
    return any(token in lower for token in ("seg", "label", "mask", "atlas"))


#: Grid of the demo's CT phantom (small, so the demo stays quick on a CPU): (Z, Y, X), mm.
PHANTOM_SHAPE_ZYX = (20, 64, 80)
PHANTOM_SPACING_ZYX = (10.0, 5.0, 5.0)
#: Phantom organs the demo puts boxes on (label values of io.sample_data.PHANTOM_CLASSES).
PHANTOM_DEMO_OBJECTS = (1, 2)  # liver, spleen


def write_phantom(path: Path, phantom: CTPhantom | None = None) -> Path:
    """Write the synthetic abdominal CT of :func:`napari_masam.io.sample_data.make_ct_phantom`
    (HU, int16) as a RAS NIfTI whose displayed volume is ``phantom.image_hu``.

    ``phantom`` defaults to ``make_ct_phantom(PHANTOM_SHAPE_ZYX, PHANTOM_SPACING_ZYX)``.
    """
    from .io.nifti import write_nifti
    from .io.sample_data import make_ct_phantom

    if phantom is None:
        phantom = make_ct_phantom(PHANTOM_SHAPE_ZYX, PHANTOM_SPACING_ZYX)
    return write_nifti(
        path,
        phantom.image_hu,
        is_labels=False,
        spacing_zyx=phantom.spacing_zyx,
        translate_zyx=phantom.translate_zyx,
    )


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample: the cut maximising the between-class variance."""
    values = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    total = weight[-1]
    mean_low = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = mean_low / weight
        mu1 = (mean_low[-1] - mean_low) / (total - weight)
        between = weight * (total - weight) * (mu0 - mu1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[1:][int(np.argmax(between))])


def derive_demo_boxes(
    volume_zyx: np.ndarray, n_objects: int = 2, n_keyframes: int = 3
) -> dict[int, dict[int, tuple[float, float, float, float]]]:
    """Boxes around the brightest structures of a volume, on a few keyframes each.

    Otsu's threshold gives a mask of bright structures (applied a second time within the
    mask when the first cut only separated the body from the air, i.e. kept > 25 % of the
    voxels); its ``n_objects`` largest 3-D connected
    blobs become objects 1..n. Each gets ``n_keyframes`` slices evenly spread over the middle
    60 % of its extent, with the blob's bounding box there padded by 3 pixels (XYXY pixel
    indices of the displayed slice, max edge inclusive) -- the demo's stand-in for boxes a user
    draws.

    Returns
    -------
    dict
        ``{object_id: {slice: (x0, y0, x1, y1)}}``.

    Raises
    ------
    ValueError
        If nothing stands out of the background.
    """
    from scipy import ndimage

    volume = np.asarray(volume_zyx, dtype=np.float32)
    bright = volume > otsu_threshold(volume)
    if bright.mean() > 0.25:  # that cut separated air from the body: cut again inside
        bright = volume > otsu_threshold(volume[bright])
    blobs, count = ndimage.label(bright)
    if count == 0:
        raise ValueError("demo: the sample volume has no bright structure to put a box on")
    sizes = ndimage.sum_labels(np.ones_like(blobs), blobs, index=np.arange(1, count + 1))
    order = np.argsort(sizes)[::-1][:n_objects] + 1
    return keyframe_boxes(blobs, [int(b) for b in order], n_keyframes)


def keyframe_boxes(
    labels_zyx: np.ndarray, label_ids: Sequence[int], n_keyframes: int = 3
) -> dict[int, dict[int, tuple[float, float, float, float]]]:
    """Boxes of the given labels of a ``(Z, Y, X)`` label volume on a few keyframes each.

    Label ``label_ids[i]`` becomes object ``i + 1`` (labels absent from the volume are
    skipped). Each gets ``n_keyframes`` slices evenly spread over the middle 60 % of its
    extent, with its bounding box there padded by 3 pixels (XYXY pixel indices of the displayed
    slice, max edge inclusive).
    """
    blobs = np.asarray(labels_zyx)
    boxes: dict[int, dict[int, tuple[float, float, float, float]]] = {}
    _, height, width = blobs.shape
    for blob in label_ids:
        zs = np.flatnonzero((blobs == blob).any(axis=(1, 2)))
        if zs.size == 0:
            continue
        lo, hi = int(zs[0]), int(zs[-1])
        span = hi - lo
        picks = np.unique(
            np.round(np.linspace(lo + 0.2 * span, hi - 0.2 * span, n_keyframes)).astype(int)
        )
        frames: dict[int, tuple[float, float, float, float]] = {}
        for z in picks:
            tight = mask_box(blobs[z] == blob)  # THE mask -> box conversion
            if tight is None:
                continue
            x0, y0, x1, y1 = tight
            frames[int(z)] = (
                float(max(x0 - 3, 0)),
                float(max(y0 - 3, 0)),
                float(min(x1 + 3, width - 1)),
                float(min(y1 + 3, height - 1)),
            )
        if frames:
            boxes[len(boxes) + 1] = frames
    return boxes


def write_boxes_json(
    path: Path, boxes: dict[int, dict[int, tuple[float, float, float, float]]]
) -> Path:
    """Write keyframe boxes in the box-file schema of ``segment --boxes`` (JSON, atomically)."""
    return save_boxes_file(boxes, path)


@dataclass(frozen=True)
class DemoInput:
    """What ``napari-masam demo`` segments.

    Attributes
    ----------
    sample : Path
        The NIfTI volume (bundled sample, or a phantom written under ``out/inputs``).
    source : str
        ``"bundled sample"`` or ``"synthetic phantom"``.
    boxes : dict
        ``{object_id: {slice: (x0, y0, x1, y1)}}`` keyframe boxes (display pixels, inclusive).
    boxes_path : Path
        Where the boxes were written (``out/boxes/<stem>.json``, the ``segment --boxes`` schema).
    """

    sample: Path
    source: str
    boxes: dict[int, dict[int, tuple[float, float, float, float]]]
    boxes_path: Path


def prepare_demo(out: Path) -> DemoInput:
    """Pick the demo's volume and keyframe boxes, write the box file under ``out/boxes``.

    The boxes are keyframes the demo propagates from (``segment --propagate``). The bundled
    Colin27 sample gets :data:`DEMO_SAMPLE_BOXES` (one box on the brain); without a bundled sample a CT
    phantom is written and boxed around two organs; any other sample gets Otsu-derived boxes.
    """
    from .io.nifti import read_nifti
    from .io.sample_data import make_ct_phantom

    sample = sample_volume_path()
    if sample is None:
        phantom = make_ct_phantom(PHANTOM_SHAPE_ZYX, PHANTOM_SPACING_ZYX)
        sample = write_phantom(out / "inputs" / "phantom.nii.gz", phantom)
        source = "synthetic phantom"
        boxes = keyframe_boxes(phantom.labels, PHANTOM_DEMO_OBJECTS)  # the phantom's organs
    else:
        source = "bundled sample"
        if file_sha256(sample) == DEMO_SAMPLE_SHA256:
            boxes = DEMO_SAMPLE_BOXES
        else:
            boxes = derive_demo_boxes(np.asarray(read_nifti(sample).data))
    boxes_path = write_boxes_json(out / "boxes" / f"{input_stem(sample)}.json", boxes)
    return DemoInput(sample, source, boxes, boxes_path)
