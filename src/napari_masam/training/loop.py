"""The fine-tuning loop: MA-SAM's recipe (spec ``MASAM.md`` section 8) as a plain generator.

:func:`iter_train` yields a :class:`TrainProgress` after every optimiser step and after every
validation, and returns a :class:`TrainingResult`; closing the generator cancels (the resume
state is written first when an output folder is given). Validation runs the segmentation
engine itself (:func:`napari_masam.inference.iter_segment_automatic`, or
:func:`~napari_masam.inference.iter_segment_boxes` for box-prompt training), so the Dice a run
reports is the Dice a user gets from the saved model. Training groups are prepared by that
engine's own group preprocessing, so training and inference see identical inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..io._common import atomic_path
from ..model.base import DISPLAY_ORIENTATION, SegmentationModel
from ..palette import label_colors
from .config import BACKBONES, TrainingConfig
from .data import TrainingCase, check_cases, select_groups, split_cases

logger = logging.getLogger(__name__)

#: File names written into ``output_dir``.
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
AUTHORS_NAME = "best_authors.pth"
STATE_NAME = "resume.pt"
HISTORY_NAME = "history.json"
STATE_FORMAT = "napari-masam-train-state/1"


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainProgress:
    """One report of :func:`iter_train`.

    Attributes
    ----------
    stage : str
        ``"train"`` (after an optimiser step) or ``"validate"`` (after a validation).
    epoch : int
        1-based epoch the report belongs to.
    epochs : int
        Planned epochs.
    step : int
        Optimiser steps done so far (all epochs).
    total_steps : int
        Planned optimiser steps.
    loss : float or None
        Loss of the step just taken (``"train"``), or the epoch's mean loss (``"validate"``).
    lr : float
        Learning rate the step used.
    val_dice : dict or None
        Class name -> validation Dice (NaN for a class absent from prediction and truth).
    val_mean_dice : float or None
        Mean over classes present (NaN-aware).
    best_mean_dice : float or None
        Best ``val_mean_dice`` so far.
    elapsed_s : float
        Seconds since the generator started (this session).
    """

    stage: str
    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float | None
    lr: float
    val_dice: dict[str, float] | None = None
    val_mean_dice: float | None = None
    best_mean_dice: float | None = None
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float:
        """Share of planned steps done."""
        return self.step / self.total_steps if self.total_steps else 1.0


@dataclass
class TrainingResult:
    """What :func:`iter_train` returns.

    Attributes
    ----------
    model : SegmentationModel
        The trained model after the last step (metadata updated), on the training device.
    class_names : tuple of str
    best_path, last_path : Path or None
        Our single-file checkpoints (best by validation, and the last state); None without an
        output folder.
    authors_path : Path or None
        The best model in the MA-SAM authors' format (ViT MA-SAM only).
    best_mean_dice : float
        Best mean validation Dice (NaN if never validated).
    best_val_dice : dict
        Class name -> Dice at the best epoch.
    best_epoch : int
        1-based (0 if never validated).
    history : list of dict
        Per epoch: ``epoch``, ``mean_loss``, ``lr``, ``val_dice`` (list), ``val_mean_dice``.
    step_losses : list of float
        Loss of every step.
    train_cases, val_cases : list of str
        Names of the cases (slabs) on each side of the split.
    """

    model: SegmentationModel
    class_names: tuple[str, ...]
    best_path: Path | None
    last_path: Path | None
    authors_path: Path | None
    best_mean_dice: float
    best_val_dice: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    train_cases: list[str] = field(default_factory=list)
    val_cases: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Recipe pieces
# ----------------------------------------------------------------------------------------------
def masam_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ce_weight: float = 0.2,
    dice_weight: float = 0.8,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """MA-SAM's loss: ``ce_weight * CE + dice_weight * soft Dice``.

    The soft Dice follows the authors (SAMed's ``DiceLoss``): softmax probabilities, every
    channel including background, squared sums, pooled over the whole batch, averaged over
    channels: ``1 - (2 sum(p t) + smooth) / (sum(p^2) + sum(t^2) + smooth)``.

    Parameters
    ----------
    logits : Tensor
        (N, C + 1, h, w) float.
    target : Tensor
        (N, h, w) int64 class indices in 0..C.

    Returns
    -------
    Tensor
        Scalar float32.
    """
    logits = logits.float()
    k = logits.shape[1]
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return ce_weight * ce + dice_weight * dice.mean()


def warmup_steps_for(config: TrainingConfig, total_steps: int) -> int:
    """Effective warm-up length: ``min(warmup_steps, floor(warmup_max_fraction * total))``."""
    return min(config.warmup_steps, int(config.warmup_max_fraction * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, power: float) -> float:
    """Multiplier of the peak learning rate at 0-based optimiser step ``step``.

    Linear warm-up ``(step + 1) / warmup`` for the first ``warmup`` steps (the authors'
    SAMed-style schedule), then ``(1 - (step - warmup) / (total - warmup)) ** power``.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    return max(0.0, 1.0 - (step - warmup) / span) ** power


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def augment_group(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainingConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random transform on every slice of one group (image and labels).

    Parameters
    ----------
    images : Tensor
        (D, 3, S, S) float32 in [0, 1] (model input of one group).
    labels : Tensor
        (D, S, S) int64 in the model frame.
    config : TrainingConfig
        Probabilities and ranges (``p_rot90_flip``, ``p_rotate`` ...).
    gen : torch.Generator
        CPU generator; every draw comes from it (reproducible, resumable).

    Returns
    -------
    (Tensor, Tensor)
        Transformed copies, same shapes and dtypes. Geometric steps: rot90 by k in 0..3 then a
        flip of rows or columns; a rotation by up to ``max_rotation_deg`` (bilinear image,
        nearest labels, zero fill). Intensity steps (image only): gamma, then contrast and
        brightness, clipped to [0, 1].
    """
    if torch.rand((), generator=gen) < config.p_rot90_flip:
        k = int(torch.randint(4, (), generator=gen))
        axis = -2 if int(torch.randint(2, (), generator=gen)) == 0 else -1
        images = torch.rot90(images, k, dims=(-2, -1)).flip(axis)
        labels = torch.rot90(labels, k, dims=(-2, -1)).flip(axis)
    if torch.rand((), generator=gen) < config.p_rotate and config.max_rotation_deg > 0:
        angle = math.radians(_uniform(gen, -config.max_rotation_deg, config.max_rotation_deg))
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32)
        d = images.shape[0]
        grid = F.affine_grid(theta.expand(d, 2, 3), list(images.shape), align_corners=False)
        images = F.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        lab = F.grid_sample(
            labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        labels = lab[:, 0].round().long()
    if torch.rand((), generator=gen) < config.p_gamma:
        low, high = config.gamma_range
        gamma = math.exp(_uniform(gen, math.log(low), math.log(high)))
        images = images.clamp(0.0, 1.0) ** gamma
    if torch.rand((), generator=gen) < config.p_intensity:
        contrast = _uniform(gen, *config.contrast_range)
        brightness = _uniform(gen, *config.brightness_range)
        images = (images * contrast + brightness).clamp(0.0, 1.0)
    return images.contiguous(), labels.contiguous()


def boxes_from_labels(
    labels: torch.Tensor, jitter: float, gen: torch.Generator | None, image_size: int
) -> torch.Tensor:
    """One XYXY box per slice around its foreground, jittered like a user's box.

    Parameters
    ----------
    labels : Tensor
        (D, S, S) int64 labels of one group in the model frame.
    jitter : float
        Each coordinate moves by up to ``jitter`` times the box side (uniform); 0 or ``gen``
        None: exact boxes.
    gen : torch.Generator or None
    image_size : int
        S; boxes are clipped to ``[0, S - 1]``.

    Returns
    -------
    Tensor
        (D, 4) float32, inclusive pixel indices of the model input. A slice without foreground
        gets the box of the whole group's foreground (a "3D box" whose ends hold nothing);
        a group without any foreground gets the full frame.
    """
    fg = labels > 0
    union = fg.any(dim=0)
    boxes = []
    for d in range(labels.shape[0]):
        mask = fg[d] if fg[d].any() else union
        if mask.any():
            rows = torch.nonzero(mask.any(dim=1)).flatten()
            cols = torch.nonzero(mask.any(dim=0)).flatten()
            box = [float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])]
        else:
            box = [0.0, 0.0, image_size - 1.0, image_size - 1.0]
        if jitter > 0 and gen is not None:
            w, h = box[2] - box[0] + 1.0, box[3] - box[1] + 1.0
            box = [
                box[0] + _uniform(gen, -jitter, jitter) * w,
                box[1] + _uniform(gen, -jitter, jitter) * h,
                box[2] + _uniform(gen, -jitter, jitter) * w,
                box[3] + _uniform(gen, -jitter, jitter) * h,
            ]
        x0, x1 = sorted((box[0], box[2]))
        y0, y1 = sorted((box[1], box[3]))
        boxes.append([x0, y0, x1, y1])
    return torch.tensor(boxes, dtype=torch.float32).clamp(0.0, image_size - 1.0)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def trainable_parameter_names(
    model: SegmentationModel, train_prompt_encoder: bool = True
) -> list[str]:
    """Parameters the MA-SAM recipe trains (spec section 4) for any model kind.

    Adapters (with their norms), FacT (shared U/V and per-block cores), the mask decoder (and
    MA-SAM-Lite's class head), and the prompt encoder unless ``train_prompt_encoder`` is False.

    Raises
    ------
    ValueError
        For a model without 3D adapters (plain LiteMedSAM): there is nothing MA-SAM would train.
    """
    kind = getattr(model, "kind", "")
    if kind == "masam":
        from ..model.masam import trainable_parameter_names as names_of

        names = names_of(model)
    elif hasattr(model, "trainable_parameter_names"):
        names = list(model.trainable_parameter_names())
    else:
        raise ValueError(
            f"No fine-tuning recipe for a model of kind {kind!r}: train 'masam-lite' (LiteMedSAM "
            "with 3D adapters) or an MA-SAM ViT model instead."
        )
    if not train_prompt_encoder:
        names = [n for n in names if not n.startswith("prompt_encoder.")]
    return names


def apply_trainable(model: SegmentationModel, names: Sequence[str]) -> int:
    """Freeze every parameter except ``names``; returns the number of trainable scalars."""
    chosen = set(names)
    total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        total += param.numel() if name in chosen else 0
    return total


def build_training_model(
    backbone: str,
    num_classes: int,
    *,
    sam_checkpoint: str | os.PathLike[str] | None = None,
    masam_checkpoint: str | os.PathLike[str] | None = None,
    init_checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **changes: Any,
) -> SegmentationModel:
    """A model to fine-tune for ``num_classes`` classes.

    Parameters
    ----------
    backbone : str
        ``"masam-lite"`` (embedded LiteMedSAM + zero-init adapters; trainable on a CPU),
        ``"tiny"`` / ``"tiny_train"`` (random tiny MA-SAMs, tests; ``tiny_train`` has a finer
        token grid and learns a phantom in a few dozen steps) or ``"vit_b"``/``"vit_l"``/
        ``"vit_h"`` (from ``sam_checkpoint``, optionally with the authors' ``masam_checkpoint``
        on top).
    num_classes : int
        C foreground classes.
    sam_checkpoint, masam_checkpoint : path or None
        Meta's SAM weights (the frozen base) and an MA-SAM checkpoint of the authors.
    init_checkpoint : path or None
        Continue from one of our single-file checkpoints (any kind; class count must match).
    device : str or torch.device
    seed : int
        Seeds the random initialisation of the new parts.
    **changes
        Extra builder arguments (e.g. ``slices_per_group``, MA-SAM config fields).

    Raises
    ------
    ValueError
        Unknown backbone, a ViT backbone without ``sam_checkpoint``, or a class-count mismatch.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init_checkpoint is not None:
            from ..checkpoints import load_checkpoint

            model = load_checkpoint(init_checkpoint, device="cpu")
            if model.num_classes != num_classes:
                raise ValueError(
                    f"{init_checkpoint} has {model.num_classes} classes but the training data "
                    f"declares {num_classes}: start from a backbone instead."
                )
        elif backbone == "masam-lite":
            from ..model.lite import build_masam_lite

            model = build_masam_lite(num_classes=num_classes, device="cpu", **changes)
        elif backbone in ("tiny", "tiny_train"):
            from ..model.masam import build_masam

            model = build_masam(backbone, num_classes=num_classes, **changes)
        elif backbone in ("vit_b", "vit_l", "vit_h"):
            if sam_checkpoint is None:
                raise ValueError(
                    f"Backbone {backbone!r} needs Meta's SAM checkpoint (sam_checkpoint=...); "
                    "or use 'masam-lite', which starts from embedded weights."
                )
            from ..checkpoints import load_masam

            model = load_masam(
                sam_checkpoint, masam_checkpoint, num_classes=num_classes, device="cpu", **changes
            )
        else:
            raise ValueError(
                f"Unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}."
            )
    from ..devices import resolve_device

    return model.to(resolve_device(device))


# ----------------------------------------------------------------------------------------------
# Data pipeline (the segmentation engine's own group preprocessing)
# ----------------------------------------------------------------------------------------------
class _CaseSource:
    """Model inputs and label targets of one case's groups, prepared like the inference engine."""

    def __init__(self, model: SegmentationModel, case: TrainingCase, preset: Any) -> None:
        from ..inference import _Engine

        self.case = case
        # cache=None, autocast=False: only the engine's reading/normalisation/resize is used.
        self.engine = _Engine(
            model,
            case.image,
            preset=preset,
            device=next(model.parameters()).device,
            cache=None,
            stack_orientation=None,
            batch_size=1,
            autocast=False,
        )
        self.labels = np.asarray(case.labels)

    def group(self, center: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, 3, S, S) float32 input and (D, S, S) int64 labels of the group around ``center``."""
        from ..preprocess import labels_to_model_frame

        members = self.engine.members(center)
        x = torch.from_numpy(self.engine.group_input(members))
        lab = labels_to_model_frame(self.labels[list(members)].astype(np.int64), self.engine.info)
        return x, torch.from_numpy(lab)


def _fit_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour (pixel centres) resample of (N, S, S) labels to the logits' (h, w)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    t = F.interpolate(target[:, None].float(), size=size, mode="nearest-exact")
    return t[:, 0].long()


# ----------------------------------------------------------------------------------------------
# Validation through the segmentation engine
# ----------------------------------------------------------------------------------------------
def _dice_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.zeros((3, num_classes), dtype=np.int64)
    for c in range(1, num_classes + 1):
        p, t = pred == c, truth == c
        counts[0, c - 1] = np.logical_and(p, t).sum()
        counts[1, c - 1] = p.sum()
        counts[2, c - 1] = t.sum()
    return counts


def _dice_from_counts(counts: np.ndarray) -> np.ndarray:
    denom = counts[1] + counts[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * counts[0] / np.maximum(denom, 1), np.nan)


def _label_boxes(labels: np.ndarray) -> dict[int, dict[int, list[float]]]:
    """Exact per-slice boxes of all foreground (object 1) in (Z, Y, X) labels."""
    out: dict[int, list[float]] = {}
    for z in range(labels.shape[0]):
        mask = labels[z] > 0
        if mask.any():
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            out[z] = [float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])]
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
            truth = np.asarray(case.labels)
            if box_prompts:
                result = run(
                    iter_segment_boxes(
                        model,
                        case.image,
                        _label_boxes(truth),
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
            counts += _dice_counts(np.asarray(result.labels), truth, model.num_classes)
    finally:
        model.train(was_training)
    return _dice_from_counts(counts)


# ----------------------------------------------------------------------------------------------
# Checkpoints of a run
# ----------------------------------------------------------------------------------------------
def _fingerprint(cases: Sequence[TrainingCase]) -> str:
    """Names, shapes and label histograms of the cases (detects resuming on other data)."""
    parts = []
    for case in cases:
        labels = np.asarray(case.labels)
        hist = np.bincount(labels.astype(np.int64).ravel(), minlength=1)
        parts.append([case.name, list(np.shape(case.image)), hist.tolist()])
    return json.dumps(parts)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _save_model(model: SegmentationModel, path: Path) -> None:
    from ..checkpoints import save_checkpoint

    with atomic_path(path) as tmp:
        save_checkpoint(model, tmp)


def _stamp_metadata(
    model: SegmentationModel,
    config: TrainingConfig,
    class_names: tuple[str, ...],
    preset_name: str,
    rgb: bool,
    extra: dict[str, Any],
) -> None:
    """Record class names, colours, preprocessing and the run on ``model.metadata``."""
    base = model.metadata
    colors = config.class_colors or label_colors(len(class_names))
    provenance = dict(base.provenance)
    provenance.setdefault("fine_tuned_from", base.name)
    provenance["training"] = {"config": config.to_dict(), **extra}
    model.metadata = dataclasses.replace(
        base,
        name=f"{provenance['fine_tuned_from']}-finetuned",
        class_names=tuple(class_names),
        class_colors=tuple(colors),
        intensity_preset=preset_name,
        orientation="" if rgb else (base.orientation or DISPLAY_ORIENTATION),
        provenance=provenance,
    )


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    from ..devices import autocast_context

    with autocast_context(device, enabled=enabled):
        yield


def _class_names(config: TrainingConfig, largest: int) -> tuple[str, ...]:
    if config.class_names:
        return tuple(config.class_names)
    return tuple(f"class {i}" for i in range(1, largest + 1))


def _check_model_for(model: SegmentationModel, num_classes: int, config: TrainingConfig) -> None:
    if not isinstance(model, SegmentationModel):
        raise TypeError(f"Expected a SegmentationModel, got {type(model).__name__}.")
    if model.num_classes != num_classes:
        raise ValueError(
            f"The model has {model.num_classes} classes but the training data declares "
            f"{num_classes}: build it with num_classes={num_classes} "
            "(build_training_model(backbone, num_classes))."
        )
    if config.box_prompts:
        if not model.supports_boxes:
            raise ValueError(f"{model.metadata.name} does not take box prompts.")
        if num_classes != 1:
            raise ValueError(
                "Box-prompt training segments one object per box: declare 1 class, not "
                f"{num_classes}."
            )
    elif not model.supports_automatic:
        raise ValueError(
            f"{model.metadata.name} has no automatic class head: fine-tune 'masam-lite' or an "
            "MA-SAM model, or set box_prompts=True."
        )


def iter_train(
    model: SegmentationModel,
    cases: Sequence[TrainingCase],
    config: TrainingConfig | None = None,
    *,
    val_cases: Sequence[TrainingCase] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "auto",
    resume: bool = False,
) -> Generator[TrainProgress, None, TrainingResult]:
    """Fine-tune ``model`` on labelled stacks with the MA-SAM recipe.

    Every input check (shapes, label values, class count, model abilities, split) runs before
    the first step, at the first ``next()``.

    Parameters
    ----------
    model : SegmentationModel
        MA-SAM (any ViT size) or MA-SAM-Lite with ``num_classes`` = the declared classes; the
        recipe's parameters are unfrozen (:func:`trainable_parameter_names`), all others frozen.
        It is trained in place.
    cases : sequence of TrainingCase
        Training stacks. Without ``val_cases`` they are split (:func:`~.data.split_cases`):
        by case, or, for a single case, by slabs.
    config : TrainingConfig or None
        The recipe (default ``TrainingConfig()``).
    val_cases : sequence of TrainingCase or None
        Explicit validation cases (then ``cases`` are all used for training).
    output_dir : path or None
        Where ``best.safetensors``, ``last.safetensors``, ``best_authors.pth`` (ViT MA-SAM),
        ``resume.pt`` and ``history.json`` go. None keeps everything in memory (no resume).
    device : str, torch.device or None
        ``"auto"``: cuda, mps, cpu. Autocast (bf16/fp16) on GPUs when ``config.autocast``.
    resume : bool
        Continue from ``output_dir/resume.pt`` if it exists: trainable weights, optimiser,
        scheduler, random generators and position in the epoch are restored, so the next step
        is the step an uninterrupted run would take. The same model start, data and config are
        required.

    Yields
    ------
    TrainProgress
        After each optimiser step (``stage="train"``) and each validation (``"validate"``).

    Returns
    -------
    TrainingResult

    Notes
    -----
    Closing the generator cancels the run after the current step; with ``output_dir`` the
    resume state is written first. The global torch RNG is seeded from ``config.seed`` (FacT
    dropout draws from it); data order and augmentation use their own generator.
    """
    from ..devices import autocast_dtype, resolve_device
    from ..preprocess import resolve_preset

    config = TrainingConfig() if config is None else config
    started = time.perf_counter()
    all_cases = list(cases) + list(val_cases or [])
    declared = len(config.class_names) if config.class_names else None
    largest = check_cases(all_cases, declared)
    class_names = _class_names(config, largest)
    num_classes = len(class_names)
    _check_model_for(model, num_classes, config)
    preset = resolve_preset(config.intensity_preset, default=model.metadata.intensity_preset)
    rgb = all_cases[0].is_rgb
    if any(c.is_rgb != rgb for c in all_cases):
        raise ValueError("Mix of RGB (video) and grey cases: train one kind of data per model.")
    group = int(model.slices_per_group)
    slab = config.slab_thickness or 2 * group
    if val_cases:
        train_cases, val_list = list(cases), list(val_cases)
    else:
        train_cases, val_list = split_cases(list(cases), config.val_fraction, slab, config.seed)
    check_cases(train_cases, num_classes)

    dev = resolve_device(device)
    model.to(dev)
    names = trainable_parameter_names(model, config.train_prompt_encoder)
    n_trainable = apply_trainable(model, names)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    logger.info(
        "Fine-tuning %s: %d trainable of %d parameters on %s",
        model.metadata.name,
        n_trainable,
        sum(p.numel() for p in model.parameters()),
        dev,
    )

    rng = np.random.default_rng(config.seed)
    groups = select_groups(
        train_cases, group, config.empty_group_share, rng, only_foreground=config.box_prompts
    )
    batch = config.batch_size
    steps_per_epoch = math.ceil(len(groups) / batch)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    warmup = warmup_steps_for(config, total_steps)

    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, config.poly_power)
    )
    amp_dtype = autocast_dtype(dev) if config.autocast else None
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    data_gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)

    sources = [_CaseSource(model, case, preset) for case in train_cases]
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(train_cases) + _fingerprint(val_list)
    config_json = json.dumps(config.to_dict(), sort_keys=True)

    epoch, step_in_epoch, global_step = 0, 0, 0
    order: torch.Tensor | None = None
    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    best_mean, best_epoch, best_dice = -math.inf, 0, np.full(num_classes, np.nan)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]

    if resume and out_dir is not None and (out_dir / STATE_NAME).exists():
        state = torch.load(out_dir / STATE_NAME, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{out_dir / STATE_NAME} is not a napari-masam training state.")
        if state["config"] != config_json:
            raise ValueError(
                f"{out_dir / STATE_NAME} was written with another TrainingConfig: resume with the "
                "same settings, or train into a new output folder."
            )
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"{out_dir / STATE_NAME} was written for other training data (cases, shapes or "
                "labels differ): resume with the same data, or train into a new output folder."
            )
        if list(state["trainable"].keys()) != trainable_names:
            raise ValueError(f"{out_dir / STATE_NAME} holds the trainable parts of another model.")
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in state["trainable"].items():
                named[name].copy_(value.to(dev))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["step"]
        order = state["order"] if state["order"].numel() else None
        progress_json = json.loads(state["progress"])
        history, step_losses = progress_json["history"], progress_json["step_losses"]
        best_mean = progress_json["best_mean"]
        best_mean = -math.inf if best_mean is None else float(best_mean)
        best_epoch = progress_json["best_epoch"]
        best_dice = np.array(
            [np.nan if v is None else v for v in progress_json["best_dice"]], dtype=np.float64
        )
        logger.info("Resumed at epoch %d, step %d of %d", epoch + 1, global_step, total_steps)

    def save_state() -> None:
        if out_dir is None:
            return
        state = {
            "format": STATE_FORMAT,
            "config": config_json,
            "fingerprint": fingerprint,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "step": global_step,
            "order": order if order is not None else torch.zeros(0, dtype=torch.int64),
            "trainable": {
                n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
            },
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "data_rng": data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "progress": json.dumps(
                {
                    "history": history,
                    "step_losses": step_losses,
                    "best_mean": best_mean if math.isfinite(best_mean) else None,
                    "best_epoch": best_epoch,
                    "best_dice": [None if math.isnan(v) else float(v) for v in best_dice],
                }
            ),
        }
        if dev.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(dev)
        _atomic_torch_save(state, out_dir / STATE_NAME)

    run_facts = {
        "train_cases": [c.name for c in train_cases],
        "val_cases": [c.name for c in val_list],
        "groups": len(groups),
        "trainable_parameters": int(n_trainable),
        "preset": preset.to_dict(),
    }
    best_path = out_dir / BEST_NAME if out_dir is not None else None
    authors_path = None

    def save_best() -> None:
        nonlocal authors_path
        if out_dir is None:
            return
        _stamp_metadata(
            model,
            config,
            class_names,
            preset.name,
            rgb,
            {**run_facts, "epoch": epoch + 1, "val_dice": [_json_float(v) for v in dice]},
        )
        _save_model(model, out_dir / BEST_NAME)
        if getattr(model, "kind", "") == "masam":
            from ..checkpoints import save_authors_checkpoint

            authors_path = out_dir / AUTHORS_NAME
            save_authors_checkpoint(model, authors_path)

    model.train()
    try:
        while epoch < config.epochs:
            if order is None:
                order = torch.randperm(len(groups), generator=data_gen)
            epoch_losses: list[float] = []
            while step_in_epoch < steps_per_epoch:
                picks = order[step_in_epoch * batch : (step_in_epoch + 1) * batch].tolist()
                if not picks:
                    break
                xs, labs, boxes = [], [], []
                for index in picks:
                    case_index, center = (int(v) for v in groups[index])
                    x, lab = sources[case_index].group(center)
                    if config.augment:
                        x, lab = augment_group(x, lab, config, data_gen)
                    if config.box_prompts:
                        boxes.append(
                            boxes_from_labels(lab, config.box_jitter, data_gen, model.image_size)
                        )
                    xs.append(x)
                    labs.append(lab)
                images = torch.stack(xs).to(dev)  # B x D x 3 x S x S
                target = torch.cat(labs).to(dev)  # B*D x S x S
                box_t = torch.stack(boxes).to(dev) if boxes else None
                if config.box_prompts:
                    target = (target > 0).long()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.zero_grad(set_to_none=True)
                with _autocast(dev, amp_dtype is not None):
                    logits = model(images, box_t)
                loss = masam_loss(
                    logits,
                    _fit_target(target, tuple(logits.shape[-2:])),
                    config.ce_weight,
                    config.dice_weight,
                    config.dice_smooth,
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"Loss became {loss.item()} at step {global_step + 1}: lower lr or "
                        "disable autocast."
                    )
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step_in_epoch += 1
                global_step += 1
                value = float(loss.detach())
                epoch_losses.append(value)
                step_losses.append(value)
                if (
                    config.checkpoint_every_steps
                    and global_step % config.checkpoint_every_steps == 0
                ):
                    save_state()
                yield TrainProgress(
                    "train",
                    epoch + 1,
                    config.epochs,
                    global_step,
                    total_steps,
                    value,
                    lr,
                    best_mean_dice=best_mean if math.isfinite(best_mean) else None,
                    elapsed_s=time.perf_counter() - started,
                )
            # epoch done: validate
            mean_loss = float(np.mean(step_losses[-steps_per_epoch:])) if step_losses else math.nan
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "mean_loss": mean_loss,
                "lr": optimizer.param_groups[0]["lr"],
            }
            validate = (epoch + 1) % config.val_every_epochs == 0 or epoch + 1 == config.epochs
            dice = np.full(num_classes, np.nan)
            if validate:
                dice = evaluate_cases(
                    model,
                    val_list,
                    preset=preset,
                    box_prompts=config.box_prompts,
                    batch_size=config.val_batch_size,
                    device=dev,
                    autocast=config.autocast,
                )
                model.train()
                mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
                entry["val_dice"] = [_json_float(v) for v in dice]
                entry["val_mean_dice"] = mean
                if mean > best_mean:
                    best_mean, best_epoch, best_dice = mean, epoch + 1, dice.copy()
                    save_best()
            history.append(entry)
            epoch += 1
            step_in_epoch = 0
            order = None
            save_state()
            if out_dir is not None:
                (out_dir / HISTORY_NAME).write_text(json.dumps(history, indent=1))
            if validate:
                yield TrainProgress(
                    "validate",
                    epoch,
                    config.epochs,
                    global_step,
                    total_steps,
                    mean_loss,
                    entry["lr"],
                    val_dice=dict(zip(class_names, (float(v) for v in dice))),
                    val_mean_dice=entry["val_mean_dice"],
                    best_mean_dice=best_mean,
                    elapsed_s=time.perf_counter() - started,
                )
    except GeneratorExit:
        logger.info("Training cancelled at step %d of %d", global_step, total_steps)
        save_state()
        raise

    model.eval()
    _stamp_metadata(
        model,
        config,
        class_names,
        preset.name,
        rgb,
        {**run_facts, "epoch": epoch, "best_epoch": best_epoch},
    )
    last_path = None
    if out_dir is not None:
        last_path = out_dir / LAST_NAME
        _save_model(model, last_path)
    return TrainingResult(
        model=model,
        class_names=class_names,
        best_path=best_path if best_epoch else None,
        last_path=last_path,
        authors_path=authors_path,
        best_mean_dice=best_mean if math.isfinite(best_mean) else math.nan,
        best_val_dice=dict(zip(class_names, (float(v) for v in best_dice))),
        best_epoch=best_epoch,
        history=history,
        step_losses=step_losses,
        train_cases=[c.name for c in train_cases],
        val_cases=[c.name for c in val_list],
    )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def train(*args: Any, **kwargs: Any) -> TrainingResult:
    """Run :func:`iter_train` to the end and return its result (scripts, tests)."""
    gen = iter_train(*args, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
