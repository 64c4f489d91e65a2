"""The GUI harness works: a real napari viewer under Xvfb with an OpenGL canvas."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.gui
def test_viewer_opens_and_renders_layers(make_napari_viewer) -> None:
    # show=True: an unshown canvas is never exposed and renders black under Xvfb
    viewer = make_napari_viewer(show=True)
    volume = np.zeros((4, 32, 48), dtype=np.float32)
    volume[:, 8:24, 10:30] = 1.0
    image = viewer.add_image(volume, scale=(2.0, 0.5, 0.5), name="vol")
    labels = viewer.add_labels((volume > 0).astype(np.uint8), scale=(2.0, 0.5, 0.5))
    assert [layer.name for layer in viewer.layers] == ["vol", labels.name]
    # world extent (last pixel centre) honours the physical scale
    np.testing.assert_allclose(
        image.extent.world[1], (np.array(volume.shape) - 1) * [2.0, 0.5, 0.5]
    )
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[2] == 4
    # something other than the background got drawn
    assert len(np.unique(shot[..., :3].reshape(-1, 3), axis=0)) > 1
