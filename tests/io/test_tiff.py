"""TIFF stacks: spacing always with its unit (converted to mm), image vs labels by the one rule,
and labels written like their image."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_masam.io.tiff import read_tiff_stack, write_tiff_stack


def _imagej(path, unit, spacing_z=2.0, pixel=0.3, dtype=np.uint16):
    tifffile.imwrite(
        path,
        np.arange(4 * 8 * 9, dtype=dtype).reshape(4, 8, 9),
        imagej=True,
        resolution=(1 / pixel, 1 / pixel),
        metadata={"spacing": spacing_z, "unit": unit, "axes": "ZYX"},
    )
    return path


@pytest.mark.parametrize(
    ("unit", "to_mm"),
    [("micron", 1e-3), ("\\u00B5m", 1e-3), ("um", 1e-3), ("nm", 1e-6), ("mm", 1.0), ("cm", 10.0)],
)
def test_imagej_units_converted_to_mm(tmp_path, unit, to_mm):
    stack = read_tiff_stack(_imagej(tmp_path / "s.tif", unit))
    np.testing.assert_allclose(stack.spacing, np.array([2.0, 0.3, 0.3]) * to_mm, rtol=1e-6)
    assert stack.unit == "mm" and stack.physical_unit == "mm"
    assert stack.metadata["source_unit"] == unit
    # a 4 x 8 x 9 stack of 2 x 0.3 x 0.3 micron voxels is 2.6e-10 mL, not 0.26 mL
    volume_ml = 4 * 8 * 9 * float(np.prod(stack.spacing)) / 1000.0
    np.testing.assert_allclose(volume_ml, 4 * 8 * 9 * 2.0 * 0.09 * to_mm**3 / 1000.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"resolution": (72, 72)}, "72 dpi default"),
        ({"resolution": (96, 96)}, "96 dpi default"),
        ({}, "no resolution"),
        ({"resolution": (5, 5), "resolutionunit": 1}, "resolution unit none"),
    ],
)
def test_no_physical_unit_means_pixels(tmp_path, kwargs, why):
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((3, 8, 9), np.uint16), **kwargs)
    stack = read_tiff_stack(tmp_path / "p.tif")
    assert stack.spacing == (1.0,) * len(stack.spacing), why
    assert stack.unit == "pixel" and stack.physical_unit is None, why


def test_imagej_pixel_unit_is_not_physical(tmp_path):
    stack = read_tiff_stack(_imagej(tmp_path / "s.tif", "pixel"))
    assert stack.physical_unit is None and stack.spacing == (1.0, 1.0, 1.0)


def test_inch_resolution_converted(tmp_path):
    tifffile.imwrite(
        tmp_path / "scan.tif", np.zeros((8, 9), np.uint16), resolution=(254, 254), resolutionunit=2
    )
    stack = read_tiff_stack(tmp_path / "scan.tif")
    np.testing.assert_allclose(stack.spacing, (0.1, 0.1), rtol=1e-6)
    assert stack.physical_unit == "mm"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32])  # ImageJ and tifffile's own metadata
def test_own_writer_round_trips_spacing_and_unit(tmp_path, dtype):
    labels = np.zeros((3, 5, 6), dtype)
    labels[1, 2:4, 1:5] = 7
    out = write_tiff_stack(
        tmp_path / "l.tif", labels, spacing=(2.5, 0.5, 0.25), unit="mm", is_labels=True
    )
    stack = read_tiff_stack(out)
    np.testing.assert_allclose(stack.spacing, (2.5, 0.5, 0.25), rtol=1e-6)
    assert stack.physical_unit == "mm"
    np.testing.assert_array_equal(stack.data, labels)


def test_labels_rule_for_tiff(tmp_path):
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, (3, 8, 9)).astype(np.float32)
    tifffile.imwrite(tmp_path / "cells_seg.tif", seg)
    stack = read_tiff_stack(tmp_path / "cells_seg.tif")
    assert stack.is_labels and stack.data.dtype == np.uint8
    np.testing.assert_array_equal(stack.data, seg.astype(np.uint8))
    few = (rng.integers(0, 10, (3, 8, 9)) * 50).astype(np.uint16)
    tifffile.imwrite(tmp_path / "t1.tif", few)
    assert not read_tiff_stack(tmp_path / "t1.tif").is_labels  # 16-bit image, few grey levels


def test_save_labels_like_tiff_image(tmp_path):
    from napari_masam.io.formats import save_labels_like

    image = read_tiff_stack(_imagej(tmp_path / "cells.tif", "micron"))
    labels = (np.asarray(image.data) % 3).astype(np.uint8)
    meta = {"tiff": image.metadata, "physical_unit": image.physical_unit}
    out = save_labels_like(tmp_path / "cells_labels", labels, meta)
    assert out.name == "cells_labels.tif"
    back = read_tiff_stack(out)
    np.testing.assert_array_equal(back.data, labels)
    np.testing.assert_allclose(back.spacing, image.spacing, rtol=1e-6)
    with pytest.raises(ValueError, match="not read from a NIfTI file"):
        save_labels_like(tmp_path / "cells_labels.nii.gz", labels, meta)


def _tiff_claiming(path, width, height, compression):
    """A real 16 x 16 TIFF whose width/height/rows-per-strip tags are then overwritten."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), compression=compression)
    with tifffile.TiffFile(path) as tf:
        tags = tf.pages[0].tags
        where = {code: tags.get(code).valueoffset for code in (256, 257, 278)}
        assert all(tags.get(code).dtype == 4 for code in where)  # LONG values
    blob = bytearray(path.read_bytes())
    for code, value in ((256, width), (257, height), (278, height)):
        blob[where[code] : where[code] + 4] = int(value).to_bytes(4, "little")
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("compression", ["zlib", None])
def test_tiff_tags_claiming_more_than_stored_are_refused(tmp_path, compression):
    path = _tiff_claiming(tmp_path / "liar.tif", 60000, 60000, compression)
    with pytest.raises(ValueError, match=r"60000 x 60000 uint8 pixels .* nothing was read"):
        read_tiff_stack(path)


def test_complex_tiff_refused_with_advice(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", (np.ones((2, 5, 6)) * 1j).astype(np.complex64))
    with pytest.raises(ValueError, match=r"complex pixels .*magnitude"):
        read_tiff_stack(tmp_path / "c.tif")
