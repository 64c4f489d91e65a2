"""Where a model comes from: the one place that decides, and the ``masam_vit_*`` builders.

A :class:`ModelSource` is a frozen value naming a model: a registry preset (the embedded
LiteMedSAM, MA-SAM-Lite), one of our ``.safetensors`` files, or Meta's SAM base plus the MA-SAM
authors' checkpoint. The CLI, the batch sidecars, the widgets and training all turn what the
user gave into one with :meth:`ModelSource.parse`, record :meth:`ModelSource.identity` for
provenance and build the model with :meth:`ModelSource.load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CheckpointError, PathLike, _file_sha256
from .ours import _looks_like_safetensors, load_checkpoint
from .sam_pair import SAM_FILENAMES, load_masam

if TYPE_CHECKING:
    import torch

    from ..model.base import SegmentationModel
    from ..model.masam import MASAM

#: ``ModelSource.kind`` values.
SOURCE_KINDS = ("preset", "checkpoint", "sam_pair")


@dataclass(frozen=True)
class ModelIdentity:
    """What a :class:`ModelSource` names, stable across machines (for sidecars and provenance).

    Attributes
    ----------
    description : str
        One line for people: ``"preset litemedsam (embedded weights)"``,
        ``"checkpoint best.safetensors"``, ``"SAM sam_vit_b_01ec64.pth + MA-SAM masam.pth"``.
    sha256 : str
        Digest of the canonical JSON of :meth:`to_dict` without this field: equal exactly when
        the kind, preset name, builder options and every file's content are equal (paths and
        file names do not count, so a copied or renamed file keeps its identity).
    files : tuple of (str, str, str)
        ``(role, file name, sha256)`` per file: role ``"checkpoint"``, ``"sam_checkpoint"``,
        ``"masam_checkpoint"`` or ``"embedded_weights"``.
    kind : str
        :data:`SOURCE_KINDS` entry.
    name : str or None
        The preset name (``"litemedsam"``, ``"masam_vit_b"``), None for a bare file.
    options : tuple of (str, value)
        Builder options (``image_size``, ``num_classes`` ...), sorted by name.
    """

    description: str
    sha256: str
    files: tuple[tuple[str, str, str], ...]
    kind: str
    name: str | None
    options: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for sidecars and ``metadata.provenance``)."""
        return {
            "description": self.description,
            "sha256": self.sha256,
            "kind": self.kind,
            "name": self.name,
            "files": [{"role": r, "name": n, "sha256": h} for r, n, h in self.files],
            "options": dict(self.options),
        }


def _path_or_none(value: PathLike | None) -> Path | None:
    """A path, or None for None/empty/``"."`` (what empty file pickers hand over)."""
    if value is None or str(value) in ("", "."):
        return None
    return Path(value)


