"""NIfTI geometry, laziness, labels detection and exact round trips, on real files."""

from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from napari_masam.io.nifti import (
    DISPLAY_ORIENTATION,
    ObliqueAffineWarning,
    read_nifti,
    write_nifti,
)

# (x, y, z)_RAS -> display world (z, -y, -x), written out independently of the module
TO_WORLD = np.array([[0, 0, 1], [0, -1, 0], [-1, 0, 0]], dtype=float)

NIB_FILES = ["anatomical.nii", "functional.nii", "reoriented_anat_moved.nii", "standard.nii.gz"]
MRICRON = ["ch2_path", "ch2bet_path", "aal_path"]


def _spatial(vol):
    return np.asarray(vol.spacing_zyx), np.asarray(vol.translate_zyx)


def _check_voxels_land_where_nibabel_says(path: pathlib.Path, n: int = 200) -> None:
    """Every sampled file voxel ijk: its value sits in the displayed array at the index whose
    napari world position (translate + scale * index) is nibabel's affine @ ijk."""
    img = nib.load(path)
    file_data = np.asanyarray(img.dataobj)
    vol = read_nifti(path)
    scale, translate = _spatial(vol)
    shape3 = img.shape[:3]
    rng = np.random.default_rng(0)
    ijk = np.stack([rng.integers(0, s, n) for s in shape3], axis=1)
    ijk = np.concatenate(
        [ijk, np.array(np.meshgrid(*[[0, s - 1] for s in shape3])).reshape(3, -1).T]
    )
    world = apply_affine(img.affine, ijk) @ TO_WORLD.T
    display_index = (world - translate) / scale
    np.testing.assert_allclose(display_index, np.round(display_index), atol=1e-3)
    d = np.round(display_index).astype(int)
    assert (d >= 0).all() and (d < np.array(vol.data.shape[-3:])).all()
    data = np.asarray(vol.data)
    if data.ndim == 3:
        np.testing.assert_array_equal(data[tuple(d.T)], file_data[tuple(ijk.T)])
    else:  # (T, Z, Y, X): every time point
        for t in range(data.shape[0]):
            # nibabel's dataobj applies scl_slope/scl_inter itself
            np.testing.assert_allclose(
                data[t][tuple(d.T)], file_data[..., t][tuple(ijk.T)], rtol=1e-6
            )


@pytest.mark.parametrize("name", NIB_FILES)
def test_nibabel_files_geometry(nib_data, name):
    _check_voxels_land_where_nibabel_says(nib_data / name)


@pytest.mark.parametrize("fixture", MRICRON)
def test_mricron_geometry(request, fixture):
    path = request.getfixturevalue(fixture)
    _check_voxels_land_where_nibabel_says(path, n=50)


def _reoriented_copy(src: pathlib.Path, codes: str, out: pathlib.Path, zooms=None) -> pathlib.Path:
    img = nib.load(src)
    if zooms is not None:  # anisotropic: stretch the voxel axes
        aff = img.affine.copy()
        aff[:3, :3] = aff[:3, :3] @ np.diag(zooms)
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), aff, header=img.header)
    ornt = ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(codes)))
    new = img.as_reoriented(ornt)
    nib.save(new, out)
    assert "".join(nib.aff2axcodes(nib.load(out).affine)) == codes
    return out


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS", "LSA", "PIR", "SPL", "ILA"])
@pytest.mark.parametrize("zooms", [None, (0.7, 1.3, 3.0)])
def test_orientations_overlay_identically(small_head, tmp_path, codes, zooms):
    ref_path = _reoriented_copy(small_head, "RAS", tmp_path / "ref.nii.gz", zooms)
    path = _reoriented_copy(small_head, codes, tmp_path / f"{codes}.nii", zooms)
    ref, vol = read_nifti(ref_path), read_nifti(path)
    assert vol.orientation == codes
    np.testing.assert_array_equal(np.asarray(vol.data), np.asarray(ref.data))
    np.testing.assert_allclose(vol.spacing_zyx, ref.spacing_zyx, rtol=1e-6)
    np.testing.assert_allclose(vol.translate_zyx, ref.translate_zyx, atol=1e-4)
    _check_voxels_land_where_nibabel_says(path, n=60)
    expected_spacing = np.array(zooms or (1, 1, 1))[::-1] * 3.0  # RAS file axes i,j,k -> Z,Y,X
    np.testing.assert_allclose(ref.spacing_zyx, expected_spacing, rtol=1e-6)
    # exact round trip in the file's own orientation
    out = write_nifti(tmp_path / f"rt_{codes}.nii", vol.data, vol.metadata, is_labels=False)
    a, b = nib.load(path), nib.load(out)
    np.testing.assert_array_equal(b.affine, a.affine)
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), np.asanyarray(a.dataobj))


