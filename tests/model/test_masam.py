"""MA-SAM network: shapes, slice mixing, FacT, block order, decoder batching, parameter counts.

Everything runs on the tiny config of the identical architecture, except the parameter counts
(built on the meta device: shapes only, no memory).
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import pytest
import torch
from segment_anything.modeling.image_encoder import Block, add_decomposed_rel_pos
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn

from napari_masam.model.adapters import Adapter3D, FacTQKV, FacTShared
from napari_masam.model.base import ModelMetadata, SegmentationModel
from napari_masam.model.config import MASAM_CONFIGS, MASAMConfig
from napari_masam.model.decoder import MASAMMaskDecoder
from napari_masam.model.encoder import MASAMAttention, decomposed_rel_pos_bias
from napari_masam.model.masam import (
    MASAM,
    build_masam,
    set_trainable,
    trainable_parameter_names,
)

SPEC = Path(__file__).resolve().parents[1] / "data" / "spec"  # copies of shared/spec
TINY = MASAM_CONFIGS["tiny"]


def randomize_zero_inits(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised tensors (pos_embed, rel_pos, FacT V) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w", "fact.v.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture
def tiny_model() -> MASAM:
    torch.manual_seed(0)
    return randomize_zero_inits(build_masam("tiny"))


@pytest.fixture
def images() -> torch.Tensor:
    """Two groups of D slices, (2, D, 3, S, S) in [0, 1]."""
    gen = torch.Generator().manual_seed(1)
    return torch.rand(2, TINY.slices_per_group, 3, TINY.image_size, TINY.image_size, generator=gen)


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "embed", "depth", "heads", "global_idx"),
    [
        ("vit_b", 768, 12, 12, (2, 5, 8, 11)),
        ("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
        ("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    ],
)
def test_presets_follow_the_paper(name, embed, depth, heads, global_idx):
    cfg = MASAM_CONFIGS[name]
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.global_attn_indexes) == (
        embed,
        depth,
        heads,
        global_idx,
    )
    assert (cfg.image_size, cfg.fact_rank, cfg.adapter_width, cfg.slices_per_group) == (
        512,
        32,
        384,
        5,
    )
    assert (cfg.window_size, cfg.grid_size, cfg.fact_scale, cfg.norm_eps) == (14, 32, 1.0, 1e-6)


def test_config_dict_round_trip_and_validation():
    assert MASAMConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="Unknown MASAMConfig fields"):
        MASAMConfig.from_dict({**TINY.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        TINY.replace(num_heads=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TINY.replace(image_size=70)


# -- parameter counts (spec section 4) ----------------------------------------------------------
def _counts(config: MASAMConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = MASAM(config)
    set_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def test_parameter_counts_vit_b_equal_spec():
    total, trainable = _counts(MASAM_CONFIGS["vit_b"])
    assert total == 117_421_209
    assert trainable == 30_142_361
    with torch.device("meta"):
        model = MASAM(MASAM_CONFIGS["vit_b"])
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".adapter_" in n)
    assert adapters == 24_818_688


def test_parameter_counts_vit_h_match_spec_rounding():
    total, trainable = _counts(MASAM_CONFIGS["vit_h"])
    assert round(total / 1e6, 1) == 729.9
    assert round(trainable / 1e6, 1) == 96.8


def test_each_extra_class_adds_134153_decoder_parameters():
    def n(classes: int) -> int:
        with torch.device("meta"):
            dec = MASAMMaskDecoder(MASAM_CONFIGS["vit_b"].replace(num_classes=classes))
        return sum(p.numel() for p in dec.parameters())

    assert n(13) - n(12) == 134_153


def _read_tsv(name: str) -> list[dict[str, str]]:
    with open(SPEC / name, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_trainable_names_equal_spec_state_dict_tsv():
    from napari_masam.checkpoints import to_authors_key

    with torch.device("meta"):
        model = MASAM(MASAM_CONFIGS["vit_b"])
    rows = _read_tsv("masam_state_dict_vit_b.tsv")
    expected = {r["key"] for r in rows if r["trainable"] == "yes"}
    assert {to_authors_key(n) for n in trainable_parameter_names(model)} == expected


# -- contract, shapes, dtypes ----------------------------------------------------------------
def test_contract_attributes(tiny_model):
    assert isinstance(tiny_model, SegmentationModel)
    assert tiny_model.kind == "masam"
    assert (tiny_model.image_size, tiny_model.slices_per_group, tiny_model.num_classes) == (
        64,
        5,
        3,
    )
    assert tiny_model.supports_automatic and tiny_model.supports_boxes
    assert isinstance(tiny_model.metadata, ModelMetadata)
    assert len(tiny_model.metadata.class_names) == len(tiny_model.metadata.class_colors) == 3
    assert MASAMConfig.from_dict(tiny_model.get_config()) == TINY
    assert not tiny_model.training


@pytest.mark.parametrize("with_boxes", [False, True], ids=["automatic", "boxes"])
def test_shapes_and_dtypes(tiny_model, images, with_boxes):
    b, d, s, g = 2, TINY.slices_per_group, TINY.image_size, TINY.grid_size
    boxes = torch.tensor([4.0, 6.0, 40.0, 50.0]).expand(b, d, 4).clone() if with_boxes else None
    with torch.no_grad():
        emb = tiny_model.encode(images)
        logits = tiny_model(images, boxes)
        masks, iou = tiny_model.decode_with_iou(
            emb, None if boxes is None else boxes.reshape(-1, 4)
        )
    assert emb.shape == (b * d, TINY.prompt_embed_dim, g, g) and emb.dtype == torch.float32
    assert logits.shape == (b * d, TINY.num_classes + 1, s, s) and logits.dtype == torch.float32
    assert iou.shape == (b * d, TINY.num_classes + 1)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(masks, logits, rtol=0, atol=1e-5)


def test_bad_inputs_raise(tiny_model, images):
    with pytest.raises(ValueError, match=r"\(B, D, 3, 64, 64\)"):
        tiny_model.encode(images[:, :, :1])
    with pytest.raises(ValueError, match="one box per slice"):
        tiny_model(images, torch.zeros(2, 4, 4))
    emb = torch.zeros(3, TINY.prompt_embed_dim, TINY.grid_size, TINY.grid_size)
    with pytest.raises(ValueError, match="one XYXY box per slice"):
        tiny_model.decode(emb, torch.zeros(2, 4))


def test_rows_are_batch_major_slice_minor(tiny_model, images):
    with torch.no_grad():
        both = tiny_model.encode(images)
        second = tiny_model.encode(images[1:2])
    d = TINY.slices_per_group
    torch.testing.assert_close(both[d:], second, rtol=0, atol=1e-5)


def test_autocast_bf16_runs(tiny_model, images):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(images[:1])
    assert out.shape == (5, 4, 64, 64) and torch.isfinite(out.float()).all()


# -- slice mixing ------------------------------------------------------------------------------
def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    diff = (before - after).flatten(1).abs().amax(1)
    return {int(i) for i in torch.nonzero(diff > 1e-6).flatten()}


@pytest.mark.parametrize("d", range(5))
def test_one_adapter_mixes_only_neighbouring_slices(d):
    torch.manual_seed(0)
    adapter = Adapter3D(8, width=6)
    x = torch.randn(10, 3, 3, 8)  # two groups of D = 5
    y = x.clone()
    y[d] += torch.randn(3, 3, 8)
    with torch.no_grad():
        changed = _changed_rows(adapter(x, 5), adapter(y, 5))
    expected = {r for r in (d - 1, d, d + 1) if 0 <= r < 5}  # never rows 5..9 (other group)
    assert changed == expected


def test_adapter_equals_brute_force_conv_over_slices():
    torch.manual_seed(0)
    adapter = Adapter3D(8, width=6)
    x = torch.randn(10, 2, 3, 8)
    with torch.no_grad():
        got = adapter(x, 5)
        y = adapter.linear_down(adapter.norm(x))  # 10 x 2 x 3 x 6
        w, bias = adapter.conv.weight[:, :, :, 0, 0], adapter.conv.bias  # out x in x 3
        conv = torch.zeros_like(y)
        for row in range(10):
            group, d = divmod(row, 5)
            acc = bias.expand_as(y[row]).clone()
            for k, offset in enumerate((-1, 0, 1)):
                if 0 <= d + offset < 5:
                    acc += y[group * 5 + d + offset] @ w[:, :, k].T
            conv[row] = acc
        want = adapter.linear_up(torch.nn.functional.gelu(conv))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [0, 2, 4])
def test_encoder_mixes_within_group_only(tiny_model, images, d):
    changed_images = images.clone()
    changed_images[0, d] = torch.rand_like(images[0, d])
    with torch.no_grad():
        changed = _changed_rows(tiny_model.encode(images), tiny_model.encode(changed_images))
    assert changed == set(range(5))  # 2 adapters x 3 blocks reach the whole 5-slice group


@pytest.mark.parametrize("d", [0, 2])
def test_without_adapters_slices_stay_independent(tiny_model, images, d):
    with torch.no_grad():
        for block in tiny_model.image_encoder.blocks:
            for adapter in (block.adapter_1, block.adapter_2):
                adapter.linear_up.weight.zero_()
    changed_images = images.clone()
    changed_images[0, d] = torch.rand_like(images[0, d])
    with torch.no_grad():
        changed = _changed_rows(tiny_model.encode(images), tiny_model.encode(changed_images))
    assert changed == {d}


# -- FacT --------------------------------------------------------------------------------------
def test_fact_delta_zero_when_v_zero_and_formula_otherwise():
    torch.manual_seed(0)
    dim, rank = 12, 4
    shared = FacTShared(dim, rank)
    qkv = nn.Linear(dim, 3 * dim)
    fact = FacTQKV(qkv, shared, scale=0.5, dropout=0.1).eval()
    t = torch.randn(7, dim)
    with torch.no_grad():
        torch.testing.assert_close(fact(t), qkv(t), rtol=0, atol=0)  # V is zero-initialised
        shared.v.weight.normal_()
        u, v = shared.u.weight, shared.v.weight
        dq = 0.5 * t @ u.T @ fact.q_FacTs.weight.T @ v.T
        dv = 0.5 * t @ u.T @ fact.v_FacTs.weight.T @ v.T
        want = qkv(t) + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)
        got = fact(t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[:, :dim] - qkv(t)[:, :dim]).abs().max() > 1e-3
    torch.testing.assert_close(got[:, dim : 2 * dim], qkv(t)[:, dim : 2 * dim])  # k untouched


def test_fact_factors_are_shared_once(tiny_model):
    keys = tiny_model.state_dict().keys()
    assert [k for k in keys if "fact." in k] == [
        "image_encoder.fact.u.weight",
        "image_encoder.fact.v.weight",
    ]
    blocks = tiny_model.image_encoder.blocks
    assert all(b.attn.qkv._shared is tiny_model.image_encoder.fact for b in blocks)


# -- block order against segment-anything's own Block ---------------------------------------
@pytest.mark.parametrize("index", [0, 2], ids=["window", "global"])
def test_block_equals_adapters_around_sam_block_with_folded_fact(tiny_model, index):
    """ours(x) = w + mlp(norm2(w)), w = z + ad2(z), z = SAMBlock_noMLP(x + ad1(x)) with W + FacT."""
    block = tiny_model.image_encoder.blocks[index]
    cfg, g = TINY, TINY.grid_size
    sam = Block(
        dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
        use_rel_pos=True,
        window_size=block.window_size,
        input_size=(g, g),
    ).eval()
    fact = block.attn.qkv
    u, v = tiny_model.image_encoder.fact.u.weight, tiny_model.image_encoder.fact.v.weight
    with torch.no_grad():
        folded = fact.qkv.weight.clone()
        c = cfg.embed_dim
        folded[:c] += cfg.fact_scale * v @ fact.q_FacTs.weight @ u
        folded[2 * c :] += cfg.fact_scale * v @ fact.v_FacTs.weight @ u
        sam.norm1.load_state_dict(block.norm1.state_dict())
        sam.attn.rel_pos_h.copy_(block.attn.rel_pos_h)
        sam.attn.rel_pos_w.copy_(block.attn.rel_pos_w)
        sam.attn.qkv.weight.copy_(folded)
        sam.attn.qkv.bias.copy_(fact.qkv.bias)
        sam.attn.proj.load_state_dict(block.attn.proj.state_dict())
        for p in sam.mlp.parameters():
            p.zero_()
        x = torch.randn(10, g, g, cfg.embed_dim)
        z = sam(x + block.adapter_1(x, 5))
        w = z + block.adapter_2(z, 5)
        want = w + block.mlp(block.norm2(w))
        got = block(x, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- attention paths -------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "side"), [(1, 32), (9, 14)], ids=["global-32", "window-14"])
def test_fused_attention_equals_reference(batch, side):
    torch.manual_seed(0)
    shared = FacTShared(192, 8)
    attn = MASAMAttention(192, 3, True, (side, side), shared).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_(std=0.5)
        attn.rel_pos_w.normal_(std=0.5)
        shared.v.weight.normal_(std=0.1)
        x = torch.randn(batch, side, side, 192)
        attn.impl = "reference"
        ref = attn(x)
        attn.impl = "sdpa"
        fused = attn(x)
    assert (fused - ref).abs().max() <= 1e-5


def test_rel_pos_bias_equals_sam_decomposition():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5 * 4, 8)
    rh, rw = torch.randn(9, 8), torch.randn(7, 8)
    zeros = torch.zeros(6, 20, 20)
    want = add_decomposed_rel_pos(zeros, q.reshape(6, 20, 8), rh, rw, (5, 4), (5, 4))
    got = decomposed_rel_pos_bias(q, rh, rw, (5, 4)).reshape(6, 20, 20)
    torch.testing.assert_close(got, want)


def test_model_attention_switch(tiny_model, images):
    with torch.no_grad():
        fused = tiny_model(images)
        tiny_model.set_attention_impl("reference")
        ref = tiny_model(images)
    assert (fused - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="Unknown attention"):
        tiny_model.set_attention_impl("flash")


# -- decoder batching --------------------------------------------------------------------------
def test_automatic_decode_equals_segment_anything_per_row(tiny_model, images):
    with torch.no_grad():
        emb = tiny_model.encode(images[:1])
        got, got_iou = tiny_model.decode_with_iou(emb)
        pe = tiny_model.prompt_encoder.get_dense_pe()
        sparse, dense = tiny_model.prompt_encoder(points=None, boxes=None, masks=None)
        for row in range(emb.shape[0]):
            want, want_iou = MaskDecoder.predict_masks(
                tiny_model.mask_decoder, emb[row : row + 1], pe, sparse, dense
            )
            torch.testing.assert_close(got[row : row + 1], want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got_iou[row : row + 1], want_iou, rtol=1e-4, atol=1e-5)


def test_box_decode_row_i_uses_box_i_only(tiny_model, images):
    boxes = torch.tensor(
        [[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 63.0, 63.0]] * 2
    )[:5]
    with torch.no_grad():
        emb = tiny_model.encode(images[:1])
        got = tiny_model.decode(emb, boxes)
        automatic = tiny_model.decode(emb)
        pe = tiny_model.prompt_encoder.get_dense_pe()
        for row in range(5):
            sparse, dense = tiny_model.prompt_encoder(
                points=None, boxes=boxes[row : row + 1], masks=None
            )
            want, _ = MaskDecoder.predict_masks(
                tiny_model.mask_decoder, emb[row : row + 1], pe, sparse, dense
            )
            torch.testing.assert_close(got[row : row + 1], want, rtol=1e-4, atol=1e-5)
        moved = boxes.clone()
        moved[3] = torch.tensor([20.0, 20.0, 25.0, 30.0])
        changed = _changed_rows(got, tiny_model.decode(emb, moved))
    assert changed == {3}
    assert (got - automatic).abs().amax() > 1e-3  # box prompts change the output


def test_decoder_layout_matches_spec(tiny_model):
    vit_b = MASAM_CONFIGS["vit_b"]
    with torch.device("meta"):
        dec = MASAMMaskDecoder(vit_b)
    kinds = [type(m).__name__ for m in dec.output_upscaling]
    assert kinds == [
        "ConvTranspose2d", "LayerNorm2d", "GELU",
        "ConvTranspose2d", "LayerNorm2d", "GELU",
        "ConvTranspose2d", "LayerNorm2d", "GELU",
        "ConvTranspose2d", "GELU",
    ]  # fmt: skip
    channels = [m.out_channels for m in dec.output_upscaling if isinstance(m, nn.ConvTranspose2d)]
    assert channels == [64, 32, 16, 8]
    assert len(dec.output_hypernetworks_mlps) == vit_b.num_classes + 1
    assert dec.output_hypernetworks_mlps[0].layers[-1].out_features == 8


def test_set_trainable_freezes_sam_parts(tiny_model):
    names = set(trainable_parameter_names(tiny_model))
    for name, p in tiny_model.named_parameters():
        assert p.requires_grad == (name in names), name
    assert "image_encoder.blocks.0.attn.qkv.qkv.weight" not in names
    assert "image_encoder.blocks.0.attn.qkv.q_FacTs.weight" in names
    assert "image_encoder.blocks.0.adapter_2.norm.weight" in names
    assert "image_encoder.pos_embed" not in names


def test_build_masam_overrides_and_unknown_name():
    model = build_masam("tiny", num_classes=5, image_size=32)
    assert model.num_classes == 5 and model.image_size == 32
    assert model.mask_decoder.mask_tokens.weight.shape == (6, TINY.prompt_embed_dim)
    with pytest.raises(ValueError, match="Unknown MA-SAM config"):
        build_masam("vit_x")
