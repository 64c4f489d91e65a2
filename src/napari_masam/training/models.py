"""The model a fine-tuning run starts from, and which of its parameters train.

Where the weights come from is decided by :class:`napari_masam.checkpoints.ModelSource` (our
file, SAM base + the authors' file, or the embedded LiteMedSAM); which parameters train by
:func:`napari_masam.model.masam.trainable_parameter_names`, the one definition for every kind.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..model.base import SegmentationModel
from ..model.masam import set_trainable
from ..model.masam import trainable_parameter_names as trainable_parameter_names
from .config import BACKBONES, TEST_BACKBONES, TrainingConfig


def apply_trainable(model: SegmentationModel, names: Sequence[str]) -> int:
    """Freeze every parameter except ``names``; returns the number of trainable scalars.

    :func:`napari_masam.model.masam.set_trainable` with an explicit list.
    """
    return set_trainable(model, list(names))


def build_training_model(
    backbone: str,
    num_classes: int,
    *,
    sam_checkpoint: str | os.PathLike[str] | None = None,
    masam_checkpoint: str | os.PathLike[str] | None = None,
    init_checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    image_size: int | None = None,
    **changes: Any,
) -> SegmentationModel:
    """A model to fine-tune for ``num_classes`` classes.

    Parameters
    ----------
    backbone : str
        One of :data:`~napari_masam.training.config.BACKBONES`: ``"masam-lite"`` (embedded
        LiteMedSAM + zero-init adapters; trainable on a CPU) or ``"vit_b"``/``"vit_l"``/
        ``"vit_h"`` (from ``sam_checkpoint``, optionally with the authors' ``masam_checkpoint``
        on top). The test configurations (``"tiny"``, ``"tiny_train"``: random tiny MA-SAMs)
        are accepted too but offered in no menu.
    num_classes : int
        C foreground classes.
    sam_checkpoint, masam_checkpoint : path or None
        Meta's SAM weights (the frozen base) and an MA-SAM checkpoint of the authors.
    init_checkpoint : path or None
        Continue from one of our single-file checkpoints (any kind; class count must match).
    device : str or torch.device
    seed : int
        Seeds the random initialisation of the new parts.
    image_size : int or None
        Model input side S for ``masam-lite`` (None: LiteMedSAM's 256). TinyViT's weights do
        not depend on the input size, so a smaller S keeps the pretrained backbone and makes a
        CPU step several times faster (see :func:`~napari_masam.training.config.defaults_for_device`).
    **changes
        Extra builder arguments (e.g. ``slices_per_group``, MA-SAM config fields).

    Raises
    ------
    ValueError
        Unknown backbone, a ViT backbone without ``sam_checkpoint``, or a class-count mismatch.
    """
    from ..checkpoints import ModelSource
    from ..devices import resolve_device

    source = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init_checkpoint is not None:
            source = ModelSource.checkpoint_file(init_checkpoint)
            model = source.load("cpu")
            if model.num_classes != num_classes:
                raise ValueError(
                    f"{init_checkpoint} has {model.num_classes} classes but the training data "
                    f"declares {num_classes}: start from a backbone instead."
                )
        elif backbone == "masam-lite":
            model = _masam_lite(num_classes, image_size, **changes)
            source = ModelSource.preset("masam-lite")
        elif backbone in TEST_BACKBONES:
            from ..model.masam import build_masam

            model = build_masam(backbone, num_classes=num_classes, **changes)
        elif backbone in ("vit_b", "vit_l", "vit_h"):
            if sam_checkpoint is None:
                raise ValueError(
                    f"Backbone {backbone!r} needs Meta's SAM checkpoint (sam_checkpoint=...); "
                    "or use 'masam-lite', which starts from embedded weights."
                )
            source = ModelSource.sam_pair(
                sam_checkpoint,
                masam_checkpoint,
                name=f"masam_{backbone}",
                num_classes=num_classes,
                **changes,
            )
            model = source.load("cpu")
        else:
            raise ValueError(
                f"Unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}."
            )
    if source is not None:
        provenance = {**model.metadata.provenance, "start": source.identity().to_dict()}
        model.metadata = dataclasses.replace(model.metadata, provenance=provenance)
    return model.to(resolve_device(device))


def _masam_lite(num_classes: int, image_size: int | None, **changes: Any) -> SegmentationModel:
    from ..model.lite import LITEMEDSAM_ENCODER, build_lite_from_config, build_masam_lite

    if image_size is None or image_size == LITEMEDSAM_ENCODER["img_size"]:
        return build_masam_lite(num_classes=num_classes, device="cpu", **changes)
    config = {
        "kind": "masam-lite",
        "image_size": int(image_size),
        "encoder": dict(LITEMEDSAM_ENCODER, img_size=int(image_size)),
        "num_classes": num_classes,
        **changes,
    }
    model = build_lite_from_config("masam-lite", config, load_base_weights=True)
    set_trainable(model)
    return model


def check_model_for(model: SegmentationModel, num_classes: int, config: TrainingConfig) -> None:
    """Refuse a model that cannot learn this data with this recipe (class count, mode).

    Raises
    ------
    TypeError
        Not a :class:`~napari_masam.model.base.SegmentationModel`.
    ValueError
        Other class count, or a mode the model cannot run (THE check:
        :func:`napari_masam.inference.check_mode`).
    """
    from ..inference import check_mode

    if not isinstance(model, SegmentationModel):
        raise TypeError(f"Expected a SegmentationModel, got {type(model).__name__}.")
    if model.num_classes != num_classes:
        raise ValueError(
            f"The model has {model.num_classes} classes but the training data declares "
            f"{num_classes}: build it with num_classes={num_classes} "
            "(build_training_model(backbone, num_classes))."
        )
    if config.box_prompts and num_classes != 1:
        raise ValueError(
            f"Box-prompt training segments one object per box: declare 1 class, not {num_classes}."
        )
    check_mode(model, "boxes" if config.box_prompts else "automatic")
