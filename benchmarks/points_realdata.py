"""Do point prompts help the default model? Colin27 + AAL, 2-D Dice per slice (issue 17 point 5).

Debian's ``mricron-data`` ships the Colin27 T1 template (``ch2.nii.gz``), its brain mask
(``ch2bet.nii.gz``) and the AAL atlas (``aal.nii.gz``) on one 1 mm grid, read with
napari-masam's NIfTI reader in the display orientation. For the 8 deep structures of
``benchmarks/propagation_realdata.py`` (putamen, caudate, thalamus, hippocampus, left and right)
on three axial slices each (the central slice of the structure's extent and the slices
``--step`` above and below it), each slice is encoded ONCE (the engine's own
:class:`~napari_masam.preprocess.StackPipeline`: orientation, window, resize), then only the
decoder runs for:

(1) ``box``: a tight box (bounding box on the slice + 2 voxels) alone;
(2) ``box+1pos``: the box + one positive click at the structure's interior point farthest from
    its boundary (maximum of the Euclidean distance transform);
(3) ``box+kclk``: the box + k = 1, 2, 3 simulated correction clicks, the standard
    interactive-segmentation protocol: each click lies at the interior point farthest from the
    boundary of the largest error region (connected component, 8-connectivity) of the current
    prediction; negative in a false positive, positive in a false negative.

Points go through the engine's point road (:func:`napari_masam.inference.points_to_model_frame`)
and the model's own decoder (``LiteMedSAM.prompt_logits``: SAM's prompt encoder forward with
``points=(coords, labels), boxes=...``).

The issue's case, "boxes around the lateral ventricles segment the caudate/thalamus": the
ventricles' truth is defined reproducibly as the dark CSF inside ch2bet beside the caudate: voxels
of the brain mask eroded by 3 voxels whose T1 value is below 0.5 x the median T1 of that
eroded mask, in 3-D connected components (6-connectivity) of at least 1000 voxels that touch AAL
caudate (dilated by 2 voxels) and stay within the caudate's slice range +- 5 slices (this
excludes the cisterns and fissures, which connect far below). That gives exactly the two lateral
ventricles (7704 and 9502 voxels, slices 69-102); each is one object, boxed (tight box) on its
three axial slices of largest area. Then one negative click at the interior-most point of the
largest false-positive region of the box-only mask that lies in AAL caudate/thalamus (any false
positive if none does).

Command (2 shared CPU cores: about 2 minutes, 27 slice encodes)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/points_realdata.py [--model litemedsam]

Measured 2026-11-30 (embedded LiteMedSAM, torch backend, 1 thread, 2 shared cores; 57 s):

=============  =====  ========  ========  ========  ========
structure      box    box+1pos  box+1clk  box+2clk  box+3clk
=============  =====  ========  ========  ========  ========
putamen_L      0.719  0.716     0.652     0.652     0.617
putamen_R      0.700  0.692     0.734     0.765     0.790
caudate_L      0.736  0.760     0.732     0.725     0.678
caudate_R      0.796  0.805     0.787     0.795     0.793
thalamus_L     0.819  0.738     0.723     0.697     0.713
thalamus_R     0.811  0.869     0.905     0.832     0.741
hippocampus_L  0.651  0.386     0.317     0.278     0.246
hippocampus_R  0.430  0.466     0.426     0.454     0.452
MEAN (24)      0.708  0.679     0.660     0.650     0.629
=============  =====  ========  ========  ========  ========

Better than the box alone on 54 / 42 / 38 / 29 % of the slices, worse on 46 / 58 / 62 / 71 %.
Lateral ventricles (6 slices, 483-563 px each; the box-only masks grabbed 74-208 px of
caudate/thalamus): Dice 0.724 with the box, 0.727 with the negative click (per slice 0.500 ->
0.470, 0.766 -> 0.750, 0.873 -> 0.751, 0.704 -> 0.726, 0.752 -> 0.815, 0.748 -> 0.852).

Decision: clicks do not help LiteMedSAM on average (it was trained with box prompts only; each
further correction click lowers the mean), so ``LiteMedSAM.supports_points`` stays False (also
MA-SAM-Lite and the ONNX/OpenVINO runtimes) and the refusal says what was measured
(``napari_masam.model.lite.LITEMEDSAM_POINTS_REASON``). MA-SAM models take points (SAM's prompt
encoder, trained by Meta on clicks).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

# The data, the structures, the tight-box margin and Dice are propagation_realdata.py's (same
# folder; a script's folder is on sys.path).
from propagation_realdata import MARGIN, STRUCTURES, TEMPLATES, dice, load

MAX_CLICKS = 3
#: Ventricle definition (see the module docstring).
CSF_FRACTION = 0.5
BRAIN_EROSION = 3
CAUDATE = (71, 72)
CAUDATE_DILATION = 2
SLICE_SLACK = 5
MIN_VENTRICLE_VOXELS = 1000
VENTRICLE_SLICES = 3
DEEP_GREY = (71, 72, 77, 78)  # AAL caudate L/R, thalamus L/R


def tight_box(mask_yx: np.ndarray) -> tuple[int, int, int, int]:
    from napari_masam.prompts import expand_box, mask_box

    box = mask_box(mask_yx)
    if box is None:
        raise ValueError("empty mask")
    return expand_box(box, mask_yx.shape, margin_px=MARGIN)


def interior_point(region_yx: np.ndarray) -> tuple[int, int]:
    """(row, col) of the pixel of ``region_yx`` farthest from its boundary (ties: first)."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(region_yx, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c)


