"""MA-SAM's image encoder: Meta's SAM ViT with two 3D adapters per block and FacT on q and v.

Built by subclassing segment-anything's ``ImageEncoderViT``, ``Block`` and ``Attention``
(spec ``shared/spec/MASAM.md`` section 2; Chen et al., MedIA 2024). Tokens are
``(B*D, h, w, C)`` with rows batch-major and slice-minor (row ``b*D + d`` is slice ``d`` of
group ``b``); the group depth D is passed to every block so that the adapters can mix slices.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import nn

from .adapters import Adapter3D, FacTQKV, FacTShared
from .config import MASAMConfig

AttentionImpl = Literal["sdpa", "reference"]
ATTENTION_IMPLS: tuple[str, ...] = ("sdpa", "reference")


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position term as an additive attention bias.

    Equals what segment-anything's ``add_decomposed_rel_pos`` adds to the attention logits
    (MViTv2's decomposition, computed with the *unscaled* queries), materialised so that it can
    be handed to :func:`torch.nn.functional.scaled_dot_product_attention` as ``attn_mask``.

    Parameters
    ----------
    q : Tensor
        (B, heads, h*w, head_dim) queries, unscaled.
    rel_pos_h, rel_pos_w : Tensor
        (2h-1, head_dim) and (2w-1, head_dim) relative position tables (resized by SAM's
        ``get_rel_pos`` when their length differs).
    hw : tuple of int
        (h, w) of the query (= key) token grid.

    Returns
    -------
    Tensor
        (B, heads, h*w, h*w) bias, same dtype as ``q``.
    """
    h, w = hw
    b, heads, _, dim = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # h x h x dim
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # w x w x dim
    r_q = q.reshape(b, heads, h, w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # B x n x h x w x kh
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # B x n x h x w x kw
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # B x n x h x w x kh x kw
    return bias.reshape(b, heads, h * w, h * w)


class MASAMAttention(Attention):
    """SAM's rel-pos attention with a :class:`FacTQKV` as its fused qkv projection.

    Two numerically equivalent paths: ``"reference"`` is segment-anything's own forward
    (explicit attention matrix); ``"sdpa"`` (default) hands the same rel-pos bias to
    :func:`torch.nn.functional.scaled_dot_product_attention`, which fuses scaling, softmax and
    the value product. They agree within 1e-5 (tests and ``benchmarks/bench_encoder.py``).

    Parameters
    ----------
    dim, num_heads, qkv_bias, input_size
        As SAM's ``Attention`` (rel-pos always on; ``input_size`` sets the table lengths).
    shared : FacTShared
        FacT's shared U/V factors (owned by the encoder).
    fact_scale, fact_dropout : float
        FacT's s and core-output dropout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        input_size: tuple[int, int],
        shared: FacTShared,
        fact_scale: float = 1.0,
        fact_dropout: float = 0.1,
    ) -> None:
        super().__init__(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=True,
            rel_pos_zero_init=True,
            input_size=input_size,
        )
        self.qkv = FacTQKV(self.qkv, shared, scale=fact_scale, dropout=fact_dropout)
        self.impl: str = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, dim) tokens (one window or the whole grid per row) -> same shape."""
        if self.impl == "reference":
            return super().forward(x)
        return self.forward_sdpa(x)

    def forward_sdpa(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path: same maths as SAM's forward, via ``scaled_dot_product_attention``."""
        b, h, w, _ = x.shape
        # 3 x B x heads x h*w x head_dim
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


class MASAMBlock(Block):
    """SAM's ViT block with the two 3D adapters of MA-SAM around attention.

    Order (all pre-norm residual, spec section 2): ``x += adapter_1(x)``;
    ``x += attn(norm1(x))`` (windowed or global); ``x += adapter_2(x)``; ``x += mlp(norm2(x))``.
    Both adapters see the full ``(B*D, h, w, C)`` grid, outside window partitioning.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        norm_eps: float,
        window_size: int,
        input_size: tuple[int, int],
        shared: FacTShared,
        fact_scale: float,
        fact_dropout: float,
        adapter_width: int,
    ) -> None:
        super().__init__(
            dim=dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            norm_layer=partial(nn.LayerNorm, eps=norm_eps),
            act_layer=nn.GELU,
            use_rel_pos=True,
            rel_pos_zero_init=True,
            window_size=window_size,
            input_size=input_size,
        )
        # Same place in the module tree (and state dict) as SAM's attention; adds FacT.
        self.attn = MASAMAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            shared=shared,
            fact_scale=fact_scale,
            fact_dropout=fact_dropout,
        )
        self.adapter_1 = Adapter3D(dim, adapter_width, eps=norm_eps)
        self.adapter_2 = Adapter3D(dim, adapter_width, eps=norm_eps)

    def forward(self, x: torch.Tensor, depth: int = 1) -> torch.Tensor:  # type: ignore[override]
        """(B*D, h, w, dim) tokens of whole groups of ``depth`` slices -> same shape."""
        x = x + self.adapter_1(x, depth)
        shortcut = x
        t = self.norm1(x)
        if self.window_size > 0:
            h, w = t.shape[1], t.shape[2]
            t, pad_hw = window_partition(t, self.window_size)
        t = self.attn(t)
        if self.window_size > 0:
            t = window_unpartition(t, self.window_size, pad_hw, (h, w))
        x = shortcut + t
        x = x + self.adapter_2(x, depth)
        return x + self.mlp(self.norm2(x))


class MASAMImageEncoder(ImageEncoderViT):
    """SAM's ``ImageEncoderViT`` with :class:`MASAMBlock` blocks and FacT's shared factors.

    State-dict layout: SAM's (``pos_embed``, ``patch_embed``, ``blocks.{i}``, ``neck``) with
    ``blocks.{i}.attn.qkv.qkv`` for SAM's fused qkv, ``blocks.{i}.attn.qkv.{q,v}_FacTs``,
    ``blocks.{i}.adapter_{1,2}.{norm,linear_down,conv,linear_up}`` and ``fact.{u,v}``
    (:mod:`napari_masam.checkpoints` maps these to the authors' names).

    Parameters
    ----------
    config : MASAMConfig
    """

    def __init__(self, config: MASAMConfig) -> None:
        grid = config.grid_size
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=3,
            embed_dim=config.embed_dim,
            depth=0,  # our blocks are added below (they need the shared FacT factors)
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            out_chans=config.prompt_embed_dim,
            qkv_bias=config.qkv_bias,
            norm_layer=partial(nn.LayerNorm, eps=config.norm_eps),
            act_layer=nn.GELU,
            use_abs_pos=True,
            use_rel_pos=True,
            window_size=config.window_size,
        )
        self.fact = FacTShared(config.embed_dim, config.fact_rank)
        for i in range(config.depth):
            self.blocks.append(
                MASAMBlock(
                    dim=config.embed_dim,
                    num_heads=config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    norm_eps=config.norm_eps,
                    window_size=0 if i in config.global_attn_indexes else config.window_size,
                    input_size=(grid, grid),
                    shared=self.fact,
                    fact_scale=config.fact_scale,
                    fact_dropout=config.fact_dropout,
                    adapter_width=config.adapter_width,
                )
            )

    def forward(self, x: torch.Tensor, depth: int = 1) -> torch.Tensor:  # type: ignore[override]
        """Image embeddings of whole slice groups.

        Parameters
        ----------
        x : Tensor
            (B*D, 3, S, S) float, rows batch-major and slice-minor.
        depth : int
            D, slices per group.

        Returns
        -------
        Tensor
            (B*D, out_chans, g, g), g = S // patch_size.
        """
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x, depth)
        return self.neck(x.permute(0, 3, 1, 2))

    def set_attention_impl(self, impl: str) -> None:
        """Choose ``"sdpa"`` (fused, default) or ``"reference"`` (SAM's own) attention."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"Unknown attention implementation {impl!r}; use one of {ATTENTION_IMPLS}."
            )
        for blk in self.blocks:
            blk.attn.impl = impl
