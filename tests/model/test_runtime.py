"""The ONNX Runtime / OpenVINO backend of LiteMedSAM: export cache, verification, equivalence.

Fast tests use a tiny random-weight LiteMedSAM (the same TinyViT code at 64 px); the real-weight
equivalence on real MRI slices is marked slow (one ~20 s export per runtime).
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
from configs import TINY_LITE_ENCODER

from napari_masam import inference
from napari_masam.model import runtime
from napari_masam.model.lite import LiteMedSAM, build_litemedsam
from napari_masam.model.runtime import (
    BackendInfo,
    RuntimeLiteMedSAM,
    backend_info,
    export_key,
    prepare_export,
    weights_sha256,
    with_backend,
)

pytest.importorskip("onnx", reason="the runtime backends export through the onnx package")
RUNTIMES = [
    name for name in ("onnxruntime", "openvino") if importlib.util.find_spec(name) is not None
]
if not RUNTIMES:
    pytest.skip("neither onnxruntime nor openvino is installed", allow_module_level=True)


def _tiny_lite(seed: int = 0) -> LiteMedSAM:
    torch.manual_seed(seed)
    model = LiteMedSAM(encoder_config=TINY_LITE_ENCODER).eval()
    # random non-trivial weights everywhere (zero-initialised parts would hide errors)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return x.expand(-1, 3, -1, -1)[:, None].contiguous()  # N x 1 x 3 x S x S


@pytest.fixture(scope="module")
def shared_exports(tmp_path_factory):
    """One export folder per installed runtime of ``_tiny_lite()``, shared by the tests."""
    folder = tmp_path_factory.mktemp("exports")
    model = _tiny_lite()
    for name in RUNTIMES:
        prepare_export(model, name, folder)
    return folder


@pytest.mark.parametrize("name", RUNTIMES)
def test_tiny_runtime_matches_torch(shared_exports, name):
    model = _tiny_lite()
    fast = with_backend(model, name, cache_dir=shared_exports)
    assert isinstance(fast, RuntimeLiteMedSAM)
    info = backend_info(fast)
    assert info.backend == name and info.fallback_reason is None
    assert info.max_abs_logit_diff is not None and info.max_abs_logit_diff < 1e-3
    images = _images(3, 64)
    boxes = torch.tensor([[5.0, 8.0, 40.0, 50.0], [0.0, 0.0, 63.0, 63.0], [20, 10, 30, 60]])
    with torch.no_grad():
        ref_emb = model.encode(images)
        ref = model.decode(ref_emb, boxes)
    emb = fast.encode(images)
    out = fast.decode(emb, boxes)
    assert emb.shape == ref_emb.shape == (3, 256, 16, 16)
    assert out.shape == ref.shape == (3, 2, 64, 64)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    assert float((emb - ref_emb).abs().max()) < 1e-3
    assert float((out - ref).abs().max()) < 1e-3
    # the exported decoder has no IoU output: scores come from the torch reference's head
    assert fast.predicts_iou
    out_s, scores = fast.decode_scored(emb, boxes)
    with torch.no_grad():
        ref_s, ref_scores = model.decode_scored(emb, boxes)
    assert scores is not None and scores.shape == (3,)
    torch.testing.assert_close(scores, ref_scores)
    torch.testing.assert_close(out_s, ref_s)
    # the manifest records the measured difference and the files' digests
    manifest = json.loads((fast.folder / "manifest.json").read_text())
    assert manifest["max_abs_logit_diff"] == pytest.approx(info.max_abs_logit_diff)
    assert set(manifest["files"]) == {"encoder.onnx", "decoder.onnx"}


def test_engine_labels_equal_on_runtime(shared_exports):
    """The engine needs no change: the same boxes give the same labels on both backends."""
    model = _tiny_lite()
    fast = with_backend(model, RUNTIMES[0], cache_dir=shared_exports)
    stack = (np.random.default_rng(0).random((3, 40, 52)) * 100).astype(np.float32)
    stack[:, 10:30, 15:40] += 80
    boxes = {1: {0: [14, 9, 41, 31], 2: [10, 5, 45, 35]}, 2: {1: [0, 0, 20, 20]}}
    ref = inference.run(inference.iter_segment_boxes(model, stack, boxes))
    got = inference.run(inference.iter_segment_boxes(fast, stack, boxes))
    assert ref.labels.any()
    agree = float((ref.labels == got.labels).mean())
    assert agree >= 0.999, agree


def test_cache_key_follows_weights_sha256(shared_exports):
    a = _tiny_lite(seed=0)
    b = _tiny_lite(seed=0)
    assert weights_sha256(a) == weights_sha256(b)
    folder_a, manifest = prepare_export(a, RUNTIMES[0], shared_exports)
    folder_b, _ = prepare_export(b, RUNTIMES[0], shared_exports)
    assert folder_a == folder_b  # reused: same weights
    assert manifest["weights_sha256"] == weights_sha256(a)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1.0
    assert weights_sha256(a) != weights_sha256(b)
    version = runtime.runtime_version(RUNTIMES[0])
    key_b = export_key(weights_sha256(b), RUNTIMES[0], version, b.get_config())
    assert folder_a.name == export_key(weights_sha256(a), RUNTIMES[0], version, a.get_config())
    assert key_b != folder_a.name
    cfg = a.get_config()
    key = export_key("0" * 64, "onnxruntime", "1.0", cfg)
    assert key != export_key("1" * 64, "onnxruntime", "1.0", cfg)  # weights
    assert key != export_key("0" * 64, "onnxruntime", "1.1", cfg)  # runtime version
    assert key != export_key("0" * 64, "openvino", "1.0", cfg)  # runtime
    assert key != export_key("0" * 64, "onnxruntime", "1.0", cfg, opset=18)  # opset


def test_corrupted_export_is_detected_and_rebuilt(tmp_path, shared_exports, caplog):
    import shutil

    model = _tiny_lite()
    source, manifest = prepare_export(model, RUNTIMES[0], shared_exports)
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    encoder = folder / "encoder.onnx"
    good = encoder.read_bytes()
    encoder.write_bytes(good[: len(good) // 2])  # truncated, as after a full disk
    with caplog.at_level("WARNING", logger="napari_masam.model.runtime"):
        fast = with_backend(model, RUNTIMES[0], cache_dir=tmp_path)
    assert "does not match its sha256" in caplog.text
    assert isinstance(fast, RuntimeLiteMedSAM) and fast.folder == folder
    assert len(encoder.read_bytes()) == len(good)
    rebuilt = json.loads((folder / "manifest.json").read_text())
    assert rebuilt["files"]["encoder.onnx"] == manifest["files"]["encoder.onnx"] or (
        rebuilt["max_abs_logit_diff"] < 1e-3
    )
    images = _images(1, 64)
    with torch.no_grad():
        ref = model.encode(images)
    assert float((fast.encode(images) - ref).abs().max()) < 1e-3


def test_failed_verification_falls_back_to_torch(tmp_path, shared_exports, monkeypatch):
    import shutil

    model = _tiny_lite()
    source, _ = prepare_export(model, RUNTIMES[0], shared_exports)

    def copy_export(model, folder):  # the shared export's graphs instead of a fresh trace
        for name in ("encoder.onnx", "decoder.onnx"):
            shutil.copy(source / name, folder / name)

    monkeypatch.setattr(runtime, "_export_onnx", copy_export)
    monkeypatch.setattr(runtime, "MAX_LOGIT_DIFF", -1.0)  # nothing can pass
    with pytest.warns(UserWarning, match="running on torch instead"):
        got = with_backend(model, RUNTIMES[0], cache_dir=tmp_path)
    assert got is model
    info = backend_info(got)
    assert info.backend == "torch" and info.requested == RUNTIMES[0]
    assert "differs from torch" in info.fallback_reason
    assert "not used" in info.describe()
    assert backend_info(with_backend(got, "torch")).fallback_reason is None
    assert not any(tmp_path.iterdir())  # a refused export is not cached


def test_backend_choices(shared_exports):
    model = _tiny_lite()
    assert with_backend(model, "torch") is model
    assert backend_info(model).backend == "torch"
    with pytest.raises(ValueError, match="Unknown backend"):
        with_backend(model, "tensorrt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns when a runtime works
        fast = with_backend(model, "auto", cache_dir=shared_exports)
    assert backend_info(fast).backend in RUNTIMES
    assert backend_info(fast).requested == "auto"
    assert with_backend(fast, "torch") is model  # back to the reference
    assert isinstance(BackendInfo("torch").describe(), str)


def test_non_lite_models_stay_on_torch(tmp_path):
    from napari_masam.model.masam import build_masam

    model = build_masam("tiny", num_classes=2)
    got = with_backend(model, "auto", cache_dir=tmp_path)
    assert got is model
    assert "runs on torch" in backend_info(got).fallback_reason


# ----------------------------------------------------------------------------- real weights
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNTIMES)
def test_real_weights_real_slices(tmp_path_factory, ch2_path, ch2bet_path, name):
    """Released weights on Colin27 slices: logits within 1e-2, masks' Dice >= 0.995."""
    from napari_masam.io.nifti import read_nifti

    image = np.asarray(read_nifti(ch2_path).data, dtype=np.float32)
    brain = np.asarray(read_nifti(ch2bet_path).data) > 0
    slices = (60, 90)
    boxes = {}
    for i, z in enumerate(slices):
        rows, cols = np.nonzero(brain[z])
        boxes[i] = [cols.min() - 2, rows.min() - 2, cols.max() + 2, rows.max() + 2]
    model = build_litemedsam()
    fast = with_backend(model, name, cache_dir=tmp_path_factory.mktemp("exports"))
    assert isinstance(fast, RuntimeLiteMedSAM)
    assert backend_info(fast).max_abs_logit_diff < 1e-2
    sub = image[list(slices)]
    ref = inference.run(inference.iter_segment_boxes(model, sub, {1: boxes}))
    got = inference.run(inference.iter_segment_boxes(fast, sub, {1: boxes}))
    for i in range(len(slices)):
        assert ref.labels[i].sum() > 1000
        assert _dice(ref.labels[i] == 1, got.labels[i] == 1) >= 0.995
    # logits on the model input square
    x = torch.from_numpy(np.stack([np.repeat(sub[:1, None] / sub.max(), 3, axis=1)]))
    x = torch.nn.functional.interpolate(x[0], size=(256, 256), mode="bilinear")[None]
    box = torch.tensor([[30.0, 30.0, 220.0, 230.0]])
    with torch.no_grad():
        ref_logits = model.decode(model.encode(x), box)
    got_logits = fast.decode(fast.encode(x), box)
    assert float((ref_logits - got_logits).abs().max()) < 1e-2


def test_describe_backends_names_the_auto_choice():
    from napari_masam.model.runtime import available_backends, describe_backends

    text = describe_backends()
    assert (
        f"'auto' runs LiteMedSAM on {RUNTIMES[-1] if 'openvino' in RUNTIMES else RUNTIMES[0]}"
        in text
    )
    assert set(RUNTIMES) <= set(available_backends())
    assert runtime.check_backend("OpenVINO") == "openvino"


def test_registry_applies_the_backend_to_any_preset(tmp_path):
    from napari_masam.model.registry import build_model

    model = build_model("masam-lite", num_classes=2, backend="auto", export_dir=tmp_path)
    assert type(model).__name__ == "MASAMLite"  # adapted models stay on torch
    assert backend_info(model).backend == "torch"
    with pytest.raises(ValueError, match="Unknown backend"):
        build_model("masam-lite", num_classes=2, backend="cuda")
