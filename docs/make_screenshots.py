"""Screenshots of the real segmentation widget for the README (docs/images/*.png).

Drives the widget the way a user does: open a sample from File > Open Sample > napari-masam,
dock Plugins > napari-masam > Segment, draw rectangles in the prompts layer, Run, wait for the
worker. Needs a display; run it under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py [--quick]

``--quick`` segments fewer video frames. Nothing here is faked: the pictures show what the
embedded LiteMedSAM returned on this machine. The automatic-mode picture uses an *untrained*
tiny MA-SAM checkpoint written on the fly (no trained multi-class weights ship with the
package), so it shows the controls and class naming, not accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "images"
WINDOW = (1560, 940)


def _wait(widget, timeout_s: float = 1800.0) -> None:
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    while widget.is_running and time.perf_counter() - t0 < timeout_s:
        QApplication.processEvents()
        time.sleep(0.01)
    if widget.is_running:
        raise TimeoutError("the segmentation run did not finish")
    for _ in range(20):  # let the canvas draw the last slices
        QApplication.processEvents()
        time.sleep(0.01)


def _rect(z: int, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
    return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)


def _viewer_with_widget():
    import napari

    viewer = napari.Viewer(title="napari-masam")
    viewer.window.resize(*WINDOW)
    _, widget = viewer.window.add_plugin_dock_widget("napari-masam", "Segment")
    return viewer, widget


def _save(viewer, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}")
    return path


def shot_volume_boxes() -> None:
    """CT phantom, two keyframe boxes around the left kidney, LiteMedSAM, Run."""
    viewer, widget = _viewer_with_widget()
    layers = viewer.open_sample("napari-masam", "ct_phantom")
    image = next(layer for layer in layers if layer._type_string == "image")
    truth = next(layer for layer in layers if layer._type_string == "labels")
    kidney = list(truth.features["class_name"]).index("kidney_left")
    mask = np.asarray(truth.data) == kidney
    viewer.layers.remove(truth)  # the user has no ground truth: draw boxes on the image
    widget._image.value = image
    prompts = widget.add_prompts_layer()
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    keyframes = (int(zs[2]), int(zs[-3]))
    for z in keyframes:
        rows, cols = np.nonzero(mask[z])
        prompts.add_rectangles(
            _rect(z, rows.min() - 3, cols.min() - 3, rows.max() + 3, cols.max() + 3)
        )
    widget.run()
    _wait(widget)
    viewer.dims.set_current_step(0, (keyframes[0] + keyframes[1]) // 2)
    viewer.layers.selection.active = widget.preview_layer
    _save(viewer, "widget_boxes_volume.png")
    viewer.close()


def shot_video(quick: bool) -> None:
    """Sample video (Big Buck Bunny), boxes on two frames around the rabbit, every frame between."""
    viewer, widget = _viewer_with_widget()
    (video,) = viewer.open_sample("napari-masam", "video")
    widget._image.value = video
    prompts = widget.add_prompts_layer()
    first, last = (44, 50) if quick else (40, 56)
    prompts.add_rectangles(_rect(first, 8, 50, 160, 170))
    prompts.add_rectangles(_rect(last, 5, 55, 160, 170))
    widget.run()
    _wait(widget)
    viewer.dims.set_current_step(0, (first + last) // 2)
    viewer.layers.selection.active = widget.preview_layer
    _save(viewer, "widget_video.png")
    viewer.close()


def shot_automatic(tmp: Path) -> None:
    """Automatic mode with a (tiny, untrained) MA-SAM checkpoint: class names + volume table."""
    import torch

    from napari_masam._widget import CHECKPOINT_CHOICE
    from napari_masam.checkpoints import save_checkpoint
    from napari_masam.model.base import ModelMetadata
    from napari_masam.model.masam import build_masam

    torch.manual_seed(0)
    meta = ModelMetadata(
        name="tiny-untrained-demo",
        class_names=("liver", "spleen", "kidney"),
        class_colors=("#c0392b", "#8e44ad", "#27ae60"),
        intensity_preset="ct_abdomen",
    )
    path = tmp / "tiny_untrained_demo.safetensors"
    save_checkpoint(build_masam("tiny", num_classes=3, metadata=meta), path)

    viewer, widget = _viewer_with_widget()
    layers = viewer.open_sample("napari-masam", "ct_phantom")
    for layer in [la for la in layers if la._type_string == "labels"]:
        viewer.layers.remove(layer)
    widget._image.value = layers[0]
    widget._model.value = CHECKPOINT_CHOICE
    widget._checkpoint.value = path
    widget._mode.value = "automatic"
    widget.run()
    _wait(widget)
    viewer.dims.set_current_step(0, 20)
    _save(viewer, "widget_automatic.png")
    viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="segment fewer video frames")
    parser.add_argument(
        "--only", choices=("volume", "video", "automatic"), action="append", help="pictures to make"
    )
    args = parser.parse_args()
    only = set(args.only or ("volume", "video", "automatic"))
    if "volume" in only:
        shot_volume_boxes()
    if "video" in only:
        shot_video(args.quick)
    if "automatic" in only:
        with tempfile.TemporaryDirectory() as tmp:
            shot_automatic(Path(tmp))


if __name__ == "__main__":
    main()
