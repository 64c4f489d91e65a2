"""Structural guarantees every change keeps: the manifest resolves, the core stays headless."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import napari_masam

MANIFEST = Path(napari_masam.__file__).parent / "napari.yaml"


def _python_names() -> list[str]:
    manifest = yaml.safe_load(MANIFEST.read_text())
    return [c["python_name"] for c in manifest["contributions"]["commands"]]


@pytest.mark.parametrize("python_name", _python_names())
def test_manifest_python_name_imports(python_name: str) -> None:
    module_name, attr = python_name.split(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr)), python_name


def test_manifest_validates_with_npe2() -> None:
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-masam")
    assert manifest.name == "napari-masam"
    ids = {c.id for c in manifest.contributions.commands}
    assert "napari-masam.segment_widget" in ids
    # the plugin is discoverable the way napari discovers it
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover()
    assert "napari-masam" in pm._manifests


_GUI_MODULES = ("qtpy", "napari", "magicgui", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6")
_CORE = (
    "napari_masam.model",
    "napari_masam.model.base",
    "napari_masam.model.adapters",
    "napari_masam.model.registry",
    "napari_masam.devices",
    "napari_masam.checkpoints",
    "napari_masam.weights",
    "napari_masam.preprocess",
    "napari_masam.prompts",
    "napari_masam.inference",
    "napari_masam.cache",
    "napari_masam.session",
    "napari_masam.io",
    "napari_masam.cli",
    "napari_masam.batch",
    "napari_masam.training",
    "napari_masam.training.loop",
)


def _imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.split(".")[0] for line in out.stdout.split()}


def test_core_imports_no_gui() -> None:
    existing = [m for m in _CORE if importlib.util.find_spec(m) is not None]
    loaded = _imported_after("\n".join(f"import {m}" for m in existing))
    assert "torch" in loaded  # the check really imported the core
    assert not loaded & set(_GUI_MODULES), sorted(loaded & set(_GUI_MODULES))


def test_package_import_is_light() -> None:
    loaded = _imported_after(
        "import napari_masam, napari_masam._reader, napari_masam._writer, "
        "napari_masam._sample_data, napari_masam._widget, napari_masam._train_widget\n"
        "from napari_masam.model import MODEL_REGISTRY"
    )
    assert "napari_masam" in loaded
    assert "torch" not in loaded