def test_display_orientation_matches_model_contract():
    from napari_masam.model.base import DISPLAY_ORIENTATION as MODEL_ORIENTATION

    assert DISPLAY_ORIENTATION == MODEL_ORIENTATION == "SPL"


def test_ras_file_is_authors_orientation(small_head):
    """For a RAS file the display is A.T[::-1, ::-1] per the spec: (Z, Y, X) with Y, X flipped."""
    raw = np.asanyarray(nib.load(small_head).dataobj)
    expected = raw.transpose(2, 1, 0)[:, ::-1, ::-1]
    np.testing.assert_array_equal(np.asarray(read_nifti(small_head).data), expected)


def test_voxel_corners_match_nibabel(small_head, tmp_path):
    """World extent of the displayed array (voxel corners) equals nibabel's corners."""
    path = _reoriented_copy(small_head, "LPS", tmp_path / "lps.nii", (0.5, 1.0, 2.5))
    img, vol = nib.load(path), read_nifti(path)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in img.shape])).reshape(3, -1).T
    world = apply_affine(img.affine, corners) @ TO_WORLD.T
    scale, translate = _spatial(vol)
    lo = translate - 0.5 * scale
    hi = translate + (np.array(vol.data.shape) - 0.5) * scale
    np.testing.assert_allclose(world.min(axis=0), lo, atol=1e-4)
    np.testing.assert_allclose(world.max(axis=0), hi, atol=1e-4)


def test_oblique_warns_and_keeps_affine(nib_data, tmp_path):
    path = nib_data / "example4d.nii.gz"
    img = nib.load(path)
    with pytest.warns(ObliqueAffineWarning):
        vol = read_nifti(path)
    assert vol.oblique
    np.testing.assert_array_equal(vol.metadata["affine"], img.affine)
    assert vol.data.shape == (2, 24, 96, 128)  # time leads, then (Z, Y, X)
    # voxel 0 of the display sits exactly where nibabel puts that voxel
    flip = np.array(vol.metadata["transform"])
    ijk0 = np.array([0 if f == 1 else img.shape[i] - 1 for i, (_, f) in enumerate(flip)])
    np.testing.assert_allclose(
        vol.translate_zyx, TO_WORLD @ apply_affine(img.affine, ijk0), atol=1e-4
    )
    # spacing = lengths of the affine's columns (zooms), in display order
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
    np.testing.assert_allclose(sorted(vol.spacing_zyx), sorted(zooms), rtol=1e-6)
    out = write_nifti(tmp_path / "obl.nii.gz", vol.data, vol.metadata, is_labels=False)
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, img.affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(img.dataobj))


def test_rotated_ch2_is_oblique(small_head, tmp_path):
    img = nib.load(small_head)
    c, s = np.cos(0.2), np.sin(0.2)
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    out = tmp_path / "rot.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), rot @ img.affine), out)
    with pytest.warns(ObliqueAffineWarning):
        vol = read_nifti(out)
    np.testing.assert_allclose(vol.spacing_zyx, (3.0, 3.0, 3.0), rtol=1e-5)


def test_uncompressed_is_lazy_and_native_dtype(nib_data, tmp_path):
    vol = read_nifti(nib_data / "anatomical.nii")
    base = vol.data
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)  # a view of nibabel's memory map, nothing read
    assert vol.data.dtype == np.dtype(">i2")
    gz = read_nifti(nib_data / "example4d.nii.gz", as_labels=False)
    assert gz.data.dtype == np.int16  # no float64 copy


