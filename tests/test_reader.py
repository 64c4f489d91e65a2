"""napari reader contribution: through napari_get_reader, npe2's read API and a real viewer."""

from __future__ import annotations

import pathlib

import nibabel as nib
import numpy as np
import pytest

from napari_masam._reader import napari_get_reader

NIB_DATA = pathlib.Path(nib.__file__).parent / "tests" / "data"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> pathlib.Path:
    """A 60-frame H.264 clip with a keyframe every 10 frames."""
    import av

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        s.options = {"g": "10", "bf": "2"}
        for t in range(60):
            img = np.zeros((64, 96, 3), np.uint8)
            img[..., 0] = t * 4
            img[t % 64, :, 1] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_get_reader_dispatch(ch2_path, aal_path, clip, tmp_path):
    assert napari_get_reader(str(ch2_path)) is not None
    assert napari_get_reader([str(ch2_path)]) is not None
    assert napari_get_reader([str(ch2_path), str(aal_path)]) is None
    assert napari_get_reader(str(tmp_path / "x.png")) is None
    assert napari_get_reader(str(tmp_path / "missing.nii.gz")) is None
    (image,) = napari_get_reader(str(ch2_path))(str(ch2_path))
    data, kwargs, kind = image
    assert kind == "image" and data.shape == (181, 217, 181)
    assert kwargs["scale"] == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(kwargs["translate"], (-71.0, -91.0, -90.0))
    assert kwargs["metadata"]["nifti"]["orientation"] == "RAS"
    ((_, _, kind),) = napari_get_reader(str(aal_path))(str(aal_path))
    assert kind == "labels"
    ((vdata, vkw, vkind),) = napari_get_reader(str(clip))(str(clip))
    assert vkind == "image" and vkw["rgb"] and vdata.shape == (60, 64, 96, 3)
    assert vkw["metadata"]["video"]["n_frames"] == 60


@pytest.fixture
def plugin(npe2pm):
    """napari-masam registered in npe2's test plugin manager (which refuses discovery)."""
    with npe2pm.tmp_plugin(package="napari-masam") as registered:
        yield registered


@pytest.mark.filterwarnings("ignore::napari_masam.io.nifti.ObliqueAffineWarning")
def test_npe2_read_api(plugin, ch2bet_path, clip, tmp_path):
    import npe2

    layers = npe2.read([str(ch2bet_path)], stack=False, plugin_name="napari-masam")
    assert layers[0][2] == "image" and layers[0][0].shape == (181, 217, 181)
    layers = npe2.read(
        [str(NIB_DATA / "example4d.nii.gz")], stack=False, plugin_name="napari-masam"
    )
    assert layers[0][0].shape == (2, 24, 96, 128) and layers[0][1]["scale"][0] == 1.0
    layers = npe2.read([str(clip)], stack=False, plugin_name="napari-masam")
    assert layers[0][0].shape == (60, 64, 96, 3)
    import tifffile

    tifffile.imwrite(tmp_path / "vol.tif", np.zeros((4, 8, 9), np.float32), imagej=True)
    layers = npe2.read([str(tmp_path / "vol.tif")], stack=False, plugin_name="napari-masam")
    assert layers[0][0].shape == (4, 8, 9)
    (tmp_path / "bad.nii").write_text("nonsense")
    with pytest.raises(ValueError):
        npe2.read([str(tmp_path / "bad.nii")], stack=False, plugin_name="napari-masam")


@pytest.mark.gui
def test_viewer_opens_files_with_physical_overlay(
    make_napari_viewer, plugin, ch2_path, aal_path, tmp_path
):
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    img = nib.load(aal_path)
    sub = img.slicer[::2, ::2, ::2]
    lps = sub.as_reoriented(ornt_transform(io_orientation(sub.affine), axcodes2ornt("LPS")))
    nib.save(lps, tmp_path / "aal_lps_2mm.nii.gz")
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(ch2_path), plugin="napari-masam")
    (labels,) = viewer.open(str(tmp_path / "aal_lps_2mm.nii.gz"), plugin="napari-masam")
    assert type(labels).__name__ == "Labels" and type(image).__name__ == "Image"
    np.testing.assert_allclose(labels.scale, (2, 2, 2))
    # a world point maps to the same anatomical voxel in both layers
    world = np.array([10.0, -20.0, 30.0])  # (z_RAS, -y_RAS, -x_RAS)
    ras = np.array([-world[2], -world[1], world[0]])
    ijk_1mm = np.round(nib.affines.apply_affine(np.linalg.inv(img.affine), ras)).astype(int)
    d_img = np.round(image.world_to_data(world)).astype(int)
    d_lab = np.round(labels.world_to_data(world)).astype(int)
    assert labels.data[tuple(d_lab)] == np.asanyarray(img.dataobj)[tuple(ijk_1mm)]
    assert image.data[tuple(d_img)] == np.asanyarray(nib.load(ch2_path).dataobj)[tuple(ijk_1mm)]
    viewer.dims.set_point(0, 10.0)  # the axial slice z_RAS = 10 mm, shown in both layers
    assert np.asarray(image._slice.image.raw).std() > 0
    assert (np.asarray(labels._slice.image.raw) > 0).any()


