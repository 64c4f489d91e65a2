"""One loaded model, its device and its embedding cache: what the widget and the CLI hold.

A session replaces module-level singletons: the widget keeps one per selected model, the CLI one
per process (or per Dask worker). Runs are the engine's generators with the session's cache.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import DEFAULT_MAX_BYTES, EmbeddingCache

if TYPE_CHECKING:
    import torch

    from .inference import Progress, SegmentationResult
    from .model.base import ModelMetadata, SegmentationModel

logger = logging.getLogger(__name__)


class SegmentationSession:
    """A model ready to segment, with its device and an :class:`EmbeddingCache`.

    Parameters
    ----------
    model : SegmentationModel
        Moved to ``device`` and put in eval mode.
    device : str or torch.device
        ``"auto"`` (cuda, mps, cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    cache : EmbeddingCache or None
        Default: a memory-only cache bounded by ``cache_max_bytes`` (and on disk in
        ``cache_dir`` when given).
    cache_dir : str, Path or None
    cache_max_bytes : int or None

    Examples
    --------
    >>> session = SegmentationSession.from_source("litemedsam")  # doctest: +SKIP
    >>> result = session.segment_boxes(volume, {1: {10: (40, 50, 80, 90)}})  # doctest: +SKIP
    """

    def __init__(
        self,
        model: SegmentationModel,
        device: str | torch.device = "auto",
        cache: EmbeddingCache | None = None,
        *,
        cache_dir: str | Path | None = None,
        cache_max_bytes: int | None = DEFAULT_MAX_BYTES,
    ) -> None:
        from .devices import resolve_device

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.cache = (
            cache
            if cache is not None
            else EmbeddingCache(max_bytes=cache_max_bytes, directory=cache_dir)
        )

    @classmethod
    def from_source(
        cls,
        source: str | Path,
        device: str | torch.device = "auto",
        masam_checkpoint: str | Path | None = None,
        **kwargs: Any,
    ) -> SegmentationSession:
        """Load a model with :func:`napari_masam.checkpoints.load_model` and wrap it.

        Parameters
        ----------
        source : str or Path
            A registry name (``"litemedsam"``), one of our safetensors files, or a SAM
            checkpoint (with ``masam_checkpoint``, the authors' adapter file).
        device : str or torch.device
        masam_checkpoint : str, Path or None
        **kwargs
            Passed to the constructor (``cache``, ``cache_dir``, ``cache_max_bytes``).
        """
        from .checkpoints import load_model
        from .devices import resolve_device

        dev = resolve_device(device)
        model = load_model(source, masam_checkpoint=masam_checkpoint, device=dev)
        return cls(model, dev, **kwargs)

    @property
    def metadata(self) -> ModelMetadata:
        return self.model.metadata

    def __repr__(self) -> str:
        return (
            f"SegmentationSession(model={self.metadata.name!r}, device={str(self.device)!r}, "
            f"cached={len(self.cache)})"
        )

    # -- runs --------------------------------------------------------------------------------
    def iter_automatic(
        self, stack: Any, *, use_cache: bool = False, **kwargs: Any
    ) -> Generator[Progress, None, SegmentationResult]:
        """:func:`napari_masam.inference.iter_segment_automatic` on this session's model.

        ``use_cache=True`` stores every window row's embedding in the session cache (a later
        box run on the same stack then needs no encoder); off by default, since a whole stride-1
        pass holds ``D`` rows per slice and would push box embeddings out of a bounded cache.
        Other keyword arguments go to the engine (``preset``, ``stride``, ``batch_size``,
        ``stack_orientation``, ``out``, ...).
        """
        from .inference import iter_segment_automatic

        kwargs.setdefault("device", self.device)
        if use_cache:
            kwargs.setdefault("cache", self.cache)
        return iter_segment_automatic(self.model, stack, **kwargs)

    def iter_boxes(
        self,
        stack: Any,
        boxes: Mapping[int, Mapping[int, Sequence[float]]],
        *,
        windows: str = "centred",
        propagate: bool = False,
        **kwargs: Any,
    ) -> Generator[Progress, None, SegmentationResult]:
        """:func:`napari_masam.inference.iter_segment_boxes` with the session's cache (a second
        box on the same stack runs only the decoder).

        ``windows``: ``"centred"`` (default; each boxed slice encoded in the group centred on
        it, D slice encodes per boxed slice) or ``"tiled"`` (non-overlapping groups of D slices,
        each encoded once: about one slice encode per boxed slice). ``propagate=True``: the
        boxes are keyframes and :meth:`iter_propagate` runs instead (``windows`` is then
        ignored: propagation always encodes tiled groups). Other keyword arguments go to the
        engine."""
        if propagate:
            return self.iter_propagate(stack, boxes, **kwargs)
        from .inference import iter_segment_boxes

        kwargs.setdefault("device", self.device)
        kwargs.setdefault("cache", self.cache)
        return iter_segment_boxes(self.model, stack, boxes, windows=windows, **kwargs)

    def iter_propagate(
        self,
        stack: Any,
        boxes: Mapping[int, Mapping[int, Sequence[float]]],
        **kwargs: Any,
    ) -> Generator[Progress, None, SegmentationResult]:
        """:func:`napari_masam.propagation.iter_propagate` with the session's cache: keyframe
        boxes (and ``masks=``) -> whole objects; ``previous=``/``changed=`` for the correction
        loop; ``slice_ranges=``, ``config=`` (:class:`~napari_masam.propagation.
        PropagationConfig`) and the engine's keywords. A second object on the same stack costs
        decoder time only (embeddings come from the cache)."""
        from .propagation import iter_propagate

        kwargs.setdefault("device", self.device)
        kwargs.setdefault("cache", self.cache)
        return iter_propagate(self.model, stack, boxes, **kwargs)

    def segment_propagate(
        self, stack: Any, boxes: Mapping[int, Mapping[int, Sequence[float]]], **kwargs: Any
    ) -> SegmentationResult:
        """Run :meth:`iter_propagate` to the end and return its result."""
        from .inference import run

        return run(self.iter_propagate(stack, boxes, **kwargs))

    def iter_precompute(
        self, stack: Any, **kwargs: Any
    ) -> Generator[Progress, None, dict[str, float]]:
        """:func:`napari_masam.inference.iter_precompute` into the session cache: embeddings
        computed ahead (``slices=``, ``windows="tiled"`` for propagation, ``"centred"`` for
        default box runs), so later prompts run the decoder only."""
        from .inference import iter_precompute

        kwargs.setdefault("device", self.device)
        return iter_precompute(self.model, stack, self.cache, **kwargs)

    def segment_automatic(self, stack: Any, **kwargs: Any) -> SegmentationResult:
        """Run :meth:`iter_automatic` to the end and return its result."""
        from .inference import run

        return run(self.iter_automatic(stack, **kwargs))

    def segment_boxes(
        self, stack: Any, boxes: Mapping[int, Mapping[int, Sequence[float]]], **kwargs: Any
    ) -> SegmentationResult:
        """Run :meth:`iter_boxes` to the end and return its result."""
        from .inference import run

        return run(self.iter_boxes(stack, boxes, **kwargs))