def largest_component(mask_yx: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(mask_yx, structure=np.ones((3, 3)))
    if n == 0:
        return mask_yx
    sizes = np.bincount(lab.ravel())[1:]
    return lab == 1 + int(np.argmax(sizes))


def correction_click(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int] | None:
    """The next simulated click (y, x, label) on the largest error region, None if perfect."""
    fn = largest_component(truth & ~pred)
    fp = largest_component(pred & ~truth)
    if not fn.any() and not fp.any():
        return None
    if fn.sum() >= fp.sum():
        return (*interior_point(fn), 1)
    return (*interior_point(fp), 0)


def ventricles(image: np.ndarray, brain: np.ndarray, atlas: np.ndarray) -> list[np.ndarray]:
    """The lateral ventricles' truth (module docstring): [(Z, Y, X) bool] one per ventricle."""
    from scipy import ndimage

    core = ndimage.binary_erosion(brain, iterations=BRAIN_EROSION)
    dark = core & (image < CSF_FRACTION * float(np.median(image[core])))
    lab, _ = ndimage.label(dark)
    caudate = np.isin(atlas, CAUDATE)
    zs = np.nonzero(caudate.any(axis=(1, 2)))[0]
    low, high = int(zs[0]) - SLICE_SLACK, int(zs[-1]) + SLICE_SLACK
    near = ndimage.binary_dilation(caudate, iterations=CAUDATE_DILATION)
    out = []
    for index in np.unique(lab[near]):
        if index == 0:
            continue
        comp = lab == index
        cz = np.nonzero(comp.any(axis=(1, 2)))[0]
        if comp.sum() >= MIN_VENTRICLE_VOXELS and cz[0] >= low and cz[-1] <= high:
            out.append(comp)
    return sorted(out, key=lambda m: float(np.nonzero(m)[2].mean()))  # by column


class Decoder:
    """One model + one stack: encode each slice once, decode any prompt on it."""

    def __init__(self, model, stack: np.ndarray) -> None:
        from napari_masam.preprocess import StackPipeline

        self.model = model
        self.pipe = StackPipeline.for_model(model, stack)
        self.embeddings: dict[int, object] = {}
        self.encode_s = 0.0

    def embedding(self, z: int):
        import torch

        if z not in self.embeddings:
            zm = self.pipe.transform.slice_to_model(z, self.pipe.depth)
            x = torch.from_numpy(self.pipe.group_input(self.pipe.members(zm)))[None]
            t0 = time.perf_counter()
            with torch.inference_mode():
                self.embeddings[z] = self.model.encode(x)[self.pipe.front : self.pipe.front + 1]
            self.encode_s += time.perf_counter() - t0
        return self.embeddings[z]

    def mask(self, z: int, box, points=()) -> np.ndarray:
        """Foreground mask (Y, X) of slice ``z`` for a stack-pixel box and (y, x, label) points."""
        import torch

        from napari_masam.inference import points_batch, points_to_model_frame
        from napari_masam.preprocess import probabilities_to_grid

        emb = self.embedding(z)
        boxes = torch.from_numpy(self.pipe.box_to_model(box)[None])
        batch = None
        if points:
            rows = points_to_model_frame(
                points, self.pipe.transform, self.pipe.stack_shape[1:], self.pipe.info
            )
            batch = points_batch([rows])
        with torch.inference_mode():
            x = self.model.prompt_logits(emb, boxes, batch)  # 1 x 1 x S x S
            p = probabilities_to_grid(torch.sigmoid(x), self.pipe.info)[0, 0].numpy()
        return np.ascontiguousarray(self.pipe.transform.inplane_from_model(p > 0.5))


def structure_slices(mask: np.ndarray, step: int) -> list[int]:
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    centre = int(zs[len(zs) // 2])
    return [z for z in (centre - step, centre, centre + step) if mask[z].any()]


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--templates", type=Path, default=TEMPLATES)
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--step", type=int, default=3, help="slices between measured slices")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from napari_masam.model.registry import build_model

    image, atlas, brain = load(args.templates)
    model = build_model(args.model)
    model = getattr(model, "reference", model)  # runtimes decode points through torch anyway
    dec = Decoder(model, image)
    columns = ["box", "box+1pos"] + [f"box+{k}clk" for k in range(1, MAX_CLICKS + 1)]
    table: dict[str, list[list[float]]] = {}
    t0 = time.perf_counter()
    for name, region in STRUCTURES.items():
        truth3 = atlas == region
        for z in structure_slices(truth3, args.step):
            truth = truth3[z]
            box = tight_box(truth)
            row = [dice(dec.mask(z, box), truth)]
            row.append(dice(dec.mask(z, box, [(*interior_point(truth), 1)]), truth))
            clicks: list[tuple[int, int, int]] = []
            pred = dec.mask(z, box)
            for _ in range(MAX_CLICKS):
                click = correction_click(pred, truth)
                if click is not None:
                    clicks.append(click)
                    pred = dec.mask(z, box, clicks)
                row.append(dice(pred, truth))
            table.setdefault(name, []).append(row)
    print(
        f"{args.model}: 2-D Dice on {sum(len(v) for v in table.values())} axial slices "
        f"(3 per structure, step {args.step}); encode {dec.encode_s:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    print(f"{'structure':15s}" + "".join(f"{c:>10s}" for c in columns))
    for name, rows in table.items():
        print(f"{name:15s}" + "".join(f"{v:10.3f}" for v in np.mean(rows, axis=0)))
    allrows = np.array([r for rows in table.values() for r in rows])
    print(f"{'MEAN':15s}" + "".join(f"{v:10.3f}" for v in allrows.mean(axis=0)))
    better = (allrows[:, 1:] > allrows[:, :1] + 1e-9).mean(axis=0)
    worse = (allrows[:, 1:] < allrows[:, :1] - 1e-9).mean(axis=0)
    print(f"{'slices better':15s}{'':10s}" + "".join(f"{v:10.0%}" for v in better))
    print(f"{'slices worse':15s}{'':10s}" + "".join(f"{v:10.0%}" for v in worse))

    deep = np.isin(atlas, DEEP_GREY)
    print(
        "\nLateral ventricles (dark CSF beside the caudate; module docstring): Dice of a tight box "
        "alone -> box + 1 negative click on the caudate/thalamus the box-only mask grabbed"
    )
    pairs = []
    for side, vent3 in zip(("L", "R"), ventricles(image, brain, atlas)):
        areas = vent3.sum(axis=(1, 2))
        for z in sorted(np.argsort(areas)[::-1][:VENTRICLE_SLICES].tolist()):
            truth = vent3[z]
            box = tight_box(truth)
            pred = dec.mask(z, box)
            fp = pred & ~truth
            grabbed = fp & deep[z]
            target = largest_component(grabbed if grabbed.any() else fp)
            if not target.any():
                print(f"  {side} slice {z}: box {dice(pred, truth):.3f} (no false positive)")
                continue
            click = (*interior_point(target), 0)
            after = dec.mask(z, box, [click])
            pairs.append((dice(pred, truth), dice(after, truth)))
            print(
                f"  ventricle {side} slice {z} ({int(truth.sum())} px): box {pairs[-1][0]:.3f} "
                f"(grabbed {int(grabbed.sum())} px caudate/thalamus) -> + negative click at "
                f"(y, x) {click[:2]}: {pairs[-1][1]:.3f} (grabbed "
                f"{int((after & ~truth & deep[z]).sum())} px)"
            )
    if pairs:
        before, after = np.mean(pairs, axis=0)
        print(f"  MEAN box {before:.3f} -> box + negative click {after:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
