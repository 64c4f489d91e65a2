"""Every checkpoint format in and out, and the one place where key names are mapped.

Formats
-------
- **Meta SAM** (``sam_vit_b_01ec64.pth`` ...): the frozen base. Keys ``image_encoder.*``,
  ``prompt_encoder.*``, ``mask_decoder.*``; trained at 1024 px (64x64 tokens).
- **The MA-SAM authors'** files (github cchen-cc/MA-SAM): a flat dict holding only the trainable
  parts, keys ``q_FacTs_NNN``, ``v_FacTs_NNN``, ``image_encoder.FacTu.weight``,
  ``image_encoder.FacTv.weight``, ``prompt_encoder.*``, ``mask_decoder.*`` and
  ``image_encoder.ImageEncoderViT.blocks.{i}.Block.adapter_*`` (spec section 5). Their live
  model (``masam_state_dict_vit_b.tsv``) names every encoder module after its class as well.
- **Ours**: one safetensors file with the full state and, as JSON in the header, the model kind,
  its config, :class:`~napari_masam.model.base.ModelMetadata` and provenance.

Every torch file is read with ``torch.load(path, map_location="cpu", weights_only=True)``:
checkpoints saved on a GPU open on any machine and cannot run code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .model.base import ModelMetadata, SegmentationModel
    from .model.config import MASAMConfig
    from .model.masam import MASAM

logger = logging.getLogger(__name__)

PathLike = str | Path

#: Value of the ``format`` entry in the header of our safetensors files.
FORMAT_NAME = "napari-masam"
FORMAT_VERSION = 1

#: Meta's file names of the SAM bases, for messages.
SAM_FILENAMES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}

_AUTHORS_ENCODER = "image_encoder.ImageEncoderViT."
#: Order of the adapter tensors inside one block in the authors' files.
_ADAPTER_ORDER = (
    ("linear_down", "weight"),
    ("linear_up", "weight"),
    ("conv", "weight"),
    ("conv", "bias"),
    ("norm", "weight"),
    ("norm", "bias"),
)


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, wrong kind, wrong backbone or class count.

    The message names the file, says what is wrong and what to do.
    """


# ---------------------------------------------------------------------------------------------
# Key names
# ---------------------------------------------------------------------------------------------
def to_authors_key(key: str, *, saved: bool = False) -> str:
    """Our state-dict key -> the MA-SAM authors' name.

    Parameters
    ----------
    key : str
        A key of ``MASAM.state_dict()``.
    saved : bool
        False: the name in the authors' live model (``masam_state_dict_vit_b.tsv``);
        True: the name in their saved files (``masam_checkpoint_keys_vit_b.tsv``), which differs
        only for the per-block FacT cores (``q_FacTs_000`` ...).

    Examples
    --------
    ``image_encoder.blocks.3.adapter_2.conv.bias`` ->
    ``image_encoder.ImageEncoderViT.blocks.3.Block.adapter_conv_2.bias``;
    ``image_encoder.blocks.3.attn.qkv.q_FacTs.weight`` -> ``q_FacTs_003`` (saved) or
    ``image_encoder.ImageEncoderViT.blocks.3.Block.attn.Attention.qkv.q_FacTs.weight`` (live).
    """
    if m := re.fullmatch(r"image_encoder\.fact\.([uv])\.weight", key):
        return f"image_encoder.FacT{m[1]}.weight"
    if saved and (
        m := re.fullmatch(r"image_encoder\.blocks\.(\d+)\.attn\.qkv\.([qv])_FacTs\.weight", key)
    ):
        return f"{m[2]}_FacTs_{int(m[1]):03d}"
    if m := re.fullmatch(
        r"image_encoder\.blocks\.(\d+)\.adapter_([12])\.(norm|linear_down|conv|linear_up)\.(\w+)",
        key,
    ):
        suffix = "" if m[2] == "1" else "_2"
        return f"{_AUTHORS_ENCODER}blocks.{m[1]}.Block.adapter_{m[3]}{suffix}.{m[4]}"
    if m := re.fullmatch(r"image_encoder\.blocks\.(\d+)\.attn\.(.+)", key):
        return f"{_AUTHORS_ENCODER}blocks.{m[1]}.Block.attn.Attention.{m[2]}"
    if m := re.fullmatch(r"image_encoder\.blocks\.(\d+)\.(.+)", key):
        return f"{_AUTHORS_ENCODER}blocks.{m[1]}.Block.{m[2]}"
    if m := re.fullmatch(r"image_encoder\.(.+)", key):
        return _AUTHORS_ENCODER + m[1]
    return key


