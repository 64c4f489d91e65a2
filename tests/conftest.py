"""Shared fixtures. torch and torchvision are imported here, before any Qt/GL object exists:
importing torchvision after a viewer created a GL context crashes the process."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
import torchvision  # noqa: F401  (import order matters, see module docstring)

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")

#: Real volumes shipped by Debian's mricron-data (installed by .ci/run).
MRICRON_DIR = pathlib.Path("/usr/share/mricron/templates")


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} is missing: install Debian's mricron-data (bash .ci/run does)")
    return path


@pytest.fixture(scope="session")
def ch2_path() -> pathlib.Path:
    """Colin27 T1 head, RAS, 1 mm (181 x 217 x 181)."""
    return _require(MRICRON_DIR / "ch2.nii.gz")


@pytest.fixture(scope="session")
def ch2bet_path() -> pathlib.Path:
    """Colin27 brain only, same grid as ch2: ``> 0`` is a real brain mask."""
    return _require(MRICRON_DIR / "ch2bet.nii.gz")


@pytest.fixture(scope="session")
def aal_path() -> pathlib.Path:
    """AAL atlas (116 regions) on the ch2 grid."""
    return _require(MRICRON_DIR / "aal.nii.gz")


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """The suite never writes into the user's cache folder (runtime exports, embeddings):
    platformdirs reads XDG_CACHE_HOME at each call, so one folder serves the whole session
    (the OpenVINO/ONNX export of LiteMedSAM is made once per run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user_cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    # Tiny test models gain nothing from intra-op threads, and oversubscribing two cores
    # (pytest-qt worker threads run beside the main thread) made them ~10x slower.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available; everything else always runs."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
