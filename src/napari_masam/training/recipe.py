"""The pieces of MA-SAM's fine-tuning recipe (spec ``MASAM.md`` section 8), each testable alone.

Loss, learning-rate schedule, group-consistent augmentation and the jittered boxes of
box-prompt training; torch tensors in, torch tensors out, no files and no models.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..prompts import mask_box
from .config import TrainingConfig


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


def jittered_group_boxes(
    labels: torch.Tensor, jitter: float, gen: torch.Generator | None, image_size: int
) -> torch.Tensor:
    """One XYXY box per slice of a training group around its foreground, jittered like a user's.

    The tight box of each slice is :func:`napari_masam.prompts.mask_box` (THE mask -> box
    conversion); only the jitter and the whole-group fallback are training's own.

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
    fg = (labels > 0).cpu().numpy()
    union = mask_box(fg.any(axis=0))
    boxes = []
    for d in range(fg.shape[0]):
        tight = mask_box(fg[d]) or union
        box = [float(v) for v in tight] if tight else [0.0, 0.0, image_size - 1.0, image_size - 1.0]
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
    return torch.tensor(np.asarray(boxes), dtype=torch.float32).clamp(0.0, image_size - 1.0)


def fit_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour (pixel centres) resample of (N, S, S) labels to the logits' (h, w)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    t = F.interpolate(target[:, None].float(), size=size, mode="nearest-exact")
    return t[:, 0].long()