def test_scaled_file_float32_matches_nibabel(nib_data):
    path = nib_data / "functional.nii"
    vol = read_nifti(path)
    assert vol.data.dtype == np.float32
    expected = nib.load(path).get_fdata()  # (X, Y, Z, T) float64
    ornt = ornt_transform(io_orientation(nib.load(path).affine), axcodes2ornt(("S", "P", "L")))
    for t in (0, 7, 19):
        ref = nib.orientations.apply_orientation(expected[..., t], ornt)
        np.testing.assert_allclose(vol.data[t], ref, rtol=1e-6)


def test_labels_detection(ch2_path, ch2bet_path, aal_path, tmp_path):
    assert read_nifti(aal_path).is_labels  # intent "label"
    assert not read_nifti(ch2_path).is_labels
    assert not read_nifti(ch2bet_path).is_labels
    mask = (np.asanyarray(nib.load(ch2bet_path).dataobj) > 0).astype(np.uint8)
    aff = nib.load(ch2bet_path).affine
    for name in ("brain.nii.gz", "liver_seg.nii.gz"):  # few values / name hint
        nib.save(nib.Nifti1Image(mask, aff), tmp_path / name)
        assert read_nifti(tmp_path / name).is_labels
    assert not read_nifti(tmp_path / "brain.nii.gz", as_labels=False).is_labels
    vol = read_nifti(ch2_path, as_labels=True)
    assert vol.is_labels and vol.data.dtype == np.uint8
    nib.save(nib.Nifti1Image(mask.astype(np.float32), aff), tmp_path / "float_brain.nii.gz")
    fl = read_nifti(tmp_path / "float_brain.nii.gz")
    assert not fl.is_labels  # float without a label name or intent: an image unless asked
    forced = read_nifti(tmp_path / "float_brain.nii.gz", as_labels=True)
    assert forced.data.dtype == np.uint8
    np.testing.assert_array_equal(
        np.asarray(forced.data), np.asarray(read_nifti(tmp_path / "brain.nii.gz").data)
    )


@pytest.mark.filterwarnings("ignore::napari_masam.io.nifti.ObliqueAffineWarning")
@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    "name",
    [
        "anatomical.nii",
        "functional.nii",
        "reoriented_anat_moved.nii",
        "standard.nii.gz",
        "example_nifti2.nii.gz",
    ],
)
def test_round_trip_exact(nib_data, tmp_path, name, ext):
    src = nib_data / name
    vol = read_nifti(src)
    out = write_nifti(tmp_path / f"out{ext}", vol.data, vol.metadata, is_labels=vol.is_labels)
    a, b = nib.load(src), nib.load(out)
    assert type(a.header) is type(b.header)
    np.testing.assert_array_equal(b.affine, a.affine)
    assert b.get_data_dtype() == a.get_data_dtype()
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), np.asanyarray(a.dataobj))
    for key in ("qform_code", "sform_code", "xyzt_units", "quatern_b", "srow_x", "pixdim"):
        np.testing.assert_array_equal(b.header[key], a.header[key])
    again = read_nifti(out)
    np.testing.assert_array_equal(np.asarray(again.data), np.asarray(vol.data))
    if src.suffix == ".nii" and ext == ".nii":  # uncompressed: the very same bytes
        assert out.read_bytes() == src.read_bytes()


def test_labels_on_image_geometry(ch2_path, ch2bet_path, tmp_path):
    """Labels drawn on ch2 are written with ch2's affine and header, smallest dtype."""
    vol = read_nifti(ch2_path)
    labels = (np.asarray(read_nifti(ch2bet_path).data) > 0).astype(np.int32) * 300
    out = write_nifti(tmp_path / "mask", labels, vol.metadata)
    assert out.name == "mask.nii.gz"
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint16
    assert back.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(back.affine, nib.load(ch2_path).affine)
    assert int(back.header["sform_code"]) == int(nib.load(ch2_path).header["sform_code"])
    expected = (np.asanyarray(nib.load(ch2bet_path).dataobj) > 0) * 300
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), expected)