def from_authors_key(key: str) -> str:
    """The MA-SAM authors' name (saved-file or live-model form) -> our state-dict key.

    Inverse of :func:`to_authors_key` for both forms; our own names pass through unchanged.
    """
    if m := re.fullmatch(r"([qv])_FacTs_(\d+)", key):
        return f"image_encoder.blocks.{int(m[2])}.attn.qkv.{m[1]}_FacTs.weight"
    if m := re.fullmatch(r"image_encoder\.FacT([uv])\.weight", key):
        return f"image_encoder.fact.{m[1]}.weight"
    prefix = re.escape(_AUTHORS_ENCODER)
    if m := re.fullmatch(
        prefix + r"blocks\.(\d+)\.Block\.adapter_(norm|linear_down|conv|linear_up)(_2)?\.(\w+)", key
    ):
        return f"image_encoder.blocks.{m[1]}.adapter_{2 if m[3] else 1}.{m[2]}.{m[4]}"
    if m := re.fullmatch(prefix + r"blocks\.(\d+)\.Block\.attn\.Attention\.(.+)", key):
        return f"image_encoder.blocks.{m[1]}.attn.{m[2]}"
    if m := re.fullmatch(prefix + r"blocks\.(\d+)\.Block\.(.+)", key):
        return f"image_encoder.blocks.{m[1]}.{m[2]}"
    if m := re.fullmatch(prefix + r"(.+)", key):
        return "image_encoder." + m[1]
    return key


