"""napari writer contributions: exact NIfTI round trips through the layer metadata."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_masam._reader import read_nifti_layers
from napari_masam._writer import write_image, write_labels


def _meta(kwargs, name="layer"):
    return {
        "name": name,
        "scale": kwargs["scale"],
        "translate": kwargs["translate"],
        "metadata": kwargs["metadata"],
    }


def test_labels_drawn_on_image_written_in_original_geometry(ch2_path, ch2bet_path, tmp_path):
    ((data, kwargs, _),) = read_nifti_layers(str(ch2_path))
    mask = np.zeros(data.shape, np.int32)  # what napari's "new labels" gives
    mask[np.asarray(read_nifti_layers(str(ch2bet_path))[0][0]) > 0] = 3
    (out,) = write_labels(str(tmp_path / "brain_labels.nii.gz"), mask, _meta(kwargs))
    back = nib.load(out)
    ref = nib.load(ch2_path)
    np.testing.assert_array_equal(back.affine, ref.affine)
    assert back.get_data_dtype() == np.uint8
    assert back.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(
        np.asanyarray(back.dataobj), (np.asanyarray(nib.load(ch2bet_path).dataobj) > 0) * 3
    )


def test_labels_read_write_exact(aal_path, tmp_path):
    ((data, kwargs, kind),) = read_nifti_layers(str(aal_path))
    assert kind == "labels"
    (out,) = write_labels(str(tmp_path / "aal.nii"), data, _meta(kwargs))
    a, b = nib.load(aal_path), nib.load(out)
    np.testing.assert_array_equal(b.affine, a.affine)
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), np.asanyarray(a.dataobj))
    assert (
        b.header["sform_code"] == a.header["sform_code"]
        and b.header["qform_code"] == a.header["qform_code"]
    )


def test_image_round_trip_and_errors(tmp_path):
    path = nib.__file__.replace("__init__.py", "tests/data/anatomical.nii")
    ((data, kwargs, _),) = read_nifti_layers(path)
    (out,) = write_image(str(tmp_path / "anat.nii"), data, _meta(kwargs))
    assert Path(out).read_bytes() == Path(path).read_bytes()  # byte for byte
    with pytest.raises(ValueError, match="RGB"):
        write_image(
            str(tmp_path / "rgb.nii.gz"), np.zeros((4, 5, 3), np.uint8), {"rgb": True, "name": "x"}
        )
    with pytest.raises(ValueError, match="NIfTI only"):
        write_image(str(tmp_path / "x.tif"), data, _meta(kwargs))


def test_layer_without_reference_and_tiff(tmp_path):
    labels = np.zeros((6, 10, 12), np.int64)
    labels[2:4, 3:7, 5:9] = 2
    meta = {"name": "l", "scale": (3.0, 0.5, 0.75), "translate": (10.0, -5.0, 2.0), "metadata": {}}
    (out,) = write_labels(str(tmp_path / "new.nii.gz"), labels, meta)
    ((back, kwargs, kind),) = read_nifti_layers(out)
    assert kind == "labels"
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(kwargs["scale"], meta["scale"])
    np.testing.assert_allclose(kwargs["translate"], meta["translate"], atol=1e-5)
    (tif,) = write_labels(str(tmp_path / "new.tif"), labels, meta)
    np.testing.assert_array_equal(tifffile.imread(tif), labels.astype(np.uint8))


def test_npe2_write_api(npe2pm, ch2_path, tmp_path):
    import npe2

    ((data, kwargs, _),) = read_nifti_layers(str(ch2_path))
    labels = (np.asarray(data) > 100).astype(np.uint8)
    with npe2pm.tmp_plugin(package="napari-masam"):
        paths = npe2.write(
            str(tmp_path / "seg.nii.gz"),
            [(labels, {**kwargs, "name": "seg"}, "labels")],
            plugin_name="napari-masam",
        )
    back = nib.load(paths[0])
    np.testing.assert_array_equal(back.affine, nib.load(ch2_path).affine)
    np.testing.assert_array_equal(
        np.asanyarray(back.dataobj), np.asanyarray(nib.load(ch2_path).dataobj) > 100
    )


def test_2d_nifti_one_slice_result_written_back(tmp_path):
    """The 2-D rule: a (1, Y, X) result of a 2-D file is written as that 2-D file."""
    arr = np.arange(12 * 9, dtype=np.int16).reshape(12, 9)
    src = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([0.5, 0.7, 3.0, 1.0])), src)
    ((data, kwargs, _),) = read_nifti_layers(str(src))
    labels = (np.asarray(data) % 3)[None].astype(np.uint8)  # (1, Y, X) from stack_zyx
    meta = {**_meta(kwargs), "scale": (1.0, *kwargs["scale"]), "translate": (0.0, 0.0, 0.0)}
    (out,) = write_labels(str(tmp_path / "slice_seg.nii.gz"), labels, meta)
    back = nib.load(out)
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back.affine, nib.load(src).affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), arr % 3)


def test_writer_refuses_unknown_ending_with_reason(tmp_path):
    with pytest.raises(ValueError, match=r"use \.nii\.gz, \.nii or \.tif"):
        write_labels(str(tmp_path / "x.png"), np.zeros((2, 3), np.uint8), {"name": "x"})


def test_labels_of_a_tiff_stack_without_ending_go_to_tiff(tmp_path):
    from napari_masam._reader import read_tiff_layers

    tifffile.imwrite(
        tmp_path / "cells.tif",
        np.zeros((3, 8, 9), np.uint16),
        imagej=True,
        resolution=(2.0, 2.0),
        metadata={"spacing": 1.5, "unit": "micron", "axes": "ZYX"},
    )
    ((_, kwargs, _),) = read_tiff_layers(str(tmp_path / "cells.tif"))
    labels = np.zeros((3, 8, 9), np.uint8)
    labels[1, 2:5, 3:6] = 1
    (out,) = write_labels(str(tmp_path / "cells_labels"), labels, {**kwargs, "name": "l"})
    assert out.endswith("cells_labels.tif")
    from napari_masam.io.tiff import read_tiff_stack

    back = read_tiff_stack(out)
    np.testing.assert_array_equal(back.data, labels)
    np.testing.assert_allclose(back.spacing, (0.0015, 0.0005, 0.0005), rtol=1e-6)
