"""Label export (PNG folder, TIFF stack, overlay mp4) and TIFF stacks."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import tifffile

from napari_masam.io.export import (
    LabelsTiffWriter,
    PngMaskWriter,
    blend_labels,
    read_png_masks,
    write_labels_tiff,
    write_overlay_mp4,
    write_png_masks,
)
from napari_masam.io.tiff import read_tiff_stack, write_tiff_stack
from napari_masam.io.video import VideoReader


def _labels(t=6, h=37, w=51, high=5, seed=0):
    return np.random.default_rng(seed).integers(0, high, (t, h, w)).astype(np.int32)


@pytest.mark.parametrize("high", [5, 300])
def test_png_masks_lossless(tmp_path, high):
    labels = _labels(high=high)
    paths = write_png_masks(labels, tmp_path / "masks", class_names=["background", "tool"])
    assert [p.name for p in paths] == [f"frame{i:03d}.png" for i in range(6)]
    back = read_png_masks(tmp_path / "masks")
    assert back.dtype == (np.uint8 if high < 256 else np.uint16)
    np.testing.assert_array_equal(back, labels)
    assert json.loads((tmp_path / "masks" / "labels.json").read_text()) == {
        "0": "background",
        "1": "tool",
    }
    with pytest.raises(ValueError, match="TIFF"):
        write_png_masks(labels - 1, tmp_path / "neg")


def test_png_writer_streams_atomically(tmp_path):
    labels = _labels(t=5, high=4)
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "frame999.png").write_bytes(b"stale")  # an older, longer run
    with PngMaskWriter(folder, max_label=3, n_frames=5) as writer:
        writer.write(labels[:2])  # a block ...
        for t in range(2, 5):  # ... then single frames
            writer.write(labels[t])
        # nothing under the final name until the writer closes
        assert sorted(p.name for p in folder.iterdir()) == ["frame999.png"]
    assert sorted(p.name for p in folder.iterdir()) == [f"frame{t:03d}.png" for t in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]  # no temporary left
    back = read_png_masks(folder)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)

    # an error while writing leaves the previous folder as it was
    with pytest.raises(ValueError, match=r"0\.\.255"), PngMaskWriter(folder, max_label=255) as w:
        w.write(labels[0])
        w.write(labels[1] + 300)
    np.testing.assert_array_equal(read_png_masks(folder), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]

    # a folder holding other things is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        PngMaskWriter(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_labels_tiff_writer_streams(tmp_path):
    labels = _labels(t=7, high=300)
    path = tmp_path / "stack_labels.tif"
    with LabelsTiffWriter(path, max_label=299, spacing=(1.0, 0.5, 0.25)) as writer:
        for t in range(0, 7, 3):
            writer.write(labels[t : t + 3])
        assert not path.exists()
    stack = read_tiff_stack(path)
    assert stack.axes == "TYX" and stack.is_labels and stack.data.dtype == np.uint16
    assert isinstance(stack.data, np.memmap)  # contiguous pages: memory-mapped back
    np.testing.assert_array_equal(stack.data, labels)
    np.testing.assert_allclose(stack.spacing[1:], (0.5, 0.25), rtol=1e-6)


def test_labels_tiff_round_trip(tmp_path):
    labels = _labels(high=300)
    out = write_labels_tiff(labels, tmp_path / "labels.tif", spacing=(1.0, 0.5, 0.25))
    with tifffile.TiffFile(out) as tf:
        assert tf.series[0].axes == "TYX"
        back = tf.asarray()
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    stack = read_tiff_stack(out)
    assert stack.is_labels and stack.axes == "TYX"
    np.testing.assert_allclose(stack.spacing[1:], (0.5, 0.25), rtol=1e-6)


def test_overlay_mp4(clips, tmp_path):
    video = VideoReader(clips["h264_bframes.mp4"])
    labels = np.zeros((len(video), video.height, video.width), np.uint8)
    labels[:, 10:40, 20:60] = 1
    out = write_overlay_mp4(
        video, labels, tmp_path / "overlay.mp4", colors={1: (255, 0, 0)}, alpha=0.6
    )
    r = VideoReader(out)
    assert r.shape == video.shape
    np.testing.assert_allclose(r.fps, video.fps)
    for t in (0, len(video) - 1):
        got, frame = r[t].astype(float), video[t].astype(float)
        expected = blend_labels(video[t], labels[t], {1: (255, 0, 0)}, 0.6).astype(float)
        assert np.abs(got - expected).mean() < 6  # lossy H.264, but close to the blend
        inside = (slice(14, 36), slice(24, 56))
        assert got[inside][..., 0].mean() - frame[inside][..., 0].mean() > 40  # tinted red
        assert np.abs(got[50:, :, :] - frame[50:, :, :]).mean() < 8  # background untouched


def test_png_masks_of_a_duplicate_timestamp_clip_land_on_decoded_frames(
    clips, decode_reference, tmp_path
):
    """Labels drawn from each frame of a clip whose frames share timestamps (pts 0, 40, 80,
    80, ...), written as PNG masks: ``frameNNN.png`` belongs to the NNN-th picture of a
    sequential decode (a reader that dropped or merged the duplicates would shift them)."""
    path = clips["duplicate_pts.mkv"]
    ref = decode_reference(path)
    video = VideoReader(path)
    assert len(video) == len(ref) == 10

    def label_of(frame):  # content-derived: differs for every frame of the pattern
        return (frame[..., 1] // 64 + 1).astype(np.uint8) * (frame[..., 0] > 100)

    labels = np.stack([label_of(video[t]) for t in range(len(video))])
    paths = write_png_masks(labels, tmp_path / "masks")
    assert [p.name for p in paths] == [f"frame{t:03d}.png" for t in range(10)]
    import imageio.v3 as iio

    for t, p in enumerate(paths):
        np.testing.assert_array_equal(iio.imread(p), label_of(ref[t]), err_msg=p.name)
    # the frames really differ, so a shift by one would have failed
    assert all(not np.array_equal(label_of(a), label_of(b)) for a, b in itertools.pairwise(ref))


def test_overlay_of_a_rotated_clip_is_upright(clips, tmp_path):
    """Exports are on the upright grid: the overlay of a 90-degree clip is 64 x 48, no matrix."""
    video = VideoReader(clips["rotate90.mp4"])
    labels = np.zeros((len(video), video.height, video.width), np.uint8)
    labels[:, -8:, :8] = 1  # the stored top-left corner, shown bottom-left
    out = write_overlay_mp4(video, labels, tmp_path / "overlay.mp4", colors={1: (0, 0, 255)})
    back = VideoReader(out)
    assert back.shape == video.shape and back.rotation == 0
    tint = back[3].astype(int) - video[3].astype(int)
    assert tint[-6:, 2:6, 2].mean() > 60  # blue added where labelled (the red corner)
    assert np.abs(tint[:40, 16:, :]).mean() < 8  # elsewhere the frame is unchanged


def test_blend_labels_exact():
    frame = np.full((4, 5, 3), 100, np.uint8)
    labels = np.zeros((4, 5), np.int32)
    labels[1, 2] = 2
    out = blend_labels(frame, labels, {2: (0, 200, 250)}, alpha=0.5)
    np.testing.assert_array_equal(out[1, 2], [50, 150, 175])
    out[1, 2] = 100
    np.testing.assert_array_equal(out, frame)


@pytest.mark.parametrize(
    ("dtype", "axes", "shape"),
    [
        (np.float32, "ZYX", (5, 12, 9)),
        (np.int16, "ZYX", (5, 12, 9)),
        (np.uint16, "TZYX", (3, 4, 6, 7)),
    ],
)
def test_tiff_stack_round_trip(tmp_path, dtype, axes, shape):
    data = (np.random.default_rng(0).normal(size=shape) * 1000).astype(dtype)
    spacing = tuple(float(v) for v in (np.arange(len(shape)) + 1) * 0.5)
    out = write_tiff_stack(tmp_path / "stack.tiff", data, axes=axes, spacing=spacing)
    stack = read_tiff_stack(out, as_labels=False)
    assert stack.axes == axes
    np.testing.assert_array_equal(np.asarray(stack.data), data)
    assert isinstance(stack.data, np.memmap) or np.asarray(stack.data).base is not None
    for ax, sp in zip(axes, spacing):
        if ax in "ZYX" and (ax != "Z" or dtype != np.int16):  # int16: no ImageJ spacing tag
            np.testing.assert_allclose(stack.spacing[axes.index(ax)], sp, rtol=1e-5)


def test_tiff_compressed_and_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (4, 10, 12, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", compression="zlib")
    stack = read_tiff_stack(tmp_path / "rgb.tif")
    assert stack.is_rgb and not stack.is_labels
    np.testing.assert_array_equal(stack.data, rgb)


def test_tiff_bad(tmp_path):
    (tmp_path / "x.tif").write_text("nope")
    with pytest.raises(ValueError, match=r"x\.tif"):
        read_tiff_stack(tmp_path / "x.tif")
