"""The batch job logic: inputs, chunked streaming, atomic writes, resume, failures.

Most tests here drive :func:`napari_masam.batch.run_job` with a small stand-in session whose
labels depend on +-4 neighbouring frames exactly like MA-SAM's averaged 5-frame windows, so the
streaming logic is checked against an independent whole-stack computation in milliseconds. The
real engine end to end is in tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_masam import batch

DEPTH = 5


# ------------------------------------------------------------------------------------ helpers
def windowed_reference(stack: np.ndarray, depth: int = DEPTH) -> np.ndarray:
    """Labels from averaged D-frame windows (edge-replicated), written independently of batch.

    Window ``c`` (every frame is a centre) scores the mean grey of frames ``c - h .. c + h``
    (clamped at the ends); frame ``t``'s probability is the mean score of the windows whose
    centre is within ``h`` of ``t``; labels 1 above 100, 2 above 170. Frame ``t`` so depends on
    frames ``t - 2h .. t + 2h``: the context the chunk overlap must supply.
    """
    grey = np.asarray(stack, dtype=np.float32)
    if grey.ndim == 4:
        grey = grey.mean(axis=-1)
    n, h = grey.shape[0], depth // 2
    score = np.empty_like(grey)
    for c in range(n):
        idx = np.clip(np.arange(c - h, c + h + 1), 0, n - 1)
        score[c] = grey[idx].mean(axis=0)
    prob = np.empty_like(grey)
    for t in range(n):
        centres = np.arange(max(0, t - h), min(n - 1, t + h) + 1)
        prob[t] = score[centres].mean(axis=0)
    return ((prob > 100).astype(np.uint8) + (prob > 170)).astype(np.uint8)


class FakeModel:
    kind = "fake"
    slices_per_group = DEPTH
    num_classes = 2
    image_size = 64
    supports_automatic = True
    supports_boxes = True
    metadata = SimpleNamespace(
        name="fake",
        class_names=("dim", "bright"),
        class_colors=("#ff0000", "#00ff00"),
        intensity_preset="rgb",
        resize_mode="stretch",
        orientation="",
        sha256="0" * 64,
    )

    def get_config(self) -> dict:
        return {"depth": DEPTH}


class FakeSession:
    """Implements the two SegmentationSession generators used by batch."""

    def __init__(self, automatic: bool = True) -> None:
        self.model = FakeModel()
        self.model.supports_automatic = automatic
        self.device = "cpu"
        self.stack_lengths: list[int] = []

    def iter_automatic(self, stack, preset=None, stride=1, batch_size=None):
        stack = np.asarray(stack)
        self.stack_lengths.append(len(stack))
        labels = windowed_reference(stack)
        for i in range(len(stack)):
            yield SimpleNamespace(done=i + 1, total=len(stack))
        return SimpleNamespace(labels=labels, timings={"fake_s": 0.0})

    def iter_boxes(self, stack, boxes, preset=None):
        stack = np.asarray(stack)
        self.stack_lengths.append(len(stack))
        labels = np.zeros(stack.shape[:3], dtype=np.uint8)
        for obj, frames in boxes.items():
            for z, (x0, y0, x1, y1) in frames.items():
                labels[z, int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = obj
        yield SimpleNamespace(done=len(stack), total=len(stack))
        return SimpleNamespace(labels=labels, timings={})


def make_video(path: Path, n_frames: int, size: int = 64, seed: int = 0) -> Path:
    """Synthetic RGB video: a disc moving across, a random brightness per frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(n_frames):
            cx = (t * 3) % size
            disc = (yy - size / 2) ** 2 + (xx - cx) ** 2 < (size / 4) ** 2
            level = rng.integers(60, 255)
            frame = np.where(disc[..., None], level, 30).astype(np.uint8).repeat(3, axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_png_folder(folder: Path) -> np.ndarray:
    """The PNG folder through PIL (independent of io.export), frames in numeric order, checking
    the EndoVis names ``frame000.png``, ``frame001.png``, ..."""
    files = sorted(folder.glob("frame*.png"))
    assert [f.name for f in files] == [f"frame{t:03d}.png" for t in range(len(files))]
    return np.stack([np.asarray(Image.open(f)) for f in files])


def config_for(out: Path, **kw) -> batch.BatchConfig:
    return batch.BatchConfig(model=batch.ModelSpec(model="litemedsam"), output_dir=out, **kw)


def fake_holder(session: FakeSession | None = None) -> batch.SessionHolder:
    return batch.SessionHolder(
        batch.ModelSpec(model="litemedsam"), session=session or FakeSession()
    )


def video_item(path: Path) -> batch.BatchInput:
    return batch.BatchInput(path, "video", batch.input_stem(path))


# ------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize(
    ("name", "kind", "stem"),
    [
        ("case01.nii.gz", "nifti", "case01"),
        ("CASE.NII", "nifti", "CASE"),
        ("clip.mp4", "video", "clip"),
        ("clip.v2.avi", "video", "clip.v2"),
        ("stack.tiff", "tiff", "stack"),
        ("stack.tif", "tiff", "stack"),
        ("notes.txt", None, "notes"),
    ],
)
def test_input_kind_and_stem(name: str, kind: str | None, stem: str) -> None:
    assert batch.input_kind(name) == kind
    assert batch.input_stem(name) == stem


