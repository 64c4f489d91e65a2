"""Point prompts (issue 17 point 5) at the model level: numbers against SAM's own embedding
rule computed by hand, padding, points alone, refusals."""

from __future__ import annotations

import pytest
import torch
from configs import TINY_LITE_ENCODER

from napari_masam.model.base import check_points, points_refusal
from napari_masam.model.lite import LiteMedSAM
from napari_masam.model.masam import build_masam


@pytest.fixture(scope="module")
def masam():
    torch.manual_seed(0)
    model = build_masam("tiny", num_classes=2)
    # random (not SAM's zero-ish init) prompt embeddings, so that every token matters
    with torch.no_grad():
        for emb in model.prompt_encoder.point_embeddings:
            emb.weight.normal_()
        model.prompt_encoder.not_a_point_embed.weight.normal_()
    return model


@pytest.fixture(scope="module")
def embeddings(masam) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, masam.slices_per_group, 3, masam.image_size, masam.image_size, generator=g)
    with torch.inference_mode():
        return masam.encode(x)[:3]  # 3 rows


def _by_hand_sparse(pe, coords, labels, boxes, pad):
    """SAM's sparse prompt tokens written out from its published rule (Kirillov et al. 2023):
    random-Fourier positional encoding of (coords + 0.5) / size, plus a learned embedding per
    label (0 negative, 1 positive), "not a point" for padding; box corners get embeddings 2, 3.
    """
    size = pe.input_image_size
    tokens = []
    for i in range(coords.shape[0]):
        row = []
        cs, ls = coords[i], labels[i]
        if pad:
            cs = torch.cat([cs, torch.zeros(1, 2)])
            ls = torch.cat([ls, torch.tensor([-1])])
        for (x, y), label in zip(cs.tolist(), ls.tolist(), strict=True):
            if label == -1:
                row.append(pe.not_a_point_embed.weight[0])
                continue
            xy = torch.tensor([[[(x + 0.5) / size[1], (y + 0.5) / size[0]]]])
            enc = pe.pe_layer._pe_encoding(xy)[0, 0]
            row.append(enc + pe.point_embeddings[int(label)].weight[0])
        if boxes is not None:
            x0, y0, x1, y1 = boxes[i].tolist()
            for k, (x, y) in enumerate(((x0, y0), (x1, y1))):
                xy = torch.tensor([[[(x + 0.5) / size[1], (y + 0.5) / size[0]]]])
                row.append(
                    pe.pe_layer._pe_encoding(xy)[0, 0] + pe.point_embeddings[2 + k].weight[0]
                )
        tokens.append(torch.stack(row))
    return torch.stack(tokens)


def _by_hand_logits(model, embeddings, coords, labels, boxes):
    pe = model.prompt_encoder
    sparse = _by_hand_sparse(pe, coords, labels, boxes, pad=boxes is None)
    n, _, g, _ = embeddings.shape
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, g, g)
    return model.mask_decoder(embeddings, pe.get_dense_pe(), sparse, dense)[0]


BOXES = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 63.0, 63.0]])
COORDS = torch.tensor(
    [[[20.0, 25.0], [5.0, 50.0]], [[12.0, 15.0], [28.0, 18.0]], [[30.0, 31.0], [1.0, 2.0]]]
)
LABELS = torch.tensor([[1, 0], [1, 1], [0, 1]])


def test_masam_supports_points_and_box_plus_points_is_sams_rule(masam, embeddings) -> None:
    assert masam.supports_points
    with torch.inference_mode():
        got = masam.decode(embeddings, BOXES, (COORDS, LABELS))
        expected = _by_hand_logits(masam, embeddings, COORDS, LABELS, BOXES)
        box_only = masam.decode(embeddings, BOXES)
        flipped = masam.decode(embeddings, BOXES, (COORDS, 1 - LABELS))
    assert got.shape == (3, 3, 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the clicks matter, and so does their sign
    assert (got - box_only).abs().max() > 1e-3
    assert (got - flipped).abs().max() > 1e-3


def test_masam_points_alone_are_prompted_not_automatic(masam, embeddings) -> None:
    with torch.inference_mode():
        got = masam.decode(embeddings, None, (COORDS, LABELS))
        expected = _by_hand_logits(masam, embeddings, COORDS, LABELS, None)  # SAM's pad token
        automatic = masam.decode(embeddings)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - automatic).abs().max() > 1e-3


