"""The model must not care how a file is stored: world-space labels across the 48 storages.

A real MRI crop (Colin27) is stored in each of the 48 axis permutations/flips, read with
napari-masam's reader (display "SPL"), segmented with box prompts through the engine with the
model's declared orientation, written back with the writer in the file's own orientation, and
compared in world (RAS) space. A tiny random-weight LiteMedSAM keeps it fast: the property is
the pipeline's, not the weights'.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from configs import TINY_LITE_ENCODER

from napari_masam import inference
from napari_masam.io.nifti import read_nifti, write_nifti
from napari_masam.model.base import DISPLAY_ORIENTATION
from napari_masam.model.lite import LITEMEDSAM_ORIENTATION, LiteMedSAM, build_litemedsam

STORAGES = [
    np.array([[p, s] for p, s in zip(perm, signs)], dtype=float)
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1, -1), repeat=3)
]


@pytest.fixture(scope="module")
def tiny_model() -> LiteMedSAM:
    torch.manual_seed(0)
    model = LiteMedSAM(encoder_config=TINY_LITE_ENCODER).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def crop(ch2_path) -> nib.Nifti1Image:
    """Colin27 RAS, a 36 x 40 x 5 mm block through the basal ganglia (1 mm voxels)."""
    img = nib.as_closest_canonical(nib.load(ch2_path))
    data = np.asarray(img.dataobj)[70:106, 110:150, 80:85].astype(np.float32)
    affine = img.affine @ nib.affines.from_matvec(np.eye(3), [70, 110, 80])
    return nib.Nifti1Image(data, affine)


def _world_labels(tmp_path, crop, model, ornt: np.ndarray, k: int) -> np.ndarray:
    stored = crop.as_reoriented(ornt)
    path = tmp_path / f"img{k}.nii"
    nib.save(stored, path)
    vol = read_nifti(path)
    display = np.asarray(vol.data, dtype=np.float32)
    z, y, x = display.shape
    boxes = {1: {i: [4, 5, x - 8, y - 6] for i in range(z)}, 2: {2: [10, 8, 20, 30]}}
    result = inference.run(
        inference.iter_segment_boxes(
            model, display, boxes, stack_orientation=DISPLAY_ORIENTATION, cache=None
        )
    )
    out = tmp_path / f"lab{k}.nii"
    write_nifti(out, result.labels, vol.metadata)
    back = nib.as_closest_canonical(nib.load(out))
    assert np.allclose(back.affine, crop.affine, atol=1e-4)
    return np.asarray(back.dataobj)


#: Axial, coronal and sagittal storage (slice axis S, A, R), each also with all axes flipped.
THREE_PLANES = [
    np.array(o, dtype=float)
    for o in (
        [[0, 1], [1, 1], [2, 1]],
        [[0, 1], [2, 1], [1, 1]],
        [[2, 1], [1, 1], [0, 1]],
        [[0, -1], [1, -1], [2, -1]],
        [[0, -1], [2, -1], [1, -1]],
        [[2, -1], [1, -1], [0, -1]],
    )
]


@pytest.mark.parametrize(
    "storages",
    [
        pytest.param(THREE_PLANES, id="3-planes"),
        pytest.param(STORAGES, id="all-48", marks=pytest.mark.slow),
    ],
)
def test_storages_give_identical_world_labels(tmp_path, crop, tiny_model, storages):
    reference = _world_labels(tmp_path, crop, tiny_model, STORAGES[0], 0)
    assert reference.shape == crop.shape
    assert len(np.unique(reference)) >= 2  # a real segmentation, not all background
    for k, ornt in enumerate(storages[1:], start=1):
        got = _world_labels(tmp_path, crop, tiny_model, ornt, k)
        assert np.array_equal(got, reference), nib.orientations.ornt2axcodes(ornt)


def test_declared_orientation_reaches_the_encoder(tiny_model, monkeypatch):
    """With a model orientation other than the stack's, the encoder sees the oriented slice."""
    import dataclasses

    seen = []
    real = tiny_model.encode

    def spy(images):
        seen.append(images.clone())
        return real(images)

    stack = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    stack[0, 10:30, 5:60] += 2.0  # not symmetric under transposition
    boxes = {1: {0: [0, 0, 63, 63]}}
    monkeypatch.setattr(tiny_model, "encode", spy)
    for orientation in ("SPL", "SLP"):
        monkeypatch.setattr(
            tiny_model,
            "metadata",
            dataclasses.replace(tiny_model.metadata, orientation=orientation),
        )
        inference.run(
            inference.iter_segment_boxes(tiny_model, stack, boxes, stack_orientation="SPL")
        )
    as_display, transposed = seen[0][0, 0, 0], seen[1][0, 0, 0]
    assert not torch.equal(as_display, transposed)
    assert torch.allclose(as_display.T, transposed)


def test_litemedsam_declares_its_training_orientation():
    from napari_masam.model.masam_lite import masam_lite_metadata
    from napari_masam.preprocess import orientation_transform

    # in-plane only (box prompts need the slice axis kept), measured best: transposed display
    assert LITEMEDSAM_ORIENTATION == "SLP"
    assert orientation_transform(DISPLAY_ORIENTATION, LITEMEDSAM_ORIENTATION).keeps_slice_axis
    assert build_litemedsam.__module__ == "napari_masam.model.lite"
    # MA-SAM-Lite is fine-tuned on display slices: it must declare the display orientation
    assert masam_lite_metadata(2).orientation == DISPLAY_ORIENTATION