def test_discover_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.nii.gz", "a.mp4", "c.tif", "readme.txt", ".hidden.nii.gz"):
        (folder / name).write_bytes(b"x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.nii").write_bytes(b"x")  # same stem as a.mp4: outputs would collide
    items, problems = batch.discover_inputs(
        [folder, other / "a.nii", tmp_path / "missing.nii.gz", folder / "readme.txt"]
    )
    assert [(i.path.name, i.kind, i.stem) for i in items] == [
        ("a.mp4", "video", "a"),
        ("b.nii.gz", "nifti", "b"),
        ("c.tif", "tiff", "c"),
    ]
    errors = {Path(p.input).name: p.error for p in problems}
    assert set(errors) == {"a.nii", "missing.nii.gz", "readme.txt"}
    assert all(p.status == "failed" for p in problems)
    assert "already used" in errors["a.nii"]
    assert "no such file" in errors["missing.nii.gz"]
    assert "not a NIfTI" in errors["readme.txt"]


# ------------------------------------------------------------------------------------ chunks
@pytest.mark.parametrize(
    ("n", "chunk", "overlap"), [(1, 4, 4), (10, 3, 0), (23, 7, 4), (16, 8, 4), (5, 64, 4)]
)
def test_overlapping_chunks_tile_the_stream(n: int, chunk: int, overlap: int) -> None:
    frames = [np.full((2, 2), t) for t in range(n)]
    own: list[int] = []
    for start, window, lo, hi in batch.iter_overlapping_chunks(iter(frames), chunk, overlap):
        indices = window[:, 0, 0].tolist()
        assert indices == list(range(start, start + len(window)))  # contiguous, in order
        assert len(window) <= chunk + 2 * overlap
        first, last = start + lo, start + hi - 1
        assert lo == min(overlap, first)  # full left context where the stream has it
        assert len(window) - hi == min(overlap, n - 1 - last)  # and right context
        own.extend(indices[lo:hi])
    assert own == list(range(n))


def test_overlapping_chunks_reject_bad_sizes() -> None:
    with pytest.raises(ValueError, match="chunk"):
        next(batch.iter_overlapping_chunks(iter([]), 0, 1))


