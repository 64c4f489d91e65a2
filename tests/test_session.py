"""SegmentationSession: one model + device + cache, driving the engine for widget and CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_masam.cache import EmbeddingCache
from napari_masam.inference import iter_segment_automatic, iter_segment_boxes, run
from napari_masam.model import config as masam_config
from napari_masam.model import masam
from napari_masam.session import SegmentationSession


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return masam.build_masam(masam_config.MASAM_CONFIGS["tiny"], num_classes=3)


def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 150, size=(7, 64, 64)).astype(np.int16)


def test_session_runs_both_modes_like_the_engine(model) -> None:
    session = SegmentationSession(model, "cpu")
    assert session.device == torch.device("cpu") and not session.model.training
    vol = volume()
    auto = session.segment_automatic(vol, preset="ct_abdomen", stride=2)
    direct = run(iter_segment_automatic(model, vol, preset="ct_abdomen", stride=2))
    np.testing.assert_array_equal(auto.labels, direct.labels)
    assert len(session.cache) == 0  # automatic runs do not fill the cache by default
    boxes = {1: {3: (10, 10, 40, 40)}, 2: {3: (30, 30, 60, 60), 4: (30, 30, 60, 60)}}
    gen = session.iter_boxes(vol, boxes, preset="ct_abdomen")
    progress = list(gen)
    assert [p.slice_index for p in progress] == [3, 4]
    first = session.segment_boxes(vol, boxes, preset="ct_abdomen")
    assert first.timings["windows_encoded"] == 0  # the iterated run above filled the cache
    direct = run(iter_segment_boxes(model, vol, boxes, preset="ct_abdomen"))
    np.testing.assert_array_equal(first.labels, direct.labels)
    assert "masam_tiny" in repr(session)


def test_session_automatic_with_cache_feeds_boxes(model, tmp_path) -> None:
    session = SegmentationSession(model, "cpu", cache_dir=tmp_path, cache_max_bytes=1 << 20)
    vol = volume()
    session.segment_automatic(vol, preset="ct_abdomen", use_cache=True)
    assert session.cache.directory == tmp_path and any(tmp_path.iterdir())
    boxes = session.segment_boxes(vol, {1: {0: (0, 0, 20, 20)}}, preset="ct_abdomen")
    assert boxes.timings["windows_encoded"] == 0


def test_from_source_with_our_checkpoint(model, tmp_path) -> None:
    from napari_masam import checkpoints

    path = checkpoints.save_checkpoint(model, tmp_path / "tiny.safetensors")
    session = SegmentationSession.from_source(path, device="cpu", cache=EmbeddingCache())
    assert session.metadata.name == model.metadata.name
    vol = volume()
    a = session.segment_automatic(vol, preset="ct_abdomen", stride=5).labels
    b = run(iter_segment_automatic(model, vol, preset="ct_abdomen", stride=5)).labels
    np.testing.assert_array_equal(a, b)


def test_from_source_unknown(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        SegmentationSession.from_source(tmp_path / "nope.safetensors", device="cpu")


def test_session_passes_box_windows_through(model) -> None:
    session = SegmentationSession(model, "cpu")
    vol = volume()
    boxes = {1: {z: (10, 10, 50, 50) for z in range(1, 7)}}
    tiled = session.segment_boxes(vol, boxes, preset="ct_abdomen", windows="tiled")
    direct = run(iter_segment_boxes(model, vol, boxes, preset="ct_abdomen", windows="tiled"))
    np.testing.assert_array_equal(tiled.labels, direct.labels)
    assert tiled.timings["windows_encoded"] == 2  # groups 0-4 and 5-6 (padded)
    centred = run(session.iter_boxes(vol, boxes, preset="ct_abdomen", cache=EmbeddingCache()))
    assert centred.timings["windows_encoded"] == 6


def test_session_propagates_with_its_cache(model) -> None:
    from napari_masam.propagation import iter_propagate

    session = SegmentationSession(model, "cpu")
    vol = volume()
    boxes = {1: {3: (10, 10, 40, 40)}}
    direct = run(iter_propagate(model, vol, boxes, preset="ct_abdomen"))
    first = run(session.iter_boxes(vol, boxes, propagate=True, preset="ct_abdomen"))
    np.testing.assert_array_equal(first.labels, direct.labels)
    assert first.mode == "propagate" and first.timings["windows_encoded"] > 0
    # a second object on the same stack: decoder only
    second = session.segment_propagate(vol, {2: {3: (20, 20, 50, 50)}}, preset="ct_abdomen")
    assert second.timings["windows_encoded"] == 0 and second.timings["decoded"] >= 1


@pytest.mark.parametrize("windows", ["tiled", "centred"])
def test_precompute_makes_later_runs_decoder_only(model, windows) -> None:
    session = SegmentationSession(model, "cpu")
    vol = volume()
    progress = list(session.iter_precompute(vol, windows=windows, preset="ct_abdomen"))
    d = model.slices_per_group
    expected = -(-len(vol) // d) if windows == "tiled" else len(vol)
    assert len(progress) == expected and progress[-1].fraction == 1.0
    assert all(p.stage == "precompute" and p.labels_slice is None for p in progress)
    boxes = {1: {z: (10, 10, 40, 40) for z in range(len(vol))}}
    warm = session.segment_boxes(vol, boxes, windows=windows, preset="ct_abdomen")
    assert warm.timings["windows_encoded"] == 0
    cold = run(iter_segment_boxes(model, vol, boxes, windows=windows, preset="ct_abdomen"))
    np.testing.assert_array_equal(warm.labels, cold.labels)
    if windows == "tiled":
        prop = session.segment_propagate(vol, {1: {3: (10, 10, 40, 40)}}, preset="ct_abdomen")
        assert prop.timings["windows_encoded"] == 0
