"""Validation Dice through the segmentation engine itself (what a user gets from the model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..model.base import SegmentationModel
from ..prompts import mask_box
from .data import TrainingCase


class EvaluationCancelled(Exception):
    """Raised by :func:`evaluate_cases` when its ``should_stop`` says so."""


def dice_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.zeros((3, num_classes), dtype=np.int64)
    for c in range(1, num_classes + 1):
        p, t = pred == c, truth == c
        counts[0, c - 1] = np.logical_and(p, t).sum()
        counts[1, c - 1] = p.sum()
        counts[2, c - 1] = t.sum()
    return counts


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    denom = counts[1] + counts[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * counts[0] / np.maximum(denom, 1), np.nan)


def label_boxes(labels: np.ndarray) -> dict[int, dict[int, tuple[int, int, int, int]]]:
    """Exact per-slice boxes (:func:`napari_masam.prompts.mask_box`) of all foreground, as
    object 1, in (Z, Y, X) labels."""
    out = {}
    for z in range(labels.shape[0]):
        box = mask_box(labels[z] > 0)
        if box is not None:
            out[z] = box
    return {1: out}


def evaluate_cases(
    model: SegmentationModel,
    cases: Sequence[TrainingCase],
    *,
    preset: Any = None,
    box_prompts: bool = False,
    stride: int | None = None,
    batch_size: int | None = None,
    device: Any = None,
    autocast: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Per-class Dice of ``model`` on labelled cases, through the segmentation engine.

    Automatic mode runs :func:`napari_masam.inference.iter_segment_automatic` on each case's
    image; box mode runs :func:`~napari_masam.inference.iter_segment_boxes` with the exact box of
    the labels on every slice that has foreground. Dice is pooled over all cases (voxel counts
    summed before the ratio).

    Parameters
    ----------
    stride : int or None
        Window stride of automatic mode (None: ``slices_per_group``, each slice encoded once).
    should_stop : callable or None
        Asked before each case; True raises :class:`EvaluationCancelled`.

    Returns
    -------
    ndarray
        (C,) float64 Dice per foreground class; NaN for a class absent from prediction and
        truth in every case.
    """
    from ..inference import iter_segment_automatic, iter_segment_boxes, run

    was_training = model.training
    model.eval()
    counts = np.zeros((3, model.num_classes), dtype=np.int64)
    try:
        for case in cases:
            if should_stop is not None and should_stop():
                raise EvaluationCancelled("evaluation cancelled")
            truth = np.asarray(case.labels)
            if box_prompts:
                result = run(
                    iter_segment_boxes(
                        model,
                        case.image,
                        label_boxes(truth),
                        preset=preset,
                        device=device,
                        batch_size=batch_size,
                        autocast=autocast,
                    )
                )
                truth = (truth > 0).astype(np.uint8)
            else:
                result = run(
                    iter_segment_automatic(
                        model,
                        case.image,
                        preset=preset,
                        stride=stride or model.slices_per_group,
                        batch_size=batch_size,
                        device=device,
                        autocast=autocast,
                    )
                )
            counts += dice_counts(np.asarray(result.labels), truth, model.num_classes)
    finally:
        model.train(was_training)
    return dice_from_counts(counts)
