"""Where the GUI thread stalls during the first and the second Run after napari starts.

Run (a display is needed; Xvfb with software OpenGL is what CI and this machine have)::

    OMP_NUM_THREADS=1 xvfb-run -a -s "-screen 0 1280x1024x24" \
        .venv/bin/python benchmarks/gui_freeze.py [--sample head_mri|ct_phantom] [--propagate]

What it does, as a user would: a fresh ``napari.Viewer(show=True)``, *File > Open Sample >
MA-SAM segmentation > ...*, *Plugins > MA-SAM segmentation > Segment* (docked the way the
Plugins menu does), **Add prompts layer**, one rectangle on a slice of the prompts layer, a click
on the real **Run** button; then a second box (object 2) on another slice and Run again in the
same process. While it runs:

- a ``QTimer`` heartbeat every 20 ms on the GUI thread; a *stall* is a gap > 100 ms;
- the widget's GUI-thread phases are timestamped (run start, preview creation, model loaded,
  every progress callback, result, finish, object table, undo step);
- a sampler thread reads the main thread's Python stack every 5 ms
  (``sys._current_frames``), so each stall names the functions the GUI thread was in.

Printed per run: total time (click -> finished), the longest stalls with the phase they fall
in and the deepest functions common to most samples, and the total time the GUI thread spent in
each widget phase. ``--variant-src DIR`` imports napari_masam from another source tree (e.g. an
older commit unpacked with ``git archive``) so two versions can be compared run after run.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import threading
import time

GAP_MS = 100.0
TICK_MS = 20
SAMPLE_S = 0.005
PHASES = (
    "run",
    "_start",
    "_ensure_preview",
    "_on_progress",
    "_on_returned",
    "_refresh_objects",
    "_on_finished",
    "_record_undo_step",
    "_sync_model",
    "_keep_prompts_active",
    "reset_choices",
)


class Sampler(threading.Thread):
    """Samples the main thread's Python stack every ``SAMPLE_S`` seconds."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.main_id = threading.main_thread().ident
        self.samples: list[tuple[float, tuple]] = []
        self.others: list[tuple[float, tuple]] = []  # (t, leaf frames of the other threads)
        self.stop = False

    def run(self) -> None:
        me = threading.get_ident()
        while not self.stop:
            frames = sys._current_frames()
            frame = frames.get(self.main_id)
            stack = []
            while frame is not None and len(stack) < 80:
                stack.append((frame.f_code, frame.f_lineno))
                frame = frame.f_back
            now = time.perf_counter()
            self.samples.append((now, tuple(stack)))
            others = []
            for ident, other in frames.items():
                if ident in (self.main_id, me) or other is None:
                    continue
                chain, f = [], other
                while f is not None and len(chain) < 80:  # the worker's engine/model frame
                    chain.append(f.f_code)
                    f = f.f_back
                if any("threading.py" not in c.co_filename for c in chain[:1]):
                    others.append(tuple(chain))
            self.others.append((now, tuple(others)))
            time.sleep(SAMPLE_S)


def _name(code, lineno: int) -> str:
    path = code.co_filename
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{code.co_name}:{lineno}"


