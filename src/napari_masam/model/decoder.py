"""MA-SAM's mask decoder: SAM's two-way transformer with C + 1 mask tokens and x16 upsampling.

Subclasses segment-anything's ``MaskDecoder`` (spec ``shared/spec/MASAM.md`` section 3): the
upsampling path has one ``ConvTranspose2d(k2, s2)`` per factor two of the patch size (four for
16, so a 32x32 grid comes back at 512x512), LayerNorm2d + GELU between, GELU after the last;
the hypernetwork MLPs end at the last upsampling width.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from .config import MASAMConfig


class MASAMMaskDecoder(MaskDecoder):
    """SAM's mask decoder returning all ``num_classes + 1`` masks at full input resolution.

    Batching (spec section 3): the image embeddings are never repeated per token batch. With
    one token batch (automatic mode) the tokens broadcast against all N image embeddings inside
    the two-way transformer; with N token batches (one box per row) row i of the tokens meets
    row i of the embeddings.

    Parameters
    ----------
    config : MASAMConfig
    """

    def __init__(self, config: MASAMConfig) -> None:
        dim = config.prompt_embed_dim
        super().__init__(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=dim,
                num_heads=config.decoder_heads,
                mlp_dim=config.decoder_mlp_dim,
            ),
            num_multimask_outputs=config.num_classes,
            activation=nn.GELU,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )
        stages = int(math.log2(config.patch_size))
        layers: list[nn.Module] = []
        channels = dim
        for stage in range(stages):
            out = dim // 2 ** (stage + 2)  # 256 -> 64, 32, 16, 8
            layers.append(nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2))
            if stage < stages - 1:
                layers.append(LayerNorm2d(out))
            layers.append(nn.GELU())
            channels = out
        self.output_upscaling = nn.Sequential(*layers)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, channels, 3) for _ in range(self.num_mask_tokens)
        )

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask logits and iou predictions.

        Parameters
        ----------
        image_embeddings : Tensor
            (N, E, g, g).
        image_pe : Tensor
            (1, E, g, g) dense positional encoding.
        sparse_prompt_embeddings : Tensor
            (1 or N, T, E) prompt tokens (T = 0 in automatic mode, 2 for a box).
        dense_prompt_embeddings : Tensor
            (1 or N, E, g, g).

        Returns
        -------
        masks : Tensor
            (N, C + 1, g * patch, g * patch) logits.
        iou_pred : Tensor
            (N, C + 1).
        """
        n = image_embeddings.shape[0]
        n_tokens = sparse_prompt_embeddings.shape[0]
        if n_tokens not in (1, n):
            raise ValueError(
                f"Got {n_tokens} prompt batches for {n} image embeddings; give one prompt per "
                "embedding row or none (automatic mode)."
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n_tokens, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)  # n_tok x T' x E

        src = image_embeddings + dense_prompt_embeddings  # N x E x g x g
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)  # broadcasts a single token batch
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # N x (C+1) x c'
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`predict_masks`: MA-SAM always returns every class mask."""
        return self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
