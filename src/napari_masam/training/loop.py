"""The fine-tuning loop: MA-SAM's recipe (spec ``MASAM.md`` section 8) as a plain generator.

:func:`iter_train` yields a :class:`TrainProgress` after every optimiser step and after every
validation, and returns a :class:`TrainingResult`. Validation runs the segmentation engine
itself (:func:`~napari_masam.training.evaluate.evaluate_cases`), so the Dice a run reports is
the Dice a user gets from the saved model; training groups go through the engine's public
:class:`napari_masam.preprocess.StackPipeline`, so training and inference see identical inputs.

The pieces live beside it: the recipe (:mod:`.recipe`), the starting model (:mod:`.models`),
the run's plan and state (:mod:`.state`), validation (:mod:`.evaluate`) and the output files
(:mod:`.outputs`); their public names stay importable from here.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..model.base import SegmentationModel
from .config import TrainingConfig
from .data import TrainingCase
from .evaluate import EvaluationCancelled, evaluate_cases
from .models import (
    apply_trainable,
    build_training_model,
    check_model_for,
    trainable_parameter_names,
)
from .outputs import AUTHORS_NAME, BEST_NAME, HISTORY_NAME, LAST_NAME, STATE_NAME, RunFolder
from .recipe import (
    augment_group,
    fit_target,
    jittered_group_boxes,
    lr_factor,
    masam_loss,
    warmup_steps_for,
)
from .state import (
    STATE_FORMAT,
    RunPlan,
    StepCancelled,
    TrainingResult,
    TrainingState,
    TrainProgress,
)

__all__ = [
    "AUTHORS_NAME",
    "BEST_NAME",
    "HISTORY_NAME",
    "LAST_NAME",
    "STATE_FORMAT",
    "STATE_NAME",
    "RunPlan",
    "TrainProgress",
    "TrainingResult",
    "TrainingState",
    "apply_trainable",
    "augment_group",
    "build_training_model",
    "check_model_for",
    "evaluate_cases",
    "fit_target",
    "iter_train",
    "jittered_group_boxes",
    "lr_factor",
    "masam_loss",
    "train",
    "trainable_parameter_names",
    "warmup_steps_for",
]

logger = logging.getLogger(__name__)


def iter_train(
    model: SegmentationModel,
    cases: Sequence[TrainingCase],
    config: TrainingConfig | None = None,
    *,
    val_cases: Sequence[TrainingCase] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "auto",
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
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
        ``resume.pt`` and ``history.json`` go, each replaced atomically. None keeps everything
        in memory (no resume).
    device : str, torch.device or None
        ``"auto"``: cuda, mps, cpu. Autocast (bf16/fp16) on GPUs when ``config.autocast``.
    resume : bool
        Continue from ``output_dir/resume.pt`` if it exists: trainable weights, optimiser,
        scheduler, random generators and position in the epoch are restored, so the next step
        is the step an uninterrupted run would take. The same model start, data and config are
        required.
    should_stop : callable or None
        Asked inside every step (before and after the forward pass) and between validation
        cases: True ends the run early (the step in flight is abandoned before the optimiser
        changes anything), writes the resume state and returns a result with
        ``cancelled=True``.

    Yields
    ------
    TrainProgress
        After each optimiser step (``stage="train"``) and each validation (``"validate"``),
        with the ETA measured so far.

    Returns
    -------
    TrainingResult

    Notes
    -----
    Closing the generator cancels the run after the current step; with ``output_dir`` the
    resume state is written first.
    """
    from ..devices import resolve_device

    config = TrainingConfig() if config is None else config
    started = time.perf_counter()
    plan = RunPlan.make(model, cases, config, val_cases)
    state = TrainingState(model, plan, config, resolve_device(device))
    folder = RunFolder(output_dir) if output_dir is not None else None
    if resume and folder is not None and (saved := folder.load_state()) is not None:
        state.restore(saved, folder.state_path)
        logger.info(
            "Resumed at epoch %d, step %d of %d",
            state.epoch + 1,
            state.global_step,
            plan.total_steps,
        )
    logger.info(
        "Fine-tuning %s: %d trainable of %d parameters on %s",
        model.metadata.name,
        state.trainable_count,
        sum(p.numel() for p in model.parameters()),
        state.device,
    )

    cancelled = False
    model.train()
    try:
        while state.epoch < config.epochs and not cancelled:
            while not state.epoch_done:
                try:
                    loss, lr = state.step(should_stop)
                except StepCancelled:
                    cancelled = True
                    break
                every = config.checkpoint_every_steps
                if every and state.global_step % every == 0:
                    _save_state(folder, state)
                yield state.progress("train", loss, lr, started)
            if cancelled:
                break
            dice = None
            if state.validates_now:
                try:
                    dice = _validate(state, should_stop)
                except EvaluationCancelled:
                    cancelled = True
                    break
            entry, improved = state.end_epoch(dice)
            if improved and folder is not None:
                state.stamp_metadata(
                    {"epoch": state.epoch, "val_dice": entry["val_dice"]},
                )
                folder.save_model(model, BEST_NAME)
                if getattr(model, "kind", "") == "masam":
                    folder.save_authors(model)
            _save_state(folder, state)
            if folder is not None:
                folder.save_history(state.history)
            if dice is not None:
                yield state.progress(
                    "validate",
                    entry["mean_loss"],
                    entry["lr"],
                    started,
                    val_dice=dict(zip(plan.class_names, (float(v) for v in dice))),
                    val_mean_dice=entry["val_mean_dice"],
                )
    except GeneratorExit:
        logger.info("Training cancelled at step %d of %d", state.global_step, plan.total_steps)
        _save_state(folder, state)
        raise

    model.eval()
    if cancelled:
        logger.info("Training stopped at step %d of %d", state.global_step, plan.total_steps)
        _save_state(folder, state)
    state.stamp_metadata({"epoch": state.epoch, "best_epoch": state.best_epoch})
    last_path = None
    if folder is not None and not cancelled:
        last_path = folder.save_model(model, LAST_NAME)
    best_path = folder.path / BEST_NAME if folder is not None and state.best_epoch else None
    authors_path: Path | None = None
    if best_path is not None and (folder.path / AUTHORS_NAME).exists():  # type: ignore[union-attr]
        authors_path = folder.path / AUTHORS_NAME  # type: ignore[union-attr]
    best = state.best_mean
    return TrainingResult(
        model=model,
        class_names=plan.class_names,
        best_path=best_path,
        last_path=last_path,
        authors_path=authors_path,
        best_mean_dice=best if math.isfinite(best) else math.nan,
        best_val_dice=dict(zip(plan.class_names, (float(v) for v in state.best_dice))),
        best_epoch=state.best_epoch,
        history=state.history,
        step_losses=state.step_losses,
        train_cases=[c.name for c in plan.train_cases],
        val_cases=[c.name for c in plan.val_cases],
        cancelled=cancelled,
    )


def _save_state(folder: RunFolder | None, state: TrainingState) -> None:
    """Write the resume state (nothing without an output folder)."""
    if folder is not None:
        folder.save_state(state.to_dict())


def _validate(state: TrainingState, should_stop: Callable[[], bool] | None) -> np.ndarray:
    """Per-class Dice of the held-out cases through the engine (timed for the ETA)."""
    began = time.perf_counter()
    config = state.config
    dice = evaluate_cases(
        state.model,
        state.plan.val_cases,
        preset=state.plan.preset,
        box_prompts=config.box_prompts,
        batch_size=config.val_batch_size,
        device=state.device,
        autocast=config.autocast,
        should_stop=should_stop,
    )
    state.model.train()
    state.validation_seconds.append(time.perf_counter() - began)
    return dice


def train(*args: object, **kwargs: object) -> TrainingResult:
    """Run :func:`iter_train` to the end and return its result (scripts, tests)."""
    from ..inference import run

    return run(iter_train(*args, **kwargs))  # type: ignore[arg-type]