# ------------------------------------------------------------------------------------ atomic
def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    final = tmp_path / "out.json"
    final.write_text("old")
    with pytest.raises(RuntimeError), batch.atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_path_replaces_folders(tmp_path: Path) -> None:
    final = tmp_path / "frames"
    final.mkdir()
    (final / "stale.png").write_bytes(b"x")
    with batch.atomic_path(final, directory=True) as tmp:
        (tmp / "frame000.png").write_bytes(b"y")
    assert sorted(p.name for p in final.iterdir()) == ["frame000.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


# ------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_streamed_video_equals_whole_stack(tmp_path: Path, chunk: int) -> None:
    video = make_video(tmp_path / "clip.mp4", 23)
    session = FakeSession()
    result = batch.run_job(
        video_item(video), config_for(tmp_path / "out", chunk_frames=chunk), fake_holder(session)
    )
    assert result.status == "done", result.error
    assert result.frames == 23
    expected = windowed_reference(decode_all(video))
    got = read_png_folder(Path(result.outputs[0]))
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert max(session.stack_lengths) <= chunk + 2 * (DEPTH - 1)
    assert expected.sum() > 0  # the comparison is not between two empty stacks


@pytest.mark.parametrize("fmt", ["tiff", "mp4-overlay"])
def test_streamed_frame_formats(tmp_path: Path, fmt: str) -> None:
    video = make_video(tmp_path / "clip.mp4", 19)
    config = config_for(tmp_path / "out", chunk_frames=6, output_format=fmt)
    result = batch.run_job(video_item(video), config, fake_holder())
    assert result.status == "done", result.error
    output = Path(result.outputs[0])
    frames = decode_all(video)
    expected = windowed_reference(frames)
    if fmt == "tiff":
        np.testing.assert_array_equal(tifffile.imread(output), expected)
    else:
        overlay = decode_all(output).astype(np.float64)
        assert overlay.shape == frames.shape
        # the expected blend, computed here: half frame, half class colour where labelled
        colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.float64)
        labelled = (expected > 0)[..., None]
        blend = np.where(labelled, 0.5 * frames + 0.5 * colours[expected], frames)
        on = expected > 0
        error_blend = np.abs(overlay - blend)[on].mean()
        error_plain = np.abs(overlay - frames)[on].mean()
        assert error_blend < error_plain / 2, (error_blend, error_plain)
        assert np.abs(overlay - frames)[~on].mean() < 8  # elsewhere: the frame, codec noise


def test_tiff_stack_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    stack = rng.integers(0, 300, (7, 20, 24)).astype(np.uint16)
    stack[:, 5:15, 5:15] += 200
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    item = batch.BatchInput(path, "tiff", "stack")
    result = batch.run_job(item, config_for(tmp_path / "out"), fake_holder())
    assert result.status == "done", result.error
    assert Path(result.outputs[0]).name == "stack_seg.tif"  # format auto: TIFF for TIFF
    np.testing.assert_array_equal(tifffile.imread(result.outputs[0]), windowed_reference(stack))