def test_minimal_dtypes(small_head, tmp_path):
    vol = read_nifti(small_head)
    for values, dtype in (
        ((0, 1), np.uint8),
        ((0, 256), np.uint16),
        ((-1, 5), np.int8),
        ((0, 70000), np.uint32),
    ):
        data = np.zeros(vol.data.shape, np.int64)
        data[0, 0, 0], data[-1, -1, -1] = values
        back = nib.load(write_nifti(tmp_path / "l.nii.gz", data, vol.metadata))
        assert back.get_data_dtype() == dtype
    with pytest.raises(ValueError, match="whole numbers"):
        write_nifti(tmp_path / "bad.nii.gz", np.full(vol.data.shape, 0.5), vol.metadata)
    with pytest.raises(ValueError, match="does not match the displayed shape"):
        write_nifti(tmp_path / "bad.nii.gz", np.zeros((3, 4, 5), np.uint8), vol.metadata)


def test_write_without_reference_keeps_world_geometry(small_head, tmp_path):
    vol = read_nifti(small_head)
    out = write_nifti(
        tmp_path / "new.nii.gz",
        np.asarray(vol.data),
        None,
        is_labels=False,
        spacing_zyx=vol.spacing_zyx,
        translate_zyx=vol.translate_zyx,
    )
    back = read_nifti(out, as_labels=False)
    assert back.orientation == "RAS"
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(vol.data))
    np.testing.assert_allclose(back.spacing_zyx, vol.spacing_zyx)
    np.testing.assert_allclose(back.translate_zyx, vol.translate_zyx, atol=1e-4)
    np.testing.assert_allclose(nib.load(out).affine, nib.load(small_head).affine, atol=1e-4)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "ASL"])
def test_2d_files(tmp_path, codes):
    rng = np.random.default_rng(1)
    data2d = rng.integers(0, 1000, (13, 9)).astype(np.int16)
    aff = np.diag([0.8, 0.6, 2.0, 1.0])
    aff[:3, 3] = (10, -20, 30)
    img = nib.Nifti1Image(data2d, aff)
    ornt = ornt_transform(io_orientation(aff), axcodes2ornt(tuple(codes)))
    img = nib.Nifti1Image(data2d[..., None], aff).as_reoriented(ornt)
    if img.shape[2] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine)
    path = tmp_path / "slice.nii"
    nib.save(img, path)
    vol = read_nifti(path, as_labels=False)
    assert np.asarray(vol.data).ndim in (2, 3)
    assert sorted(np.asarray(vol.data).shape)[-2:] == [9, 13]
    out = write_nifti(tmp_path / "slice_rt.nii", vol.data, vol.metadata, is_labels=False)
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), np.asanyarray(img.dataobj))
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(path).affine)


def test_true_2d_file_is_shown_2d(tmp_path):
    data2d = np.arange(7 * 5, dtype=np.int16).reshape(7, 5)
    nib.save(nib.Nifti1Image(data2d, np.diag([0.5, 0.25, 3, 1])), tmp_path / "p.nii")
    vol = read_nifti(tmp_path / "p.nii", as_labels=False)
    assert vol.data.shape == (5, 7)  # (Y, X) of an axial slice: rows posterior, cols left
    np.testing.assert_array_equal(vol.data, data2d.T[::-1, ::-1])
    np.testing.assert_allclose(vol.spacing_zyx, (0.25, 0.5))


