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
        self.windows: list = []
        self.box_calls: list = []

    def iter_automatic(self, stack, preset=None, stride=1, batch_size=None, window=None):
        stack = np.asarray(stack)
        self.stack_lengths.append(len(stack))
        self.windows.append(window)
        labels = windowed_reference(stack)
        for i in range(len(stack)):
            yield SimpleNamespace(done=i + 1, total=len(stack))
        return SimpleNamespace(
            labels=labels, timings={"fake_s": 0.0}, preprocessing={"volume_window": window}
        )

    def iter_boxes(
        self, stack, boxes, preset=None, window=None, propagate=False, slice_ranges=None
    ):
        stack = np.asarray(stack[:])
        self.stack_lengths.append(len(stack))
        self.windows.append(window)
        self.box_calls.append((boxes, propagate, slice_ranges))
        labels = np.zeros(stack.shape[:3], dtype=np.uint8)
        for obj, frames in boxes.items():
            for z, (x0, y0, x1, y1) in frames.items():
                labels[z, int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = obj
        yield SimpleNamespace(done=len(stack), total=len(stack))
        return SimpleNamespace(labels=labels, timings={}, preprocessing={"volume_window": window})


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
    # a sidecar that is not ours proves nothing: the output is kept, --overwrite replaces it
    Path(first.sidecar).write_text("{not json")
    refused = batch.run_job(video_item(video), config_for(out, stride=3), holder)
    assert refused.status == "failed" and "--overwrite" in refused.error
    assert Path(first.sidecar).read_text() == "{not json"
    redo = batch.run_job(video_item(video), config_for(out, stride=3, overwrite=True), holder)
    assert redo.status == "done"


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
        (None, True, True, "boxes"),  # boxes given are never ignored
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
    with pytest.raises(FileNotFoundError, match="does not exist"):
        batch.ModelSpec(checkpoint=str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="is a folder"):  # not "no such file"
        batch.ModelSpec(checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="needs Meta's SAM base"):
        batch.ModelSpec(masam_checkpoint=__file__)
    assert batch.ModelSpec().source == "litemedsam"
    identity = batch.ModelSpec(checkpoint=__file__).identity()
    assert identity["files"] == [
        {
            "role": "checkpoint",
            "name": os.path.basename(__file__),
            "sha256": batch.file_sha256(__file__),
        }
    ]


def test_model_name_with_sam_files_is_honoured_or_refused(tmp_path: Path) -> None:
    """#13.4: `--model masam_vit_b` was ignored when `--sam-checkpoint` was given (the sidecar
    still named it); now the preset is built from the files, and a model that cannot be built
    from them is refused."""
    sam = tmp_path / "sam_vit_b.pth"
    sam.write_bytes(b"not loaded here")
    spec = batch.ModelSpec(model="masam_vit_b", sam_checkpoint=sam)
    assert spec.model_source.kind == "sam_pair" and spec.model_source.name == "masam_vit_b"
    assert spec.model_source.sam_checkpoint == sam
    assert "masam_vit_b" in spec.identity()["description"]
    with pytest.raises(ValueError):
        batch.ModelSpec(model="litemedsam", sam_checkpoint=sam)


@pytest.mark.parametrize("preset", ["no_such_preset", "MRI"])
def test_unknown_preset_is_refused_by_the_config(tmp_path: Path, preset: str) -> None:
    with pytest.raises(ValueError, match="unknown"):
        config_for(tmp_path / "out", preset=preset)


# ------------------------------------------------------------------------------------ never clobber
def tiff_input(tmp_path: Path, name: str = "stack.tif") -> batch.BatchInput:
    """A (7, 20, 24) uint16 TIFF stack with a bright square (labels are not all background)."""
    rng = np.random.default_rng(5)
    stack = rng.integers(0, 300, (7, 20, 24)).astype(np.uint16)
    stack[:, 5:15, 5:15] += 200
    path = tmp_path / name
    tifffile.imwrite(path, stack)
    return batch.BatchInput(path, "tiff", batch.input_stem(path))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_users_own_output_file_is_never_replaced(tmp_path: Path) -> None:
    """#13.1: a case01_seg.nii.gz of the user's (no sidecar: we never wrote it) was replaced."""
    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "stack_seg.tif"
    mine.write_bytes(b"the user's own segmentation")
    result = batch.run_job(item, config_for(out), fake_holder())
    assert result.status == "failed"
    assert str(mine) in result.error and "--overwrite" in result.error
    assert mine.read_bytes() == b"the user's own segmentation"
    assert sorted(p.name for p in out.iterdir()) == ["stack_seg.tif"]  # nothing else written
    forced = batch.run_job(item, config_for(out, overwrite=True), fake_holder())
    assert forced.status == "done", forced.error
    assert tifffile.imread(mine).shape == (7, 20, 24)


def test_users_png_folder_is_never_deleted(tmp_path: Path) -> None:
    """#13.1: a user's folder of PNG masks at the output's name was deleted."""
    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    folder = out / "stack_seg"
    folder.mkdir(parents=True)
    for t in range(3):  # hand-made masks, named as ours would be
        Image.fromarray(np.full((20, 24), t + 1, np.uint8)).save(folder / f"frame{t:03d}.png")
    before = _tree(folder)
    result = batch.run_job(item, config_for(out, output_format="png"), fake_holder())
    assert result.status == "failed" and "stack_seg" in result.error
    assert _tree(folder) == before


def test_sidecar_records_the_output_digest(tmp_path: Path) -> None:
    import hashlib

    item = tiff_input(tmp_path)
    result = batch.run_job(item, config_for(tmp_path / "out"), fake_holder())
    side = json.loads(Path(result.sidecar).read_text())
    digest = hashlib.sha256(Path(result.outputs[0]).read_bytes()).hexdigest()
    assert side["output"]["digest"] == f"sha256:{digest}"
    assert side["producer"] == "napari-masam" and side["output"]["replaces"] is None


def test_output_changed_under_our_sidecar_is_not_up_to_date(tmp_path: Path) -> None:
    """#13.1: run B's labels under run A's sidecar counted as up to date on resume."""
    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    first = batch.run_job(item, config_for(out), fake_holder())
    assert first.status == "done"
    output = Path(first.outputs[0])
    other = tifffile.imread(output)
    other[0, 0, 0] = 2  # another run (or a person) changed the labels
    tifffile.imwrite(output, other)
    again = batch.run_job(item, config_for(out), fake_holder())
    assert again.status == "failed" and "differs from what" in again.error
    np.testing.assert_array_equal(tifffile.imread(output), other)  # kept as found


def test_failed_overwrite_keeps_old_output_and_sidecar(tmp_path: Path, monkeypatch) -> None:
    """#13.1: a failed --overwrite (full disk) kept the old outputs but deleted their sidecars."""
    import errno

    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    first = batch.run_job(item, config_for(out), fake_holder())
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(self, labels, frames=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch.TiffSink, "write", full_disk)
    failed = batch.run_job(item, config_for(out, overwrite=True), fake_holder())
    assert failed.status == "failed" and "No space left" in failed.error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partials either
    monkeypatch.undo()
    assert batch.run_job(item, config_for(out), fake_holder()).status == "skipped"
    assert first.sidecar is not None


def test_sidecar_written_but_output_not_moved_is_still_ours(tmp_path: Path, monkeypatch) -> None:
    """A stop between writing the new sidecar and moving the new output in leaves the old
    output, which the new sidecar names as the one it replaces: the next run redoes it."""
    from napari_masam.io import _common

    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    batch.run_job(item, config_for(out), fake_holder())
    old_output = (out / "stack_seg.tif").read_bytes()
    real_commit = _common.commit_path

    def crash_on_output(tmp, path):
        if Path(path).name == "stack_seg.tif":
            raise KeyboardInterrupt  # killed right there
        real_commit(tmp, path)

    monkeypatch.setattr(_common, "commit_path", crash_on_output)
    changed = tifffile.imread(item.path)
    changed[:, 5:15, 5:15] = 0  # a new input: new labels, a new sidecar
    tifffile.imwrite(item.path, changed)
    with pytest.raises(KeyboardInterrupt):
        batch.run_job(item, config_for(out), fake_holder())
    monkeypatch.undo()
    assert (out / "stack_seg.tif").read_bytes() == old_output
    side = json.loads((out / "stack_seg.json").read_text())  # the new record, old output
    assert side["output"]["digest"] != side["output"]["replaces"]
    redo = batch.run_job(item, config_for(out), fake_holder())
    assert redo.status == "done", redo.error
    np.testing.assert_array_equal(
        tifffile.imread(out / "stack_seg.tif"), windowed_reference(changed)
    )


def test_a_live_lock_stops_a_second_run(tmp_path: Path) -> None:
    """#13.1: two concurrent runs on one output; the second now fails at once and says why."""
    import socket

    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".stack_seg.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # this process is alive
    result = batch.run_job(item, config_for(out), fake_holder())
    assert result.status == "failed" and "another napari-masam run" in result.error
    assert str(os.getpid()) in result.error
    assert sorted(p.name for p in out.iterdir()) == [".stack_seg.lock"]


def test_stale_lock_and_partials_of_a_killed_run_are_cleaned(tmp_path: Path) -> None:
    """#13.1: kill -9 left a hidden partial (and its lock) that nothing removed."""
    import socket
    import subprocess
    import sys

    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (out / ".stack_seg.lock").write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    partial_dir = out / ".stack_seg.abc123.partial"
    partial_dir.mkdir()
    (partial_dir / "frame000.png").write_bytes(b"x")
    (out / ".stack_seg.tif.def456.partial.tif").write_bytes(b"half")
    (out / ".stack_seg.json.x1.partial.json").write_text("{")
    (out / ".keep_me").write_text("not ours")
    result = batch.run_job(item, config_for(out), fake_holder())
    assert result.status == "done", result.error
    assert sorted(p.name for p in out.iterdir()) == [".keep_me", "stack_seg.json", "stack_seg.tif"]


# ------------------------------------------------------------------------------------ nothing usable
@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("", ".csv", "empty"),
        ("object,slice,x0,y0,x1,y1\n", ".csv", "no boxes"),
        ("[]", ".json", "no boxes"),
        ("object,slice,x0,y0,x1,y1\n1,2,5,30,15,50\n", ".csv", "wholly outside"),  # y, x swapped
        ("object,slice,x0,y0,x1,y1\n1.5,2,1,1,5,5\n", ".csv", "must be an integer"),
        ("object,slice,x0,y0,x1,y1\n1,2.5,1,1,5,5\n", ".csv", "must be an integer"),
    ],
)
def test_box_files_with_nothing_usable_fail_the_input(
    tmp_path: Path, content: str, suffix: str, message: str
) -> None:
    """#13.4: these gave "done", exit 0 and an empty mask (or truncated 1.5 to 1)."""
    item = tiff_input(tmp_path)  # (7, 20, 24): x 0..23, y 0..19
    boxes = tmp_path / f"stack{suffix}"
    boxes.write_text(content)
    out = tmp_path / "out"
    result = batch.run_job(item, config_for(out, mode="boxes", boxes=boxes), fake_holder())
    assert result.status == "failed", result
    assert message in result.error and "stack" in result.error
    assert not (out / "stack_seg.tif").exists() and not (out / "stack_seg.json").exists()


