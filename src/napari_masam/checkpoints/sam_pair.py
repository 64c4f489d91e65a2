"""MA-SAM from Meta's SAM base checkpoint plus the MA-SAM authors' checkpoint (and back).

The architecture is read from the files (embed dim, depth, heads, global blocks from the SAM
base; FacT rank, adapter width and class count from the MA-SAM file), SAM's position tables are
resized to the model's token grid, and the authors' file is loaded on top.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CheckpointError, PathLike, _file_sha256, _group_keys, _shape, _torch
from .keys import (
    _masam_file_to_ours,
    authors_checkpoint_state_dict,
    sam_key_to_masam,
    to_authors_key,
)
from .torch_files import read_state_dict

if TYPE_CHECKING:
    import torch

    from ..model.base import ModelMetadata
    from ..model.config import MASAMConfig
    from ..model.masam import MASAM

logger = logging.getLogger(__name__)

#: Meta's file names of the SAM bases, for messages.
SAM_FILENAMES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}


# ---------------------------------------------------------------------------------------------
# Resizing SAM's position tables to the model's token grid
# ---------------------------------------------------------------------------------------------
def _float_for_interp(t: torch.Tensor) -> torch.Tensor:
    torch = _torch()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """SAM's absolute position embedding (1, G, G, C) -> (1, grid, grid, C).

    Bilinear with half-pixel centres (``align_corners=False``), as the authors (spec section 2).
    """
    torch = _torch()
    pe = _float_for_interp(pos_embed).permute(0, 3, 1, 2)
    pe = torch.nn.functional.interpolate(
        pe, size=(grid, grid), mode="bilinear", align_corners=False
    )
    return pe.permute(0, 2, 3, 1).contiguous().to(pos_embed.dtype)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """A relative position table (L, head_dim) -> (length, head_dim).

    Treated as a one-channel image and resized bilinearly with ``align_corners=False`` to
    (length, head_dim) (so the head_dim axis is unchanged), as the authors do for the global
    blocks (spec section 2).
    """
    torch = _torch()
    rp = _float_for_interp(rel_pos)[None, None]
    rp = torch.nn.functional.interpolate(
        rp, size=(length, rel_pos.shape[1]), mode="bilinear", align_corners=False
    )
    return rp[0, 0].contiguous().to(rel_pos.dtype)


# ---------------------------------------------------------------------------------------------
# Architecture from the files
# ---------------------------------------------------------------------------------------------
def infer_sam_architecture(
    state: Mapping[str, torch.Tensor], path: PathLike = "<state dict>"
) -> dict[str, Any]:
    """MASAMConfig fields determined by a Meta SAM state dict.

    Returns embed_dim and patch_size (patch embedding), depth (block count), num_heads (from the
    rel_pos width = head dim), global_attn_indexes (blocks whose rel_pos spans the whole
    pretraining grid), window_size (from the other blocks' rel_pos length), mlp_ratio,
    qkv_bias, prompt_embed_dim (neck), mask_in_chans, decoder_depth, decoder_mlp_dim,
    iou_head_depth, iou_head_hidden_dim, plus ``"name"`` (``"vit_b"``/``"vit_l"``/``"vit_h"``
    when the numbers are Meta's, else ``"custom"``) and ``"pretrain_grid"``.

    Raises
    ------
    CheckpointError
        If the dict is not a SAM state dict (e.g. an MA-SAM checkpoint passed as the base).
    """
    from ..model.config import MASAM_CONFIGS

    path = Path(path) if not isinstance(path, Path) else path
    pe_key, patch_key = "image_encoder.pos_embed", "image_encoder.patch_embed.proj.weight"
    if patch_key not in state or pe_key not in state:
        hint = ""
        if (
            any(re.fullmatch(r"[qv]_FacTs_\d+", k) for k in state)
            or "image_encoder.FacTu.weight" in state
        ):
            hint = (
                " It looks like an MA-SAM checkpoint (adapters/FacT only): pass Meta's SAM "
                "checkpoint as the base and this file as masam_checkpoint."
            )
        raise CheckpointError(
            f"{path} is not a Meta SAM checkpoint: it lacks {patch_key} / {pe_key}.{hint}"
        )
    patch = state[patch_key]
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    blocks = sorted(
        {int(m[1]) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    )
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(
            f"{path}: the encoder blocks are missing or not numbered 0..N-1 ({blocks[:5]}...)."
        )
    depth = len(blocks)
    pretrain_grid = int(state[pe_key].shape[1])
    lengths = []
    for i in range(depth):
        key = f"image_encoder.blocks.{i}.attn.rel_pos_h"
        if key not in state:
            raise CheckpointError(
                f"{path}: {key} is missing; MA-SAM needs SAM's relative positions."
            )
        lengths.append(int(state[key].shape[0]))
    head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
    global_len = 2 * pretrain_grid - 1
    global_idx = tuple(i for i, n in enumerate(lengths) if n == global_len)
    window_lengths = {n for n in lengths if n != global_len}
    if len(window_lengths) > 1:
        raise CheckpointError(
            f"{path}: the window blocks' rel_pos lengths differ ({sorted(window_lengths)}); "
            "not a SAM ViT."
        )
    window = (window_lengths.pop() + 1) // 2 if window_lengths else 14
    arch: dict[str, Any] = {
        "embed_dim": embed_dim,
        "patch_size": patch_size,
        "depth": depth,
        "num_heads": embed_dim // head_dim,
        "global_attn_indexes": global_idx,
        "window_size": window,
        "mlp_ratio": state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
        "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state,
        "prompt_embed_dim": int(state["image_encoder.neck.0.weight"].shape[0]),
    }
    if "prompt_encoder.mask_downscaling.3.weight" in state:
        arch["mask_in_chans"] = int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0])
    layers = {
        int(m[1])
        for k in state
        if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))
    }
    if layers:
        arch["decoder_depth"] = len(layers)
        arch["decoder_mlp_dim"] = int(
            state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
        )
    iou_layers = {
        int(m[1])
        for k in state
        if (m := re.match(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.", k))
    }
    if iou_layers:
        arch["iou_head_depth"] = len(iou_layers)
        arch["iou_head_hidden_dim"] = int(
            state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]
        )
    arch["name"] = "custom"
    for name in ("vit_b", "vit_l", "vit_h"):
        preset = MASAM_CONFIGS[name]
        if (preset.embed_dim, preset.depth, preset.global_attn_indexes) == (
            embed_dim,
            depth,
            global_idx,
        ):
            arch["name"] = name
    arch["pretrain_grid"] = pretrain_grid
    return arch


def sam_to_masam_state_dict(
    sam_state: Mapping[str, torch.Tensor], config: MASAMConfig
) -> dict[str, torch.Tensor]:
    """A Meta SAM state dict under our names, position tables resized to ``config``'s grid.

    ``pos_embed`` goes to (1, g, g, C) and the GLOBAL blocks' ``rel_pos_h``/``rel_pos_w`` to
    (2g - 1, head_dim), both by bilinear interpolation with ``align_corners=False``; the window
    blocks keep theirs (spec section 2). Non-persistent SAM buffers (pixel_mean/std) are dropped.
    """
    grid = config.grid_size
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sam_state.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        new = sam_key_to_masam(key)
        if new == "image_encoder.pos_embed" and tuple(tensor.shape[1:3]) != (grid, grid):
            tensor = resize_pos_embed(tensor, grid)
        m = re.fullmatch(r"image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]", new)
        if m and int(m[1]) in config.global_attn_indexes and tensor.shape[0] != 2 * grid - 1:
            tensor = resize_rel_pos(tensor, 2 * grid - 1)
        out[new] = tensor
    return out


def copy_matching(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """Copy every tensor whose key and shape match the model's (the authors' SAM loading rule).

    Returns
    -------
    copied, skipped : list of str
        Keys copied, and keys absent from the model or of another shape (left at their init).
    """
    torch = _torch()
    own = model.state_dict()
    copied, skipped = [], []
    with torch.no_grad():
        for key, tensor in state.items():
            target = own.get(key)
            if target is not None and target.shape == tensor.shape:
                target.copy_(tensor)
                copied.append(key)
            else:
                skipped.append(key)
    return copied, skipped


def _is_trainable_key(key: str) -> bool:
    from ..model.masam import _TRAINABLE_RE

    return _TRAINABLE_RE.match(key) is not None


def _check_masam_against_sam(
    ours: Mapping[str, torch.Tensor], arch: Mapping[str, Any], masam_path: Path, sam_path: Path
) -> dict[str, int]:
    """Architecture numbers given by the MA-SAM file; CheckpointError if they contradict SAM."""
    found: dict[str, int] = {}
    base = f"{arch['name']} (embed dim {arch['embed_dim']}, {arch['depth']} blocks)"
    u = ours.get("image_encoder.fact.u.weight")
    if u is None:
        raise CheckpointError(
            f"{masam_path} is not an MA-SAM checkpoint: it has no FacT factor "
            "(image_encoder.FacTu.weight). "
            + (
                "It looks like a SAM checkpoint: pass it as the base (first argument)."
                if "image_encoder.patch_embed.proj.weight" in ours
                else "Pass the authors' MA-SAM file or one of ours (.safetensors)."
            )
        )
    found["fact_rank"] = int(u.shape[0])
    if u.shape[1] != arch["embed_dim"]:
        raise CheckpointError(
            f"Wrong backbone: {masam_path} was trained on a ViT with embed dim {u.shape[1]} "
            f"(image_encoder.FacTu.weight {_shape(u)}), but the SAM checkpoint {sam_path} is "
            f"{base}; its image_encoder.patch_embed.proj.weight has {arch['embed_dim']} output channels. "
            "Use the SAM checkpoint of the same backbone as the MA-SAM file."
        )
    cores = {
        int(m[1])
        for k in ours
        if (m := re.fullmatch(r"image_encoder\.blocks\.(\d+)\.attn\.qkv\.q_FacTs\.weight", k))
    }
    if cores and len(cores) != arch["depth"]:
        raise CheckpointError(
            f"Wrong backbone: {masam_path} has FacT cores for {len(cores)} blocks (q_FacTs_000.."
            f"q_FacTs_{max(cores):03d}) but the SAM checkpoint {sam_path} is {base}. Use the SAM "
            "checkpoint of the same backbone."
        )
    down = ours.get("image_encoder.blocks.0.adapter_1.linear_down.weight")
    if down is not None:
        found["adapter_width"] = int(down.shape[0])
    tokens = ours.get("mask_decoder.mask_tokens.weight")
    if tokens is not None:
        found["num_classes"] = int(tokens.shape[0]) - 1
        heads = {
            int(m[1])
            for k in ours
            if (m := re.match(r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.", k))
        }
        if len(heads) != tokens.shape[0]:
            # the class count sizes the decoder: it must be what the file really holds
            raise CheckpointError(
                f"{masam_path}: mask_decoder.mask_tokens.weight {_shape(tokens)} declares "
                f"{tokens.shape[0]} masks (classes + background) but the file holds "
                f"{len(heads)} output_hypernetworks_mlps; it is incomplete or edited. Use the "
                "original MA-SAM checkpoint."
            )
    return found


def _check_masam_part(
    own: Mapping[str, tuple[int, ...]],
    ours: Mapping[str, torch.Tensor],
    path: Path,
    num_classes: int,
) -> None:
    """The MA-SAM file against the model's shapes: strict for the trainable parts."""
    unexpected = [k for k in ours if k not in own]
    missing = [k for k in own if _is_trainable_key(k) and k not in ours]
    wrong = [k for k in ours if k in own and tuple(own[k]) != tuple(ours[k].shape)]
    if not (unexpected or missing or wrong):
        return
    lines = [f"The MA-SAM checkpoint {path} does not fit the model built from it and the SAM base:"]
    if wrong:
        details = ", ".join(
            f"{to_authors_key(k, saved=True)} {_shape(ours[k])} vs {tuple(own[k])}"
            for k in wrong[:6]
        )
        if all(k.startswith("mask_decoder.") for k in wrong):
            lines.append(
                f"- wrong class count: {len(wrong)} decoder tensors have other shapes ({details}); "
                f"the model was built for {num_classes} classes."
            )
        else:
            lines.append(f"- wrong backbone: {len(wrong)} tensors have other shapes ({details}).")
    if missing:
        lines.append(
            f"- missing {len(missing)} keys: {_group_keys(to_authors_key(k, saved=True) for k in missing)}"
        )
    if unexpected:
        lines.append(f"- unexpected {len(unexpected)} keys: {_group_keys(unexpected)}")
    lines.append(
        "Check that the file is an MA-SAM checkpoint for this SAM backbone, and that it is "
        "complete (the authors' files hold adapters, FacT, prompt encoder and mask decoder)."
    )
    raise CheckpointError("\n".join(lines))


def _meta_shapes(config: MASAMConfig) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of MA-SAM with ``config``, from a meta-device build (no memory)."""
    torch = _torch()
    from ..model.masam import MASAM

    with torch.device("meta"):
        model = MASAM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_sam_covers_frozen(
    own: Mapping[str, tuple[int, ...]],
    sam_ours: Mapping[str, torch.Tensor],
    sam_path: Path,
    backbone: str,
) -> None:
    """Every frozen tensor of the model must come from the SAM base (else it would stay random)."""
    lacking = [
        k
        for k, shape in own.items()
        if not _is_trainable_key(k) and (k not in sam_ours or tuple(sam_ours[k].shape) != shape)
    ]
    if lacking:
        raise CheckpointError(
            f"The SAM checkpoint {sam_path} lacks {len(lacking)} frozen tensors the {backbone} "
            f"model needs, or holds them in other shapes: {_group_keys(lacking)}. Those parts "
            "would keep a random init; the file is incomplete or edited. Use Meta's complete "
            f"{SAM_FILENAMES.get(backbone, 'sam_vit_*.pth')}."
        )


def load_masam(
    sam_checkpoint: PathLike,
    masam_checkpoint: PathLike | None = None,
    *,
    image_size: int = 512,
    slices_per_group: int = 5,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    metadata: ModelMetadata | None = None,
    backbone: str | None = None,
    **overrides: Any,
) -> MASAM:
    """MA-SAM from Meta's SAM checkpoint plus (optionally) the authors' MA-SAM checkpoint.

    The architecture comes from the files: embed dim, patch size and depth from the SAM base,
    head dim from the rel_pos widths, global blocks from the rel_pos lengths, class count from
    the mask tokens, FacT rank from U and adapter width from the adapters of the MA-SAM file.
    SAM's ``pos_embed`` and global ``rel_pos`` tables are resized to the token grid, every SAM
    tensor whose key and shape match is copied, then the MA-SAM file is loaded on top (strict
    for the trainable parts). Without an MA-SAM file the adapters, FacT cores and the class head
    keep their fresh init (a fine-tuning start).

    Parameters
    ----------
    sam_checkpoint : str or Path
        ``sam_vit_{b,l,h}_*.pth``.
    masam_checkpoint : str or Path or None
        The authors' file (flat dict, ``q_FacTs_000`` ...); their full live-model dump and our
        own key names are accepted too.
    image_size : int
        Model input side S in pixels (512 in the paper).
    slices_per_group : int
        D (5 in the paper).
    num_classes : int or None
        Inferred from the MA-SAM file; required without one. A value contradicting the file
        raises.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.
    metadata : ModelMetadata or None
        Class names etc.; generic ones when None. Its sha256/provenance are filled in.
    backbone : str or None
        ``"vit_b"``/``"vit_l"``/``"vit_h"`` to insist on (presets); None accepts any.
    **overrides
        Other :class:`~napari_masam.model.config.MASAMConfig` fields the files do not fix
        (``fact_rank``/``adapter_width`` of a fine-tuning start without an MA-SAM file,
        ``fact_scale``, ``fact_dropout``, ``decoder_heads``, ``norm_eps``). A value contradicting
        the files raises.

    Returns
    -------
    MASAM
        In eval mode on ``device``; SAM parts frozen.

    Raises
    ------
    FileNotFoundError
        A path does not exist.
    CheckpointError
        Unreadable/truncated file, not a SAM/MA-SAM checkpoint, wrong backbone (the message
        names the disagreeing shapes), wrong class count, missing/unexpected keys (grouped).
    ValueError
        ``num_classes`` missing without an MA-SAM file.
    """
    from ..devices import resolve_device
    from ..model.base import ModelMetadata
    from ..model.config import MASAMConfig
    from ..model.masam import MASAM, default_metadata, set_trainable

    target = resolve_device(device)
    sam_path = Path(sam_checkpoint)
    sam_state = read_state_dict(sam_path, what="SAM checkpoint")
    arch = infer_sam_architecture(sam_state, sam_path)
    if backbone is not None and arch["name"] != backbone:
        raise CheckpointError(
            f"Wrong backbone: the SAM checkpoint {sam_path} is {arch['name']} (embed dim "
            f"{arch['embed_dim']}, {arch['depth']} blocks; image_encoder.patch_embed.proj.weight "
            f"{_shape(sam_state['image_encoder.patch_embed.proj.weight'])}), but {backbone} was "
            f"asked for. Use Meta's {SAM_FILENAMES.get(backbone, backbone)}."
        )

    found: dict[str, int] = {}
    masam_state: dict[str, torch.Tensor] | None = None
    masam_path = None
    if masam_checkpoint is not None:
        masam_path = Path(masam_checkpoint)
        masam_state = _masam_file_to_ours(read_state_dict(masam_path, what="MA-SAM checkpoint"))
        found = _check_masam_against_sam(masam_state, arch, masam_path, sam_path)
    if num_classes is not None and "num_classes" in found and found["num_classes"] != num_classes:
        tokens = masam_state["mask_decoder.mask_tokens.weight"]  # type: ignore[index]
        raise CheckpointError(
            f"Wrong class count: {masam_path} has {found['num_classes']} classes "
            f"(mask_decoder.mask_tokens.weight {_shape(tokens)} = classes + background), but "
            f"num_classes={num_classes} was asked for. Leave num_classes out to use the file's."
        )
    classes = found.get("num_classes", num_classes)
    if classes is None:
        raise ValueError(
            "num_classes is needed when no MA-SAM checkpoint is given (or the file lacks "
            "mask_decoder.mask_tokens.weight): pass num_classes=C for C foreground classes."
        )

    fields = {k: v for k, v in arch.items() if k != "pretrain_grid"}
    from_files = {**fields, **found}
    clashes = {
        k: (v, from_files[k])
        for k, v in overrides.items()
        if k in from_files and from_files[k] != v
    }
    if clashes:
        raise CheckpointError(
            "The checkpoint files fix "
            + ", ".join(f"{k}={f!r} (asked {v!r})" for k, (v, f) in clashes.items())
            + f" ({sam_path}{', ' + str(masam_path) if masam_path else ''}); leave these out."
        )
    fields.update(overrides)
    fields.update(
        image_size=image_size,
        slices_per_group=slices_per_group,
        num_classes=classes,
        **{k: v for k, v in found.items() if k != "num_classes"},
    )
    try:
        config = MASAMConfig(**fields)
    except TypeError as exc:
        raise TypeError(f"load_masam got an unknown config field: {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{sam_path} with image_size={image_size}: {exc}") from exc

    provenance: dict[str, Any] = {
        "format": "sam+masam-authors" if masam_path else "sam",
        "sam_checkpoint": sam_path.name,
        "sam_sha256": _file_sha256(sam_path),
    }
    if masam_path is not None:
        provenance.update(masam_checkpoint=masam_path.name, masam_sha256=_file_sha256(masam_path))
    base_meta = metadata or default_metadata(
        config, name=masam_path.stem if masam_path else f"masam_{config.name}"
    )
    meta = dataclasses.replace(
        base_meta,
        sha256=provenance.get("masam_sha256", provenance["sam_sha256"]),
        provenance={**base_meta.provenance, **provenance},
    )
    if not isinstance(meta, ModelMetadata):  # pragma: no cover - defensive
        raise TypeError("metadata must be a ModelMetadata")

    # every check against the files runs on shapes (a meta-device model allocates nothing)
    # before the real model is built: memory stays bounded by what the files hold
    sam_ours = sam_to_masam_state_dict(sam_state, config)
    expected = _meta_shapes(config)
    _check_sam_covers_frozen(expected, sam_ours, sam_path, arch["name"])
    if masam_state is not None:
        _check_masam_part(expected, masam_state, masam_path, classes)  # type: ignore[arg-type]

    model = MASAM(config, metadata=meta)
    copied, skipped = copy_matching(model, sam_ours)
    logger.info(
        "SAM base %s: copied %d tensors, kept fresh init for %d (%s)",
        sam_path.name,
        len(copied),
        len(skipped),
        _group_keys(skipped, limit=6),
    )
    if masam_state is not None:
        copy_matching(model, masam_state)
    set_trainable(model)
    return model.to(target).eval()


def save_authors_checkpoint(model: MASAM, path: PathLike) -> Path:
    """Write the trainable parts in the authors' format (flat dict, their names and order).

    Written atomically (a temporary sibling renamed into place). The file loads in the
    authors' code and back here with :func:`load_masam` (together with
    the SAM base it was trained on).
    """
    torch = _torch()
    path = Path(path)
    state = {
        k: v.detach().to("cpu").clone() for k, v in authors_checkpoint_state_dict(model).items()
    }
    from ..io._common import atomic_path

    with atomic_path(path) as tmp:  # an interrupted save keeps the previous file
        torch.save(state, tmp)
    return path