def _describe_stall(t0: float, t1: float, sampler: Sampler, phases: list) -> tuple[str, list]:
    inside = [name for name, a, b in phases if a < t1 and b > t0]
    counts = collections.Counter(inside)
    phase = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.most_common(4)) or "napari"
    stacks = [s for t, s in sampler.samples if t0 <= t <= t1]
    if not stacks:
        return phase, []
    frames: collections.Counter = collections.Counter()
    depth: dict = {}
    for stack in stacks:
        frames.update({code for code, _ in stack})
        for i, (code, _) in enumerate(stack):
            depth[code] = min(depth.get(code, 1 << 30), len(stack) - i)
    # the deepest functions that many samples of this stall share name what the thread did;
    # the event loop and this script are in every sample and say nothing
    boring = ("gui_freeze.py", "qtpy/QtCore.py", "threading.py")
    common = [
        code
        for code, n in frames.items()
        if n >= 0.3 * len(stacks) and not any(b in code.co_filename for b in boring)
    ]
    ordered = sorted(common, key=lambda c: -depth[c])[:5]
    leaves = collections.Counter(_name(*s[0]) for s in stacks if s)
    top = [
        f"{_name(code, 0).rsplit(':', 1)[0]} ({frames[code] / len(stacks):.0%})" for code in ordered
    ]
    top.append("leaf: " + "; ".join(f"{k} {v / len(stacks):.0%}" for k, v in leaves.most_common(2)))
    # another thread holding the GIL (model loading, imports) starves the GUI thread too
    workers: collections.Counter = collections.Counter()
    n_other = 0
    for t, chains in sampler.others:
        if t0 <= t <= t1:
            n_other += 1
            for chain in chains:
                mine = [c for c in chain if "napari_masam" in c.co_filename]
                workers[_name(mine[0] if mine else chain[0], 0).rsplit(":", 1)[0]] += 1
    if workers:
        top.append(
            "other threads: "
            + "; ".join(f"{k} {v / max(1, n_other):.0%}" for k, v in workers.most_common(3))
        )
    return phase, top


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", default="head_mri", choices=("head_mri", "ct_phantom"))
    parser.add_argument("--propagate", action="store_true", help="the widget's propagate box")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--show", type=int, default=8, help="stalls printed per run")
    parser.add_argument("--variant-src", default=None, help="import napari_masam from here")
    parser.add_argument(
        "--torch-late",
        action="store_true",
        help="do not import torch first: the worker imports it on the first Run, as in `napari`",
    )
    args = parser.parse_args()
    if args.variant_src:
        sys.path.insert(0, os.path.abspath(args.variant_src))

    import numpy as np

    if not args.torch_late:
        import torch  # noqa: F401  # before any Qt/GL object (see _worker.guard_gl_llvm_clash)

    t_import = time.perf_counter()
    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    import napari_masam

    print(f"napari_masam from {os.path.dirname(napari_masam.__file__)}")
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1280, 900)
    layers = viewer.open_sample("napari-masam", args.sample)
    image = next(layer for layer in layers if layer._type_string == "image")
    for layer in list(viewer.layers):
        if layer is not image:
            viewer.layers.remove(layer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-masam", "Segment")
    widget._image.value = image
    widget._propagate.value = bool(args.propagate)
    print(f"viewer + sample + widget: {time.perf_counter() - t_import:.1f} s")

    ticks: list[float] = []
    phases: list[tuple[str, float, float]] = []
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()

    def wrap(name: str) -> None:
        original = getattr(widget, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                phases.append((name, t0, time.perf_counter()))

        setattr(widget, name, timed)

    for name in PHASES:
        wrap(name)

    def spin(seconds: float = 0.0, until=None, timeout: float = 1800.0) -> None:
        loop = QEventLoop()
        t0 = time.perf_counter()

        def check() -> None:
            now = time.perf_counter()
            done = now - t0 >= seconds if until is None else until()
            if done or now - t0 > timeout:
                loop.quit()

        poll = QTimer()
        poll.timeout.connect(check)
        poll.start(10)
        loop.exec_()
        poll.stop()

    spin(2.0)  # the first draws of the image (its own first-use compile) settle
    widget._prompts_btn.native.click()  # Add prompts layer
    prompts = widget.prompts_layer
    vol = np.asarray(image.data, dtype=np.float32)
    n = vol.shape[0]
    sampler = Sampler()
    sampler.start()

    def box_on(z: int, obj: int) -> None:
        widget._object.value = obj
        fg = vol[z] > np.percentile(vol[z], 70)
        rows, cols = np.nonzero(fg)
        rc, cc = int(np.median(rows)), int(np.median(cols))
        h = max(6, (rows.max() - rows.min()) // 6)
        w = max(6, (cols.max() - cols.min()) // 6)
        rect = np.array(
            [[z, rc - h, cc - w], [z, rc - h, cc + w], [z, rc + h, cc + w], [z, rc + h, cc - w]],
            dtype=float,
        )
        viewer.dims.set_point(0, image.data_to_world([z, 0, 0])[0])
        prompts.add_rectangles(rect)

    results = []
    for run_no in range(1, args.runs + 1):
        box_on(n // 2 + 6 * (run_no - 1), run_no)
        spin(1.5)  # the box is drawn (Shapes' own first draw is not part of the run)
        start_index = len(ticks)
        t_click = time.perf_counter()
        widget._run_btn.native.click()
        spin(until=lambda t=t_click: widget.worker is None and time.perf_counter() - t > 0.5)
        t_done = time.perf_counter()
        spin(1.5)  # draws that follow the last callback belong to the run's end
        t_end = time.perf_counter()
        window = [t for t in ticks[max(0, start_index - 1) :] if t <= t_end]
        gaps = [(a, b) for a, b in itertools.pairwise(window) if b - a > GAP_MS / 1e3]
        gaps.sort(key=lambda g: g[0] - g[1])
        stall_total = sum(b - a for a, b in gaps)
        print(
            f"\n=== run {run_no}: click -> finished {t_done - t_click:.2f} s; "
            f"{len(gaps)} stalls > {GAP_MS:.0f} ms, {stall_total:.2f} s in stalls; "
            f"longest {max((b - a for a, b in gaps), default=0) * 1e3:.0f} ms; "
            f"status: {widget._status.value!r}"
        )
        for a, b in gaps[: args.show]:
            phase, top = _describe_stall(a, b, sampler, phases)
            print(f"  {(b - a) * 1e3:6.0f} ms at +{a - t_click:6.2f} s  [{phase}]")
            for line in top:
                print(f"        {line}")
        in_run = [(nm, a, b) for nm, a, b in phases if t_click <= a <= t_end]
        per: dict[str, list[float]] = collections.defaultdict(list)
        for nm, a, b in in_run:
            per[nm].append(b - a)
        print("  GUI-thread time per widget phase (nested phases counted in each):")
        for nm, ds in sorted(per.items(), key=lambda kv: -sum(kv[1])):
            print(
                f"    {nm:22s} {sum(ds) * 1e3:7.0f} ms total, {len(ds):3d} calls, "
                f"max {max(ds) * 1e3:6.0f} ms"
            )
        # where a stall falls: the run's start (Run click, preview creation), the end (the last
        # second before the worker finished, and after), or while slices stream in between
        start_end = min((b for nm, a, b in in_run if nm == "_start"), default=t_click)
        parts = {"start": 0.0, "stream": 0.0, "end": 0.0}
        for a, b in gaps:
            part = "start" if a <= start_end else "end" if b >= t_done - 1.0 else "stream"
            parts[part] = max(parts[part], b - a)
        results.append((t_done - t_click, stall_total, parts))
    sampler.stop = True
    print("\nSUMMARY run: click->finished s | s in stalls | longest stall ms at start/stream/end")
    for i, (total, stalls, parts) in enumerate(results, 1):
        longest = " / ".join(f"{parts[k] * 1e3:.0f}" for k in ("start", "stream", "end"))
        print(f"SUMMARY {i}: {total:.2f} s | {stalls:.2f} s | {longest} ms")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
