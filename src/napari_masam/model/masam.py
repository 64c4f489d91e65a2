"""The composed MA-SAM network: encoder (3D adapters + FacT), SAM's prompt encoder, decoder.

Chen et al., "MA-SAM: Modality-agnostic SAM Adaptation for 3D Medical Image Segmentation",
Medical Image Analysis 98:103310 (2024); spec ``shared/spec/MASAM.md``. Inputs are
``(B, D, 3, S, S)`` float in [0, 1] with no mean/std normalisation (the authors' pixel_mean 0,
pixel_std 1); outputs are ``(B*D, C + 1, S, S)`` logits, row ``b*D + d`` = slice ``d`` of
group ``b``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from ..palette import label_colors
from .base import ModelMetadata, PointPrompts, SegmentationModel, check_points, decode_point_groups
from .config import MASAM_CONFIGS, MASAMConfig
from .decoder import MASAMMaskDecoder
from .encoder import MASAMImageEncoder

#: Regular expressions (on our parameter names) of the parts MA-SAM fine-tunes (spec section 4):
#: both adapters of every block (with their LayerNorms), FacT's shared U/V and per-block cores,
#: the whole prompt encoder and the whole mask decoder. Everything else of SAM is frozen.
#: MA-SAM-Lite (TinyViT stages ``layers.N``, one FacT U/V per stage) trains the same parts plus
#: its automatic class head (class tokens and their hypernetwork MLPs).
TRAINABLE_PATTERNS: tuple[str, ...] = (
    r"^image_encoder\.blocks\.\d+\.adapter_[12]\.",
    r"^image_encoder\.fact\.[uv]\.",
    r"^image_encoder\.blocks\.\d+\.attn\.qkv\.[qv]_FacTs\.",
    r"^image_encoder\.layers\.\d+\.blocks\.\d+\.adapter_[12]\.",
    r"^image_encoder\.layers\.\d+\.fact\.[uv]\.",
    r"^image_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv\.[qv]_FacTs\.",
    r"^prompt_encoder\.",
    r"^mask_decoder\.",
    r"^class_tokens\.",
    r"^class_hypernetworks_mlps\.",
)
#: The adapter parameters: a model without any has nothing the MA-SAM recipe would train.
_ADAPTER_RE = re.compile(r"^image_encoder\.(layers\.\d+\.)?blocks\.\d+\.adapter_[12]\.")
_TRAINABLE_RE = re.compile("|".join(TRAINABLE_PATTERNS))


def default_metadata(config: MASAMConfig, name: str | None = None) -> ModelMetadata:
    """Generic metadata for a model without any: ``class 1``, ``class 2``, ... and palette colours."""
    n = config.num_classes
    return ModelMetadata(
        name=name or f"masam_{config.name}",
        class_names=tuple(f"class {i}" for i in range(1, n + 1)),
        class_colors=label_colors(n),
    )


class MASAM(SegmentationModel):
    """MA-SAM: SAM's ViT with 3D adapters and FacT, SAM's prompt encoder, a x16 decoder.

    Parameters
    ----------
    config : MASAMConfig
        The architecture (see :data:`napari_masam.model.config.MASAM_CONFIGS`).
    metadata : ModelMetadata or None
        Class names, colours, intensity preset, ...; generic ones when None.

    Attributes
    ----------
    image_encoder : MASAMImageEncoder
    prompt_encoder : segment_anything.modeling.PromptEncoder
    mask_decoder : MASAMMaskDecoder
    config : MASAMConfig
    """

    kind = "masam"

    def __init__(self, config: MASAMConfig, metadata: ModelMetadata | None = None) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.slices_per_group = config.slices_per_group
        self.num_classes = config.num_classes
        self.supports_automatic = True
        self.supports_boxes = True
        # SAM's prompt encoder, trained by Meta on clicks (and fine-tuned whole by MA-SAM)
        self.supports_points = True
        self.metadata = metadata if metadata is not None else default_metadata(config)
        grid = config.grid_size
        self.image_encoder = MASAMImageEncoder(config)
        self.prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        self.mask_decoder = MASAMMaskDecoder(config)

    # -- contract -------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """JSON-able architecture (:meth:`MASAMConfig.to_dict`)."""
        return self.config.to_dict()

    def set_attention_impl(self, impl: str) -> None:
        """``"sdpa"`` (fused, default) or ``"reference"`` (segment-anything's own attention)."""
        self.image_encoder.set_attention_impl(impl)

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.image_size
        if images.ndim != 5 or images.shape[2] != 3 or images.shape[-2:] != (s, s):
            raise ValueError(
                f"MA-SAM expects images of shape (B, D, 3, {s}, {s}) (groups of D slices, "
                f"3 channels, float in [0, 1]); got {tuple(images.shape)}. Resize slices to "
                f"{s}x{s} and copy grey slices into 3 channels."
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt-free image embeddings of whole groups.

        Parameters
        ----------
        images : Tensor
            (B, D, 3, S, S) float in [0, 1] (no mean/std normalisation); D is normally
            ``slices_per_group`` (the adapters mix the D slices of each group).

        Returns
        -------
        Tensor
            (B*D, E, g, g) float, E = ``config.prompt_embed_dim``, g = S // 16; row ``b*D + d``
            is slice ``d`` of group ``b``.
        """
        self._check_images(images)
        b, d = images.shape[:2]
        return self.image_encoder(images.reshape(b * d, *images.shape[2:]), d)

    def decode_with_iou(
        self,
        embeddings: torch.Tensor,
        boxes_xyxy: torch.Tensor | None = None,
        points: PointPrompts | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits and the iou head's predictions (the authors' ``iou_predictions``).

        Parameters
        ----------
        embeddings : Tensor
            (N, E, g, g) from :meth:`encode`.
        boxes_xyxy : Tensor or None
            (N, 4) float boxes, XYXY pixels of the model input (x = column), one per row.
        points : (coords, labels) or None
            coords (N, P, 2) XY pixels of the model input, labels (N, P): 1 positive,
            0 negative, -1 padding (:func:`~napari_masam.model.base.check_points`).

        Returns
        -------
        masks : Tensor
            (N, C + 1, S, S) logits (channel 0 background).
        iou : Tensor
            (N, C + 1).

        Notes
        -----
        Automatic mode is ``boxes_xyxy is None and points is None`` (no prompt token: the
        class tokens alone). Points without boxes are a *prompted* call: SAM's prompt encoder
        appends its not-a-point padding token as SAM does for clicks alone, and every row must
        have at least one real point. Padding (-1) is removed before the prompt encoder (rows
        decoded in groups of equal point count, :func:`~napari_masam.model.base.
        decode_point_groups`), so a row's logits do not depend on the other rows.
        """
        if embeddings.ndim != 4:
            raise ValueError(f"embeddings must be (N, E, g, g); got {tuple(embeddings.shape)}.")
        if boxes_xyxy is not None:
            if boxes_xyxy.shape != (embeddings.shape[0], 4):
                raise ValueError(
                    f"boxes_xyxy must be (N, 4) with N = {embeddings.shape[0]} embedding rows "
                    f"(one XYXY box per slice); got {tuple(boxes_xyxy.shape)}."
                )
            boxes_xyxy = boxes_xyxy.to(device=embeddings.device, dtype=torch.float32)
        image_pe = self.prompt_encoder.get_dense_pe()
        if points is None:
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes_xyxy, masks=None)
            return self.mask_decoder(embeddings, image_pe, sparse, dense)
        self.refuse_points(points)
        points = check_points(points, embeddings.shape[0], embeddings.device)
        ious: dict[int, torch.Tensor] = {}

        def rows(index: torch.Tensor, boxes, group_points) -> torch.Tensor:
            sparse, dense = self.prompt_encoder(points=group_points, boxes=boxes, masks=None)
            masks, iou = self.mask_decoder(
                embeddings.index_select(0, index), image_pe, sparse, dense
            )
            for j, i in enumerate(index.tolist()):
                ious[i] = iou[j]
            return masks

        masks = decode_point_groups(embeddings.shape[0], boxes_xyxy, points, rows)
        return masks, torch.stack([ious[i] for i in range(len(ious))])

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes_xyxy: torch.Tensor | None = None,
        points: PointPrompts | None = None,
    ) -> torch.Tensor:
        """Mask logits (N, C + 1, S, S) from embeddings (N, E, g, g), optional boxes (N, 4)
        and optional points ((N, P, 2), (N, P)).

        See :meth:`decode_with_iou`. In automatic mode all rows share the same prompt tokens;
        with boxes, row i is decoded with box i (SAM's box embedding: corners + 0.5, divided by
        the input size) and its points (SAM's point embedding, trained by Meta on clicks).
        """
        return self.decode_with_iou(embeddings, boxes_xyxy, points)[0]

    def forward(self, images: torch.Tensor, boxes_xyxy: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B*D, C + 1, S, S) of images (B, D, 3, S, S) and optional boxes (B, D, 4).

        Boxes are XYXY pixels of the model input, one per slice.
        """
        if boxes_xyxy is not None and boxes_xyxy.shape != (*images.shape[:2], 4):
            raise ValueError(
                f"boxes_xyxy must be (B, D, 4) = {(*images.shape[:2], 4)}, one box per slice; "
                f"got {tuple(boxes_xyxy.shape)}."
            )
        return super().forward(images, boxes_xyxy)


def trainable_parameter_names(model: nn.Module, train_prompt_encoder: bool = True) -> list[str]:
    """Names of the parameters the MA-SAM recipe fine-tunes (spec section 4), in state order.

    THE one definition for every model kind (MA-SAM ViT, MA-SAM-Lite): the parameters matching
    :data:`TRAINABLE_PATTERNS` (adapters with their norms, FacT U/V and cores, mask decoder,
    MA-SAM-Lite's class head, and the prompt encoder unless ``train_prompt_encoder`` is False).

    Raises
    ------
    ValueError
        For a model without 3D adapters (plain LiteMedSAM, a SAM): nothing MA-SAM would train.
    """
    names = [name for name, _ in model.named_parameters() if _TRAINABLE_RE.match(name)]
    if not any(_ADAPTER_RE.match(n) for n in names):
        raise ValueError(
            f"No fine-tuning recipe for a {type(model).__name__}: it has no 3D adapters. Train "
            "'masam-lite' (LiteMedSAM with 3D adapters) or an MA-SAM ViT model instead."
        )
    if not train_prompt_encoder:
        names = [n for n in names if not n.startswith("prompt_encoder.")]
    return names


def set_trainable(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Freeze everything except the MA-SAM trainable parts (or exactly ``names``).

    Returns
    -------
    int
        Number of trainable scalars.
    """
    chosen = set(trainable_parameter_names(model) if names is None else names)
    total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        if name in chosen:
            total += param.numel()
    return total


def build_masam(
    config: MASAMConfig | str = "vit_b",
    *,
    num_classes: int | None = None,
    metadata: ModelMetadata | None = None,
    device: str | torch.device = "cpu",
    **changes: Any,
) -> MASAM:
    """A fresh MA-SAM (random init, SAM parts frozen per spec section 4), in eval mode.

    Parameters
    ----------
    config : MASAMConfig or str
        A config or a key of :data:`MASAM_CONFIGS`.
    num_classes : int or None
        Overrides ``config.num_classes``.
    metadata : ModelMetadata or None
        Generic names and colours when None.
    device : str or torch.device
        Where to put the model (``"auto"`` allowed).
    **changes
        Other config fields to override (``image_size=...``).
    """
    from ..devices import resolve_device

    if isinstance(config, str):
        try:
            config = MASAM_CONFIGS[config]
        except KeyError:
            raise ValueError(
                f"Unknown MA-SAM config {config!r}; known: {', '.join(MASAM_CONFIGS)}."
            ) from None
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if changes:
        config = config.replace(**changes)
    model = MASAM(config, metadata=metadata)
    set_trainable(model)
    return model.to(resolve_device(device)).eval()
