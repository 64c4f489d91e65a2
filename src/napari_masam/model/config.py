"""Architecture of MA-SAM as one frozen dataclass, with named presets.

Numbers follow the spec (``shared/spec/MASAM.md``, sections 2 and 3) and Meta's
segment-anything ``build_sam.py`` for the three ViT backbones. Every architectural number is a
field, so that ``MASAM_CONFIGS["tiny"]`` is the identical network with small numbers (for tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MASAMConfig:
    """Every number that determines the MA-SAM architecture (and so its state-dict shapes).

    Attributes
    ----------
    name : str
        Preset name (``"vit_b"``, ...) or a free label.
    embed_dim : int
        Token width of the ViT encoder (768 / 1024 / 1280 for vit_b / l / h).
    depth : int
        Number of transformer blocks.
    num_heads : int
        Attention heads per block (head dim = ``embed_dim // num_heads``).
    global_attn_indexes : tuple of int
        Blocks with global attention; every other block attends within windows.
    window_size : int
        Side of the attention windows, in tokens (14 in SAM).
    image_size : int
        Side S of the square model input, in pixels (512 in the paper).
    patch_size : int
        Side of a patch, in pixels; the token grid is ``image_size // patch_size``. Must be a
        power of two: the decoder upsamples by ``patch_size`` back to the full input resolution.
    mlp_ratio : float
        Hidden width of the block MLP as a multiple of ``embed_dim``.
    qkv_bias : bool
        Bias of the fused qkv projection.
    norm_eps : float
        LayerNorm epsilon of the encoder (SAM's 1e-6; the adapters use it too).
    prompt_embed_dim : int
        Width of the neck output, prompt tokens and mask decoder (256 in SAM).
    mask_in_chans : int
        Hidden channels of the prompt encoder's mask branch (16 in SAM; unused by MA-SAM but
        part of the state dict).
    decoder_depth : int
        Layers of the two-way transformer.
    decoder_heads : int
        Heads of the two-way transformer.
    decoder_mlp_dim : int
        MLP width of the two-way transformer.
    iou_head_depth : int
        Linear layers of the iou head.
    iou_head_hidden_dim : int
        Hidden width of the iou head.
    num_classes : int
        C, foreground classes; the decoder has C + 1 mask tokens (token 0 = background).
    slices_per_group : int
        D, neighbouring slices encoded together (5 in the paper).
    adapter_width : int
        Bottleneck width of the 3D adapters (384 for every backbone).
    fact_rank : int
        r, rank of FacT (32 in the paper).
    fact_scale : float
        s, scale of the FacT update (1.0).
    fact_dropout : float
        Dropout on the FacT core outputs during training (0.1).
    """

    name: str = "vit_b"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    image_size: int = 512
    patch_size: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_classes: int = 12
    slices_per_group: int = 5
    adapter_width: int = 384
    fact_rank: int = 32
    fact_scale: float = 1.0
    fact_dropout: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            problems.append(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
            problems.append(f"patch_size {self.patch_size} is not a power of two")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            problems.append(
                f"global_attn_indexes {self.global_attn_indexes} outside 0..{self.depth - 1}"
            )
        if self.prompt_embed_dim % (2 * self.patch_size):
            problems.append(
                f"prompt_embed_dim {self.prompt_embed_dim} must be a multiple of 2 * patch_size "
                f"({2 * self.patch_size}) for the upsampling decoder"
            )
        for name in (
            "num_classes",
            "slices_per_group",
            "adapter_width",
            "fact_rank",
            "window_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("Invalid MASAMConfig: " + "; ".join(problems) + ".")

    @property
    def grid_size(self) -> int:
        """g, side of the token grid (32 at image_size 512)."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.embed_dim // self.num_heads

    def replace(self, **changes: Any) -> MASAMConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists); inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        out["global_attn_indexes"] = list(self.global_attn_indexes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MASAMConfig:
        """Rebuild from :meth:`to_dict` output.

        Raises
        ------
        ValueError
            On unknown fields (a file written by a newer napari-masam, or not a MA-SAM config).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown MASAMConfig fields {unknown}; known fields: {sorted(known)}. "
                "Was the file written by a newer napari-masam?"
            )
        data = dict(data)
        if "global_attn_indexes" in data:
            data["global_attn_indexes"] = tuple(int(i) for i in data["global_attn_indexes"])
        return cls(**data)


#: Named presets: the three SAM backbones at the paper's 512 input with r 32, plus ``tiny``
#: (identical architecture, small numbers, for tests; forward well under a second on CPU) and
#: ``tiny_train`` (``tiny`` with 4 px patches, for fine-tuning tests).
MASAM_CONFIGS: dict[str, MASAMConfig] = {
    "vit_b": MASAMConfig(
        name="vit_b", embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)
    ),
    "vit_l": MASAMConfig(
        name="vit_l", embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": MASAMConfig(
        name="vit_h", embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)
    ),
    # 4x4 token grid with 3x3 windows: window padding and two window rows/columns are exercised.
    "tiny": MASAMConfig(
        name="tiny",
        embed_dim=32,
        depth=3,
        num_heads=2,
        global_attn_indexes=(2,),
        window_size=3,
        image_size=64,
        prompt_embed_dim=64,
        mask_in_chans=8,
        decoder_depth=2,
        decoder_heads=8,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
        num_classes=3,
        adapter_width=16,
        fact_rank=4,
    ),
}
# "tiny" with 4 px patches: a 16 x 16 token grid (two 8 x 8 windows per side) and a two-stage
# x4 decoder ending in 8 channels. tiny's 4 x 4 grid and x16 decoder (2 channels at the end)
# also learns the fine-tuning tests' 64 px phantom, but needs 75-150 steps to pass Dice 0.9
# where this one needs 30-45 (3 seeds, constant learning rate 3e-3).
MASAM_CONFIGS["tiny_train"] = dataclasses.replace(
    MASAM_CONFIGS["tiny"], name="tiny_train", patch_size=4, window_size=8
)

#: Configs that exist for tests only (random weights, toy sizes): never offered in user menus
#: (Fine-tune backbone, CLI choices). They stay buildable by name for tests; tests import them
#: as ``tests/model/configs.py`` ``TINY`` / ``TINY_TRAIN``.
TEST_CONFIG_NAMES: tuple[str, ...] = ("tiny", "tiny_train")
#: The configs a user may choose: the three SAM backbones.
USER_CONFIGS: dict[str, MASAMConfig] = {
    k: v for k, v in MASAM_CONFIGS.items() if k not in TEST_CONFIG_NAMES
}


def is_test_config(name: str) -> bool:
    """Whether ``name`` is a test-only config (hidden from menus)."""
    return name in TEST_CONFIG_NAMES
