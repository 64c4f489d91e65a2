"""Our own checkpoint format: one safetensors file, full state, config + metadata in the header.

Header entries (all strings): ``format`` (``"napari-masam"``), ``format_version``, ``kind``,
``config`` (JSON), ``metadata`` (JSON of :class:`~napari_masam.model.base.ModelMetadata`,
provenance included), ``base_sha256`` and ``napari_masam_version``. No pickle: opening a file a
colleague shared cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CheckpointError, PathLike, _file_sha256, _group_keys, _torch

if TYPE_CHECKING:
    import torch

    from ..model.base import ModelMetadata, SegmentationModel

#: Value of the ``format`` entry in the header of our safetensors files.
FORMAT_NAME = "napari-masam"
FORMAT_VERSION = 1


def _metadata_to_dict(meta: ModelMetadata) -> dict[str, Any]:
    out = dataclasses.asdict(meta)
    out["class_names"] = list(meta.class_names)
    out["class_colors"] = list(meta.class_colors)
    return out


def _metadata_from_dict(
    data: Mapping[str, Any] | ModelMetadata | None, fallback_name: str
) -> ModelMetadata:
    from ..model.base import ModelMetadata

    if isinstance(data, ModelMetadata):
        return data
    if data is None:
        return ModelMetadata(name=fallback_name)
    known = {f.name for f in dataclasses.fields(ModelMetadata)}
    kwargs = {k: v for k, v in data.items() if k in known}
    for key in ("class_names", "class_colors"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    kwargs.setdefault("name", fallback_name)
    kwargs["provenance"] = dict(kwargs.get("provenance") or {})
    return ModelMetadata(**kwargs)


def model_from_config(
    kind: str, config: Mapping[str, Any], metadata: Mapping[str, Any] | ModelMetadata | None = None
) -> SegmentationModel:
    """A freshly initialised model of any kind from its ``get_config()`` dict (on the CPU).

    Parameters
    ----------
    kind : str
        ``"masam"``, ``"litemedsam"`` or ``"masam-lite"`` (the class attribute ``kind``).
    config : dict
        ``model.get_config()``.
    metadata : dict or ModelMetadata or None

    Raises
    ------
    ValueError
        Unknown kind or config.
    """
    if kind == "masam":
        from ..model.config import MASAMConfig
        from ..model.masam import build_masam

        cfg = MASAMConfig.from_dict(dict(config))
        return build_masam(cfg, metadata=_metadata_from_dict(metadata, f"masam_{cfg.name}"))
    if kind in ("litemedsam", "masam-lite"):
        from ..model import lite

        meta = _metadata_from_dict(metadata, kind)
        return lite.build_lite_from_config(kind, dict(config), meta)
    raise ValueError(f"Unknown model kind {kind!r}; known: masam, litemedsam, masam-lite.")


def _unshare(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, cloning any that share storage (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ident in seen:
            t = t.clone()
        seen.add(ident)
        out[key] = t
    return out


def save_checkpoint(
    model: SegmentationModel,
    path: PathLike,
    *,
    metadata: ModelMetadata | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write one self-contained safetensors file: full state + kind, config, metadata.

    Written to a temporary sibling and renamed into place (``io._common.atomic_path``): an
    interrupted save leaves the previous file intact.

    Header entries (all strings): ``format`` (``"napari-masam"``), ``format_version``,
    ``kind``, ``config`` (JSON), ``metadata`` (JSON of :class:`ModelMetadata`, provenance
    included), ``base_sha256`` (the SAM base's digest when known) and ``napari_masam_version``.

    Parameters
    ----------
    model : SegmentationModel
        Any model with ``kind`` and ``get_config()``.
    path : str or Path
        Destination, conventionally ``*.safetensors``.
    metadata : ModelMetadata or None
        Replaces ``model.metadata`` in the file.
    provenance : dict or None
        Merged into the metadata's provenance.
    """
    from safetensors.torch import save_file

    from .. import __version__

    path = Path(path)
    meta = metadata if metadata is not None else model.metadata
    merged = {**meta.provenance, **(provenance or {})}
    meta = dataclasses.replace(meta, provenance=merged)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "kind": model.kind,
        "config": json.dumps(model.get_config()),
        "metadata": json.dumps(_metadata_to_dict(meta)),
        "base_sha256": str(merged.get("sam_sha256") or meta.sha256 or ""),
        "napari_masam_version": __version__,
    }
    from ..io._common import atomic_path

    with atomic_path(path) as tmp:  # an interrupted save keeps the previous file
        save_file(_unshare(model.state_dict()), str(tmp), metadata=header)
    return path


