"""Run the engine's generators in napari's thread worker and stream results to the GUI.

The core never knows about threads: it exposes plain generators (``iter_automatic``,
``iter_boxes``) that yield :class:`napari_masam.inference.Progress` and return a
:class:`napari_masam.inference.SegmentationResult`. This module wraps such a generator with
``napari.qt.threading.create_worker`` (napari's threading guide), so

- the model loading and every slice run off the GUI thread;
- each yielded progress arrives on the GUI thread (``yielded`` signal), where the finished slice is
  written into the preview Labels layer;
- Cancel is ``worker.quit()``: the worker stops between two yields and *closes* the engine
  generator in the worker thread (the engine's cancel contract), so slices already streamed stay.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker

logger = logging.getLogger(__name__)

#: Least seconds between two repaints of napari's activity progress bar of a run (the last step
#: is painted at once). Each repaint composites the window on the GUI thread (16-80 ms with
#: software OpenGL), and a backlog of yields was drained one repaint each
#: (benchmarks/gui_freeze.py).
PBAR_REPAINT_S = 0.25


def guard_gl_llvm_clash() -> bool:
    """Keep ``triton`` from loading into a process where Mesa's LLVM is already mapped.

    torchvision imports ``torch._dynamo``, which imports ``triton`` when it is installed (it is,
    with CUDA builds of torch). triton bundles its own LLVM; loading it after napari created an
    OpenGL context on Mesa (llvmpipe, radeonsi: ``libLLVM`` mapped into the process) crashes
    the interpreter with a segmentation fault. napari-masam never uses triton (no
    ``torch.compile``), so when ``libLLVM`` is mapped and triton is not loaded yet, the import
    of triton is made to fail cleanly (torch then reports "no triton", as on CPU-only builds).

    Returns
    -------
    bool
        True if the import of triton was blocked now.
    """
    if "triton" in sys.modules or "torch._dynamo" in sys.modules:
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            llvm_mapped = any("libLLVM" in line for line in maps)
    except OSError:  # not Linux: no /proc, and no known clash
        return False
    if llvm_mapped:
        sys.modules["triton"] = None  # type: ignore[assignment]  # -> ImportError on import
        logger.info("Mesa's LLVM is loaded (OpenGL): not loading triton, which would crash.")
        return True
    return False


def import_core() -> None:
    """Import torch and the torch-using core safely from the GUI (see :func:`guard_gl_llvm_clash`)."""
    guard_gl_llvm_clash()
    import torch  # noqa: F401

    try:  # segment_anything and LiteMedSAM import torchvision; load it under the guard
        import torchvision  # noqa: F401
    except ImportError:  # pragma: no cover - torchvision is a dependency
        logger.debug("torchvision is not installed")


@dataclass
class RunStats:
    """What the GUI knows about a running job (for the progress line).

    Attributes
    ----------
    done, total : int
        Finished slices and slices to do (from the engine's progress).
    elapsed_s : float
        Seconds since the first slice work started (engine's clock when given).
    finished_slices : set of int
        Slice indices whose labels were streamed into the preview.
    """

    done: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    stage: str = ""
    finished_slices: set[int] = field(default_factory=set)
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def rate(self) -> float:
        """Slices per second so far (0 before the first one)."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 and self.done else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate, or None while unknown."""
        if self.rate <= 0 or self.total <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate

    def describe(self) -> str:
        """``"12/40 slices · 3.2 slices/s · ETA 9 s"``."""
        text = f"{self.done}/{self.total} slices" if self.total else self.stage or "working"
        if self.rate:
            text += f" · {self.rate:.1f} slices/s"
        if self.eta_s is not None and self.done < self.total:
            text += f" · ETA {format_seconds(self.eta_s)}"
        return text


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


class EngineWorker(GeneratorWorker):
    """napari's GeneratorWorker that closes the engine generator in the worker on cancel.

    superqt's ``work`` loop stops between yields when ``quit()`` was called, but leaves the
    generator suspended; closing it here (still in the worker thread) runs the engine's cleanup
    (freeing GPU memory, ...) off the GUI thread and before ``finished`` is emitted.
    """

    def work(self) -> Any:
        try:
            return super().work()
        finally:
            if self.abort_requested:
                self._gen.close()


def _drive(prepare: Callable[[], Generator[Any, None, Any]]) -> Generator[Any, None, Any]:
    """Worker body: build the engine generator (may load a model) and relay it."""
    engine = prepare()
    try:
        result = yield from engine
    finally:
        engine.close()
    return result


def start_worker(
    prepare: Callable[[], Generator[Any, None, Any]],
    *,
    on_progress: Callable[[Any], None],
    on_returned: Callable[[Any], None],
    on_errored: Callable[[BaseException], None],
    on_finished: Callable[[], None],
    on_aborted: Callable[[], None] | None = None,
    total: int = 0,
    desc: str = "MA-SAM",
) -> EngineWorker:
    """Start ``prepare()``'s generator in napari's thread worker (the one wrapper of both
    widgets: segmentation runs, exports, fine-tuning).

    Parameters
    ----------
    prepare : callable
        Called **in the worker thread**; returns the engine generator (e.g.
        ``session.iter_boxes(stack, boxes)``). Heavy set-up (loading a checkpoint) belongs here.
    on_progress : callable
        Called on the GUI thread with every yielded progress.
    on_returned : callable
        Called on the GUI thread with the generator's return value (the result).
    on_errored : callable
        Called on the GUI thread with the exception raised in the worker.
    on_finished : callable
        Called on the GUI thread last, after success, error or cancel.
    on_aborted : callable, optional
        Called on the GUI thread after a cancel took effect.
    total : int
        Expected number of steps, for napari's activity progress bar (0 = unknown). Progress
        items with ``done``/``total`` attributes (the engine's ``Progress``), or plain ints
        (steps done), move that bar.
    desc : str
        Description in napari's activity dock.

    Returns
    -------
    EngineWorker
        Already started; ``worker.quit()`` cancels.
    """
    connect: dict[str, Any] = {
        "yielded": on_progress,
        "returned": on_returned,
        "errored": on_errored,
        "finished": on_finished,
    }
    if on_aborted is not None:
        connect["aborted"] = on_aborted
    worker = create_worker(
        _drive,
        prepare,
        _worker_class=EngineWorker,
        _progress={"total": int(total), "desc": desc},
        _connect=connect,
        _start_thread=False,
    )
    pbar = getattr(worker, "pbar", None)
    if pbar is not None and total:
        # napari counts yields; the engine reports (done, total) itself, which we prefer.
        with contextlib.suppress(TypeError, RuntimeError):  # not connected: nothing to undo
            worker.yielded.disconnect(pbar.increment_with_overflow)
        shown = [float("-inf")]  # perf_counter of the last repaint of this run's bar
        worker.yielded.connect(lambda p: _update_pbar(pbar, p, shown))
    worker.start()
    return worker


#: The name the segmentation widget used first; same function.
start_engine_worker = start_worker


def _update_pbar(pbar: Any, progress: Any, shown: list[float] | None = None) -> None:
    """Move napari's bar to the progress's ``done``/``total``; with ``shown`` (a one-item list
    holding the time of the last repaint) at most every :data:`PBAR_REPAINT_S`, the end at once."""
    if isinstance(progress, int):
        done, total = progress, 0
    else:
        done = int(getattr(progress, "done", 0) or 0)
        total = int(getattr(progress, "total", 0) or 0)
    now = time.perf_counter()
    last = total > 0 and done >= total
    if shown is not None and not last and now - shown[0] < PBAR_REPAINT_S:
        return
    if total and total != pbar.total:
        pbar.total = total
    if done > pbar.n:
        pbar.update(done - pbar.n)
        if shown is not None:
            shown[0] = now