def test_padding_equals_no_point_whatever_the_batch(masam, embeddings) -> None:
    # row 0: 2 points, row 1: 1 point (+ 1 padding), row 2: no point (2 paddings)
    coords = COORDS.clone()
    labels = torch.tensor([[1, 0], [1, -1], [-1, -1]])
    coords[1, 1] = torch.tensor([50.0, 3.0])  # where a padding sits must not matter
    with torch.inference_mode():
        batch = masam.decode(embeddings, BOXES, (coords, labels))
        row0 = masam.decode(embeddings[:1], BOXES[:1], (COORDS[:1], LABELS[:1]))
        row1 = masam.decode(embeddings[1:2], BOXES[1:2], (COORDS[1:2, :1], labels[1:2, :1]))
        row2 = masam.decode(embeddings[2:], BOXES[2:])
        # padding first in a row is the same as padding last
        swapped = masam.decode(
            embeddings[1:2], BOXES[1:2], (COORDS[1:2].flip(1), torch.tensor([[-1, 1]]))
        )
    torch.testing.assert_close(batch[0:1], row0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1:2], row1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[2:3], row2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        swapped,
        masam.decode(embeddings[1:2], BOXES[1:2], (COORDS[1:2, :1], torch.tensor([[1]]))),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    ("coords", "labels", "message"),
    [
        (torch.zeros(3, 2, 3), torch.ones(3, 2, dtype=torch.int64), "(N, P, 2)"),
        (torch.zeros(2, 2, 2), torch.ones(2, 2, dtype=torch.int64), "N = 3"),
        (torch.zeros(3, 2, 2), torch.ones(3, 1, dtype=torch.int64), "one per point"),
        (torch.full((3, 1, 2), float("nan")), torch.ones(3, 1, dtype=torch.int64), "finite"),
        (torch.zeros(3, 1, 2), torch.full((3, 1), 2), "1 (positive), 0 (negative)"),
    ],
)
def test_bad_points_are_refused_with_what_to_do(masam, embeddings, coords, labels, message) -> None:
    with pytest.raises(ValueError, match=r"points|point") as info:
        masam.decode(embeddings, BOXES, (coords, labels))
    assert message in str(info.value)


def test_a_row_without_box_or_point_is_refused(masam, embeddings) -> None:
    labels = torch.tensor([[1, 0], [1, 1], [-1, -1]])
    with pytest.raises(ValueError, match="neither a box nor a point"):
        masam.decode(embeddings, None, (COORDS, labels))
    with pytest.raises(TypeError, match="coords, labels"):
        check_points(COORDS, 3)  # not a pair


@pytest.fixture(scope="module")
def tiny_lite() -> LiteMedSAM:
    torch.manual_seed(0)
    return LiteMedSAM(encoder_config=TINY_LITE_ENCODER).eval()


def test_litemedsam_refuses_points_with_the_measured_reason(tiny_lite) -> None:
    assert not LiteMedSAM.supports_points and not tiny_lite.supports_points
    emb = torch.randn(2, 256, 16, 16)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 40.0], [0.0, 0.0, 63.0, 63.0]])
    points = (torch.tensor([[[10.0, 10.0]], [[20.0, 30.0]]]), torch.tensor([[1], [0]]))
    with pytest.raises(ValueError) as info:
        tiny_lite.decode(emb, boxes, points)
    text = str(info.value)
    assert text == points_refusal(tiny_lite)
    assert "box prompts only" in text and "0.708" in text and "0.629" in text
    # the measured path itself (benchmarks/points_realdata.py): SAM's rule, padding = no point
    with torch.inference_mode():
        x = tiny_lite.prompt_logits(emb, boxes, points)
        box_only = tiny_lite.prompt_logits(emb, boxes)
        padded = tiny_lite.prompt_logits(emb, boxes, (points[0], torch.tensor([[1], [-1]])))
    assert x.shape == (2, 1, 64, 64)
    assert (x - box_only).abs().max() > 1e-4
    torch.testing.assert_close(padded[1:], box_only[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[:1], x[:1], atol=1e-5, rtol=1e-5)
    # and decode of boxes alone is unchanged (the box road of every earlier test)
    torch.testing.assert_close(tiny_lite.decode(emb, boxes)[:, 1:], box_only)


def test_masam_lite_and_runtime_follow_litemedsam(tiny_lite, tmp_path) -> None:
    from napari_masam.model.masam_lite import MASAMLite
    from napari_masam.model.runtime import BackendInfo, RuntimeLiteMedSAM

    torch.manual_seed(0)
    adapted = MASAMLite(
        num_classes=2, slices_per_group=3, rank=4, adapter_width=8, encoder_config=TINY_LITE_ENCODER
    ).eval()
    emb = torch.randn(1, 256, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0]])
    points = (torch.tensor([[[10.0, 10.0]]]), torch.tensor([[1]]))
    assert not adapted.supports_points
    with pytest.raises(ValueError, match=r"Point prompts are not supported.*0\.708"):
        adapted.decode(emb, boxes, points)
    # prompt-free is still its automatic head, a box still the box road
    assert adapted.decode(emb).shape == (1, 3, 64, 64)
    assert adapted.decode(emb, boxes).shape == (1, 3, 64, 64)

    info = BackendInfo(backend="onnxruntime", requested="onnxruntime")
    runtime = RuntimeLiteMedSAM(tiny_lite, "onnxruntime", tmp_path, info)
    assert not runtime.supports_points
    with pytest.raises(ValueError, match="Point prompts are not supported"):
        runtime.decode(emb, boxes, points)
    # with a points-capable reference the runtime decodes points through it (no ONNX session:
    # the exported decoder takes boxes only, and none exists in tmp_path)
    tiny_lite.supports_points = True
    runtime.supports_points = True
    try:
        with torch.inference_mode():
            torch.testing.assert_close(
                runtime.decode(emb, boxes, points), tiny_lite.decode(emb, boxes, points)
            )
    finally:
        del tiny_lite.supports_points  # back to the class default