def _require_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise FileNotFoundError(f"The {what} {path} is a folder, not a checkpoint file.")
    if not path.is_file():
        raise FileNotFoundError(f"The {what} {path} does not exist; check the path.")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: the one value every caller passes around.

    Build one with :meth:`parse` (from what a user typed or picked) or the constructors
    :meth:`preset`, :meth:`checkpoint_file` and :meth:`sam_pair`; never decide by hand.

    Attributes
    ----------
    kind : str
        ``"preset"`` (a registry name; ``litemedsam`` and ``masam-lite`` start from the
        embedded weights), ``"checkpoint"`` (one of our ``.safetensors`` files) or
        ``"sam_pair"`` (Meta's SAM base + optionally the authors' MA-SAM checkpoint).
    name : str or None
        The registry name. For ``"checkpoint"``/``"sam_pair"`` an optional preset
        (``"masam_vit_b"``) whose backbone the files must have (checked by :meth:`load`).
    checkpoint : Path or None
        Our file (kind ``"checkpoint"``).
    sam_checkpoint, masam_checkpoint : Path or None
        The SAM base and the authors' file (kind ``"sam_pair"``; the latter optional: without
        it adapters and class head keep their fresh init, a fine-tuning start).
    options : tuple of (str, value)
        Builder keyword arguments (``image_size``, ``num_classes`` ...), sorted by name.
    """

    kind: str
    name: str | None = None
    checkpoint: Path | None = None
    sam_checkpoint: Path | None = None
    masam_checkpoint: Path | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"ModelSource kind {self.kind!r}; known: {', '.join(SOURCE_KINDS)}.")
        if self.kind == "preset" and not self.name:
            raise ValueError("A preset ModelSource needs a registry name.")
        if self.kind == "checkpoint" and self.checkpoint is None:
            raise ValueError("A checkpoint ModelSource needs its .safetensors file.")
        if self.kind == "sam_pair" and self.sam_checkpoint is None:
            raise ValueError(
                "A SAM-pair ModelSource needs Meta's SAM base checkpoint (sam_vit_*.pth); the "
                "authors' MA-SAM file alone holds only the fine-tuned parts."
            )
        if self.kind != "sam_pair" and (self.sam_checkpoint or self.masam_checkpoint):
            raise ValueError(
                "SAM/MA-SAM checkpoint files go with a SAM-pair source, not with "
                f"a {self.kind} source: give either our single file or the authors' pair."
            )
        if self.kind != "checkpoint" and self.checkpoint is not None:
            raise ValueError(f"A {self.kind} source takes no .safetensors checkpoint.")

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **options: Any) -> ModelSource:
        """A registry preset (``napari-masam info`` lists them).

        Raises
        ------
        ValueError
            Unknown name (the message lists the known ones), or a preset that needs weight
            files (use :meth:`sam_pair` / :meth:`checkpoint_file` with ``name=``).
        """
        from ..model.registry import MODEL_REGISTRY

        preset = MODEL_REGISTRY.get(name)
        if preset is None:
            raise ValueError(
                f"Unknown model {name!r}. Known models: {', '.join(MODEL_REGISTRY)}. For your "
                "own weights give a checkpoint file instead of a name."
            )
        if preset.needs_weights:
            backbone = _preset_backbone(name)
            raise ValueError(
                f"{name} needs weight files: Meta's SAM base "
                f"({SAM_FILENAMES.get(backbone or '', 'sam_vit_*.pth')}) plus the MA-SAM "
                "authors' checkpoint, or one napari-masam .safetensors file."
            )
        return cls("preset", name=name, options=_options(options))

    @classmethod
    def checkpoint_file(
        cls, path: PathLike, *, name: str | None = None, **options: Any
    ) -> ModelSource:
        """One of our ``.safetensors`` files (``name``: a ``masam_vit_*`` preset to insist on)."""
        path = Path(path)
        _require_file(path, "checkpoint")
        return cls("checkpoint", name=name, checkpoint=path, options=_options(options))

    @classmethod
    def sam_pair(
        cls,
        sam_checkpoint: PathLike,
        masam_checkpoint: PathLike | None = None,
        *,
        name: str | None = None,
        **options: Any,
    ) -> ModelSource:
        """Meta's SAM base plus (optionally) the authors' MA-SAM checkpoint."""
        sam = Path(sam_checkpoint)
        _require_file(sam, "SAM checkpoint")
        masam = _path_or_none(masam_checkpoint)
        if masam is not None:
            _require_file(masam, "MA-SAM checkpoint")
        return cls(
            "sam_pair",
            name=name,
            sam_checkpoint=sam,
            masam_checkpoint=masam,
            options=_options(options),
        )

    @classmethod
    def parse(
        cls,
        source: PathLike | ModelSource | None = None,
        *,
        checkpoint: PathLike | None = None,
        sam_checkpoint: PathLike | None = None,
        masam_checkpoint: PathLike | None = None,
        **options: Any,
    ) -> ModelSource:
        """THE decision of where a model comes from, from what a user gave.

        Parameters
        ----------
        source : str, Path, ModelSource or None
            A registry name, a file (ours: ``.safetensors`` or a safetensors header; anything
            else is taken as a SAM base checkpoint), an existing source (returned unchanged
            when nothing else is given), or None: the default model
            (:data:`napari_masam.model.registry.DEFAULT_MODEL`) unless files are given.
        checkpoint : path or None
            Our single file (``--checkpoint``).
        sam_checkpoint, masam_checkpoint : path or None
            The authors' pair (``--sam-checkpoint``/``--masam-checkpoint``).
        **options
            Builder options (``image_size``, ``num_classes`` ...).

        Raises
        ------
        ValueError
            Unknown preset name, both our file and the authors' pair, an MA-SAM file without
            its SAM base, a preset that needs files given none, or files under a preset that
            takes none (``litemedsam``).
        FileNotFoundError
            A named file does not exist (or is a folder).
        """
        from ..model.registry import DEFAULT_MODEL, MODEL_REGISTRY

        if isinstance(source, ModelSource):
            if checkpoint or sam_checkpoint or masam_checkpoint or options:
                raise ValueError("A ModelSource is complete: give no other files or options.")
            return source
        checkpoint = _path_or_none(checkpoint)
        sam = _path_or_none(sam_checkpoint)
        masam = _path_or_none(masam_checkpoint)
        name: str | None = None
        if source is not None and str(source) not in ("", "."):
            text = str(source)
            if isinstance(source, str) and text in MODEL_REGISTRY:
                name = text
            elif Path(text).exists() or Path(text).suffix:
                path = Path(text)
                _require_file(path, "model file")
                if _looks_like_safetensors(path):
                    if checkpoint is not None and checkpoint != path:
                        raise ValueError(
                            f"Two napari-masam checkpoints given ({path}, {checkpoint}); give one."
                        )
                    checkpoint = path
                else:
                    if sam is not None and sam != path:
                        raise ValueError(
                            f"Two SAM base checkpoints given ({path}, {sam}); give one."
                        )
                    sam = path
            else:
                raise ValueError(
                    f"Unknown model {text!r}: neither a known model ({', '.join(MODEL_REGISTRY)}) "
                    "nor an existing checkpoint file."
                )
        if checkpoint is not None and (sam is not None or masam is not None):
            raise ValueError(
                "Give either our single .safetensors checkpoint or the SAM base + MA-SAM pair, "
                "not both."
            )
        if masam is not None and sam is None:
            raise ValueError(
                "The MA-SAM checkpoint needs Meta's SAM base checkpoint too: the authors' file "
                "holds only the fine-tuned parts, the backbone comes from SAM."
            )
        if name is not None and checkpoint is None and sam is None:
            return cls.preset(name, **options)
        if name is not None and not MODEL_REGISTRY[name].needs_weights:
            raise ValueError(
                f"{name} brings its own weights; a checkpoint file cannot be combined with it. "
                "Give the file alone as the model."
            )
        if checkpoint is not None:
            return cls.checkpoint_file(checkpoint, name=name, **options)
        if sam is not None:
            return cls.sam_pair(sam, masam, name=name, **options)
        return cls.preset(DEFAULT_MODEL, **options)

    # -- what it is --------------------------------------------------------------------------
    @property
    def files(self) -> tuple[tuple[str, Path], ...]:
        """``(role, path)`` of every file this source reads (empty for embedded presets)."""
        out = []
        for role in ("checkpoint", "sam_checkpoint", "masam_checkpoint"):
            value = getattr(self, role)
            if value is not None:
                out.append((role, Path(value)))
        return tuple(out)

    @property
    def label(self) -> str:
        """Short text for menus and status lines (no digests computed)."""
        if self.kind == "preset":
            return str(self.name)
        if self.kind == "checkpoint":
            return Path(self.checkpoint).name  # type: ignore[arg-type]
        pair = Path(self.sam_checkpoint).name  # type: ignore[arg-type]
        if self.masam_checkpoint is not None:
            pair += f" + {Path(self.masam_checkpoint).name}"
        return pair

    def identity(self) -> ModelIdentity:
        """A stable description and sha256 of what this source names (for provenance).

        Reads every file once to hash it (cached per path, size and modification time).

        Raises
        ------
        FileNotFoundError
            A file of the source has gone.
        """
        files: list[tuple[str, str, str]] = []
        for role, path in self.files:
            _require_file(path, role.replace("_", " "))
            files.append((role, path.name, _file_sha256(path)))
        if self.kind == "preset":
            embedded = _embedded_weights_sha256(str(self.name))
            if embedded:
                files.append(("embedded_weights", embedded[0], embedded[1]))
            description = f"preset {self.name}" + (" (embedded weights)" if embedded else "")
        elif self.kind == "checkpoint":
            description = f"checkpoint {files[0][1]}"
        else:
            description = f"SAM {files[0][1]}" + (
                f" + MA-SAM {files[1][1]}" if len(files) > 1 else " (no MA-SAM file)"
            )
        if self.kind != "preset" and self.name:
            description += f" as {self.name}"
        if self.options:
            description += " (" + ", ".join(f"{k}={v!r}" for k, v in self.options) + ")"
        canonical = {
            "kind": self.kind,
            "name": self.name,
            "files": [[r, h] for r, _, h in files],
            "options": [[k, _jsonable(v)] for k, v in self.options],
        }
        digest = hashlib.sha256(
            json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        return ModelIdentity(
            description=description,
            sha256=digest,
            files=tuple(files),
            kind=self.kind,
            name=self.name,
            options=self.options,
        )

    # -- building ----------------------------------------------------------------------------
    def load(self, device: str | torch.device = "auto") -> SegmentationModel:
        """Build the model this source names, in eval mode on ``device``.

        Raises
        ------
        FileNotFoundError
            A file has gone.
        CheckpointError
            Unreadable, foreign or inconsistent files, or files of another backbone than the
            named ``masam_vit_*`` preset.
        ValueError
            Bad builder options.
        """
        from ..model.registry import build_model

        options = dict(self.options)
        if self.kind == "preset":
            return build_model(str(self.name), device=device, **options)
        backbone = _preset_backbone(self.name) if self.name else None
        if self.kind == "checkpoint":
            model = load_checkpoint(self.checkpoint, device=_resolve(device))  # type: ignore[arg-type]
            if backbone is not None:
                got = getattr(getattr(model, "config", None), "name", None)
                if model.kind != "masam" or got != backbone:
                    raise CheckpointError(
                        f"{self.checkpoint} holds a {model.kind} model ({got or '?'}), not "
                        f"MA-SAM {backbone} as {self.name} says."
                    )
            return model
        return load_masam(
            self.sam_checkpoint,  # type: ignore[arg-type]
            self.masam_checkpoint,
            device=device,
            backbone=backbone,
            **options,
        )

    def with_options(self, **options: Any) -> ModelSource:
        """A copy with builder options added (or replaced)."""
        merged = {**dict(self.options), **options}
        return dataclasses.replace(self, options=_options(merged))


def _options(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    out = []
    for key in sorted(options):
        value = options[key]
        if value is None:
            continue
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"Model option {key}={value!r} is not hashable; pass numbers, strings or tuples."
            ) from None
        out.append((key, value))
    return tuple(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _preset_backbone(name: str | None) -> str | None:
    """``"masam_vit_b"`` -> ``"vit_b"``; None for presets that are not MA-SAM ViTs."""
    if name and name.startswith("masam_vit_"):
        return name[len("masam_") :]
    return None


def _embedded_weights_sha256(name: str) -> tuple[str, str] | None:
    """(file name, sha256) of the embedded weights a preset starts from, or None."""
    if name in ("litemedsam", "masam-lite"):
        from ..weights import LITEMEDSAM_FILENAME, LITEMEDSAM_SHA256

        return LITEMEDSAM_FILENAME, LITEMEDSAM_SHA256
    return None


def _resolve(device: str | torch.device) -> torch.device:
    from ..devices import resolve_device

    return resolve_device(device)


def load_model(
    source: PathLike | ModelSource,
    *,
    masam_checkpoint: PathLike | None = None,
    device: str | torch.device = "auto",
    **kwargs: Any,
) -> SegmentationModel:
    """Any model from what a user has at hand: ``ModelSource.parse(...).load(device)``.

    Parameters
    ----------
    source : str, Path or ModelSource
        A registry name (``"litemedsam"``, ``"masam_vit_b"`` ...; extra keyword arguments go to
        its builder), one of our ``.safetensors`` files, or a Meta SAM checkpoint (then
        ``masam_checkpoint`` is the authors' file on top).
    masam_checkpoint : str or Path or None
    device : str or torch.device
        ``"auto"`` picks cuda, mps, cpu.
    **kwargs
        Builder options (``image_size``, ``num_classes``, ... for SAM + MA-SAM).

    Raises
    ------
    FileNotFoundError
        ``source`` is neither a registry name nor an existing file.
    CheckpointError, ValueError
        See :func:`load_checkpoint` and :func:`load_masam`.
    """
    from ..model.registry import MODEL_REGISTRY

    known = isinstance(source, ModelSource) or str(source) in MODEL_REGISTRY
    if not known and not Path(source).is_file():
        raise FileNotFoundError(
            f"{source!s} is neither a model name ({', '.join(MODEL_REGISTRY)}) nor an "
            "existing checkpoint file."
        )
    return ModelSource.parse(source, masam_checkpoint=masam_checkpoint, **kwargs).load(device)


# ---------------------------------------------------------------------------------------------
# Registry builders
# ---------------------------------------------------------------------------------------------
def _build_preset(
    backbone: str,
    sam_checkpoint: PathLike | None,
    masam_checkpoint: PathLike | None,
    device: str | torch.device,
    checkpoint: PathLike | None,
    **kwargs: Any,
) -> MASAM:
    name = f"masam_{backbone}"
    if checkpoint is not None and _looks_like_safetensors(Path(checkpoint)):
        return ModelSource.checkpoint_file(checkpoint, name=name).load(device)  # type: ignore[return-value]
    if checkpoint is not None:
        masam_checkpoint = masam_checkpoint or checkpoint
    if sam_checkpoint is None:
        raise ValueError(
            f"The masam_{backbone} preset needs Meta's SAM {backbone} checkpoint "
            f"({SAM_FILENAMES[backbone]}) as sam_checkpoint= and the authors' MA-SAM checkpoint "
            "as masam_checkpoint= (or one napari-masam .safetensors file as checkpoint=)."
        )
    source = ModelSource.sam_pair(sam_checkpoint, masam_checkpoint, name=name, **kwargs)
    return source.load(device)  # type: ignore[return-value]


def build_masam_preset_vit_b(
    sam_checkpoint: PathLike | None = None,
    masam_checkpoint: PathLike | None = None,
    device: str | torch.device = "auto",
    checkpoint: PathLike | None = None,
    **kwargs: Any,
) -> MASAM:
    """Registry builder ``masam_vit_b``: SAM vit_b + MA-SAM file (see :func:`load_masam`)."""
    return _build_preset("vit_b", sam_checkpoint, masam_checkpoint, device, checkpoint, **kwargs)


def build_masam_preset_vit_l(
    sam_checkpoint: PathLike | None = None,
    masam_checkpoint: PathLike | None = None,
    device: str | torch.device = "auto",
    checkpoint: PathLike | None = None,
    **kwargs: Any,
) -> MASAM:
    """Registry builder ``masam_vit_l``: SAM vit_l + MA-SAM file (see :func:`load_masam`)."""
    return _build_preset("vit_l", sam_checkpoint, masam_checkpoint, device, checkpoint, **kwargs)


def build_masam_preset_vit_h(
    sam_checkpoint: PathLike | None = None,
    masam_checkpoint: PathLike | None = None,
    device: str | torch.device = "auto",
    checkpoint: PathLike | None = None,
    **kwargs: Any,
) -> MASAM:
    """Registry builder ``masam_vit_h``: SAM vit_h + MA-SAM file (the authors' BTCV model)."""
    return _build_preset("vit_h", sam_checkpoint, masam_checkpoint, device, checkpoint, **kwargs)
