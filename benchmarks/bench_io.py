"""IO benchmark: random frame access vs sequential decode; time to first frame and memory after
opening 1-min and 60-min videos as ratios to a 10-s one (mp4: sample table; mkv: packet scan);
opening a 512 x 512 x 300 int16 NIfTI vs nibabel.load + get_fdata.

Run: ``python benchmarks/bench_io.py`` (``--quick`` for a smaller run; ``--hd`` for opening
1080p mp4 clips with 10-s keyframe intervals, the worst case for the last-GOP count). Prints
ratios.
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


def write_video(path: Path, n: int, h: int, w: int, gop: int, smooth: bool = False) -> Path:
    """A test clip: a rolling noise picture (poorly compressible), or with ``smooth`` a
    gradient with a moving square (small files even at 1080p)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(25))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {
            "g": str(gop),
            "bf": "2",
            "preset": "ultrafast",
            "crf": "30",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
        }
        rng = np.random.default_rng(0)
        if smooth:
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1)
            base = base.astype(np.uint8)
        else:
            base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for t in range(n):
            frame = np.roll(base, t * 3, axis=1)
            if smooth:
                frame[(t * 7) % (h - 40) :][:40, (t * 11) % (w - 40) :][:, :40] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def repeat_video(src: Path, dst: Path, times: int) -> Path:
    """``src`` played ``times`` times in a row, by copying its packets (closed GOPs, so the
    result decodes like one long recording; no re-encoding, so a 60-min clip takes seconds)."""
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        sin = i.streams.video[0]
        sout = o.add_stream_from_template(sin)
        packets = [p for p in i.demux(sin) if p.size]
        span = max(p.pts for p in packets) - min(p.pts for p in packets) + packets[1].duration
        span = span or packets[0].duration
        for r in range(times):
            for p in packets:
                q = av.Packet(bytes(p))
                q.pts, q.dts = p.pts + r * span, p.dts + r * span
                q.time_base, q.is_keyframe, q.stream = p.time_base, p.is_keyframe, sout
                o.mux(q)
    return dst


def bench_random_access(tmp: Path, n: int, gop: int) -> None:
    import av

    from napari_masam.io.video import VideoReader

    path = write_video(tmp / "access.mp4", n, 360, 640, gop)
    rounds: dict[str, list[float]] = {"pyav": [], "seq": [], "rand": []}
    idx = np.random.default_rng(0).integers(0, n, 40)
    for _ in range(3):  # interleaved: the machine's load hits all three alike
        t0 = time.perf_counter()
        with av.open(str(path)) as c:
            count = sum(1 for f in c.decode(video=0) if f.to_ndarray(format="rgb24") is not None)
        rounds["pyav"].append(count / (time.perf_counter() - t0))
        reader = VideoReader(path, cache_bytes=0)
        t0 = time.perf_counter()
        for i in range(len(reader)):
            reader[i]
        rounds["seq"].append(len(reader) / (time.perf_counter() - t0))
        reader = VideoReader(path, cache_bytes=0)
        t0 = time.perf_counter()
        for i in idx:
            reader[int(i)]
        rounds["rand"].append(len(idx) / (time.perf_counter() - t0))
    pyav, seq, rand = (float(np.median(v)) for v in rounds.values())
    print(f"video {n} frames 640x360, keyframe every {gop} (median of 3 interleaved rounds):")
    print(f"  PyAV sequential decode+RGB      {pyav:8.1f} frames/s")
    print(f"  VideoReader sequential          {seq:8.1f} frames/s  ratio to PyAV {seq / pyav:.2f}")
    print(
        f"  VideoReader random access       {rand:8.1f} frames/s  ratio to sequential "
        f"{rand / seq:.3f}"
    )
    print(
        f"  (a random frame needs ~{gop / 2:.0f} decoded frames on average: "
        f"expected ratio ~{2 / gop:.3f})"
    )


_OPEN = """
import sys, time
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
r[0]
first = time.perf_counter() - t
after_open = kib("VmRSS:") - base
t = time.perf_counter()
r[len(r) // 2]
middle = time.perf_counter() - t
print(len(r), first, after_open, kib("VmHWM:") - base, middle, r.index_source)
"""


def bench_open(
    tmp: Path,
    fps: int = 25,
    gop: int = 50,
    repeats: int = 3,
    size: tuple[int, int] = (180, 320),
    containers: tuple[str, ...] = (".mp4", ".mkv"),
) -> None:
    """Time to first frame and memory after open for 10-s, 1-min and 60-min clips."""
    h, w = size
    print(
        f"opening a video (table + frame 0 + last-GOP count), own process each, {w}x{h}, "
        f"keyframe every {gop}:"
    )
    base = write_video(tmp / "base10s.mp4", 10 * fps, h, w, gop, smooth=h > 360)
    clips = {"10 s": base}
    for label, times in (("1 min", 6), ("60 min", 360)):
        clips[label] = repeat_video(base, tmp / f"long{times}.mp4", times)
    for suffix in containers:
        rows = {}
        for label, path in clips.items():
            if suffix == ".mkv":
                path = repeat_video(path, path.with_suffix(".mkv"), 1)
            runs = []
            for _ in range(repeats):
                out = subprocess.run(
                    [sys.executable, "-c", _OPEN, str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(out.stdout.split())
            frames, source = int(runs[0][0]), runs[0][5]
            first = float(np.median([float(r[1]) for r in runs]))
            rss = float(np.median([int(r[2]) for r in runs])) / 1024
            peak = float(np.median([int(r[3]) for r in runs])) / 1024
            middle = float(np.median([float(r[4]) for r in runs]))
            rows[label] = (frames, first, rss, peak, middle, source)
        ref = rows["10 s"]
        print(f"  {suffix} ({ref[5]} index):")
        for label, (frames, first, rss, peak, middle, _) in rows.items():
            print(
                f"    {label:>6} {frames:6d} frames: first frame {first * 1000:7.1f} ms "
                f"(x{first / ref[1]:.2f}), RSS after open {rss:6.1f} MiB (x{rss / ref[2]:.2f}), "
                f"peak {peak:6.1f} MiB (x{peak / ref[3]:.2f}), a middle frame {middle * 1000:.0f} ms"
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
    parser.add_argument(
        "--hd", action="store_true", help="only: open 10-s/1-min/60-min 1080p mp4 clips"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.hd:
            bench_open(tmp, gop=250, size=(1080, 1920), containers=(".mp4",))
        elif args.quick:
            bench_random_access(tmp, 150, 30)
            bench_open(tmp, repeats=1)
            bench_nifti(tmp, (256, 256, 100))
        else:
            bench_random_access(tmp, 300, 50)
            bench_open(tmp)
            bench_nifti(tmp, (512, 512, 300))


if __name__ == "__main__":
    main()
