"""Fixtures of the widget tests: small real files on disk, a tiny 3-class MA-SAM checkpoint, and
the docked widget in a real viewer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CLASS_NAMES = ("liver", "kidney", "spleen")
CLASS_COLORS = ("#aa3311", "#22bb44", "#3355ee")


@pytest.fixture(scope="session")
def small_nifti_path(tmp_path_factory, ch2bet_path) -> Path:
    """A real brain MRI crop (Colin27, brain extracted): 2 mm in-plane, 6 axial slices."""
    import nibabel as nib

    img = nib.load(str(ch2bet_path))
    crop = img.slicer[30:150:2, 40:200:2, 84:90]  # nibabel updates the affine
    out = tmp_path_factory.mktemp("nifti") / "brain_crop.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(crop.dataobj, dtype=np.int16), crop.affine), str(out))
    return out


@pytest.fixture(scope="session")
def tiny_masam_path(tmp_path_factory) -> Path:
    """The tiny MA-SAM (same architecture, small numbers) with 3 named classes, in our format."""
    import torch

    from napari_masam.checkpoints import save_checkpoint
    from napari_masam.model.base import ModelMetadata
    from napari_masam.model.masam import build_masam

    torch.manual_seed(0)
    meta = ModelMetadata(
        name="tiny-3class",
        class_names=CLASS_NAMES,
        class_colors=CLASS_COLORS,
        intensity_preset="mri",
    )
    model = build_masam("tiny", num_classes=3, metadata=meta)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_masam_3class.safetensors"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def litemedsam_session():
    """One LiteMedSAM session for the whole test run (the widget reuses a session the same way)."""
    from napari_masam.session import SegmentationSession

    return SegmentationSession.from_source("litemedsam", device="cpu")


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory, monkeypatch):
    """Models the widget loads keep embeddings in the per-user disk cache: a temporary one here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache_home")))


@pytest.fixture
def viewer_widget(make_napari_viewer):
    """A shown viewer with the segmentation widget docked."""
    from napari_masam._widget import MASAMWidget

    viewer = make_napari_viewer(show=True)
    widget = MASAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MA-SAM")
    yield viewer, widget
    if widget.worker is not None:  # never leave a thread running into the next test
        widget.cancel()
        import time

        from qtpy.QtCore import QCoreApplication

        t0 = time.perf_counter()
        while widget.worker is not None and time.perf_counter() - t0 < 60:
            QCoreApplication.processEvents()
