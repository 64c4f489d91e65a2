"""The state of one fine-tuning run: its plan (fixed at the start) and what each step changes.

:class:`RunPlan` holds every decision taken before the first step (classes, split, groups,
step counts) and runs every input check; :class:`TrainingState` holds the model, optimiser,
schedule, random generators and counters, takes one optimiser step at a time and turns itself
into (and back from) the resume file's dict, so that a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.base import DISPLAY_ORIENTATION, SegmentationModel
from ..palette import label_colors
from ..preprocess import IntensityPreset, StackPipeline
from .config import TrainingConfig
from .data import TrainingCase, check_cases, select_groups, split_cases
from .models import apply_trainable, check_model_for, trainable_parameter_names
from .recipe import (
    augment_group,
    fit_target,
    jittered_group_boxes,
    lr_factor,
    masam_loss,
    warmup_steps_for,
)

STATE_FORMAT = "napari-masam-train-state/1"


# ----------------------------------------------------------------------------------------------
# Reports
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
    step_s : float or None
        Mean seconds per optimiser step measured so far in this session (None before the
        first step).
    eta_s : float or None
        Estimated seconds to the end of the run: the mean step time times the steps left,
        plus the mean validation time times the validations left (None before a step was
        measured).
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
    step_s: float | None = None
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        """Share of planned steps done."""
        return self.step / self.total_steps if self.total_steps else 1.0

    @property
    def done(self) -> int:
        """Steps done (the ``done``/``total`` pair progress bars read)."""
        return self.step

    @property
    def total(self) -> int:
        """Planned steps."""
        return self.total_steps


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
    cancelled : bool
        True when the run stopped early on request (``should_stop``); the resume state is in
        the output folder and ``model`` holds the weights of the last completed step.
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
    cancelled: bool = False


# ----------------------------------------------------------------------------------------------
# The plan: every decision before the first step
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided (and checked) before its first step.

    Attributes
    ----------
    class_names : tuple of str
    preset : IntensityPreset
        Applied to every case (the model's own unless the config names one).
    rgb : bool
        Video (RGB) cases rather than grey stacks.
    train_cases, val_cases : tuple of TrainingCase
    groups : ndarray
        (G, 2) int64 ``(case index, centre slice)`` of the training groups.
    steps_per_epoch, total_steps, warmup : int
    fingerprint : str
        Names, shapes and label histograms of the cases (resume must see the same data).
    config_json : str
        The config as canonical JSON (resume must use the same recipe).
    """

    class_names: tuple[str, ...]
    preset: IntensityPreset
    rgb: bool
    train_cases: tuple[TrainingCase, ...]
    val_cases: tuple[TrainingCase, ...]
    groups: np.ndarray
    steps_per_epoch: int
    total_steps: int
    warmup: int
    fingerprint: str
    config_json: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def make(
        cls,
        model: SegmentationModel,
        cases: Sequence[TrainingCase],
        config: TrainingConfig,
        val_cases: Sequence[TrainingCase] | None = None,
    ) -> RunPlan:
        """Check the data against the model and the recipe, split it, select the groups.

        Raises
        ------
        ValueError, TypeError
            Shapes, label values, class count, model abilities, mixed RGB/grey data.
        """
        from ..preprocess import resolve_preset

        all_cases = list(cases) + list(val_cases or [])
        declared = len(config.class_names) if config.class_names else None
        largest = check_cases(all_cases, declared)
        class_names = tuple(config.class_names) or tuple(
            f"class {i}" for i in range(1, largest + 1)
        )
        check_model_for(model, len(class_names), config)
        preset = resolve_preset(config.intensity_preset, default=model.metadata.intensity_preset)
        rgb = all_cases[0].is_rgb
        if any(c.is_rgb != rgb for c in all_cases):
            raise ValueError("Mix of RGB (video) and grey cases: train one kind of data per model.")
        depth = int(model.slices_per_group)
        if val_cases:
            train_list, val_list = list(cases), list(val_cases)
        else:
            slab = config.slab_thickness or 2 * depth
            train_list, val_list = split_cases(list(cases), config.val_fraction, slab, config.seed)
        check_cases(train_list, len(class_names))
        groups = select_groups(
            train_list,
            depth,
            config.empty_group_share,
            np.random.default_rng(config.seed),
            only_foreground=config.box_prompts,
        )
        steps = math.ceil(len(groups) / config.batch_size)
        if config.max_steps_per_epoch is not None:
            steps = min(steps, config.max_steps_per_epoch)
        total = steps * config.epochs
        return cls(
            class_names=class_names,
            preset=preset,
            rgb=rgb,
            train_cases=tuple(train_list),
            val_cases=tuple(val_list),
            groups=np.asarray(groups),
            steps_per_epoch=steps,
            total_steps=total,
            warmup=warmup_steps_for(config, total),
            fingerprint=_fingerprint(train_list) + _fingerprint(val_list),
            config_json=json.dumps(config.to_dict(), sort_keys=True),
        )

    def facts(self, trainable: int) -> dict[str, Any]:
        """What the saved model's provenance records about the run."""
        return {
            "train_cases": [c.name for c in self.train_cases],
            "val_cases": [c.name for c in self.val_cases],
            "groups": len(self.groups),
            "trainable_parameters": int(trainable),
            "preset": self.preset.to_dict(),
        }


