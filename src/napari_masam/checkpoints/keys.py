"""The one place where key names are mapped: Meta SAM, the MA-SAM authors' files, ours.

- **Meta SAM** (``sam_vit_b_01ec64.pth`` ...): keys ``image_encoder.*``, ``prompt_encoder.*``,
  ``mask_decoder.*``; SAM's fused ``attn.qkv`` sits inside our FacT wrapper (``attn.qkv.qkv``).
- **The MA-SAM authors'** files (github cchen-cc/MA-SAM): a flat dict holding only the trainable
  parts, keys ``q_FacTs_NNN``, ``v_FacTs_NNN``, ``image_encoder.FacTu.weight``,
  ``image_encoder.FacTv.weight``, ``prompt_encoder.*``, ``mask_decoder.*`` and
  ``image_encoder.ImageEncoderViT.blocks.{i}.Block.adapter_*`` (spec section 5). Their live
  model (``masam_state_dict_vit_b.tsv``) names every encoder module after its class as well.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..model.masam import MASAM

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


def _masam_file_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = from_authors_key(sam_key_to_masam(key))
        out[new] = tensor
    return out