@pytest.mark.gui
def test_viewer_video_is_lazy(make_napari_viewer, plugin, clip):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(clip), plugin="napari-masam")
    assert layer.rgb and layer.data.shape == (60, 64, 96, 3)
    from napari_masam.io.video import VideoReader

    # the VideoReader sits in the dask graph
    video = next(v for v in layer.data.dask.values() if isinstance(v, VideoReader))
    before = video.stats["frames_decoded"]
    viewer.dims.set_point(0, 55)
    viewer.screenshot(canvas_only=True, flash=False)
    decoded = video.stats["frames_decoded"] - before
    assert 0 < decoded <= 2 * 10 + 4  # from the keyframe at 50, not from frame 0
    shown = np.asarray(layer._slice.image.raw)
    np.testing.assert_array_equal(shown[..., :3], video[55])


# ------------------------------------------------ the reason reaches the person (issue 13.5)
@pytest.fixture
def shown(monkeypatch):
    """Messages napari-masam shows through napari's notifications."""
    from napari.utils import notifications

    messages: list[str] = []
    monkeypatch.setattr(notifications, "show_error", messages.append)
    monkeypatch.setattr(notifications, "show_warning", messages.append)
    return messages


def _write_bad_files(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """name -> (file, what our message must say)."""
    import gzip

    files = {}
    cplx = (np.arange(24).reshape(2, 3, 4) * 1j).astype(np.complex64)
    nib.save(nib.Nifti1Image(cplx, np.eye(4)), tmp_path / "complex.nii.gz")
    files["complex"] = (tmp_path / "complex.nii.gz", "complex voxels")
    rgb = np.zeros((2, 3, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    files["rgb"] = (tmp_path / "rgb.nii", "colour voxels (RGB24")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 2048))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    with gzip.open(tmp_path / "liar.nii.gz", "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + bytes(1000))
    files["liar"] = (tmp_path / "liar.nii.gz", "8.0 GiB")
    (tmp_path / "junk.nii").write_text("nonsense")
    files["junk"] = (tmp_path / "junk.nii", "not a readable NIfTI file")
    return files


def test_refused_files_say_why(tmp_path, shown):
    for path, says in _write_bad_files(tmp_path).values():
        shown.clear()
        assert napari_get_reader(str(path)) is None
        (message,) = shown
        assert path.name in message and says in message, message
        assert "IndexError" not in message and "SVD" not in message
    # not ours by name: silently None (another plugin's business)
    shown.clear()
    assert napari_get_reader(str(tmp_path / "x.png")) is None
    assert shown == []


def test_reader_function_failure_is_shown(ch2bet_path, tmp_path, shown):
    from napari_masam._reader import read_nifti_layers

    blob = ch2bet_path.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    assert read_nifti_layers(str(tmp_path / "cut.nii.gz")) is None
    (message,) = shown
    assert "cut.nii.gz" in message and "truncated or corrupt" in message


def test_units_and_physical_unit_on_layers(ch2_path, tmp_path):
    import tifffile

    ((_, kw, _),) = napari_get_reader(str(ch2_path))(str(ch2_path))
    assert kw["units"] == ("mm", "mm", "mm") and kw["metadata"]["physical_unit"] == "mm"
    tifffile.imwrite(
        tmp_path / "cells.tif",
        np.zeros((4, 8, 9), np.uint16),
        imagej=True,
        resolution=(1 / 0.3, 1 / 0.3),
        metadata={"spacing": 2.0, "unit": "micron", "axes": "ZYX"},
    )
    ((_, kw, _),) = napari_get_reader(str(tmp_path / "cells.tif"))(str(tmp_path / "cells.tif"))
    np.testing.assert_allclose(kw["scale"], (0.002, 0.0003, 0.0003), rtol=1e-6)
    assert kw["units"] == ("mm", "mm", "mm") and kw["metadata"]["physical_unit"] == "mm"
    tifffile.imwrite(tmp_path / "photo.tif", np.zeros((8, 9), np.uint16), resolution=(72, 72))
    ((_, kw, _),) = napari_get_reader(str(tmp_path / "photo.tif"))(str(tmp_path / "photo.tif"))
    assert kw["scale"] == (1.0, 1.0) and kw["units"] == ("pixel", "pixel")
    assert kw["metadata"]["physical_unit"] is None


@pytest.mark.gui
def test_viewer_shows_our_reason_for_a_refused_file(make_napari_viewer, plugin, tmp_path, shown):
    files = _write_bad_files(tmp_path)
    viewer = make_napari_viewer()
    path, says = files["liar"]
    with pytest.raises(Exception, match="refused"):  # napari's own words ...
        viewer.open(str(path), plugin="napari-masam")
    assert any(says in m and path.name in m for m in shown)  # ... and ours, with the reason
    assert len(viewer.layers) == 0
