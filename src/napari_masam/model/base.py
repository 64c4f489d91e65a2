"""The contract every segmentation backbone of napari-masam fulfils.

The inference engine, the widget, the CLI and fine-tuning only talk to a
:class:`SegmentationModel`; whether the encoder is SAM's ViT (MA-SAM) or LiteMedSAM's TinyViT is
a detail of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: Axis codes of the stacks napari-masam shows and feeds: (Z, Y, X) = (Superior, Posterior, Left).
#: For a RAS-stored NIfTI this is the authors' training orientation ``A.T[::-1, ::-1]`` per slice.
DISPLAY_ORIENTATION = "SPL"


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
        self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mask logits from embeddings and optional boxes (one per row).

        Parameters
        ----------
        embeddings : Tensor
            (N, E, g, g) from :meth:`encode` (any subset of rows).
        boxes_xyxy : Tensor or None
            (N, 4) float32 boxes, XYXY in pixels of the model input (x = column; corners are
            pixel indices, both inclusive), or None for automatic mode.

        Returns
        -------
        Tensor
            (N, C + 1, h, w) logits over the model input square (h = w, often S); softmax over
            channels gives class probabilities.
        """
        raise NotImplementedError

    def forward(self, images: torch.Tensor, boxes_xyxy: torch.Tensor | None = None) -> torch.Tensor:
        """``decode(encode(images), boxes)``; boxes (B, D, 4) or None -> (B*D, C + 1, h, w)."""
        embeddings = self.encode(images)
        if boxes_xyxy is not None:
            boxes_xyxy = boxes_xyxy.reshape(-1, 4)
        return self.decode(embeddings, boxes_xyxy)