@pytest.mark.parametrize(
    "kind", ["truncated_nii", "truncated_gz", "not_nifti", "empty", "garbage_gz"]
)
def test_bad_files_raise_clear_errors(nib_data, tmp_path, kind):
    from napari_masam._reader import napari_get_reader

    src = (nib_data / "anatomical.nii").read_bytes()
    path = tmp_path / ("bad.nii.gz" if "gz" in kind else "bad.nii")
    if kind == "truncated_nii":
        path.write_bytes(src[: len(src) // 2])
    elif kind == "truncated_gz":
        path.write_bytes(gzip.compress(src)[:3000])
    elif kind == "not_nifti":
        path.write_text("this is not a NIfTI file\n" * 40)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=str(path.name)):
        read_nifti(path)
    reader = napari_get_reader(str(path))
    assert reader is None or reader(str(path)) is None


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_nifti(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize(
    ("stored", "slope", "inter", "expected"),
    [
        (np.int16, 1.0, -1024.0, np.int32),  # DICOM-converted CT
        (np.uint8, 1.0, -1024.0, np.int16),
        (np.uint16, 2.0, 0.0, np.uint32),
        (np.int16, 0.5, 3.25, np.float32),  # non-integral scaling: float32
    ],
)
@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_scaled_integer_file_is_lazy_and_exact(tmp_path, stored, slope, inter, expected, ext):
    import tracemalloc

    import dask.array  # noqa: F401  (imported before measuring: its import allocates)

    info = np.iinfo(stored)
    rng = np.random.default_rng(0)
    raw = rng.integers(info.min, int(info.max) + 1, size=(128, 96, 80)).astype(stored)
    raw[0, 0, 0], raw[1, 0, 0] = info.min, info.max  # the extremes must fit the dtype
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    img = nib.Nifti1Image(raw, affine)
    img.header.set_slope_inter(slope, inter)
    path = tmp_path / f"ct{ext}"
    nib.save(img, path)

    tracemalloc.start()
    vol = read_nifti(path, as_labels=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if ext == ".nii":  # memory-mapped: opening reads no voxels (a scaled copy: >= 2 MB)
        assert peak < raw.size // 4, peak
    assert vol.data.dtype == expected
    assert vol.metadata["dtype"] == str(np.dtype(stored))

    fdata = nib.load(path).get_fdata()  # float64, nibabel's own scaling
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(DISPLAY_ORIENTATION)))
    ref = nib.orientations.apply_orientation(fdata, ornt)
    assert vol.data.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(vol.data[7]), ref[7].astype(expected))
    got = np.asarray(vol.data)
    assert got.dtype == expected
    if np.dtype(expected).kind == "f":
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, ref)

    # unchanged data write back to the stored dtype and scaling, voxel for voxel
    out = write_nifti(tmp_path / f"rt{ext}", vol.data, vol.metadata, is_labels=False)
    back = nib.load(out)
    assert back.get_data_dtype() == np.dtype(stored)
    assert (back.dataobj.slope, back.dataobj.inter) == (slope, inter)
    np.testing.assert_array_equal(back.dataobj.get_unscaled(), raw)


# ------------------------------------------------------------------ image vs labels: one rule
def test_labels_rule_intent_and_content(ch2bet_path, tmp_path):
    aff = nib.load(ch2bet_path).affine
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, (20, 24, 16)).astype(np.float32)  # {0, 1, 2} stored as float32
    nib.save(nib.Nifti1Image(seg, aff), tmp_path / "case01_seg.nii.gz")
    vol = read_nifti(tmp_path / "case01_seg.nii.gz")
    assert vol.is_labels and vol.data.dtype == np.uint8
    ornt = ornt_transform(io_orientation(aff), axcodes2ornt(tuple(DISPLAY_ORIENTATION)))
    np.testing.assert_array_equal(vol.data, nib.orientations.apply_orientation(seg, ornt))
    # a label word, but fractional values: an image
    nib.save(nib.Nifti1Image(seg + 0.5, aff), tmp_path / "prob_seg.nii.gz")
    assert not read_nifti(tmp_path / "prob_seg.nii.gz").is_labels
    # an int16 MRI with few grey levels: an image, unless its name or intent says labels
    mri = (rng.integers(0, 12, (20, 24, 16)) * 100).astype(np.int16)
    nib.save(nib.Nifti1Image(mri, aff), tmp_path / "t1.nii.gz")
    assert not read_nifti(tmp_path / "t1.nii.gz").is_labels
    nib.save(nib.Nifti1Image(mri, aff), tmp_path / "t1_labels.nii.gz")
    assert read_nifti(tmp_path / "t1_labels.nii.gz").is_labels
    img = nib.Nifti1Image(mri, aff)
    img.header.set_intent("label")
    nib.save(img, tmp_path / "t1_intent.nii.gz")
    assert read_nifti(tmp_path / "t1_intent.nii.gz").is_labels


