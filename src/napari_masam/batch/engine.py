"""The engine seam of a batch: the model loaded once, the mode resolved, generators drained."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

import numpy as np

from .config import SegmentationRequest
from .source import ModelSpec

if TYPE_CHECKING:
    from ..inference import Progress, SegmentationResult
    from ..model.base import SegmentationModel
    from ..session import SegmentationSession

logger = logging.getLogger(__name__)

#: ``progress(done, total)`` in slices/frames of one input.
ProgressCallback = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------
# the model, loaded once per process/worker
# ----------------------------------------------------------------------------------------------
class SessionHolder:
    """Loads a :class:`SegmentationSession` on first use and keeps it (thread-safe).

    The sequential CLI owns one holder; on Dask every worker owns one (see
    :mod:`napari_masam.distributed`), so each worker loads the model once.

    Parameters
    ----------
    spec : ModelSpec
    torch_threads : int or None
        If given, ``torch.set_num_threads`` before loading (workers sharing few cores).
    session : SegmentationSession or None
        An already loaded session to use (e.g. the widget's); ``spec`` then only names it.
    """

    def __init__(
        self,
        spec: ModelSpec,
        torch_threads: int | None = None,
        session: SegmentationSession | None = None,
    ) -> None:
        self.spec = spec
        self.torch_threads = torch_threads
        self.load_seconds = 0.0
        #: how many times this holder loaded a model (0 or 1; checked by the Dask tests)
        self.loads = 0
        self._session: SegmentationSession | None = session
        self._lock = threading.Lock()
        self._identity: dict[str, object] | None = None

    def identity(self) -> dict[str, object]:
        """:meth:`ModelSpec.identity`, computed once (hashing big checkpoints takes time)."""
        if self._identity is None:
            self._identity = self.spec.identity()
        return self._identity

    def get(self) -> SegmentationSession:
        """The loaded session (loads it on the first call)."""
        with self._lock:
            if self._session is None:
                start = time.perf_counter()
                if self.torch_threads:
                    import torch

                    torch.set_num_threads(self.torch_threads)
                from ..devices import resolve_device
                from ..session import SegmentationSession

                device = resolve_device(self.spec.device)
                # every slice is segmented once per run: caching embeddings only costs memory
                self._session = SegmentationSession(
                    self.spec.load(device), device, cache_max_bytes=0
                )
                self.load_seconds = time.perf_counter() - start
                self.loads += 1
                logger.info("Loaded model %s in %.1f s", self.spec.source, self.load_seconds)
            return self._session

    @property
    def loaded(self) -> bool:
        """Whether :meth:`get` has loaded the model already."""
        return self._session is not None


def session_model(session: SegmentationSession) -> SegmentationModel:
    """The :class:`SegmentationModel` held by a session."""
    return session.model


def resolve_mode(mode: str | None, model: SegmentationModel, has_boxes: bool) -> str:
    """The mode a job runs in, with a clear error when it cannot run.

    Parameters
    ----------
    mode : str or None
        Requested mode; None = boxes when a box file/folder is given, else automatic if the
        model supports it, else boxes.
    model : SegmentationModel
    has_boxes : bool
        Whether a boxes file/folder was given.

    Raises
    ------
    ValueError
        Automatic mode on a box-only model, or boxes mode without ``--boxes``.
    """
    from ..inference import supported_modes

    name = model.metadata.name
    modes = supported_modes(model)  # THE "can this model run this mode"
    if mode is None:  # boxes given are never ignored
        mode = "boxes" if has_boxes or "automatic" not in modes else "auto"
    if mode == "auto" and "automatic" not in modes:
        raise ValueError(
            f"model {name!r} has no trained class head, so it cannot segment automatically; "
            "use --mode boxes with --boxes FILE, or a MA-SAM checkpoint"
        )
    if mode == "boxes":
        if "boxes" not in modes:
            raise ValueError(f"model {name!r} does not take box prompts; use --mode auto")
        if not has_boxes:
            raise ValueError(
                f"model {name!r} needs box prompts (mode 'boxes') but no --boxes FILE or folder "
                "was given; see `napari-masam segment --help` for the box file schema"
            )
    return mode


# ----------------------------------------------------------------------------------------------
# driving the engine
# ----------------------------------------------------------------------------------------------
class _Observed:
    """An iterator over an engine generator that reports each item; its StopIteration carries
    the generator's return value, so :func:`napari_masam.inference.run` drains it."""

    def __init__(
        self, gen: Generator[Progress, None, SegmentationResult], report: Callable[[Progress], None]
    ) -> None:
        self._gen = gen
        self._report = report

    def __iter__(self) -> _Observed:
        return self

    def __next__(self) -> Progress:
        progress = next(self._gen)
        self._report(progress)
        return progress


def observe(
    gen: Generator[Progress, None, SegmentationResult], report: Callable[[Progress], None]
) -> Generator[Progress, None, SegmentationResult]:
    """``gen``, calling ``report(progress)`` on every item it yields; returns its result."""
    return (yield from _Observed(gen, report))


def drain(
    gen: Generator[Progress, None, SegmentationResult],
    on_progress: Callable[[Progress], None] | None = None,
) -> SegmentationResult:
    """Run an engine generator to the end (:func:`napari_masam.inference.run`), reporting."""
    from ..inference import run

    return run(gen if on_progress is None else observe(gen, on_progress))


def segment_stack(
    session: SegmentationSession,
    stack: np.ndarray,
    request: SegmentationRequest,
    on_progress: Callable[[Progress], None] | None = None,
) -> SegmentationResult:
    """Segment one in-memory stack with the session (the widget's code path).

    Parameters
    ----------
    session : SegmentationSession
    stack : ndarray
        (Z, Y, X) grey or (T, Y, X, 3) uint8 RGB, axis 0 = slices/frames.
    request : SegmentationRequest
        Mode, preset, stride, batch size, boxes (pixel indices of ``stack``), window.

    Returns
    -------
    SegmentationResult
        ``labels`` (Z, Y, X) uint8/uint16.
    """
    if request.mode == "auto":
        gen = session.iter_automatic(
            stack,
            preset=request.preset,
            stride=request.stride,
            batch_size=request.batch_size,
            window=request.window,
        )
    elif request.propagate:
        gen = session.iter_boxes(
            stack,
            request.boxes or {},
            propagate=True,
            slice_ranges=request.slice_ranges or None,
            preset=request.preset,
            window=request.window,
        )
    else:
        gen = session.iter_boxes(
            stack, request.boxes or {}, preset=request.preset, window=request.window
        )
    return drain(gen, on_progress)


def non_finite_record(preprocessing: list[dict[str, object]]) -> dict[str, object] | None:
    """The engine's non-finite policy and the voxels it replaced, summed over engine calls
    (the chunks of a video), for the sidecar; None if the engine reports none."""
    reports = [p.get("non_finite") for p in preprocessing]
    reports = [r for r in reports if isinstance(r, dict)]
    if not reports:
        return None
    policies = sorted({str(r.get("policy")) for r in reports})
    voxels = sum(int(r.get("voxels", 0) or 0) for r in reports)  # type: ignore[call-overload]
    return {"policy": policies[0] if len(policies) == 1 else policies, "voxels": voxels}