def read_checkpoint_header(path: PathLike) -> dict[str, Any]:
    """The decoded header of one of our files: kind, config, metadata, ... (no tensors read).

    Raises
    ------
    FileNotFoundError, CheckpointError
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The checkpoint {path} does not exist (or is not a file).")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read {path} as a safetensors file: it is truncated, corrupted or of "
            f"another format ({type(exc).__name__}: {exc})."
        ) from exc
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is a safetensors file but not a napari-masam checkpoint (its header has no "
            f"'format': '{FORMAT_NAME}' entry). Load model weights of other tools through their "
            "own checkpoint format, e.g. SAM .pth + MA-SAM .pth."
        )
    if int(raw.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in napari-masam checkpoint format {raw['format_version']}, newer "
            f"than this version reads ({FORMAT_VERSION}); update napari-masam."
        )
    try:
        return {
            "kind": raw["kind"],
            "config": json.loads(raw["config"]),
            "metadata": json.loads(raw["metadata"]),
            "base_sha256": raw.get("base_sha256", ""),
            "napari_masam_version": raw.get("napari_masam_version", ""),
        }
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the napari-masam header is damaged ({exc}).") from exc


def read_tensor_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor listed in a safetensors header (no tensor data read).

    Raises
    ------
    CheckpointError
        Not a readable safetensors file (safetensors itself checks that every listed tensor
        lies within the file).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(int(n) for n in f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read the tensor list of {path}: it is truncated, corrupted or not a "
            f"safetensors file ({type(exc).__name__}: {exc})."
        ) from exc


#: No architecture number of a real model comes near this (largest: ViT-H's 5120-wide MLP).
_MAX_CONFIG_NUMBER = 1 << 16


def _config_numbers(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Mapping):
        return [n for v in value.values() for n in _config_numbers(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _config_numbers(v)]
    return []


def _mismatch_lines(
    expected: Mapping[str, tuple[int, ...]], held: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Lines naming keys missing from / unexpected in ``held`` and shapes that differ."""
    missing = [k for k in expected if k not in held]
    unexpected = [k for k in held if k not in expected]
    wrong = [k for k in held if k in expected and tuple(expected[k]) != tuple(held[k])]
    lines = []
    if wrong:
        lines.append(
            f"- {len(wrong)} tensors have other shapes (file vs config): "
            + ", ".join(f"{k} {tuple(held[k])} vs {tuple(expected[k])}" for k in wrong[:6])
        )
    if missing:
        lines.append(f"- missing {len(missing)} keys: {_group_keys(missing)}")
    if unexpected:
        lines.append(f"- unexpected {len(unexpected)} keys: {_group_keys(unexpected)}")
    return lines