def _fingerprint(cases: Sequence[TrainingCase]) -> str:
    """Names, shapes and label histograms of the cases (detects resuming on other data)."""
    parts = []
    for case in cases:
        labels = np.asarray(case.labels)
        hist = np.bincount(labels.astype(np.int64).ravel(), minlength=1)
        parts.append([case.name, list(np.shape(case.image)), hist.tolist()])
    return json.dumps(parts)


# ----------------------------------------------------------------------------------------------
# The state: what each step changes
# ----------------------------------------------------------------------------------------------
class StepCancelled(Exception):
    """A step was abandoned on request before the optimiser changed anything."""


class TrainingState:
    """Model, optimiser, schedule, random generators and counters of one run.

    Parameters
    ----------
    model : SegmentationModel
        Moved to ``device``; the recipe's parameters unfrozen, all others frozen.
    plan : RunPlan
    config : TrainingConfig
    device : torch.device

    Notes
    -----
    The global torch RNG is seeded from ``config.seed`` (FacT dropout draws from it); data order,
    augmentation and box jitter draw from :attr:`data_gen`. Every input group goes through
    :class:`napari_masam.preprocess.StackPipeline`, the engine's own stack -> model-input road.
    """

    def __init__(
        self,
        model: SegmentationModel,
        plan: RunPlan,
        config: TrainingConfig,
        device: torch.device,
    ) -> None:
        from ..devices import autocast_dtype

        self.model, self.plan, self.config, self.device = model, plan, config, device
        model.to(device)
        names = trainable_parameter_names(model, config.train_prompt_encoder)
        self.trainable_count = apply_trainable(model, names)
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        total, warmup, power = plan.total_steps, plan.warmup, config.poly_power
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, power)
        )
        self.amp_dtype = autocast_dtype(device) if config.autocast else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.data_gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        self.pipelines = [
            StackPipeline.for_model(model, case.image, preset=plan.preset)
            for case in plan.train_cases
        ]
        # counters and records (all saved in the resume state)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.global_step = 0
        self.order: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.best_mean = -math.inf
        self.best_epoch = 0
        self.best_dice = np.full(plan.num_classes, np.nan)
        # timings of this session (for the ETA; not saved)
        self.step_seconds: list[float] = []
        self.validation_seconds: list[float] = []

    # -- one step --------------------------------------------------------------------------
    def _group(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, 3, S, S) float32 input and (D, S, S) int64 labels of training group ``index``."""
        case_index, center = (int(v) for v in self.plan.groups[index])
        pipe = self.pipelines[case_index]
        members = pipe.members(center)
        labels = np.asarray(self.plan.train_cases[case_index].labels)
        x = torch.from_numpy(pipe.group_input(members))
        lab = torch.from_numpy(np.ascontiguousarray(pipe.labels_input(labels, members), np.int64))
        return x, lab

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs (B, D, 3, S, S), targets (B*D, S, S) and boxes (B, D, 4) or None."""
        config, batch = self.config, self.config.batch_size
        if self.order is None:
            self.order = torch.randperm(len(self.plan.groups), generator=self.data_gen)
        picks = self.order[self.step_in_epoch * batch : (self.step_in_epoch + 1) * batch]
        xs, labs, boxes = [], [], []
        for index in picks.tolist():
            x, lab = self._group(index)
            if config.augment:
                x, lab = augment_group(x, lab, config, self.data_gen)
            if config.box_prompts:
                boxes.append(
                    jittered_group_boxes(
                        lab, config.box_jitter, self.data_gen, self.model.image_size
                    )
                )
            xs.append(x)
            labs.append(lab)
        images = torch.stack(xs).to(self.device)  # B x D x 3 x S x S
        target = torch.cat(labs).to(self.device)  # B*D x S x S
        if config.box_prompts:
            target = (target > 0).long()
        box_t = torch.stack(boxes).to(self.device) if boxes else None
        return images, target, box_t

    def step(self, should_stop: Callable[[], bool] | None = None) -> tuple[float, float]:
        """One optimiser step on the next batch of the epoch; returns (loss, learning rate).

        ``should_stop`` is asked before and after the forward pass; when it answers True the
        step is abandoned before the optimiser changes anything and the random generators are
        put back, so the resume state equals the state before this step.

        Raises
        ------
        StepCancelled
            The step was abandoned on request.
        FloatingPointError
            The loss is not finite.
        """
        from ..devices import autocast_context

        started = time.perf_counter()
        rng_before = (self.data_gen.get_state(), torch.get_rng_state(), self.order)

        def abandon() -> None:
            self.data_gen.set_state(rng_before[0])
            torch.set_rng_state(rng_before[1])
            self.order = rng_before[2]
            raise StepCancelled

        if should_stop is not None and should_stop():
            abandon()
        images, target, boxes = self._batch()
        if should_stop is not None and should_stop():
            abandon()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, enabled=self.amp_dtype is not None):
            logits = self.model(images, boxes)
        config = self.config
        loss = masam_loss(
            logits,
            fit_target(target, tuple(logits.shape[-2:])),
            config.ce_weight,
            config.dice_weight,
            config.dice_smooth,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Loss became {loss.item()} at step {self.global_step + 1}: lower lr or "
                "disable autocast."
            )
        if should_stop is not None and should_stop():
            self.optimizer.zero_grad(set_to_none=True)
            abandon()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step_in_epoch += 1
        self.global_step += 1
        value = float(loss.detach())
        self.step_losses.append(value)
        self.step_seconds.append(time.perf_counter() - started)
        return value, lr

    @property
    def epoch_done(self) -> bool:
        """Whether every step of the current epoch has been taken."""
        taken = self.step_in_epoch * self.config.batch_size
        return self.step_in_epoch >= self.plan.steps_per_epoch or taken >= len(self.plan.groups)

    @property
    def validates_now(self) -> bool:
        """Whether the epoch just finished is validated (every ``val_every_epochs``, and last)."""
        n = self.epoch + 1
        return n % self.config.val_every_epochs == 0 or n == self.config.epochs

    def end_epoch(self, dice: np.ndarray | None) -> tuple[dict[str, Any], bool]:
        """Record the finished epoch (``dice``: its validation, or None); returns (entry,
        whether the validation is the best so far)."""
        steps = self.plan.steps_per_epoch
        mean_loss = float(np.mean(self.step_losses[-steps:])) if self.step_losses else math.nan
        entry: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "mean_loss": mean_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        improved = False
        if dice is not None:
            mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
            entry["val_dice"] = [_json_float(v) for v in dice]
            entry["val_mean_dice"] = mean
            if mean > self.best_mean:
                self.best_mean, self.best_epoch, self.best_dice = mean, self.epoch + 1, dice.copy()
                improved = True
        self.history.append(entry)
        self.epoch += 1
        self.step_in_epoch = 0
        self.order = None
        return entry, improved

    # -- reports ---------------------------------------------------------------------------
    def eta_seconds(self) -> float | None:
        """Seconds left by this session's mean step (and validation) time; None before a step."""
        if not self.step_seconds:
            return None
        recent = self.step_seconds[-20:]
        steps_left = self.plan.total_steps - self.global_step
        every = self.config.val_every_epochs
        epochs = self.config.epochs
        validations_left = sum(
            1 for e in range(self.epoch + 1, epochs + 1) if e % every == 0 or e == epochs
        )
        per_validation = (
            float(np.mean(self.validation_seconds))
            if self.validation_seconds
            else float(np.mean(recent)) * max(1, len(self.plan.val_cases))
        )
        return float(np.mean(recent)) * steps_left + per_validation * validations_left

    def progress(
        self, stage: str, loss: float | None, lr: float, started: float, **extra: Any
    ) -> TrainProgress:
        """A :class:`TrainProgress` of the current counters."""
        best = self.best_mean if math.isfinite(self.best_mean) else None
        return TrainProgress(
            stage,
            self.epoch + (1 if stage == "train" else 0),
            self.config.epochs,
            self.global_step,
            self.plan.total_steps,
            loss,
            lr,
            best_mean_dice=best,
            elapsed_s=time.perf_counter() - started,
            step_s=float(np.mean(self.step_seconds)) if self.step_seconds else None,
            eta_s=self.eta_seconds(),
            **extra,
        )

    # -- resume ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resume state: a plain dict of tensors and strings (loads with weights_only)."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "config": self.plan.config_json,
            "fingerprint": self.plan.fingerprint,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.global_step,
            "order": self.order if self.order is not None else torch.zeros(0, dtype=torch.int64),
            "trainable": {
                n: p.detach().cpu().clone()
                for n, p in self.model.named_parameters()
                if p.requires_grad
            },
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data_rng": self.data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "progress": json.dumps(
                {
                    "history": self.history,
                    "step_losses": self.step_losses,
                    "best_mean": self.best_mean if math.isfinite(self.best_mean) else None,
                    "best_epoch": self.best_epoch,
                    "best_dice": [_json_float(v) for v in self.best_dice],
                }
            ),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any], where: Path | str) -> None:
        """Continue from a :meth:`to_dict` state written by the same run.

        Raises
        ------
        ValueError
            Not a training state, or written with another config, other data or another model.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{where} is not a napari-masam training state.")
        if state["config"] != self.plan.config_json:
            raise ValueError(
                f"{where} was written with another TrainingConfig: resume with the same "
                "settings, or train into a new output folder."
            )
        if state["fingerprint"] != self.plan.fingerprint:
            raise ValueError(
                f"{where} was written for other training data (cases, shapes or labels differ): "
                "resume with the same data, or train into a new output folder."
            )
        if list(state["trainable"].keys()) != self.trainable_names:
            raise ValueError(f"{where} holds the trainable parts of another model.")
        with torch.no_grad():
            named = dict(self.model.named_parameters())
            for name, value in state["trainable"].items():
                named[name].copy_(value.to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["step"]
        self.order = state["order"] if state["order"].numel() else None
        progress = json.loads(state["progress"])
        self.history, self.step_losses = progress["history"], progress["step_losses"]
        best = progress["best_mean"]
        self.best_mean = -math.inf if best is None else float(best)
        self.best_epoch = progress["best_epoch"]
        self.best_dice = np.array(
            [np.nan if v is None else v for v in progress["best_dice"]], dtype=np.float64
        )

    # -- the model's record ----------------------------------------------------------------
    def stamp_metadata(self, extra: dict[str, Any]) -> None:
        """Record class names, colours, preprocessing and the run on ``model.metadata``."""
        model, config, names = self.model, self.config, self.plan.class_names
        base = model.metadata
        colors = config.class_colors or label_colors(len(names))
        provenance = dict(base.provenance)
        provenance.setdefault("fine_tuned_from", base.name)
        provenance["training"] = {
            "config": config.to_dict(),
            **self.plan.facts(self.trainable_count),
            **extra,
        }
        model.metadata = dataclasses.replace(
            base,
            name=f"{provenance['fine_tuned_from']}-finetuned",
            class_names=tuple(names),
            class_colors=tuple(colors),
            intensity_preset=self.plan.preset.name,
            orientation="" if self.plan.rgb else (base.orientation or DISPLAY_ORIENTATION),
            provenance=provenance,
        )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
