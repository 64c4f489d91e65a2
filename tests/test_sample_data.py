"""Sample data: real shipped files with stated licences, and a phantom with known labels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import napari_masam
from napari_masam._sample_data import make_sample_phantom, make_sample_video, make_sample_volume

DATA = Path(napari_masam.__file__).parent / "data"


def test_shipped_files_small_and_documented():
    files = [p for p in DATA.iterdir() if p.is_file() and p.suffix != ".py"]
    assert sum(p.stat().st_size for p in files) < 2 * 2**20
    readme = (DATA / "README.txt").read_text()
    for needle in (
        "BSD-3-clause",
        "Chris Rorden",
        "Blender Foundation",
        "Creative Commons Attribution 3.0",
    ):
        assert needle in readme
    for p in files:
        if p.name != "README.txt":
            assert p.name in readme


def test_head_mri_is_ch2_block_mean(ch2_path):
    ((data, kwargs, kind),) = make_sample_volume()
    assert kind == "image" and data.shape == (91, 109, 91) and data.dtype == np.uint8
    np.testing.assert_allclose(kwargs["scale"], (2, 2, 2))
    ch2 = nib.load(ch2_path)
    raw = np.pad(np.asanyarray(ch2.dataobj).astype(float), [(0, 1)] * 3)
    # display voxel (z, y, x) of a RAS file = file voxel (X-1-x, Y-1-y, z); check a few blocks
    X, Y, _ = 91, 109, 91
    for z, y, x in [(45, 54, 45), (30, 70, 20), (60, 40, 66)]:
        i, j, k = X - 1 - x, Y - 1 - y, z
        expected = np.rint(raw[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 2 * k : 2 * k + 2].mean())
        assert data[z, y, x] == expected
    # block centres: world = ch2 world of voxel (2i + 0.5, ...)
    ras = nib.affines.apply_affine(ch2.affine, [2 * (X - 1) + 0.5, 2 * (Y - 1) + 0.5, 0.5])
    np.testing.assert_allclose(kwargs["translate"], [ras[2], -ras[1], -ras[0]], atol=1e-4)


def test_phantom_labels_and_hu():
    (image, ikw, ikind), (labels, lkw, lkind) = make_sample_phantom()
    assert (ikind, lkind) == ("image", "labels")
    assert image.shape == labels.shape and image.dtype == np.int16
    assert ikw["scale"] == lkw["scale"] and ikw["translate"] == lkw["translate"]
    names = lkw["metadata"]["class_names"]
    assert names[0] == "background" and set(np.unique(labels)) == set(range(len(names)))
    assert image.min() == -1000  # air
    for value, low, high in [(1, 40, 80), (6, 600, 800)]:  # liver, vertebra
        assert low < image[labels == value].mean() < high
    # liver on patient right = image left half (radiological view), spine posterior (bottom)
    liver_cols = np.nonzero(labels == 1)[2]
    assert liver_cols.mean() < labels.shape[2] / 2
    assert np.nonzero(labels == 6)[1].mean() > labels.shape[1] / 2


def test_phantom_saves_as_ras(tmp_path):
    from napari_masam._writer import write_labels

    _, (labels, lkw, _) = make_sample_phantom()
    (out,) = write_labels(str(tmp_path / "ph.nii.gz"), labels, {"name": "l", **lkw})
    img = nib.load(out)
    assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
    np.testing.assert_array_equal(
        np.asanyarray(img.dataobj).transpose(2, 1, 0)[:, ::-1, ::-1], labels
    )


def test_sample_video():
    ((data, kwargs, kind),) = make_sample_video()
    assert kind == "image" and kwargs["rgb"] and data.shape == (75, 180, 320, 3)
    frame = np.asarray(data[40])
    assert frame.dtype == np.uint8 and frame.std() > 10
    assert kwargs["metadata"]["video"]["fps"] == pytest.approx(25.0)


@pytest.mark.gui
def test_open_samples_in_viewer(make_napari_viewer, npe2pm):
    with npe2pm.tmp_plugin(package="napari-masam"):
        viewer = make_napari_viewer()
        for key in ("head_mri", "ct_phantom", "video"):
            viewer.open_sample("napari-masam", key)
    assert [type(layer).__name__ for layer in viewer.layers] == [
        "Image",
        "Image",
        "Labels",
        "Image",
    ]


def test_samples_say_whether_sizes_are_physical():
    """The widget shows mL only for layers whose metadata["physical_unit"] is "mm"."""
    ((_, vkw, _),) = make_sample_volume()
    (_, ikw, _), (_, lkw, _) = make_sample_phantom()
    ((_, clip_kw, _),) = make_sample_video()
    assert vkw["metadata"]["physical_unit"] == "mm" and vkw["units"] == ("mm", "mm", "mm")
    assert ikw["metadata"]["physical_unit"] == lkw["metadata"]["physical_unit"] == "mm"
    assert clip_kw["metadata"]["physical_unit"] is None