def _masam_structure(config: Mapping[str, Any], held: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Cheap checks of an MA-SAM config's size numbers against the tensor list."""
    problems = []
    blocks = {int(m[1]) for k in held if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    depth = config.get("depth")
    if isinstance(depth, int) and depth != len(blocks):
        problems.append(f"depth {depth} but the file holds tensors of {len(blocks)} encoder blocks")
    patch = held.get("image_encoder.patch_embed.proj.weight")
    dim = config.get("embed_dim")
    if patch and isinstance(dim, int) and dim != patch[0]:
        problems.append(
            f"embed_dim {dim} but image_encoder.patch_embed.proj.weight is {tuple(patch)}"
        )
    tokens = held.get("mask_decoder.mask_tokens.weight")
    classes = config.get("num_classes")
    if tokens and isinstance(classes, int) and classes + 1 != tokens[0]:
        problems.append(
            f"mask_decoder.mask_tokens.weight {tuple(tokens)} vs {(classes + 1, *tokens[1:])} "
            f"(num_classes {classes} + background)"
        )
    return problems


def _expected_shapes(kind: str, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """State-dict shapes of the model a config describes, built without memory (meta device).

    None for kinds whose builders cannot run on the meta device (the lite models).
    """
    if kind != "masam":
        return None
    torch = _torch()
    from ..model.config import MASAMConfig
    from ..model.masam import MASAM

    cfg = MASAMConfig.from_dict(dict(config))
    with torch.device("meta"):
        model = MASAM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _lite_size_estimate(config: Mapping[str, Any]) -> int:
    """Rough parameter count of a lite model from its config: TinyViT blocks (12 d^2 each) and
    the decoder's per-class parts."""
    encoder = config.get("encoder") or {}
    dims = encoder.get("embed_dims") or []
    depths = encoder.get("depths") or []
    blocks = sum(12 * int(d) * int(d) * int(n) for d, n in zip(dims, depths))
    # each class adds a mask token and a hypernetwork MLP in the decoder (~140 k numbers)
    classes = int(config.get("num_classes") or 0) + 1
    return blocks + 140_000 * classes


def check_header_against_tensors(
    path: PathLike, header: Mapping[str, Any], held: Mapping[str, tuple[int, ...]]
) -> None:
    """Refuse a header config that does not describe the tensors the file really holds.

    Runs before any model is built, so a header claiming a huge model (embed dim 4096 x 48
    blocks over a small file) costs no memory: numbers are bounded, MA-SAM configs are compared
    key by key with the tensor list (the model's shapes come from a meta-device build, which
    allocates nothing), lite configs by their size estimate against the tensors' element count.

    Raises
    ------
    CheckpointError
        Naming the disagreeing numbers or keys, and the likely cause.
    """
    kind, config = header["kind"], header["config"]
    cause = (
        "The header was edited, or the file was written by another tool; it is not loaded. "
        "Re-save the model with napari-masam or ask for the original file."
    )
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: the header's config is not a JSON object. {cause}")
    huge = [n for n in _config_numbers(config) if abs(n) > _MAX_CONFIG_NUMBER]
    if huge:
        raise CheckpointError(
            f"{path}: the header's config holds impossible sizes ({', '.join(map(str, huge[:4]))}). "
            + cause
        )
    held_numel = sum(math.prod(shape) for shape in held.values())
    if kind == "masam":
        problems = _masam_structure(config, held)
        if problems:
            raise CheckpointError(
                f"{path}: the header's config does not describe the tensors in the file: "
                + "; ".join(problems)
                + ". "
                + cause
            )
    try:
        expected = _expected_shapes(kind, config)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model from its header: {exc}") from exc
    if expected is not None:
        lines = _mismatch_lines(expected, held)
        if lines:
            raise CheckpointError(
                "\n".join(
                    [f"The tensors in {path} do not fit its own config ({kind}):", *lines, cause]
                )
            )
    elif _lite_size_estimate(config) > 4 * held_numel + 1_000_000:
        raise CheckpointError(
            f"{path}: the header's config describes a model of about "
            f"{_lite_size_estimate(config):,} parameters, but the file holds {held_numel:,} "
            f"numbers. {cause}"
        )


def load_checkpoint(path: PathLike, device: str | torch.device = "cpu") -> SegmentationModel:
    """A model from one of our safetensors files (any kind), in eval mode on ``device``.

    The header's config is checked against the tensor list of the file
    (:func:`check_header_against_tensors`) before any model is built, so memory is bounded by
    what the file really holds. ``metadata.sha256`` is set to the digest of this file.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    CheckpointError
        Not a safetensors file, not ours, damaged header, a header config that does not
        describe the file's tensors, or tensors not fitting the config (missing/unexpected keys
        grouped, shape mismatches named).
    """
    from safetensors.torch import load_file

    from ..devices import resolve_device

    target = resolve_device(device)
    path = Path(path)
    header = read_checkpoint_header(path)
    held = read_tensor_shapes(path)
    check_header_against_tensors(path, header, held)
    try:
        model = model_from_config(header["kind"], header["config"], header["metadata"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model from its header: {exc}") from exc
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    lines = _mismatch_lines(own, held)
    if lines:
        raise CheckpointError(
            "\n".join(
                [
                    f"The tensors in {path} do not fit its own config ({header['kind']}):",
                    *lines,
                    "Likely cause: the header was edited or the file was written by another "
                    "tool or napari-masam version; re-save the model, or ask for the original.",
                ]
            )
        )
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"Cannot read the tensors of {path} (truncated?): {exc}") from exc
    model.load_state_dict(state, strict=True)
    model.metadata = dataclasses.replace(model.metadata, sha256=_file_sha256(path))
    return model.to(target).eval()


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < (1 << 27) and head[8:9] == b"{"
