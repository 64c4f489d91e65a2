"""The contract every segmentation backbone of napari-masam fulfils.

The inference engine, the widget, the CLI and fine-tuning only talk to a
:class:`SegmentationModel`; whether the encoder is SAM's ViT (MA-SAM) or LiteMedSAM's TinyViT is
a detail of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

#: Axis codes of the stacks napari-masam shows and feeds: (Z, Y, X) = (Superior, Posterior, Left).
#: For a RAS-stored NIfTI this is the authors' training orientation ``A.T[::-1, ::-1]`` per slice.
DISPLAY_ORIENTATION = "SPL"


#: A batch of point prompts: coords (N, P, 2) float32 XY pixels of the model input, labels
#: (N, P) int64 (1 positive, 0 negative, -1 padding).
PointPrompts = tuple[torch.Tensor, torch.Tensor]

#: POINT_LABELS: the label values of a real point (0 negative, 1 positive); -1 pads a row.
POINT_LABELS = (0, 1)
PADDING_LABEL = -1

#: Why a model kind refuses points (measured; filled by the model modules, shown to users).
POINTS_UNSUPPORTED_REASON: dict[str, str] = {}


@dataclass(frozen=True)
class ModelMetadata:
    """What a user and the engine need to know about a trained model, beside its weights.

    Attributes
    ----------
    name : str
        Human-readable model name (registry key or checkpoint name).
    class_names : tuple of str
        Foreground class names; class ``i`` (1-based label value) is ``class_names[i - 1]``.
    class_colors : tuple of str
        ``#rrggbb`` colours, one per foreground class.
    intensity_preset : str
        Key of :data:`napari_masam.preprocess.INTENSITY_PRESETS` the model was trained with.
    orientation : str
        Axis codes of the (Z, Y, X) stack the model expects (see :data:`DISPLAY_ORIENTATION`).
        Empty string: orientation-free (video, 2D photographs).
    resize_mode : str
        ``"stretch"`` (each slice resized to the square input, aspect not kept; MA-SAM) or
        ``"longest_side"`` (longest side to the input size, then zero-pad bottom/right; LiteMedSAM).
    sha256 : str or None
        Digest of the weights file(s) the model was loaded from.
    provenance : dict
        Free-form JSON-able facts (source files, training run, software versions).
    """

    name: str
    class_names: tuple[str, ...] = ("object",)
    class_colors: tuple[str, ...] = ("#ff0000",)
    intensity_preset: str = "minmax"
    orientation: str = DISPLAY_ORIENTATION
    resize_mode: str = "stretch"
    sha256: str | None = None
    provenance: dict = field(default_factory=dict, compare=False, hash=False)


class SegmentationModel(nn.Module):
    """Base class of every network the engine can drive.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`encode` and
    :meth:`decode`.

    Attributes
    ----------
    image_size : int
        Side S of the square model input, in pixels.
    slices_per_group : int
        D, the number of neighbouring slices/frames encoded together (5 for MA-SAM, 1 for a 2D
        model). The encoder output of a slice depends on its whole group.
    num_classes : int
        C, the number of foreground classes; logits have C + 1 channels (channel 0 background).
    supports_automatic : bool
        Whether prompt-free multi-class segmentation is meaningful (a trained class head).
    supports_boxes : bool
        Whether box prompts are meaningful.
    supports_points : bool
        Whether point prompts (positive / negative clicks) are meaningful; :meth:`decode` raises
        ValueError for points otherwise. Class default False.
    metadata : ModelMetadata
    preferred_batch_size : int or None
        Windows per :meth:`encode` call that measured fastest for this model on a CPU (None: no
        preference; the engine decides). Set by :class:`~napari_masam.model.runtime.
        RuntimeLiteMedSAM`.
    """

    #: Architecture family, the ``kind`` of :meth:`get_config` (``"masam"``, ``"litemedsam"``, ...).
    kind: str = ""
    #: class-level default; subclasses or instances may set an int
    preferred_batch_size: int | None = None
    image_size: int
    slices_per_group: int
    num_classes: int
    supports_automatic: bool
    supports_boxes: bool
    #: class default; models whose prompt encoder was trained on points set True
    supports_points: bool = False
    #: class default; models whose IoU head was trained (it predicts the IoU of each mask with
    #: the truth) set True, and :meth:`decode_scored` then returns those predictions
    predicts_iou: bool = False
    metadata: ModelMetadata

    def get_config(self) -> dict:
        """JSON-able architecture description (``{"kind": ..., ...}``) that rebuilds the network.

        Every concrete model overrides it; the base gives only the kind.
        """
        return {"kind": self.kind}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt-free image embeddings.

        Parameters
        ----------
        images : Tensor
            (B, D, 3, S, S) float in [0, 1], D = ``slices_per_group``.

        Returns
        -------
        Tensor
            (B*D, E, g, g) embeddings; row ``b*D + d`` is slice ``d`` of group ``b``.
        """
        raise NotImplementedError

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes_xyxy: torch.Tensor | None = None,
        points: PointPrompts | None = None,
    ) -> torch.Tensor:
        """Mask logits from embeddings and optional boxes and points (one prompt set per row).

        Parameters
        ----------
        embeddings : Tensor
            (N, E, g, g) from :meth:`encode` (any subset of rows).
        boxes_xyxy : Tensor or None
            (N, 4) float32 boxes, XYXY in pixels of the model input (x = column; corners are
            pixel indices, both inclusive), or None (automatic mode when ``points`` is None too).
        points : (coords, labels) or None
            Point prompts (models with :attr:`supports_points` only): coords (N, P, 2) float32
            XY pixels of the model input (same frame as ``boxes_xyxy``), labels (N, P) int64,
            1 positive, 0 negative, -1 padding (ignored). See :func:`check_points`.

        Returns
        -------
        Tensor
            (N, C + 1, h, w) logits over the model input square (h = w, often S); softmax over
            channels gives class probabilities.
        """
        raise NotImplementedError

    def decode_scored(
        self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Box-prompted logits and the model's own quality estimate of each mask.

        Parameters
        ----------
        embeddings : Tensor
            (N, E, g, g) from :meth:`encode`.
        boxes_xyxy : Tensor
            (N, 4) XYXY boxes as in :meth:`decode`.

        Returns
        -------
        logits : Tensor
            (N, C + 1, h, w), equal to ``decode(embeddings, boxes_xyxy)``.
        scores : Tensor or None
            (N,) float32 predicted IoU of each row's foreground mask with the truth (SAM's IoU
            head), where :attr:`predicts_iou`; None otherwise (the default here).
        """
        return self.decode(embeddings, boxes_xyxy), None

    def refuse_points(self, points: PointPrompts | None) -> None:
        """ValueError when ``points`` is given to a model without :attr:`supports_points`."""
        if points is not None and not self.supports_points:
            raise ValueError(points_refusal(self))

    def forward(self, images: torch.Tensor, boxes_xyxy: torch.Tensor | None = None) -> torch.Tensor:
        """``decode(encode(images), boxes)``; boxes (B, D, 4) or None -> (B*D, C + 1, h, w)."""
        embeddings = self.encode(images)
        if boxes_xyxy is not None:
            boxes_xyxy = boxes_xyxy.reshape(-1, 4)
        return self.decode(embeddings, boxes_xyxy)


def points_refusal(model: SegmentationModel) -> str:
    """THE message for a model without :attr:`SegmentationModel.supports_points` (engine,
    widget and CLI show the same words, with the measured reason of its kind)."""
    return points_refusal_text(model.kind, model.metadata.name)


def points_refusal_text(kind: str, name: str) -> str:
    """:func:`points_refusal` for a model known by its kind and name (before it is loaded)."""
    reason = POINTS_UNSUPPORTED_REASON.get(
        kind, "its prompt encoder was not trained on point prompts"
    )
    return (
        f"Point prompts are not supported by model {name!r}: {reason}. Draw a box around the "
        "object instead (a Shapes layer), or choose an MA-SAM model."
    )


def check_points(
    points: PointPrompts, n: int, device: torch.device | str | None = None
) -> PointPrompts:
    """Validate a batch of point prompts and bring it to ``device``.

    Parameters
    ----------
    points : (coords, labels)
        coords (N, P, 2) float XY pixels of the model input; labels (N, P) integers in
        {-1, 0, 1} (-1 = padding).
    n : int
        N, the number of embedding rows.
    device : torch.device, str or None

    Returns
    -------
    (Tensor, Tensor)
        coords float32 (N, P, 2), labels int64 (N, P).

    Raises
    ------
    TypeError
        If ``points`` is not a (coords, labels) pair.
    ValueError
        For wrong shapes, non-finite coordinates or labels outside {-1, 0, 1}.
    """
    if not isinstance(points, (tuple, list)) or len(points) != 2:
        raise TypeError(
            "points must be a (coords, labels) pair of tensors: coords (N, P, 2) XY pixels of "
            f"the model input, labels (N, P) in {{-1, 0, 1}}; got {type(points).__name__}."
        )
    coords = torch.as_tensor(points[0], device=device, dtype=torch.float32)
    labels = torch.as_tensor(points[1], device=device).to(torch.int64)
    if coords.ndim != 3 or coords.shape[0] != n or coords.shape[2] != 2:
        raise ValueError(
            f"point coords must be (N, P, 2) with N = {n} embedding rows; got "
            f"{tuple(coords.shape)}."
        )
    if tuple(labels.shape) != tuple(coords.shape[:2]):
        raise ValueError(
            f"point labels must be (N, P) = {tuple(coords.shape[:2])}, one per point; got "
            f"{tuple(labels.shape)}."
        )
    if not bool(torch.isfinite(coords).all()):
        raise ValueError("point coords contain NaN or infinity; give finite pixel positions.")
    if labels.numel() and not bool(((labels >= PADDING_LABEL) & (labels <= 1)).all()):
        raise ValueError(
            "point labels must be 1 (positive), 0 (negative) or -1 (padding); got "
            f"{sorted(set(labels.unique().tolist()))}."
        )
    return coords, labels


def decode_point_groups(
    n: int,
    boxes_xyxy: torch.Tensor | None,
    points: PointPrompts,
    decode_rows: Callable[[torch.Tensor, torch.Tensor | None, PointPrompts | None], torch.Tensor],
) -> torch.Tensor:
    """Decode rows grouped by their number of real points, padding removed.

    SAM's prompt encoder turns a padding point (label -1) into a "not a point" token that the
    decoder still attends to, so a padded row would differ from the same row alone. Rows are
    therefore decoded in groups of equal real point count with the padding dropped (SAM's
    tokens carry no order, so moving real points to the front changes nothing): a row gives
    the same logits whatever the longest row of its batch.

    Parameters
    ----------
    n : int
        Number of rows.
    boxes_xyxy : Tensor or None
        (N, 4) boxes or None.
    points : (coords, labels)
        Validated by :func:`check_points`.
    decode_rows : callable
        ``decode_rows(index, boxes, points)`` -> (len(index), K, h, w) logits of the rows
        ``index`` with their boxes (or None) and compacted points (or None when the group has
        none).

    Returns
    -------
    Tensor
        (N, K, h, w) logits in row order.

    Raises
    ------
    ValueError
        For a row with neither a box nor a real point.
    """
    if n < 1:
        raise ValueError("Nothing to decode: no embedding rows.")
    coords, labels = points
    real = labels != PADDING_LABEL
    counts = real.sum(dim=1)
    if boxes_xyxy is None and bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"Rows {rows[:8]} have neither a box nor a point (only padding); give each row a "
            "box or at least one point."
        )
    # real points first in each row (stable), so that [:k] keeps exactly the real ones
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    coords = torch.gather(coords, 1, order[..., None].expand(-1, -1, 2))
    labels = torch.gather(labels, 1, order)
    out: torch.Tensor | None = None
    for k in sorted(set(counts.tolist())):
        index = torch.nonzero(counts == k).flatten()
        group_boxes = None if boxes_xyxy is None else boxes_xyxy.index_select(0, index)
        group_points = (
            (coords.index_select(0, index)[:, :k], labels.index_select(0, index)[:, :k])
            if k
            else None
        )
        logits = decode_rows(index, group_boxes, group_points)
        if out is None:
            out = logits.new_empty((n, *logits.shape[1:]))
        out[index] = logits
    return out  # type: ignore[return-value]  # n >= 1 rows always form one group
