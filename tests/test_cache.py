"""EmbeddingCache: LRU bounds, disk persistence, corruption, and its use by the engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_masam.cache import EmbeddingCache, hash_array, make_key, model_identity
from napari_masam.inference import iter_segment_automatic, iter_segment_boxes, run
from napari_masam.model import config as masam_config
from napari_masam.model import masam


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return masam.build_masam(masam_config.MASAM_CONFIGS["tiny"], num_classes=3).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 150, size=(6, 64, 64)).astype(np.int16)


BOXES = {1: {2: (5, 5, 40, 40), 3: (8, 8, 44, 44)}}


def key(i: int) -> str:
    return make_key("test", i)


# -- the cache itself --------------------------------------------------------------------------
def test_lru_by_items_and_bytes() -> None:
    cache = EmbeddingCache(max_items=2, max_bytes=None)
    for i in range(3):
        cache.put(key(i), torch.full((4,), float(i)))
    assert key(0) not in cache and len(cache) == 2
    assert cache.get(key(1)) is not None  # 1 becomes most recent
    cache.put(key(3), torch.zeros(4))
    assert key(2) not in cache and key(1) in cache
    small = EmbeddingCache(max_bytes=3 * 16)  # three float32 (4,) tensors
    for i in range(5):
        small.put(key(i), torch.zeros(4))
    assert len(small) == 3 and small.nbytes == 48
    small.put(key(9), torch.zeros(100))  # larger than the bound: not kept
    assert key(9) not in small and len(small) == 3
    assert (small.hits, small.misses) == (0, 0)
    assert small.get(key(0)) is None and small.misses == 1


def test_disk_round_trip_between_sessions(tmp_path) -> None:
    value = torch.randn(8, 4, 4)
    EmbeddingCache(directory=tmp_path).put(key(1), value)
    assert [p.name for p in tmp_path.iterdir()] == [f"{key(1)}.safetensors"]  # no temp files
    other = EmbeddingCache(directory=tmp_path)  # a new session sharing the folder
    got = other.get(key(1))
    torch.testing.assert_close(got, value, rtol=0, atol=0)
    assert other.disk_hits == 1 and other.get(key(1)) is not None and other.disk_hits == 1


@pytest.mark.parametrize("damage", ["flip_data_byte", "truncate", "garbage"])
def test_corrupt_entry_is_a_miss_and_removed(tmp_path, damage) -> None:
    EmbeddingCache(directory=tmp_path).put(key(1), torch.randn(16, 4, 4))
    path = tmp_path / f"{key(1)}.safetensors"
    raw = bytearray(path.read_bytes())
    if damage == "flip_data_byte":
        raw[-1] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(raw))
    cache = EmbeddingCache(directory=tmp_path)
    assert cache.get(key(1)) is None
    assert cache.corrupt == 1 and not path.exists()


def test_keys_must_be_hex(tmp_path) -> None:
    with pytest.raises(ValueError, match="hex"):
        EmbeddingCache(directory=tmp_path).put("../evil", torch.zeros(1))


def test_hash_array_sees_dtype_shape_and_content() -> None:
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert hash_array(a) == hash_array(a.copy())
    assert hash_array(a) != hash_array(a.reshape(4, 3))
    assert hash_array(a) != hash_array(a.astype(np.int32))
    b = a.copy()
    b[1, 1] += 1
    assert hash_array(a) != hash_array(b)
    assert hash_array(a[:, ::2]) == hash_array(np.ascontiguousarray(a[:, ::2]))


def test_model_identity_tracks_weights() -> None:
    m = tiny(1)
    first = model_identity(m)
    assert model_identity(m) == first
    assert model_identity(tiny(2)) != first  # other weights
    assert model_identity(tiny(1)) == first  # same weights, other object
    with torch.no_grad():
        next(m.parameters()).add_(1.0)  # fine-tuned in place
    assert model_identity(m) != first


# -- the engine with a cache -------------------------------------------------------------------
def test_second_box_runs_only_the_decoder(model) -> None:
    cache = EmbeddingCache()
    vol = volume()
    cold = run(iter_segment_boxes(model, vol, BOXES, preset="ct_abdomen", cache=cache))
    assert cold.timings["windows_encoded"] == 2 and cold.timings["cache_hits"] == 0
    other_box = {2: {2: (30, 30, 60, 60)}}
    warm = run(iter_segment_boxes(model, vol, other_box, preset="ct_abdomen", cache=cache))
    assert warm.timings["windows_encoded"] == 0 and warm.timings["cache_hits"] == 1
    uncached = run(iter_segment_boxes(model, vol, other_box, preset="ct_abdomen"))
    np.testing.assert_array_equal(warm.labels, uncached.labels)


@pytest.mark.parametrize("change", ["image", "model", "preset", "weights_in_place"])
def test_cache_miss_when_inputs_change(change) -> None:
    m = tiny(3)
    cache = EmbeddingCache()
    vol = volume()
    run(iter_segment_boxes(m, vol, BOXES, preset="ct_abdomen", cache=cache))
    preset = "ct_abdomen"
    if change == "image":
        vol = vol.copy()
        vol[3, 0, 0] += 1  # slice 3 is in both centred windows (slices 0..4 and 1..5)
    elif change == "model":
        m = tiny(4)
    elif change == "preset":
        preset = "ct_pancreas"
    else:
        with torch.no_grad():
            next(m.parameters()).add_(0.01)
    again = run(iter_segment_boxes(m, vol, BOXES, preset=preset, cache=cache))
    assert again.timings["windows_encoded"] == 2 and again.timings["cache_hits"] == 0


def test_corrupt_disk_entries_are_recomputed(model, tmp_path) -> None:
    vol = volume(5)
    reference = run(iter_segment_boxes(model, vol, BOXES, preset="ct_abdomen")).labels
    run(
        iter_segment_boxes(
            model, vol, BOXES, preset="ct_abdomen", cache=EmbeddingCache(directory=tmp_path)
        )
    )
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:-7])  # truncated by a crash / full disk
    cache = EmbeddingCache(directory=tmp_path)
    again = run(iter_segment_boxes(model, vol, BOXES, preset="ct_abdomen", cache=cache))
    assert cache.corrupt == 1 and cache.disk_hits == 1
    assert again.timings["windows_encoded"] == 1
    np.testing.assert_array_equal(again.labels, reference)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # rewritten


def test_automatic_pass_fills_the_cache_for_boxes(model) -> None:
    cache = EmbeddingCache()
    vol = volume(6)
    auto = run(iter_segment_automatic(model, vol, preset="ct_abdomen", cache=cache))
    assert auto.timings["windows_encoded"] == 6 and len(cache) == 6 * 5
    boxes = run(iter_segment_boxes(model, vol, BOXES, preset="ct_abdomen", cache=cache))
    assert boxes.timings["windows_encoded"] == 0
    rerun = run(iter_segment_automatic(model, vol, preset="ct_abdomen", cache=cache))
    assert rerun.timings["windows_encoded"] == 0
    np.testing.assert_array_equal(rerun.labels, auto.labels)


def test_identical_sha256_metadata_shares_entries() -> None:
    a, b = tiny(7), tiny(7)
    meta = dataclasses.replace(a.metadata, sha256="ab" * 32)
    a.metadata = meta
    b.metadata = meta
    assert model_identity(a) == model_identity(b)


def test_disk_bound_prunes_least_recently_used(tmp_path) -> None:
    import os

    value = torch.zeros(64)  # ~256 bytes of data + header per entry
    one = EmbeddingCache(directory=tmp_path, max_disk_bytes=10**9)
    one.put(key(0), value)
    size = one.disk_bytes()
    assert size > 256
    cache = EmbeddingCache(max_items=0, directory=tmp_path, max_disk_bytes=int(3.5 * size))
    for i in range(1, 3):
        cache.put(key(i), value)
    for i, t in enumerate((100, 200, 300)):
        os.utime(tmp_path / f"{key(i)}.safetensors", (t, t))
    assert cache.get(key(0)) is not None  # a disk hit makes entry 0 the most recent
    cache.put(key(3), value)  # 4 entries > 3.5: prune to 90 % of the bound (3 entries)
    left = sorted(p.stem for p in tmp_path.iterdir())
    assert left == sorted([key(0), key(2), key(3)]) and cache.disk_bytes() <= 3.5 * size
    assert EmbeddingCache(directory=tmp_path).max_disk_bytes == 20 << 30
    with pytest.raises(ValueError, match="max_disk_bytes"):
        EmbeddingCache(directory=tmp_path, max_disk_bytes=-1)


def test_rewriting_a_disk_entry_counts_its_size_once(tmp_path) -> None:
    """The disk bound's running total must not grow when one key is written again (it made
    the bound prune entries too early)."""
    import torch

    from napari_masam.cache import EmbeddingCache

    cache = EmbeddingCache(directory=tmp_path, max_disk_bytes=10**9)
    key = "ab" * 16
    cache.put(key, torch.ones(8, 4, 4))
    cache.put("cd" * 16, torch.zeros(8, 4, 4))  # the running total is in use from here on
    for _ in range(4):
        cache.put(key, torch.ones(8, 4, 4))
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert cache._disk_bytes == on_disk == cache.disk_bytes()
