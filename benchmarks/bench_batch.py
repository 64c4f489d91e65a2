"""Batch throughput: sequential vs a 2-worker Dask LocalCluster, same inputs, same tiny model.

Run: ``python benchmarks/bench_batch.py`` (``--quick`` for fewer inputs). Prints files/s and
frames/s (slices + video frames) of

- ``sequential``: :func:`napari_masam.batch.run_batch` in this process (torch's default threads);
- ``dask``: :func:`napari_masam.distributed.run_distributed` on a ``LocalCluster`` of 2 worker
  processes with 1 torch thread each (model loaded once per worker),

and their ratio, with and without the cluster's start-up (process spawn + imports + model load).
Outputs are compared so that the speed-up is not bought with different results.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import av
import nibabel as nib
import numpy as np


def make_inputs(folder: Path, n_volumes: int, n_videos: int, depth: int, frames: int) -> int:
    """Write synthetic volumes and videos; return the number of slices + frames."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n_volumes):
        data = rng.normal(100, 30, (48, 48, depth)).astype(np.float32)
        data[12:36, 10 + i : 30 + i] += 400
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.5, 1.0])), folder / f"vol{i}.nii.gz")
        total += depth
    for i in range(n_videos):
        with av.open(str(folder / f"clip{i}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width = stream.height = 48
            stream.pix_fmt = "yuv420p"
            for t in range(frames):
                frame = np.full((48, 48, 3), 30, np.uint8)
                frame[10:30, t % 30 : t % 30 + 16] = 220
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        total += frames
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller inputs")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import torch
    from distributed import Client, LocalCluster

    from napari_masam import batch
    from napari_masam.checkpoints import save_checkpoint
    from napari_masam.distributed import default_threads, run_distributed
    from napari_masam.model.masam import build_masam

    n_volumes, n_videos, depth, frames = (4, 1, 6, 12) if args.quick else (8, 2, 10, 30)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        n_frames = make_inputs(root / "in", n_volumes, n_videos, depth, frames)
        torch.manual_seed(0)
        checkpoint = root / "tiny.safetensors"
        save_checkpoint(build_masam("tiny", num_classes=2), checkpoint)
        items, _ = batch.discover_inputs([root / "in"])
        spec = batch.ModelSpec(checkpoint=str(checkpoint), device="cpu")
        n_files = len(items)
        print(
            f"{n_files} inputs ({n_volumes} volumes x {depth} slices, {n_videos} videos x "
            f"{frames} frames = {n_frames} slices/frames), tiny MA-SAM (D = 5, 64 px), "
            f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
        )

        def sequential(out: str, threads: int | None = None) -> tuple[list, float]:
            before = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            start = time.perf_counter()
            results = batch.run_batch(items, batch.BatchConfig(spec, root / out), holder=holder)
            seconds = time.perf_counter() - start
            torch.set_num_threads(before)
            return results, seconds

        # sequential in this process: cold (model load, first calls), then warm
        holder = batch.SessionHolder(spec)
        default = torch.get_num_threads()
        seq, t_seq_cold = sequential("seq-cold")
        _, t_seq = sequential("seq-warm")
        _, t_seq1 = sequential("seq-warm-1thread", threads=1)

        # resume: a rerun on up-to-date outputs hashes inputs (as before) and, since the outputs
        # carry their digest in the sidecar, the outputs too; measured interleaved, median of 3
        resume, digests = [], []
        for _ in range(3):
            again, seconds = sequential("seq-warm")
            if any(r.status != "skipped" for r in again):
                raise SystemExit("resume did not skip up-to-date outputs")
            resume.append(seconds)
            start = time.perf_counter()
            for r in again:
                for out in r.outputs:
                    batch.output_digest(Path(out))
            digests.append(time.perf_counter() - start)
        t_resume, t_digest = float(np.median(resume)), float(np.median(digests))

        # dask: cluster start, a cold batch (worker imports + model load), then a warm batch
        threads = default_threads(args.workers)
        start = time.perf_counter()
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=40,
        )
        client = Client(cluster)
        t_start = time.perf_counter() - start
        timings = []
        for out in ("dask-cold", "dask-warm"):
            start = time.perf_counter()
            par = run_distributed(
                items,
                batch.BatchConfig(spec, root / out),
                client=client,
                threads_per_worker=threads,
            )
            timings.append(time.perf_counter() - start)
        t_dask_cold, t_dask = timings
        client.close()
        cluster.close()

        failed = [r for r in seq + par if r.status != "done"]
        if failed:
            raise SystemExit(f"benchmark inputs failed: {[r.error for r in failed]}")
        for a, b in zip(seq, par):
            for out_a, out_b in zip(a.outputs, b.outputs):
                if out_a.endswith(".nii.gz"):
                    same = np.array_equal(
                        np.asarray(nib.load(out_a).dataobj), np.asarray(nib.load(out_b).dataobj)
                    )
                    if not same:
                        raise SystemExit(f"dask and sequential differ for {a.input}")

        def rates(seconds: float) -> str:
            return f"{n_files / seconds:6.2f} files/s {n_frames / seconds:7.1f} frames/s"

        print(
            f"sequential cold, 1 process x {default} threads: {t_seq_cold:7.2f} s  {rates(t_seq_cold)}"
        )
        print(f"sequential warm, 1 process x {default} threads: {t_seq:7.2f} s  {rates(t_seq)}")
        print(f"sequential warm, 1 process x 1 thread:   {t_seq1:7.2f} s  {rates(t_seq1)}")
        print(
            f"resume, all up to date:                  {t_resume:7.2f} s  (output digests "
            f"{t_digest:.3f} s = {100 * t_digest / t_resume:.0f} % of it)"
        )
        print(
            f"dask cold, {args.workers} workers x {threads} thread(s):   {t_dask_cold:7.2f} s  "
            f"{rates(t_dask_cold)}  (+ cluster start {t_start:.2f} s)"
        )
        print(
            f"dask warm, {args.workers} workers x {threads} thread(s):   {t_dask:7.2f} s  {rates(t_dask)}"
        )
        print(
            f"ratio dask / sequential throughput: warm {t_seq / t_dask:.2f}x, cold "
            f"{t_seq_cold / (t_dask_cold + t_start):.2f}x (cluster start included); "
            f"warm vs 1-thread sequential {t_seq1 / t_dask:.2f}x (parallel efficiency, ideal "
            f"{args.workers}x)"
        )
        print(
            "why: 2 workers x 1 thread use the same 2 cores as 1 process x 2 threads, so on an "
            "idle 2-core machine expect about 1x: workers gain by overlapping decoding, IO and "
            "Python overhead with inference and by avoiding intra-op thread synchronisation on "
            "small tensors; they pay process start-up, a second model load and scheduling. On "
            "a shared, oversubscribed machine 2 single-threaded processes also win a larger share "
            "of the CPU and do not spin waiting for a descheduled sibling thread. The ratio vs "
            "the 1-thread sequential run is the parallel efficiency over workers (ideal 2x). "
            "Real scale-out: one worker per GPU or per node, on a Dask cluster."
        )


if __name__ == "__main__":
    main()