def sam_key_to_masam(key: str) -> str:
    """Meta SAM state-dict key -> ours (SAM's fused qkv Linear sits inside FacT's wrapper)."""
    if m := re.fullmatch(r"image_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
        return f"image_encoder.blocks.{m[1]}.attn.qkv.qkv.{m[2]}"
    return key


def _reorder_adapter_keys(keys: list[str]) -> list[str]:
    """Put each block's adapter keys (our names) in the authors' order, where the first stood."""
    out: list[str] = []
    seen_blocks: set[str] = set()
    by_block: dict[str, list[str]] = {}
    pattern = re.compile(r"image_encoder\.blocks\.(\d+)\.adapter_([12])\.(\w+)\.(\w+)")
    for key in keys:
        if m := pattern.fullmatch(key):
            by_block.setdefault(m[1], []).append(key)
    for key in keys:
        m = pattern.fullmatch(key)
        if m is None:
            out.append(key)
            continue
        block = m[1]
        if block in seen_blocks:
            continue
        seen_blocks.add(block)
        present = set(by_block[block])
        for which in ("1", "2"):
            for part, param in _ADAPTER_ORDER:
                name = f"image_encoder.blocks.{block}.adapter_{which}.{part}.{param}"
                if name in present:
                    out.append(name)
                    present.discard(name)
        out.extend(k for k in by_block[block] if k in present)  # anything unforeseen, kept
    return out


def authors_state_dict(model: MASAM) -> dict[str, torch.Tensor]:
    """The full state under the authors' live-model names and order (``masam_state_dict``)."""
    state = model.state_dict()
    return {to_authors_key(k): state[k] for k in _reorder_adapter_keys(list(state))}


def authors_checkpoint_state_dict(model: MASAM) -> dict[str, torch.Tensor]:
    """The trainable parts under the authors' saved-file names, in their order.

    Order (spec section 5): ``q_FacTs_*``, ``v_FacTs_*``, ``FacTu``, ``FacTv``, the prompt
    encoder, the mask decoder, then each block's adapters.
    """
    state = model.state_dict()
    depth = model.config.depth
    ours: list[str] = []
    for branch in "qv":
        ours += [f"image_encoder.blocks.{i}.attn.qkv.{branch}_FacTs.weight" for i in range(depth)]
    ours += ["image_encoder.fact.u.weight", "image_encoder.fact.v.weight"]
    ours += [k for k in state if k.startswith("prompt_encoder.")]
    ours += [k for k in state if k.startswith("mask_decoder.")]
    ours += _reorder_adapter_keys(
        [k for k in state if re.match(r"image_encoder\.blocks\.\d+\.adapter_", k)]
    )
    return {to_authors_key(k, saved=True): state[k].detach() for k in ours}


# ---------------------------------------------------------------------------------------------
# Reading torch files
# ---------------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def read_state_dict(path: PathLike, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a torch checkpoint file, on the CPU.

    Loads with ``map_location="cpu", weights_only=True`` (files saved on CUDA load anywhere; no
    code runs). A dict wrapping the state under ``"state_dict"`` or ``"model"`` is unwrapped.

    Parameters
    ----------
    path : str or Path
    what : str
        How to call the file in messages (``"SAM checkpoint"``).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is truncated, not a torch file, or does not hold a flat dict of tensors.
    """
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} {path} does not exist (or is not a file).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read the {what} {path}: the file is truncated, corrupted or not a PyTorch "
            f"checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Download it again or check that you picked the right file."
        ) from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"The {what} {path} holds a {type(obj).__name__}, not a state dict (a flat dict of "
            "named tensors)."
        )
    bad = [
        str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    ]
    if bad:
        raise CheckpointError(
            f"The {what} {path} is not a flat state dict: {len(bad)} entries are not named "
            f"tensors (e.g. {', '.join(bad[:5])})."
        )
    return {k: v.detach() for k, v in obj.items()}


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    from .weights import file_sha256

    return file_sha256(path)


def _file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file (cached per path, size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def _group_keys(keys: Iterable[str], limit: int = 12) -> str:
    """``a.blocks.*.b (x12), c`` -- keys grouped by replacing numeric path parts with ``*``."""
    counts = Counter(re.sub(r"(?<=\.)\d+(?=\.|$)|(?<=_FacTs_)\d+$", "*", k) for k in keys)
    parts = [f"{name} (x{n})" if n > 1 else name for name, n in sorted(counts.items())]
    more = f", ... and {len(parts) - limit} more groups" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


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
    from .model.config import MASAM_CONFIGS

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
    from .model.masam import _TRAINABLE_RE

    return _TRAINABLE_RE.match(key) is not None


def _masam_file_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = from_authors_key(sam_key_to_masam(key))
        out[new] = tensor
    return out


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
    return found


def _load_masam_part(
    model: torch.nn.Module, ours: Mapping[str, torch.Tensor], path: Path, num_classes: int
) -> None:
    """Load the MA-SAM file on top: strict for the trainable parts, shape-checked elsewhere."""
    torch = _torch()
    own = model.state_dict()
    unexpected = [k for k in ours if k not in own]
    missing = [k for k in own if _is_trainable_key(k) and k not in ours]
    wrong = [k for k in ours if k in own and own[k].shape != ours[k].shape]
    if not (unexpected or missing or wrong):
        with torch.no_grad():
            for key, tensor in ours.items():
                own[key].copy_(tensor)
        return
    lines = [f"The MA-SAM checkpoint {path} does not fit the model built from it and the SAM base:"]
    if wrong:
        details = ", ".join(
            f"{to_authors_key(k, saved=True)} {_shape(ours[k])} vs {_shape(own[k])}"
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
    from .devices import resolve_device
    from .model.base import ModelMetadata
    from .model.config import MASAMConfig
    from .model.masam import MASAM, default_metadata, set_trainable

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

    model = MASAM(config, metadata=meta)
    copied, skipped = copy_matching(model, sam_to_masam_state_dict(sam_state, config))
    logger.info(
        "SAM base %s: copied %d tensors, kept fresh init for %d (%s)",
        sam_path.name,
        len(copied),
        len(skipped),
        _group_keys(skipped, limit=6),
    )
    if masam_state is not None:
        _load_masam_part(model, masam_state, masam_path, classes)  # type: ignore[arg-type]
    set_trainable(model)
    return model.to(target).eval()


def save_authors_checkpoint(model: MASAM, path: PathLike) -> Path:
    """Write the trainable parts in the authors' format (flat dict, their names and order).

    The file loads in the authors' code and back here with :func:`load_masam` (together with
    the SAM base it was trained on).
    """
    torch = _torch()
    path = Path(path)
    state = {
        k: v.detach().to("cpu").clone() for k, v in authors_checkpoint_state_dict(model).items()
    }
    torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------
# Our single-file format
# ---------------------------------------------------------------------------------------------
def _metadata_to_dict(meta: ModelMetadata) -> dict[str, Any]:
    out = dataclasses.asdict(meta)
    out["class_names"] = list(meta.class_names)
    out["class_colors"] = list(meta.class_colors)
    return out


def _metadata_from_dict(
    data: Mapping[str, Any] | ModelMetadata | None, fallback_name: str
) -> ModelMetadata:
    from .model.base import ModelMetadata

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
        from .model.config import MASAMConfig
        from .model.masam import build_masam

        cfg = MASAMConfig.from_dict(dict(config))
        return build_masam(cfg, metadata=_metadata_from_dict(metadata, f"masam_{cfg.name}"))
    if kind in ("litemedsam", "masam-lite"):
        from .model import lite

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

    from . import __version__

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
    save_file(_unshare(model.state_dict()), str(path), metadata=header)
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


def load_checkpoint(path: PathLike, device: str | torch.device = "cpu") -> SegmentationModel:
    """A model from one of our safetensors files (any kind), in eval mode on ``device``.

    ``metadata.sha256`` is set to the digest of this file.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    CheckpointError
        Not a safetensors file, not ours, damaged header, or tensors not fitting the config
        (missing/unexpected keys grouped, shape mismatches named).
    """
    from safetensors.torch import load_file

    from .devices import resolve_device

    target = resolve_device(device)
    path = Path(path)
    header = read_checkpoint_header(path)
    try:
        model = model_from_config(header["kind"], header["config"], header["metadata"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model from its header: {exc}") from exc
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"Cannot read the tensors of {path} (truncated?): {exc}") from exc
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        lines = [f"The tensors in {path} do not fit its own config ({header['kind']}):"]
        if wrong:
            lines.append(
                "- other shapes: "
                + ", ".join(f"{k} {_shape(state[k])} vs {_shape(own[k])}" for k in wrong[:6])
            )
        if missing:
            lines.append(f"- missing {len(missing)} keys: {_group_keys(missing)}")
        if unexpected:
            lines.append(f"- unexpected {len(unexpected)} keys: {_group_keys(unexpected)}")
        raise CheckpointError("\n".join(lines))
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


def load_model(
    source: PathLike,
    *,
    masam_checkpoint: PathLike | None = None,
    device: str | torch.device = "auto",
    **kwargs: Any,
) -> SegmentationModel:
    """Any model from what a user has at hand.

    Parameters
    ----------
    source : str or Path
        A registry name (``"litemedsam"``, ``"masam_vit_b"`` ...; extra keyword arguments go to
        its builder), one of our ``.safetensors`` files, or a Meta SAM checkpoint (then
        ``masam_checkpoint`` is the authors' file on top).
    masam_checkpoint : str or Path or None
    device : str or torch.device
        ``"auto"`` picks cuda, mps, cpu.
    **kwargs
        Passed on (``image_size``, ``num_classes``, ... for SAM + MA-SAM).

    Raises
    ------
    FileNotFoundError
        ``source`` is neither a registry name nor an existing file.
    CheckpointError, ValueError
        See :func:`load_checkpoint` and :func:`load_masam`.
    """
    from .devices import resolve_device
    from .model.registry import MODEL_REGISTRY, build_model

    if isinstance(source, str) and source in MODEL_REGISTRY:
        if masam_checkpoint is not None:
            kwargs["masam_checkpoint"] = masam_checkpoint
        return build_model(source, device=device, **kwargs)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"{source!s} is neither a model name ({', '.join(MODEL_REGISTRY)}) nor an existing "
            "checkpoint file."
        )
    if _looks_like_safetensors(path):
        if masam_checkpoint is not None:
            raise ValueError(
                f"{path} is a complete napari-masam checkpoint; masam_checkpoint is only used "
                "with a SAM base checkpoint."
            )
        return load_checkpoint(path, device=resolve_device(device))
    return load_masam(path, masam_checkpoint, device=device, **kwargs)


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
    if checkpoint is not None and _looks_like_safetensors(Path(checkpoint)):
        model = load_checkpoint(checkpoint, device=device)
        if model.kind != "masam" or model.config.name != backbone:  # type: ignore[attr-defined]
            raise CheckpointError(
                f"{checkpoint} holds a {model.kind} model "
                f"({getattr(getattr(model, 'config', None), 'name', '?')}), not MA-SAM {backbone}."
            )
        return model  # type: ignore[return-value]
    if checkpoint is not None:
        masam_checkpoint = masam_checkpoint or checkpoint
    if sam_checkpoint is None:
        raise ValueError(
            f"The masam_{backbone} preset needs Meta's SAM {backbone} checkpoint "
            f"({SAM_FILENAMES[backbone]}) as sam_checkpoint= and the authors' MA-SAM checkpoint "
            "as masam_checkpoint= (or one napari-masam .safetensors file as checkpoint=)."
        )
    return load_masam(sam_checkpoint, masam_checkpoint, device=device, backbone=backbone, **kwargs)


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
