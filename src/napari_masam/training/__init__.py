"""Fine-tuning MA-SAM and MA-SAM-Lite on a user's own annotations (spec section 8 recipe).

Light to import: the config, data and CLI parts need no torch; the loop (``iter_train`` and
friends, in :mod:`napari_masam.training.loop`) is imported on first attribute access.

Modules: :mod:`.config` (the recipe's numbers, device defaults), :mod:`.data` (cases, splits,
groups), :mod:`.recipe` (loss, schedule, augmentation, jittered boxes), :mod:`.models` (the
starting model, trainable parameters), :mod:`.state` (a run's plan and state, resume),
:mod:`.evaluate` (validation through the engine), :mod:`.outputs` (the run's files, written
atomically), :mod:`.loop` (:func:`iter_train`), :mod:`.cli` (``napari-masam train``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .cli import add_train_parser, run_train
from .config import (
    BACKBONES,
    DEVICE_DEFAULTS,
    TEST_BACKBONES,
    DeviceDefaults,
    TrainingConfig,
    defaults_for_device,
)
from .data import (
    TrainingCase,
    check_cases,
    class_names_from_table,
    dice_per_class,
    find_nifti_pairs,
    group_slice_indices,
    load_folder_cases,
    load_nifti_case,
    load_video_case,
    select_groups,
    slab_cases,
    split_cases,
)

_LAZY = (
    "iter_train",
    "train",
    "TrainProgress",
    "TrainingResult",
    "masam_loss",
    "lr_factor",
    "warmup_steps_for",
    "augment_group",
    "jittered_group_boxes",
    "trainable_parameter_names",
    "apply_trainable",
    "build_training_model",
    "evaluate_cases",
    "BEST_NAME",
    "LAST_NAME",
    "AUTHORS_NAME",
    "STATE_NAME",
    "HISTORY_NAME",
    "RunPlan",
    "TrainingState",
)

__all__ = [
    "BACKBONES",
    "DEVICE_DEFAULTS",
    "TEST_BACKBONES",
    "DeviceDefaults",
    "defaults_for_device",
    "TrainingCase",
    "TrainingConfig",
    "add_train_parser",
    "check_cases",
    "class_names_from_table",
    "dice_per_class",
    "find_nifti_pairs",
    "group_slice_indices",
    "load_folder_cases",
    "load_nifti_case",
    "load_video_case",
    "run_train",
    "select_groups",
    "slab_cases",
    "split_cases",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(".loop", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
