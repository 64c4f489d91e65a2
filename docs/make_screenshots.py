"""Screenshots of the real segmentation widget for the README (docs/images/*.png).

Drives the widget the way a user does: open a sample from File > Open Sample > MA-SAM
segmentation, dock Plugins > MA-SAM segmentation > Segment, draw one rectangle in the prompts
layer, Run (propagation follows the object), rename it in the object table. Needs a display; run it under Xvfb::

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


def _rename_object(widget, object_id: int, name: str) -> None:
    """Edit the object's name cell in the object table, as a user does."""
    table = widget.object_table
    for row in range(table.rowCount()):
        if table.item(row, 0).text() == str(object_id):
            table.item(row, 1).setText(name)


def shot_volume_boxes() -> None:
    """CT phantom, ONE box around the left kidney on its central slice, propagated, LiteMedSAM."""
    viewer, widget = _viewer_with_widget()
    layers = viewer.open_sample("napari-masam", "ct_phantom")
    image = next(layer for layer in layers if layer._type_string == "image")
    truth = next(layer for layer in layers if layer._type_string == "labels")
    kidney = list(truth.features["class_name"]).index("kidney_left")
    mask = np.asarray(truth.data) == kidney
    viewer.layers.remove(truth)  # the user has no ground truth: draw a box on the image
    widget._image.value = image
    prompts = widget.add_prompts_layer()
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    z = int(zs[len(zs) // 2])
    rows, cols = np.nonzero(mask[z])
    prompts.add_rectangles(_rect(z, rows.min() - 3, cols.min() - 3, rows.max() + 3, cols.max() + 3))
    viewer.dims.set_current_step(0, z)
    widget.run()
    _wait(widget)
    _rename_object(widget, 1, "left kidney")
    viewer.dims.set_current_step(0, int(zs[len(zs) // 4]))  # a slice the box was not drawn on
    _save(viewer, "widget_boxes_volume.png")
    viewer.close()


def shot_video(quick: bool) -> None:
    """Sample video (Big Buck Bunny): ONE box around the rabbit, tracked over the next frames."""
    viewer, widget = _viewer_with_widget()
    (video,) = viewer.open_sample("napari-masam", "video")
    widget._image.value = video
    prompts = widget.add_prompts_layer()
    first, last = (44, 50) if quick else (40, 56)
    prompts.add_rectangles(_rect(first, 8, 50, 160, 170))
    widget._first_slice.value = first
    widget._last_slice.value = last
    widget.run()
    _wait(widget)
    _rename_object(widget, 1, "rabbit")
    viewer.dims.set_current_step(0, (first + last) // 2)
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
