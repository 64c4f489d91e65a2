"""The model of a batch: :class:`napari_masam.checkpoints.ModelSource` plus the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints import ModelSource

if TYPE_CHECKING:
    import torch

    from ..model.base import SegmentationModel


@dataclass(frozen=True)
class ModelSpec:
    """Where the batch's model comes from (``--model/--checkpoint/--sam-checkpoint``) and its
    device; parsed once, on construction, by :meth:`ModelSource.parse` (THE decision).

    Attributes
    ----------
    model : str or None
        Registry name or one of our files (None = the default model, or what the files say).
    checkpoint, sam_checkpoint, masam_checkpoint : str or None
        Our single file; the authors' SAM base + MA-SAM pair (with ``model`` =
        ``masam_vit_b|l|h`` the preset is built from the pair and its backbone checked).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    backend : str
        Inference backend (:data:`napari_masam.model.runtime.BACKENDS`): ``"torch"`` (the
        library default) or ``"auto"``/``"onnxruntime"``/``"openvino"``, which run a CPU
        LiteMedSAM on that runtime (verified against torch; other models stay on torch).
    model_source : ModelSource
        The parsed source (derived; not an argument).

    Raises
    ------
    ValueError, FileNotFoundError
        From :meth:`ModelSource.parse`: unknown names, conflicting or missing files.
    """

    model: str | None = None
    checkpoint: str | Path | None = None
    sam_checkpoint: str | Path | None = None
    masam_checkpoint: str | Path | None = None
    device: str = "auto"
    backend: str = "torch"
    model_source: ModelSource = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        parsed = ModelSource.parse(
            self.model,
            checkpoint=self.checkpoint,
            sam_checkpoint=self.sam_checkpoint,
            masam_checkpoint=self.masam_checkpoint,
        )
        object.__setattr__(self, "model_source", parsed)

    @classmethod
    def of(cls, source: ModelSource, device: str = "auto", backend: str = "torch") -> ModelSpec:
        """A spec for an already parsed source."""
        spec = cls(device=device, backend=backend)
        object.__setattr__(spec, "model_source", source)
        return spec

    @property
    def source(self) -> str:
        """Short label of the model (``litemedsam``, ``best.safetensors``, ...)."""
        return self.model_source.label

    def identity(self) -> dict[str, object]:
        """JSON-able identity of the model (:meth:`ModelSource.identity`) and the requested
        backend, for resume matching."""
        return {**self.model_source.identity().to_dict(), "backend": self.backend}

    def load(self, device: str | torch.device | None = None) -> SegmentationModel:
        """Build the model on ``device`` (default :attr:`device`).

        LiteMedSAM's code imports timm through module paths timm deprecates; the two
        FutureWarnings that raises say nothing to a user of napari-masam and are silenced here,
        for this import only.
        """
        from ..weights import quiet_medsam_lite_import

        with quiet_medsam_lite_import():
            model = self.model_source.load(self.device if device is None else device)
        if self.backend == "torch":
            return model
        from ..model.runtime import with_backend

        return with_backend(model, self.backend)


__all__ = ["ModelSource", "ModelSpec"]
