"""Engine benchmark: the cost of the authors' overlap, streaming memory, cached box latency.

Run: ``python benchmarks/bench_inference.py [--quick] [--device cpu|cuda] [--backbone tiny|vit_b]``

Prints, in one run and as ratios:

1. automatic mode slices/s at stride 1 (the authors: every slice encoded D times) vs stride D;
2. peak RSS of whole runs at two depths (child processes) vs the growth of the input itself
   (flat = the engine streams);
3. box latency with a cold vs a warm embedding cache (goal: warm >= 10x faster), for the tiny
   MA-SAM and for the embedded LiteMedSAM when its package is installed;
4. on CUDA: slices/s with fp32 vs autocast (bf16/fp16);
5. a box run over 20 consecutive boxed slices: ``windows="centred"`` vs ``"tiled"`` (no cache).

Random-weight models: speed and memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from napari_masam.cache import EmbeddingCache
from napari_masam.inference import iter_segment_automatic, iter_segment_boxes, run


def build(backbone: str, device: str):
    from napari_masam.model.config import MASAM_CONFIGS
    from napari_masam.model.masam import build_masam

    torch.manual_seed(0)
    config = MASAM_CONFIGS[backbone]
    model = build_masam(config, num_classes=3).eval()
    return model.to(device)


def ct_volume(depth: int, size: int, seed: int = 0) -> np.ndarray:
    """(depth, size, size) int16 HU, built slice by slice (no float64 volume: peak RSS honest)."""
    rng = np.random.default_rng(seed)
    vol = np.empty((depth, size, size), np.int16)
    for z in range(depth):
        s = rng.normal(0, 150, size=(size, size))
        s[size // 4 : size // 2, size // 3 : 2 * size // 3] += 300
        vol[z] = s
    return vol


def slices_per_s(model, vol, *, stride: int, device: str, autocast: bool = True) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(
        iter_segment_automatic(
            model, vol, preset="ct_abdomen", stride=stride, device=device, autocast=autocast
        )
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return len(vol) / (time.perf_counter() - t0)


def rss_child(depth: int, size: int, backbone: str) -> None:
    """Child process: one automatic run; prints peak RSS (bytes) and the input's bytes."""
    torch.set_num_threads(1)
    model = build(backbone, "cpu")
    vol = ct_volume(depth, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run(iter_segment_automatic(model, vol, preset="ct_abdomen", stride=model.slices_per_group))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "before": before, "input": vol.nbytes}))


