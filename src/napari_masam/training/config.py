"""Every number of a fine-tuning run, in one frozen dataclass (no torch import)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..model.config import TEST_CONFIG_NAMES, USER_CONFIGS

#: Backbones offered to users (CLI ``--backbone``, the Fine-tune widget's drop-down):
#: MA-SAM-Lite and the user-facing MA-SAM ViT configs of :mod:`napari_masam.model.config`.
BACKBONES: tuple[str, ...] = ("masam-lite", *USER_CONFIGS)
#: Random tiny MA-SAMs for tests: :func:`napari_masam.training.build_training_model` builds
#: them, no menu offers them.
TEST_BACKBONES: tuple[str, ...] = TEST_CONFIG_NAMES


@dataclass(frozen=True)
class DeviceDefaults:
    """Run-size defaults that make fine-tuning MA-SAM-Lite practical on one kind of device.

    Attributes
    ----------
    image_size : int or None
        MA-SAM-Lite input side S (None: LiteMedSAM's 256).
    epochs : int
    batch_size : int
    max_steps_per_epoch : int or None
    poly_power : float or None
        Decay exponent after the warm-up; None keeps the recipe's 7. A run of tens of steps
        learns far more with a linear decay (1), see :class:`TrainingConfig`.
    """

    image_size: int | None
    epochs: int
    batch_size: int
    max_steps_per_epoch: int | None
    poly_power: float | None = None

    def apply(self, config: TrainingConfig) -> TrainingConfig:
        """``config`` with this run size (epochs, batch, steps per epoch, decay)."""
        changes: dict[str, Any] = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "max_steps_per_epoch": self.max_steps_per_epoch,
        }
        if self.poly_power is not None:
            changes["poly_power"] = self.poly_power
        return dataclasses.replace(config, **changes)


#: Defaults per device type. CPU numbers measured on this project's 2-core test machine, one
#: thread (benchmarks/bench_training.py ``--cpu-step``): an MA-SAM-Lite optimiser step (forward
#: + backward, D = 5 slices per group) takes 66 CPU-s at 256 px with batch 2 (the recipe's
#: size: 20 epochs of such steps are hours) and 5.6 CPU-s at 128 px with batch 1, where
#: TinyViT keeps its pretrained weights. 5 epochs x 8 steps at 128 px is ~4 min of compute
#: (plus validation), with a linear decay so that 40 steps still learn. GPUs keep the recipe.
DEVICE_DEFAULTS: dict[str, DeviceDefaults] = {
    "cpu": DeviceDefaults(
        image_size=128, epochs=5, batch_size=1, max_steps_per_epoch=8, poly_power=1.0
    ),
    "mps": DeviceDefaults(image_size=None, epochs=10, batch_size=2, max_steps_per_epoch=20),
    "cuda": DeviceDefaults(image_size=None, epochs=20, batch_size=2, max_steps_per_epoch=None),
}


def defaults_for_device(device_type: str) -> DeviceDefaults:
    """:data:`DEVICE_DEFAULTS` of ``"cpu"``, ``"cuda"`` or ``"mps"`` (others: the CPU's)."""
    return DEVICE_DEFAULTS.get(device_type, DEVICE_DEFAULTS["cpu"])


@dataclass(frozen=True)
class TrainingConfig:
    """The MA-SAM fine-tuning recipe (spec ``MASAM.md`` section 8) with every number exposed.

    Defaults follow the authors except where a laptop-sized run needs otherwise (batch size,
    epochs, the cap on the warm-up length); those are marked below.

    Attributes
    ----------
    class_names : tuple of str
        Foreground class names; label value ``i`` is ``class_names[i - 1]``. Empty: ``"class i"``
        for ``i`` = 1 .. the largest label value found in the training data.
    class_colors : tuple of str
        ``#rrggbb`` per class; empty picks a fixed palette.
    intensity_preset : str or None
        Key of :data:`napari_masam.preprocess.INTENSITY_PRESETS` applied to every volume (and
        recorded in the saved model). None: the model's own preset.
    epochs : int
        Passes over the training groups (authors: 300).
    batch_size : int
        Groups per optimiser step (authors: 24 on a GPU; 2 suits a CPU).
    max_steps_per_epoch : int or None
        Cap on steps per epoch (None: every selected group once per epoch).
    lr : float
        Peak learning rate of AdamW (8e-4).
    betas : tuple of float
        AdamW betas ((0.9, 0.999)).
    weight_decay : float
        AdamW decoupled weight decay (0.1).
    warmup_steps : int
        Linear warm-up length in optimiser steps (250).
    warmup_max_fraction : float
        The warm-up never exceeds this share of all planned steps, so a short run reaches its
        peak learning rate (not in the paper, whose runs are far longer than 250 steps).
    poly_power : float
        Exponent of the polynomial decay after the warm-up (7). With 7 the rate is below a
        tenth of its peak after 28 % of the steps, which suits the authors' long runs; a short
        run (tens to a few hundred steps) learns far more with 1 (linear decay) or 0 (constant
        after the warm-up): on the tests' phantom, 60 steps reach Dice 0.41-0.77 with 7 and
        0.98 with 0.
    ce_weight, dice_weight : float
        Loss = ``ce_weight`` x cross-entropy + ``dice_weight`` x soft Dice (0.2, 0.8).
    dice_smooth : float
        Smoothing term of the soft Dice (1e-5).
    empty_group_share : float
        At most this share of the training groups have no foreground in any of their slices
        (the rest of the empty groups are dropped; 0 keeps none, 1 keeps all).
    val_fraction : float
        Share of cases (or, for a single case, of slabs) held out for validation.
    slab_thickness : int
        Slices per slab when a single case is split (0: twice the group depth).
    augment : bool
        Group-consistent augmentation on/off (the same transform for all slices of a group).
    p_rot90_flip : float
        Probability of a random rot90 (k in 0..3) followed by a random flip (authors: 0.5).
        Set 0 when classes are lateralised (left/right structures).
    p_rotate, max_rotation_deg : float
        Probability and range (+-degrees) of a small in-plane rotation.
    p_gamma : float
        Probability of a gamma change, exponent drawn log-uniform in ``gamma_range``.
    gamma_range : tuple of float
    p_intensity : float
        Probability of a contrast/brightness change: ``x * c + b``, ``c`` in ``contrast_range``,
        ``b`` in ``brightness_range``, then clipped to [0, 1].
    contrast_range, brightness_range : tuple of float
    autocast : bool
        Mixed precision on GPUs (bf16 where supported, else fp16 with a gradient scaler);
        CPU always trains in fp32.
    box_prompts : bool
        Train with one box per slice drawn from the labels (for tumour-like objects) instead of
        automatic mode. Every foreground slice of a binary problem gets the box of its labels.
    box_jitter : float
        Each box corner moves by up to this share of the box side (uniform), as a user's box would.
    train_prompt_encoder : bool
        Whether the prompt encoder trains (spec section 4: yes).
    seed : int
        Seeds the split, group selection, shuffling, augmentation and dropout: a resumed run
        continues bit-for-bit like an uninterrupted one.
    checkpoint_every_steps : int
        Also write the resume state every this many steps (0: at the end of each epoch only).
    val_every_epochs : int
        Validate every this many epochs (and always after the last one).
    val_batch_size : int
        Groups per forward pass during validation.
    """

    class_names: tuple[str, ...] = ()
    class_colors: tuple[str, ...] = ()
    intensity_preset: str | None = None
    epochs: int = 20
    batch_size: int = 2
    max_steps_per_epoch: int | None = None
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.1
    warmup_steps: int = 250
    warmup_max_fraction: float = 0.1
    poly_power: float = 7.0
    ce_weight: float = 0.2
    dice_weight: float = 0.8
    dice_smooth: float = 1e-5
    empty_group_share: float = 0.1
    val_fraction: float = 0.2
    slab_thickness: int = 0
    augment: bool = True
    p_rot90_flip: float = 0.5
    p_rotate: float = 0.3
    max_rotation_deg: float = 15.0
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_intensity: float = 0.3
    contrast_range: tuple[float, float] = (0.75, 1.25)
    brightness_range: tuple[float, float] = (-0.1, 0.1)
    autocast: bool = True
    box_prompts: bool = False
    box_jitter: float = 0.1
    train_prompt_encoder: bool = True
    seed: int = 0
    checkpoint_every_steps: int = 0
    val_every_epochs: int = 1
    val_batch_size: int = 2

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "batch_size", "val_every_epochs", "val_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "checkpoint_every_steps", "slab_thickness"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            problems.append("max_steps_per_epoch must be None or >= 1")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        for name in (
            "warmup_max_fraction",
            "empty_group_share",
            "p_rot90_flip",
            "p_rotate",
            "p_gamma",
            "p_intensity",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1) (got {self.val_fraction})")
        if self.ce_weight < 0 or self.dice_weight < 0 or self.ce_weight + self.dice_weight == 0:
            problems.append("ce_weight and dice_weight must be >= 0 and not both 0")
        if self.gamma_range[0] <= 0 or self.gamma_range[0] > self.gamma_range[1]:
            problems.append(f"gamma_range must be 0 < low <= high (got {self.gamma_range})")
        if self.box_jitter < 0:
            problems.append(f"box_jitter must be >= 0 (got {self.box_jitter})")
        if self.class_colors and len(self.class_colors) != len(self.class_names):
            problems.append(
                f"{len(self.class_colors)} class colours for {len(self.class_names)} class names"
            )
        if problems:
            raise ValueError("Invalid TrainingConfig: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (tuples become lists), recorded in the saved model's provenance."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"Unknown TrainingConfig fields: {', '.join(unknown)}.")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)


def format_duration(seconds: float | None) -> str:
    """``"45 s"``, ``"12 min"``, ``"2 h 05 min"`` (``"?"`` for None or not finite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest:02d} min"
