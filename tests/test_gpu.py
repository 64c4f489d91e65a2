"""CUDA path and mixed precision (run only where a CUDA device exists; skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_masam.devices import autocast_dtype, resolve_device
from napari_masam.inference import iter_segment_automatic, run
from napari_masam.model.config import MASAM_CONFIGS
from napari_masam.model.masam import build_masam

pytestmark = pytest.mark.gpu


def _volume(depth: int = 12, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    _z, y, x = np.mgrid[:depth, :size, :size]
    vol = np.where((y - 30) ** 2 + (x - 30) ** 2 < 200, 150.0, -50.0)
    return (vol + rng.normal(0, 20, vol.shape)).astype(np.float32)


def test_auto_device_is_cuda_and_autocast_is_half_precision() -> None:
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert autocast_dtype(device) in (torch.bfloat16, torch.float16)


def test_cuda_autocast_labels_agree_with_cpu_fp32() -> None:
    torch.manual_seed(0)
    model = build_masam(MASAM_CONFIGS["tiny"], num_classes=3).eval()
    vol = _volume()
    cpu = run(iter_segment_automatic(model, vol, preset="ct_abdomen", device="cpu")).labels
    gpu = run(
        iter_segment_automatic(model, vol, preset="ct_abdomen", device="cuda", autocast=True)
    ).labels
    assert gpu.shape == cpu.shape
    # half precision may flip near-tied voxels, nothing more
    assert (gpu == cpu).mean() > 0.98


def test_gpu_keeps_torch_for_litemedsam(tmp_path) -> None:
    """On a GPU the fast CPU runtimes are not used: torch + autocast stays (no export)."""
    from napari_masam.model.lite import build_litemedsam
    from napari_masam.model.runtime import backend_info

    model = build_litemedsam(device="cuda", backend="auto", export_dir=tmp_path)
    assert type(model).__name__ == "LiteMedSAM"
    assert next(model.parameters()).device.type == "cuda"
    info = backend_info(model)
    assert info.backend == "torch" and "cuda" in info.fallback_reason
    assert not any(tmp_path.iterdir())