# ------------------------------------------------------- untrusted header sizes (issue 13.2)
def _crafted_gz(path: pathlib.Path, shape: tuple[int, ...], payload: bytes) -> pathlib.Path:
    """A .nii.gz whose header declares ``shape`` uint8 voxels but holds ``payload`` only."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + payload)
    return path


_UNDER_LIMIT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from napari_masam.io.nifti import read_nifti
    from napari_masam._reader import napari_get_reader
    with open("/proc/self/status") as fh:
        vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
    limit = vm + int(sys.argv[2]) * 2**20  # address space: what is mapped now + a little
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = {"reader": napari_get_reader(sys.argv[1]) is not None}
    try:
        read_nifti(sys.argv[1])
        out["result"] = "read"
    except Exception as exc:
        out["result"] = type(exc).__name__
        out["message"] = str(exc)
    print(json.dumps(out))
    """
)


def _read_under_memory_limit(path: pathlib.Path, extra_mib: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _UNDER_LIMIT, str(path), str(extra_mib)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_gz_header_claiming_8gib_is_refused_before_allocating(tmp_path):
    # 4 MiB of noise (about 4 MiB compressed) under a header declaring 2048^3 voxels (8 GiB):
    # deflate cannot expand 4 MiB into 8 GiB, so this is refused from the header alone
    payload = np.random.default_rng(1).integers(0, 256, 4 * 2**20, dtype=np.uint8).tobytes()
    path = _crafted_gz(tmp_path / "liar.nii.gz", (2048, 2048, 2048), payload)
    out = _read_under_memory_limit(path, extra_mib=256)
    assert out["result"] == "ValueError", out
    assert "2048 x 2048 x 2048 uint8 voxels (8.0 GiB)" in out["message"]
    assert "nothing was read" in out["message"]
    assert out["reader"] is False  # napari's reader refuses it too, before reading


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_short_gz_is_streamed_with_bounded_memory(tmp_path):
    # 2 MiB of noise declared as 1 GiB: plausible for deflate, so the voxels are streamed and
    # the stream ends early; memory stays far below the declared size
    payload = np.random.default_rng(2).integers(0, 256, 2 * 2**20, dtype=np.uint8).tobytes()
    path = _crafted_gz(tmp_path / "short.nii.gz", (1024, 1024, 1024), payload)
    out = _read_under_memory_limit(path, extra_mib=200)
    assert out["result"] == "ValueError", out
    assert "holds only 2.0 MiB" in out["message"] and "1.0 GiB" in out["message"]


def test_truncated_gz_and_nii(ch2bet_path, tmp_path):
    data = gzip.decompress(ch2bet_path.read_bytes())
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_nifti(tmp_path / "cut.nii")
    blob = ch2bet_path.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_nifti(tmp_path / "cut.nii.gz")


def test_gz_streamed_read_equals_nibabel(aal_path):
    vol = read_nifti(aal_path)
    img = nib.load(aal_path)
    ornt = ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(DISPLAY_ORIENTATION)))
    ref = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt)
    np.testing.assert_array_equal(np.asarray(vol.data), ref)


# --------------------------------------------------- values napari-masam refuses (issue 13.3)
def test_complex_nifti_refused_with_advice(tmp_path):
    arr = (np.arange(60).reshape(3, 4, 5) * (1 + 1j)).astype(np.complex64)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match=r"complex voxels .*magnitude"):
        read_nifti(tmp_path / "c.nii.gz")