def peak_rss(depth: int, size: int, backbone: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-child",
            str(depth),
            "--size",
            str(size),
            "--backbone",
            backbone,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def box_latency(model, vol, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of one box on one slice: cold (fresh cache) vs warm (same slice cached)."""
    cold, warm = [], []
    z = len(vol) // 2
    for r in range(repeats):
        cache = EmbeddingCache()
        box = {1: {z: (10 + r, 12, vol.shape[2] // 2, vol.shape[1] // 2)}}
        t0 = time.perf_counter()
        run(iter_segment_boxes(model, vol, box, device=device, cache=cache))
        cold.append(time.perf_counter() - t0)
        box2 = {2: {z: (vol.shape[2] // 3, 20, vol.shape[2] - 5, vol.shape[1] - 9)}}
        t0 = time.perf_counter()
        res = run(iter_segment_boxes(model, vol, box2, device=device, cache=cache))
        warm.append(time.perf_counter() - t0)
        assert res.timings["windows_encoded"] == 0
    return float(np.median(cold)), float(np.median(warm))


def box_run_s(model, vol, boxed: int, device: str, windows: str) -> float:
    """Seconds of one box run with a box on each of ``boxed`` consecutive slices, no cache."""
    z0 = (len(vol) - boxed) // 2
    boxes = {1: {z: (10, 12, vol.shape[2] // 2, vol.shape[1] // 2) for z in range(z0, z0 + boxed)}}
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(iter_segment_boxes(model, vol, boxes, device=device, windows=windows))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="tiny", help="MA-SAM config: tiny, vit_b, ...")
    parser.add_argument("--size", type=int, default=None, help="slice side in pixels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-lite", action="store_true", help="skip the LiteMedSAM box latency")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child, args.size, args.backbone)
        return
    torch.set_num_threads(args.threads)
    device = args.device
    model = build(args.backbone, device)
    size = args.size or model.image_size
    group = model.slices_per_group
    print(
        f"# device {device} ({torch.cuda.get_device_name() if device == 'cuda' else os.cpu_count()} "
        f"cpus, {args.threads} torch threads), MA-SAM {args.backbone}: S={model.image_size}, D={group}"
    )

    # 1. stride 1 vs stride D
    depth = 10 if args.quick else 40
    vol = ct_volume(depth, size)
    slices_per_s(model, vol[:group], stride=1, device=device)  # warm-up
    s1 = slices_per_s(model, vol, stride=1, device=device)
    sd = slices_per_s(model, vol, stride=group, device=device)
    print(
        f"automatic, {depth} slices of {size}^2: stride 1 {s1:.2f} slices/s, stride {group} "
        f"{sd:.2f} slices/s -> stride {group} is {sd / s1:.2f}x faster (authors' overlap costs that)"
    )

    # 4. fp32 vs autocast on CUDA
    if device == "cuda":
        f32 = slices_per_s(model, vol, stride=1, device=device, autocast=False)
        amp = slices_per_s(model, vol, stride=1, device=device, autocast=True)
        print(
            f"cuda stride 1: fp32 {f32:.2f} slices/s, autocast {amp:.2f} slices/s -> {amp / f32:.2f}x"
        )

    # 2. peak RSS vs depth (child processes, CPU)
    if device == "cpu":
        d_small, d_large = (40, 160) if args.quick else (100, 400)
        rss_size = 256
        a = peak_rss(d_small, rss_size, args.backbone)
        b = peak_rss(d_large, rss_size, args.backbone)
        growth = b["peak"] - a["peak"]
        in_growth = b["input"] - a["input"]
        out_growth = in_growth // 2  # uint8 labels of int16 input
        extra = growth - in_growth - out_growth
        print(
            f"peak RSS, {rss_size}^2 int16 slices: depth {d_small} {a['peak'] / 2**20:.0f} MiB, "
            f"depth {d_large} {b['peak'] / 2**20:.0f} MiB; growth {growth / 2**20:.1f} MiB = "
            f"{growth / in_growth:.2f} x the input growth ({in_growth / 2**20:.1f} MiB; the "
            f"output labels add 0.5 x); engine's own growth {extra / 2**20:+.1f} MiB "
            f"= {extra / in_growth:+.2f} x input growth (flat = 0)"
        )

    # 3. box latency cold vs warm
    repeats = 2 if args.quick else 5
    vol = ct_volume(7, size, seed=1)
    cold, warm = box_latency(model, vol, device, repeats)
    print(
        f"box latency MA-SAM {args.backbone}: cold {cold * 1e3:.1f} ms, warm {warm * 1e3:.1f} ms "
        f"-> warm {cold / warm:.1f}x faster (goal >= 10x)"
    )

    # 5. box run over 20 boxed slices: centred windows vs tiled groups
    vol = ct_volume(24, size, seed=3)
    box_run_s(model, vol[:group], 1, device, "tiled")  # warm-up
    centred = box_run_s(model, vol, 20, device, "centred")
    tiled = box_run_s(model, vol, 20, device, "tiled")
    print(
        f"box run, 20 boxed slices, MA-SAM {args.backbone}: centred {centred:.2f} s, tiled "
        f"{tiled:.2f} s -> tiled {centred / tiled:.2f}x faster (D={group}: ideal ~{group}x)"
    )
    if not args.no_lite:
        try:
            from napari_masam.model.lite import build_litemedsam
        except ImportError as exc:
            print(f"LiteMedSAM skipped: {exc}")
            return
        lite = build_litemedsam(device=device).eval()
        vol = ct_volume(3, 181, seed=2)
        cold, warm = box_latency(lite, vol, device, 1 if args.quick else 3)
        print(
            f"box latency LiteMedSAM (181^2 slice -> 256): cold {cold * 1e3:.0f} ms, warm "
            f"{warm * 1e3:.0f} ms -> warm {cold / warm:.1f}x faster (goal >= 10x)"
        )


if __name__ == "__main__":
    main()