def test_napari_shapes_csv_drives_boxes_mode(tmp_path: Path) -> None:
    """#17.6: boxes saved from napari's Shapes layer (napari's own writer) reach the engine."""
    from napari_builtins.io._write import napari_write_shapes

    item = tiff_input(tmp_path)
    rect = np.array([[3, 4, 6], [3, 4, 12], [3, 10, 12], [3, 10, 6]], dtype=float)  # z, row, col
    boxes = tmp_path / "stack.csv"
    napari_write_shapes(str(boxes), [rect], {"shape_type": ["rectangle"]})
    config = config_for(tmp_path / "out", mode="boxes", boxes=boxes)
    result = batch.run_job(item, config, fake_holder())
    assert result.status == "done", result.error
    labels = tifffile.imread(result.outputs[0])
    expected = np.zeros_like(labels)
    expected[3, 4:11, 6:13] = 1  # rows 4..10, cols 6..12 inclusive
    np.testing.assert_array_equal(labels, expected)
    assert json.loads(Path(result.sidecar).read_text())["prompts"]["format"] == "napari-shapes"


# ------------------------------------------------------------------------------------ one window
@pytest.mark.parametrize("chunk", [3, 64])
def test_video_window_is_computed_once_per_video(tmp_path: Path, chunk: int) -> None:
    """#13.3: with --preset mri a video's labels depended on --chunk-frames (window per chunk).
    Every chunk now gets the window of the whole video, equal to the volume window of the
    decoded video computed independently here."""
    video = make_video(tmp_path / "clip.mp4", 17)
    frames = decode_all(video).astype(np.float64)
    expected = (float(frames.min()), float(np.percentile(frames, 99.5)))
    from napari_masam.preprocess import INTENSITY_PRESETS

    preset = INTENSITY_PRESETS["mri"]
    expected = (float(frames.min()), float(np.percentile(frames, preset.percentile)))
    session = FakeSession()
    config = config_for(tmp_path / "out", chunk_frames=chunk, preset="mri")
    result = batch.run_job(video_item(video), config, fake_holder(session))
    assert result.status == "done", result.error
    assert len(session.windows) == -(-17 // chunk)  # one engine call per chunk ...
    assert all(w == session.windows[0] for w in session.windows)  # ... all with one window
    np.testing.assert_allclose(session.windows[0], expected, rtol=0, atol=1e-9)
    side = json.loads(Path(result.sidecar).read_text())
    np.testing.assert_allclose(side["preprocessing"]["volume_window"], expected, atol=1e-9)


# ------------------------------------------------------------------------------------ propagation
def test_propagate_hands_keyframes_and_last_slice_limits_to_the_engine(tmp_path: Path) -> None:
    """#16 in batch: keyframes (not interpolated) go to the propagation, and an object's
    last_slice bounds its walk; objects without one are not bounded."""
    item = tiff_input(tmp_path)
    boxes = tmp_path / "stack.csv"
    boxes.write_text(
        "object,slice,x0,y0,x1,y1,last_slice\n1,2,4,4,10,10,\n1,4,6,4,12,10,5\n2,1,1,1,3,3,\n"
    )
    session = FakeSession()
    config = config_for(tmp_path / "out", mode="boxes", boxes=boxes, propagate=True)
    result = batch.run_job(item, config, fake_holder(session))
    assert result.status == "done", result.error
    ((sent, propagate, ranges),) = session.box_calls
    assert propagate is True
    assert sent == {1: {2: (4, 4, 10, 10), 4: (6, 4, 12, 10)}, 2: {1: (1, 1, 3, 3)}}
    assert ranges == {1: (2, 5)}
    side = json.loads(Path(result.sidecar).read_text())
    assert side["settings"]["propagate"] is True
    assert side["prompts"]["limits"] == {"1": [2, 5]}
    # without --propagate the same file is interpolated (and the outputs are not "up to date")
    plain = batch.run_job(
        item, config_for(tmp_path / "out", mode="boxes", boxes=boxes), fake_holder(session)
    )
    assert plain.status == "done"
    assert session.box_calls[-1][1] is False and sorted(session.box_calls[-1][0][1]) == [2, 3, 4, 5]


def test_propagate_needs_boxes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--propagate"):
        config_for(tmp_path, propagate=True)


class BlockingSession(FakeSession):
    """A FakeSession whose run waits (mid-job, lock held, staging open) until released."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.started = threading.Event()
        self.release = threading.Event()

    def iter_automatic(self, stack, **kwargs):
        self.started.set()
        assert self.release.wait(30)
        return (yield from super().iter_automatic(stack, **kwargs))


def test_concurrent_run_on_the_same_output_fails_clearly(tmp_path: Path) -> None:
    """#13.1: two concurrent runs with different models left B's labels under A's sidecar."""
    import threading

    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    slow = BlockingSession()
    results = {}
    first = threading.Thread(
        target=lambda: results.setdefault(
            "a", batch.run_job(item, config_for(out), fake_holder(slow))
        )
    )
    first.start()
    assert slow.started.wait(30)
    second = batch.run_job(item, config_for(out, stride=2), fake_holder())  # "another model"
    slow.release.set()
    first.join(30)
    assert second.status == "failed" and "another napari-masam run" in second.error
    assert results["a"].status == "done", results["a"].error
    side = json.loads((out / "stack_seg.json").read_text())
    assert side["settings"]["stride"] == 1  # the record is the run that wrote the labels
    assert batch.run_job(item, config_for(out), fake_holder()).status == "skipped"


_KILLED_RUN = """
import sys, time
from pathlib import Path
import numpy as np
from napari_masam import batch

class Session:
    device = "cpu"
    def __init__(self, model):
        self.model = model
    def iter_automatic(self, stack, **kwargs):
        Path(sys.argv[3]).write_text("staging")  # the job holds its lock, a partial is open
        time.sleep(120)
        yield None

sys.path.insert(0, sys.argv[4])
from test_batch import FakeModel
item = batch.BatchInput(Path(sys.argv[1]), "tiff", "stack")
config = batch.BatchConfig(batch.ModelSpec(), Path(sys.argv[2]), output_format="png")
batch.run_job(item, config, batch.SessionHolder(batch.ModelSpec(), session=Session(FakeModel())))
"""


def test_kill_9_mid_job_leaves_nothing_the_next_run_does_not_clean(tmp_path: Path) -> None:
    """#13.1: kill -9 during a run left a hidden partial folder (and a lock) behind."""
    import signal
    import subprocess
    import sys
    import time

    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    marker = tmp_path / "started"
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(item.path),
            str(out),
            str(marker),
            str(Path(__file__).parent),
        ]
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child never reached the engine"
        left = sorted(p.name for p in out.iterdir())
        assert ".stack_seg.lock" in left and any(".partial" in n for n in left), left
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    result = batch.run_job(item, config_for(out, output_format="png"), fake_holder())
    assert result.status == "done", result.error
    assert sorted(p.name for p in out.iterdir()) == ["stack_seg", "stack_seg.json"]
    np.testing.assert_array_equal(
        read_png_folder(out / "stack_seg"), windowed_reference(tifffile.imread(item.path))
    )


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    """#13.1/#17.9: outputs were created 0600/0700 whatever the umask (a lab group could not
    read them); every batch output goes through io._common.atomic_path, which respects it."""
    item = tiff_input(tmp_path)
    old = os.umask(0o022)
    try:
        png = batch.run_job(item, config_for(tmp_path / "png", output_format="png"), fake_holder())
        tif = batch.run_job(item, config_for(tmp_path / "tif"), fake_holder())
    finally:
        os.umask(old)
    assert png.status == tif.status == "done"
    folder = Path(png.outputs[0])
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    for path in (Path(tif.outputs[0]), Path(tif.sidecar), Path(png.sidecar)):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_users_json_at_the_sidecar_name_is_kept(tmp_path: Path) -> None:
    item = tiff_input(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    notes = out / "stack_seg.json"
    notes.write_text('{"my": "annotation notes"}')
    result = batch.run_job(item, config_for(out), fake_holder())
    assert result.status == "failed" and "not a napari-masam sidecar" in result.error
    assert notes.read_text() == '{"my": "annotation notes"}'
    assert not (out / "stack_seg.tif").exists()


# ------------------------------------------------------------------------------------ video facts
def test_sidecar_records_the_video_rotation_and_exports_upright(tmp_path: Path) -> None:
    """#14: a clip with a 90-degree display matrix is segmented upright, its PNG masks are on
    the upright grid, and the sidecar says which rotation and which frame index were used."""
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(6):
            img = np.full((48, 64, 3), 90, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:  # independent: PyAV's own view of the rotation
        rotation = round((next(container.decode(video=0)).rotation or 0) / 90) % 4 * 90
    assert rotation in (90, 270)
    session = FakeSession()
    result = batch.run_job(video_item(path), config_for(tmp_path / "out"), fake_holder(session))
    assert result.status == "done", result.error
    side = json.loads(Path(result.sidecar).read_text())
    video = side["preprocessing"]["video"]
    assert video["rotation"] == rotation
    assert video["index"] == "decode-order"
    assert (video["stored_height"], video["stored_width"]) == (48, 64)
    assert (video["height"], video["width"]) == (64, 48)
    masks = read_png_folder(Path(result.outputs[0]))
    assert masks.shape == (6, 64, 48)  # upright grid: rows x cols swapped against the file
