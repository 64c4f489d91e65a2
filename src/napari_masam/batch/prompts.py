"""The box prompts of a batch input: which file, read once, checked against the stack."""

from __future__ import annotations

from pathlib import Path

from ..io.boxes import BoxFile
from ..weights import file_sha256
from .config import BoxesDict
from .inputs import BatchInput


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


def prompt_boxes(
    path: Path,
    n_frames: int | None,
    shape_yx: tuple[int, int] | None = None,
    parsed: BoxFile | None = None,
    *,
    keyframes_only: bool = False,
) -> tuple[BoxesDict, dict[int, tuple[int, int]], dict[str, object]]:
    """Read a box file once, check it against the stack, and give the engine's prompts.

    Parameters
    ----------
    path : Path
        A box file (:mod:`napari_masam.io.boxes`: our JSON/CSV table or napari's Shapes CSV).
    n_frames : int or None
        Number of slices/frames of the stack (None: unknown).
    shape_yx : (int, int) or None
        Slice size: a box wholly outside it is an error, a box partly outside is clipped.
    parsed : BoxFile or None
        ``path`` already parsed (the CLI parses a single box file once, at the edge).
    keyframes_only : bool
        Give the keyframes as drawn (for propagation) instead of boxes interpolated over each
        object's range.

    Returns
    -------
    boxes : dict
        ``{object_id: {slice: (x0, y0, x1, y1)}}``.
    limits : dict
        ``{object_id: (first, last)}`` of the objects the file bounds with ``last_slice``.
    record : dict
        JSON-able prompts block for the provenance sidecar (the keyframes as given).

    Raises
    ------
    ValueError
        Unusable file: empty, no boxes, non-integral ids/slices, boxes outside the stack.
    """
    from ..io.boxes import read_box_file
    from ..prompts import clip_box

    box_file = parsed if parsed is not None and parsed.path == path else read_box_file(path)
    box_file.check_fits(n_frames, shape_yx)
    boxes = box_file.boxes(interpolate=not keyframes_only)
    if shape_yx is not None:
        boxes = {
            oid: {z: b for z, b in ((z, clip_box(b, shape_yx)) for z, b in frames.items()) if b}
            for oid, frames in boxes.items()
        }
    limits = box_file.limits()
    record: dict[str, object] = {
        "file": path.name,
        "format": box_file.kind,
        "sha256": file_sha256(path),
        "objects": sorted(boxes),
        "keyframes": {
            str(obj): {str(z): [float(v) for v in b] for z, b in sorted(frames.items())}
            for obj, frames in sorted(box_file.keyframes.items())
        },
        "ranges": {str(obj): list(r) for obj, r in sorted(box_file.ranges.items())},
        "limits": {str(obj): list(r) for obj, r in limits.items()},
        "use": "propagated from keyframes" if keyframes_only else "interpolated between keyframes",
    }
    return boxes, limits, record


def load_boxes(
    path: Path,
    n_frames: int | None,
    shape_yx: tuple[int, int] | None = None,
    parsed: BoxFile | None = None,
) -> tuple[BoxesDict, dict[str, object]]:
    """Boxes interpolated over each object's range, and the sidecar's prompts block
    (:func:`prompt_boxes` without propagation)."""
    boxes, _, record = prompt_boxes(path, n_frames, shape_yx, parsed)
    return boxes, record


def boxes_in_window(boxes: BoxesDict, start: int, stop: int) -> BoxesDict:
    """Boxes of slices ``start <= z < stop``, re-indexed from ``start``; empty objects dropped."""
    out: BoxesDict = {}
    for obj_id, frames in boxes.items():
        sub = {z - start: b for z, b in frames.items() if start <= z < stop}
        if sub:
            out[obj_id] = sub
    return out