def _peak_bytes(video: Path, out: Path) -> int:
    config = config_for(out, chunk_frames=16, output_format="tiff")
    holder = fake_holder()
    tracemalloc.start()
    try:
        result = batch.run_job(video_item(video), config, holder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.status == "done", result.error
    return peak


def test_streaming_memory_does_not_grow_with_length(tmp_path: Path) -> None:
    short = make_video(tmp_path / "short.mp4", 60, size=96)
    long = make_video(tmp_path / "long.mp4", 600, size=96)
    peak_short = _peak_bytes(short, tmp_path / "o1")
    peak_long = _peak_bytes(long, tmp_path / "o2")
    whole_video = 600 * 96 * 96 * 3  # what holding the decoded video would cost
    assert peak_long < peak_short * 1.5 + 256 * 1024, (peak_short, peak_long)
    assert peak_long < whole_video / 2, (peak_long, whole_video)


# ------------------------------------------------------------------------------------ resume
def test_resume_skips_and_redoes_on_change(tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4", 8)
    out = tmp_path / "out"
    session = FakeSession()
    holder = fake_holder(session)
    first = batch.run_job(video_item(video), config_for(out), holder)
    assert first.status == "done"
    sidecar = json.loads(Path(first.sidecar).read_text())
    assert sidecar["status"] == "complete"
    assert sidecar["input"]["sha256"] == batch.file_sha256(video)
    assert sidecar["model"]["name"] == "fake"
    assert sidecar["output"]["frames"] == 8
    assert {"segment_s", "total_s"} <= set(sidecar["timings"])
    assert sidecar["software"]["numpy"] == np.__version__

    calls = len(session.stack_lengths)
    again = batch.run_job(video_item(video), config_for(out), holder)
    assert again.status == "skipped"
    assert len(session.stack_lengths) == calls  # nothing was segmented
    assert (
        batch.run_job(video_item(video), config_for(out, overwrite=True), holder).status == "done"
    )
    # a different setting, or a changed input, makes the output stale
    assert batch.run_job(video_item(video), config_for(out, stride=2), holder).status == "done"
    make_video(video, 8, seed=1)
    assert batch.run_job(video_item(video), config_for(out, stride=2), holder).status == "done"
    # a sidecar from an interrupted/foreign run does not count
    Path(first.sidecar).write_text("{not json")
    assert batch.run_job(video_item(video), config_for(out, stride=2), holder).status == "done"


def test_failed_input_is_named_and_leaves_no_output(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    out = tmp_path / "out"
    result = batch.run_job(video_item(bad), config_for(out), fake_holder())
    assert result.status == "failed"
    assert "broken.mp4" in result.error
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------ boxes
def test_boxes_mode_streams_interpolated_boxes(tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4", 12)
    boxes_file = tmp_path / "clip.csv"
    boxes_file.write_text("object,slice,x0,y0,x1,y1\n1,2,10,10,20,20\n1,8,16,10,26,20\n")
    config = config_for(tmp_path / "out", mode="boxes", boxes=tmp_path, chunk_frames=4)
    result = batch.run_job(video_item(video), config, fake_holder())
    assert result.status == "done", result.error
    labels = read_png_folder(Path(result.outputs[0]))
    for t in range(12):
        cols = np.flatnonzero(labels[t].any(axis=0))
        if 2 <= t <= 8:  # linear in x0 from 10 to 16 over slices 2..8
            assert (cols.min(), cols.max()) == (10 + (t - 2), 20 + (t - 2)), t
        else:
            assert cols.size == 0, t
    prompts = json.loads(Path(result.sidecar).read_text())["prompts"]
    assert prompts["keyframes"] == {"1": {"2": [10, 10, 20, 20], "8": [16, 10, 26, 20]}}


def test_boxes_folder_without_file_for_input_fails_that_input(tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4", 4)
    boxes_dir = tmp_path / "boxes"
    boxes_dir.mkdir()
    config = config_for(tmp_path / "out", mode="boxes", boxes=boxes_dir)
    result = batch.run_job(video_item(video), config, fake_holder())
    assert result.status == "failed"
    assert "clip.json" in result.error and "clip.mp4" in result.error


@pytest.mark.parametrize(
    ("mode", "automatic", "has_boxes", "expected"),
    [
        (None, True, False, "auto"),
        (None, False, True, "boxes"),
        ("boxes", True, True, "boxes"),
        (None, False, False, "needs box prompts"),
        ("auto", False, True, "cannot segment automatically"),
    ],
)
def test_resolve_mode(mode, automatic, has_boxes, expected) -> None:
    model = FakeModel()
    model.supports_automatic = automatic
    if expected in ("auto", "boxes"):
        assert batch.resolve_mode(mode, model, has_boxes) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            batch.resolve_mode(mode, model, has_boxes)


def test_model_spec_checks(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        batch.ModelSpec(checkpoint=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="needs --sam-checkpoint"):
        batch.ModelSpec(masam_checkpoint=__file__)
    assert batch.ModelSpec().source == "litemedsam"
    assert batch.ModelSpec(checkpoint=__file__).identity()["checkpoint"]["sha256"] == (
        batch.file_sha256(__file__)
    )
    assert os.path.basename(__file__) in json.dumps(batch.ModelSpec(checkpoint=__file__).identity())