def test_rgb24_nifti_refused_with_advice(tmp_path):
    rgb = np.zeros((3, 4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    with pytest.raises(ValueError, match=r"colour voxels \(RGB24.*one channel"):
        read_nifti(tmp_path / "rgb.nii")


def test_nan_affine_refused_clearly(tmp_path):
    # written by hand: nibabel itself refuses to save such a header
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((3, 4, 5))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    hdr["sform_code"] = 2
    hdr["srow_x"] = [np.nan, 0, 0, 0]
    hdr["srow_y"] = [0, 1, 0, 0]
    hdr["srow_z"] = [0, 0, 1, 0]
    data = np.ones((3, 4, 5), np.int16).tobytes(order="F")
    (tmp_path / "nan.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + data)
    with pytest.raises(ValueError, match="NaN or infinite") as err:
        read_nifti(tmp_path / "nan.nii")
    assert "SVD" not in str(err.value)


# --------------------------------------------------------------- 2-D files: one rule (13.6)
def test_2d_nifti_is_a_one_slice_stack_and_writes_back(tmp_path):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 1000, (12, 9)).astype(np.int16)
    aff = np.diag([0.5, 0.7, 3.0, 1.0])
    nib.save(nib.Nifti1Image(arr, aff), tmp_path / "slice.nii.gz")
    vol = read_nifti(tmp_path / "slice.nii.gz")
    stack = vol.stack_zyx()
    assert stack.shape == (1, *vol.data.shape)
    # a one-slice result written with the 2-D reference lands on the file's own voxels
    labels = (np.asarray(stack) > 500).astype(np.uint8)
    out = write_nifti(tmp_path / "slice_seg.nii.gz", labels, vol.metadata)
    back = nib.load(out)
    assert back.shape == arr.shape
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), (arr > 500).astype(np.uint8))
    np.testing.assert_array_equal(back.affine, nib.load(tmp_path / "slice.nii.gz").affine)


def test_4d_advice_only_for_series(nib_data):
    vol = read_nifti(nib_data / "example4d.nii.gz", as_labels=False)
    with pytest.raises(ValueError, match=r"4-D series.*Split the series"):
        vol.stack_zyx()


def test_micron_header_shown_in_mm(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([500.0, 250.0, 1000.0, 1.0]))
    img.header.set_xyzt_units("micron")
    nib.save(img, tmp_path / "um.nii.gz")
    vol = read_nifti(tmp_path / "um.nii.gz")
    # display (z, y, x) = file (k, j, i) for this RAS file, in mm
    np.testing.assert_allclose(vol.spacing_zyx, (1.0, 0.25, 0.5))
    out = write_nifti(tmp_path / "back.nii.gz", np.asarray(vol.data), vol.metadata, is_labels=False)
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(tmp_path / "um.nii.gz").affine)


def test_folder_named_like_a_file_is_called_a_folder(tmp_path):
    from napari_masam.io.tiff import read_tiff_stack

    (tmp_path / "scan.nii.gz").mkdir()
    (tmp_path / "stack.tif").mkdir()
    with pytest.raises(ValueError, match="is a folder, not a NIfTI file"):
        read_nifti(tmp_path / "scan.nii.gz")
    with pytest.raises(ValueError, match="is a folder, not a TIFF file"):
        read_tiff_stack(tmp_path / "stack.tif")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_nifti(tmp_path / "missing.nii.gz")


def test_nifti2_dims_that_overflow_int64_are_refused(tmp_path):
    hdr = nib.Nifti2Header()
    hdr.set_data_shape((2**31, 2**31, 2**31))  # 2^93 voxels: wraps around in int64
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 544
    (tmp_path / "huge.nii").write_bytes(hdr.binaryblock + b"\\0" * 4 + bytes(1000))
    with pytest.raises(ValueError, match="truncated"):
        read_nifti(tmp_path / "huge.nii")
    with gzip.open(tmp_path / "huge.nii.gz", "wb") as fh:
        fh.write(hdr.binaryblock + b"\\0" * 4 + bytes(1000))
    with pytest.raises(ValueError, match="can hold at most"):
        read_nifti(tmp_path / "huge.nii.gz")


def test_empty_axis_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((0, 5, 5), np.int16), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(ValueError, match="empty axis"):
        read_nifti(tmp_path / "empty.nii.gz")
