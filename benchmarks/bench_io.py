"""IO benchmark: random frame access vs sequential decode, memory of opening long videos, and
opening a 512 x 512 x 300 int16 NIfTI vs nibabel.load + get_fdata.

Run: ``python benchmarks/bench_io.py`` (``--quick`` for a smaller run). Prints ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_video(path: Path, n: int, h: int, w: int, gop: int) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(25))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": str(gop), "bf": "2", "preset": "ultrafast", "crf": "30"}
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for t in range(n):
            frame = np.roll(base, t * 3, axis=1)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def bench_random_access(tmp: Path, n: int, gop: int) -> None:
    import av

    from napari_masam.io.video import VideoReader

    path = write_video(tmp / "access.mp4", n, 360, 640, gop)
    t0 = time.perf_counter()
    with av.open(str(path)) as c:
        count = sum(1 for f in c.decode(video=0) if f.to_ndarray(format="rgb24") is not None)
    seq = time.perf_counter() - t0
    seq_rate = count / seq

    reader = VideoReader(path, cache_bytes=0)
    t0 = time.perf_counter()
    for i in range(len(reader)):
        reader[i]
    ours_seq_rate = len(reader) / (time.perf_counter() - t0)

    reader = VideoReader(path, cache_bytes=0)
    idx = np.random.default_rng(0).integers(0, n, 40)
    t0 = time.perf_counter()
    for i in idx:
        reader[int(i)]
    rand_rate = len(idx) / (time.perf_counter() - t0)
    print(f"video {n} frames 640x360, keyframe every {gop}:")
    print(f"  PyAV sequential decode+RGB      {seq_rate:8.1f} frames/s")
    print(
        f"  VideoReader sequential          {ours_seq_rate:8.1f} frames/s  ratio {ours_seq_rate / seq_rate:.2f}"
    )
    print(
        f"  VideoReader random access       {rand_rate:8.1f} frames/s  ratio {rand_rate / seq_rate:.3f}"
    )
    print(
        f"  (a random frame needs ~{gop / 2:.0f} decoded frames on average: expected ratio ~{2 / gop:.3f})"
    )


_PEAK = """
import sys, time
import av, numpy
from napari_masam.io.video import VideoReader

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak-RSS mark (Linux)
base = kib("VmRSS:")
t = time.perf_counter()
r = VideoReader(sys.argv[1])
r[len(r) // 2]
dt = time.perf_counter() - t
print(len(r), dt, kib("VmHWM:") - base)
"""


def bench_open_memory(tmp: Path, lengths: list[int]) -> None:
    print("opening a video (index + frame 0 + one middle frame), own process each:")
    first = None
    for n in lengths:
        path = write_video(tmp / f"long{n}.mp4", n, 180, 320, 50)
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True
        )
        frames, dt, kib = out.stdout.split()
        first = first or (max(int(kib), 1), float(dt))
        print(
            f"  {int(frames):6d} frames: open {float(dt) * 1000:7.1f} ms, peak RSS growth {int(kib) / 1024:6.1f} MiB"
            f"  (x{int(kib) / max(first[0], 1):.2f} memory, x{float(dt) / first[1]:.2f} time vs {lengths[0]} frames)"
        )


def bench_nifti(tmp: Path, shape: tuple[int, int, int]) -> None:
    import nibabel as nib

    from napari_masam.io.nifti import read_nifti

    rng = np.random.default_rng(0)
    vol = (rng.normal(0, 30, shape) + np.linspace(-500, 500, shape[2])).astype(np.int16)
    for ext in (".nii", ".nii.gz"):
        path = tmp / f"vol{ext}"
        nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.5, 1])), path)
        t0 = time.perf_counter()
        ref = nib.load(path).get_fdata()
        t_nib = time.perf_counter() - t0
        nbytes_nib = ref.nbytes
        del ref
        t0 = time.perf_counter()
        v = read_nifti(path, as_labels=False)
        t_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.asarray(v.data[shape[2] // 2])  # one axial slice, as napari shows it
        t_slice = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.asarray(v.data).sum()  # touch everything
        t_all = time.perf_counter() - t0
        print(f"NIfTI {shape} int16 {ext}:")
        print(
            f"  nibabel.load+get_fdata {t_nib * 1000:8.1f} ms, {nbytes_nib / 2**20:6.0f} MiB float64"
        )
        print(
            f"  read_nifti open        {t_open * 1000:8.1f} ms (+ first slice {t_slice * 1000:.1f} ms), "
            f"{np.asarray(v.data).nbytes / 2**20:6.0f} MiB {v.data.dtype}  ratio nibabel/ours {t_nib / (t_open + t_slice):.1f}x"
        )
        print(f"  read all voxels once   {t_all * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.quick:
            bench_random_access(tmp, 150, 30)
            bench_open_memory(tmp, [250, 2500])
            bench_nifti(tmp, (256, 256, 100))
        else:
            bench_random_access(tmp, 300, 50)
            bench_open_memory(tmp, [500, 5000, 20000])
            bench_nifti(tmp, (512, 512, 300))


if __name__ == "__main__":
    main()
