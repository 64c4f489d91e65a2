"""Parameter-efficient pieces of MA-SAM: the 3D adapter and FacT on a fused qkv projection.

Both follow Chen et al., "MA-SAM", Medical Image Analysis 2024 (spec: ``shared/spec/MASAM.md``,
section 2). They are backbone-agnostic: the ViT encoder of SAM and the TinyViT encoder of
LiteMedSAM both use them.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_ADAPTER_WIDTH = 384


class Adapter3D(nn.Module):
    """A bottleneck adapter whose middle layer mixes neighbouring slices with a (3, 1, 1) conv.

    ``LayerNorm -> Linear(dim -> width) -> Conv3d over (slice, row, col) -> GELU ->
    Linear(width -> dim)``. The module returns the *residual* ``adapter(x)``; the caller adds it
    to ``x``. Attribute names follow the authors' checkpoint (``adapter_norm`` and so on live one
    level up in their Block; :mod:`napari_masam.checkpoints` maps the names).

    Parameters
    ----------
    dim : int
        Channel width of the tokens.
    width : int
        Bottleneck width (384 for every backbone in the paper).
    eps : float
        LayerNorm epsilon; the backbone's own (1e-6 for SAM's ViT).
    zero_init : bool
        Zero the up-projection so that the adapter starts as an exact identity of the block.
        The authors use PyTorch's default init (not identity); MA-SAM-Lite zero-initialises on
        purpose so that step 0 reproduces the pretrained backbone.
    """

    def __init__(
        self,
        dim: int,
        width: int = DEFAULT_ADAPTER_WIDTH,
        eps: float = 1e-6,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.linear_down = nn.Linear(dim, width, bias=False)
        self.conv = nn.Conv3d(width, width, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.act = nn.GELU()
        self.linear_up = nn.Linear(width, dim, bias=False)
        if zero_init:
            nn.init.zeros_(self.linear_up.weight)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Adapter residual of a token grid.

        Parameters
        ----------
        x : Tensor
            (B*D, h, w, dim) tokens, rows batch-major and slice-minor (row b*D + d is slice d of
            group b).
        depth : int
            D, the number of slices per group.

        Returns
        -------
        Tensor
            (B*D, h, w, dim), to be added to ``x``.
        """
        rows, h, w, _ = x.shape
        if depth < 1 or rows % depth != 0:
            raise ValueError(
                f"Adapter3D got {rows} token rows, which is not a multiple of the group depth "
                f"{depth}; pass whole groups of slices (rows = groups x depth)."
            )
        y = self.linear_down(self.norm(x))
        width = y.shape[-1]
        y = y.view(rows // depth, depth, h, w, width).permute(0, 4, 1, 2, 3)  # B x W x D x h x w
        y = self.conv(y)
        y = y.permute(0, 2, 3, 4, 1).reshape(rows, h, w, width)  # B*D x h x w x W
        return self.linear_up(self.act(y))


class FacTShared(nn.Module):
    """The two factors shared by every block in FacT's tensor-train form.

    ``u``: Linear(dim -> rank), ``v``: Linear(rank -> dim), no biases; ``v`` starts at zero so
    that the adapted encoder equals the frozen one at initialisation.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.v.weight)


class FacTQKV(nn.Module):
    """A fused qkv Linear plus FacT updates on its q and v output blocks.

    ``qkv(t) = W t + b + [s * V(drop(Cq(U t))), 0, s * V(drop(Cv(U t)))]`` along the output
    channels (q first ``dim`` outputs, k the middle ones, v the last ones). ``U`` and ``V`` are
    shared across blocks (held by a :class:`FacTShared` owned by the encoder, so they appear once
    in the state dict); the cores ``Cq``/``Cv`` are per block.

    Parameters
    ----------
    qkv : nn.Linear
        The frozen fused projection, (dim -> 3 * dim).
    shared : FacTShared
        The shared ``U``/``V`` factors.
    scale : float
        ``s`` (1.0 in the paper).
    dropout : float
        Dropout on the core outputs during training (0.1 in the paper), one per branch.
    """

    def __init__(
        self, qkv: nn.Linear, shared: FacTShared, scale: float = 1.0, dropout: float = 0.1
    ):
        super().__init__()
        rank = shared.u.out_features
        self.qkv = qkv
        self.q_FacTs = nn.Linear(rank, rank, bias=False)
        self.v_FacTs = nn.Linear(rank, rank, bias=False)
        self.dp_q = nn.Dropout(dropout)
        self.dp_v = nn.Dropout(dropout)
        self.scale = scale
        # Held outside the module tree so the shared factors are owned (and saved) once.
        object.__setattr__(self, "_shared", shared)

    @property
    def in_features(self) -> int:
        return self.qkv.in_features

    @property
    def out_features(self) -> int:
        return self.qkv.out_features

    def fact_delta(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The q and v updates, each (..., dim), for input ``t`` (..., dim)."""
        shared: FacTShared = self._shared
        ut = shared.u(t)
        dq = shared.v(self.dp_q(self.q_FacTs(ut))) * self.scale
        dv = shared.v(self.dp_v(self.v_FacTs(ut))) * self.scale
        return dq, dv

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., 3 * dim) fused q, k, v."""
        out = self.qkv(t)
        dq, dv = self.fact_delta(t)
        return out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)
