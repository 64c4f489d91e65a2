"""THE table of file kinds, the napari manifest checked against it, and the one atomic-write
helper (umask-respecting permissions)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

import napari_masam
from napari_masam.io import _common
from napari_masam.io.formats import (
    FORMATS,
    kind_of,
    reader_patterns,
    stem_of,
    suffix_of,
    suffixes_for,
)

MANIFEST = Path(napari_masam.__file__).with_name("napari.yaml")


def test_manifest_reader_patterns_are_the_table():
    manifest = yaml.safe_load(MANIFEST.read_text())
    (reader,) = manifest["contributions"]["readers"]
    assert list(reader["filename_patterns"]) == list(reader_patterns())
    assert sorted(p.removeprefix("*") for p in reader["filename_patterns"]) == sorted(FORMATS)


def test_manifest_writer_extensions_are_in_the_table():
    manifest = yaml.safe_load(MANIFEST.read_text())
    for writer in manifest["contributions"]["writers"]:
        for ext in writer["filename_extensions"]:
            assert kind_of(f"x{ext}") in ("nifti", "tiff"), ext


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("case01.nii.gz", "nifti"),
        ("CASE01.NII.GZ", "nifti"),
        ("a.b.nii", "nifti"),
        ("scan.img.gz", None),  # a .gz is not NIfTI by itself
        ("stack.ome.tif", "tiff"),
        ("stack.TIFF", "tiff"),
        ("clip.mpg", "video"),  # the CLI's list, now everybody's
        ("clip.wmv", "video"),
        ("clip.m4v", "video"),
        ("notes.txt", None),
        (".nii.gz", None),  # a name that is only an ending
        ("folder/", None),
    ],
)
def test_kind_of(name, kind):
    assert kind_of(name) == kind


def test_suffixes_stems_and_unknown_kind():
    assert suffixes_for("nifti") == (".nii.gz", ".nii")
    assert set(suffixes_for("video")) == {
        ".mp4",
        ".m4v",
        ".mov",
        ".avi",
        ".mkv",
        ".webm",
        ".mpg",
        ".mpeg",
        ".wmv",
    }
    assert suffix_of("/d/x.OME.TIF") == ".ome.tif"
    assert stem_of("/d/case01.nii.gz") == "case01"
    assert stem_of("/d/stack.ome.tiff") == "stack"
    assert stem_of("clip.mpeg") == "clip"
    assert stem_of("notes.txt") == "notes"
    assert _common.stem_of("case01.nii.gz") == "case01"
    with pytest.raises(ValueError, match="unknown file kind"):
        suffixes_for("dicom")


def test_format_modules_dispatch_through_the_table():
    from napari_masam.io.nifti import NIFTI_SUFFIXES, is_nifti_path
    from napari_masam.io.tiff import TIFF_SUFFIXES, is_tiff_path

    assert suffixes_for("nifti") == NIFTI_SUFFIXES and suffixes_for("tiff") == TIFF_SUFFIXES
    assert is_nifti_path("X.NII.GZ") and not is_nifti_path("x.gz")
    assert is_tiff_path("x.ome.tiff") and not is_tiff_path("x.nii")


@pytest.mark.parametrize(("suffix", "codec"), [(".mpg", "mpeg1video"), (".wmv", "wmv2")])
def test_every_video_suffix_decodes_frame_accurately(tmp_path, suffix, codec):
    """The added endings (.mpg, .wmv) are read frame-accurately by the one VideoReader."""
    import av

    from napari_masam.io.video import VideoReader

    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(20):
            frame = np.full((48, 64, 3), t * 12, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    reader = VideoReader(path)
    assert len(reader) == 20
    for t in (17, 3, 11):  # random access, out of order
        assert abs(float(np.asarray(reader[t]).mean()) - t * 12) < 6


# ------------------------------------------------------------------ one atomic write helper
@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_path_respects_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert _common.current_umask() == mask
    with _common.atomic_path(tmp_path / "out.nii.gz") as tmp:
        assert tmp.name.endswith(".partial.nii.gz")
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "out.nii.gz") == 0o666 & ~mask
    with _common.atomic_path(tmp_path / "masks", directory=True) as tmp:
        (tmp / "0000.png").write_bytes(b"x")
    assert _mode(tmp_path / "masks") == 0o777 & ~mask
    # the pair the batch and export sinks use
    tmp = _common.temp_sibling(tmp_path / "labels.tif")
    _common.commit_path(tmp, tmp_path / "labels.tif")
    assert _mode(tmp_path / "labels.tif") == 0o666 & ~mask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_writers_output_is_group_readable(tmp_path, umask, ch2bet_path):
    from napari_masam.io.nifti import read_nifti, write_nifti
    from napari_masam.io.tiff import write_tiff_stack

    umask(0o022)
    vol = read_nifti(ch2bet_path)
    out = write_nifti(tmp_path / "mask.nii.gz", np.asarray(vol.data) > 0, vol.metadata)
    assert _mode(out) == 0o644
    tif = write_tiff_stack(tmp_path / "l.tif", np.zeros((2, 3, 4), np.uint8), is_labels=True)
    assert _mode(tif) == 0o644


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "keep.nii"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), _common.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii"]


# ------------------------------------------------------------ labels written like their image
@pytest.mark.filterwarnings("ignore::napari_masam.io.nifti.ObliqueAffineWarning")
def test_save_labels_like_oblique_nifti(tmp_path, ch2bet_path):
    import nibabel as nib

    from napari_masam._reader import read_nifti_layers
    from napari_masam.io.formats import save_labels_like

    img = nib.load(ch2bet_path).slicer[::4, ::4, ::4]
    t = np.deg2rad(15)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    src = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.int16), rot @ img.affine), src)
    ((data, kwargs, _),) = read_nifti_layers(str(src))
    labels = (np.asarray(data) > 60).astype(np.uint8) * 4
    out = save_labels_like(tmp_path / "oblique_seg", labels, kwargs["metadata"])
    assert out.name == "oblique_seg.nii.gz"
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, nib.load(src).affine)
    np.testing.assert_array_equal(
        np.asanyarray(saved.dataobj), (np.asanyarray(nib.load(src).dataobj) > 60) * 4
    )
    with pytest.raises(ValueError, match="does not match the displayed shape"):
        save_labels_like(tmp_path / "bad.nii.gz", labels[:-1], kwargs["metadata"])
    with pytest.raises(ValueError, match=r"use \.nii\.gz/\.nii"):
        save_labels_like(tmp_path / "bad.png", labels, kwargs["metadata"])
