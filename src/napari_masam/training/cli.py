"""``napari-masam train``: fine-tuning from the command line (argparse hook for ``cli.py``).

Importing this module costs no torch; :func:`run_train` imports the loop when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import BACKBONES, TrainingConfig, format_duration

logger = logging.getLogger(__name__)

_EPILOG = """\
data:
  FOLDER arguments hold imagesTr/ + labelsTr/ (Decathlon/nnU-Net layout) or X.nii.gz beside
  X_labels.nii.gz; --pair IMAGE LABELS adds one NIfTI pair, --video CLIP LABELS one video clip
  with a label stack (.tif, .npy or .nii.gz, one slice per frame). Cases are split into training
  and validation by case (a single case: by slabs); --val-pair/--val-folder give validation
  cases explicitly.

outputs (in OUTDIR):
  best.safetensors   best model by validation Dice (load it in napari or `napari-masam segment
                     --model OUTDIR/best.safetensors`)
  last.safetensors   model after the last step
  best_authors.pth   ViT MA-SAM only: trainable parts in the MA-SAM authors' format
  resume.pt          training state for --resume; history.json per-epoch loss and Dice

every recipe number is a TrainingConfig field: --config FILE.json sets any of them
(e.g. {"p_rot90_flip": 0, "warmup_steps": 50}); explicit options override the file.

run size: without --epochs/--batch-size/--max-steps-per-epoch/--config the run is sized for
the device (napari_masam.training.DEVICE_DEFAULTS): on a CPU 5 epochs x 8 steps of one group
with MA-SAM-Lite at 128 px (minutes, not hours); on a GPU the recipe's 20 epochs at 256 px.
"""


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune MA-SAM / MA-SAM-Lite on your own labels",
        description="Fine-tune MA-SAM or MA-SAM-Lite on labelled volumes or video clips "
        "(MA-SAM recipe: adapters + FacT + decoder, 0.2 CE + 0.8 Dice, AdamW, poly decay).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="folders of image/label pairs")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("IMAGE", "LABELS"))
    p.add_argument("--video", nargs=2, action="append", default=[], metavar=("CLIP", "LABELS"))
    p.add_argument("--val-pair", nargs=2, action="append", default=[], metavar=("IMAGE", "LABELS"))
    p.add_argument("--val-folder", action="append", default=[], metavar="FOLDER")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--backbone", choices=BACKBONES, default="masam-lite", help="(masam-lite)")
    p.add_argument("--sam-checkpoint", help="Meta SAM weights (ViT backbones)")
    p.add_argument("--masam-checkpoint", help="MA-SAM authors' checkpoint to start from")
    p.add_argument("--init-checkpoint", help="one of our .safetensors models to continue")
    p.add_argument("--classes", help="comma-separated class names (label 1, 2, ...)")
    p.add_argument("--preset", help="intensity preset (default: the model's)")
    p.add_argument("--config", metavar="JSON", help="TrainingConfig fields as a JSON object")
    p.add_argument(
        "--image-size",
        type=int,
        help="masam-lite input side in px (default: by device, 128 on a CPU, 256 on a GPU)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument(
        "--poly-power",
        type=float,
        help="decay exponent after the warm-up (recipe: 7; 0 = constant, 1 = linear, which "
        "suit short runs)",
    )
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--slab-thickness", type=int)
    p.add_argument("--empty-group-share", type=float)
    p.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    p.add_argument("--box-prompts", action="store_true", help="train with boxes from the labels")
    p.add_argument("--box-jitter", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--resume", action="store_true", help="continue from OUTDIR/resume.pt")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


_OPTION_FIELDS = (
    "epochs",
    "batch_size",
    "max_steps_per_epoch",
    "lr",
    "weight_decay",
    "warmup_steps",
    "poly_power",
    "val_fraction",
    "slab_thickness",
    "empty_group_share",
    "box_jitter",
    "seed",
)


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The :class:`TrainingConfig` an argument namespace describes (file, then options).

    Raises
    ------
    ValueError
        For an unreadable ``--config`` file or invalid values.
    """
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            values = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"Cannot read --config {args.config}: {exc}") from exc
        if not isinstance(values, dict):
            raise ValueError(f"--config {args.config} must hold a JSON object of fields.")
    base = TrainingConfig.from_dict(values)
    changes: dict[str, Any] = {}
    for name in _OPTION_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "classes", None):
        changes["class_names"] = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    if getattr(args, "preset", None):
        changes["intensity_preset"] = args.preset
    if getattr(args, "no_augment", False):
        changes["augment"] = False
    if getattr(args, "box_prompts", False):
        changes["box_prompts"] = True
    return dataclasses.replace(base, **changes)


def _cases(folders: list[str], pairs: list[list[str]], videos: list[list[str]]) -> list[Any]:
    from .data import load_folder_cases, load_nifti_case, load_video_case

    cases = []
    for folder in folders:
        cases.extend(load_folder_cases(folder))
    cases.extend(load_nifti_case(image, labels) for image, labels in pairs)
    cases.extend(load_video_case(clip, labels) for clip, labels in videos)
    return cases


def run_train(args: argparse.Namespace) -> int:
    """Run ``napari-masam train`` for parsed arguments; returns the exit code.

    Raises
    ------
    ValueError, FileNotFoundError
        Bad data or options (before any training starts).
    """
    from ..devices import resolve_device
    from .config import defaults_for_device
    from .data import check_cases
    from .loop import build_training_model, iter_train

    config = config_from_args(args)
    device = resolve_device(args.device)
    image_size = getattr(args, "image_size", None)
    sized_by_hand = any(
        getattr(args, name, None) is not None
        for name in ("epochs", "batch_size", "max_steps_per_epoch", "config")
    )
    if not sized_by_hand:
        sized = defaults_for_device(device.type)
        config = sized.apply(config)
        image_size = image_size or sized.image_size
        if not args.quiet:
            sys.stderr.write(
                f"run sized for {device.type}: {sized.epochs} epochs, batch {sized.batch_size}, "
                f"at most {sized.max_steps_per_epoch or 'all'} steps per epoch"
                + (f", {image_size} px" if args.backbone == "masam-lite" and image_size else "")
                + " (give --epochs etc. to choose)\n"
            )
    cases = _cases(args.folders, args.pair, args.video)
    if not cases:
        raise ValueError(
            "No training data: give FOLDERs, --pair IMAGE LABELS or --video CLIP LABELS."
        )
    val_cases = _cases(args.val_folder, args.val_pair, []) or None
    declared = len(config.class_names) or None
    largest = check_cases(cases + (val_cases or []), declared)
    num_classes = declared or largest
    model = build_training_model(
        args.backbone,
        num_classes,
        sam_checkpoint=args.sam_checkpoint,
        masam_checkpoint=args.masam_checkpoint,
        init_checkpoint=args.init_checkpoint,
        device=device,
        seed=config.seed,
        image_size=image_size if args.backbone == "masam-lite" else None,
    )
    from ..inference import run

    out = sys.stderr
    stop = threading.Event()
    gen = iter_train(
        model,
        cases,
        config,
        val_cases=val_cases,
        output_dir=args.output,
        device=device,
        resume=args.resume,
        should_stop=stop.is_set,
    )

    def show(progress: Any) -> None:
        if not args.quiet:
            out.write(_progress_line(progress))
            out.flush()

    with _first_ctrl_c_stops(stop, out):
        result = run(gen, on_yield=show)
    if result.cancelled:
        out.write(f"\ncancelled; resume with --resume -o {args.output}\n")
        return 130
    if not args.quiet:
        out.write(
            f"\nbest epoch {result.best_epoch}, mean Dice {result.best_mean_dice:.3f}: "
            f"{result.best_path}\n"
        )
    return 0


@contextlib.contextmanager
def _first_ctrl_c_stops(stop: threading.Event, out: Any) -> Iterator[None]:
    """The first Ctrl-C sets ``stop`` (the run ends within its current step, state saved); a
    second one interrupts at once. Plain Ctrl-C behaviour outside the main thread."""

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        out.write("\nstopping within this step (Ctrl-C again to abort at once) ...\n")

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress_line(progress: Any) -> str:
    """One status line for a :class:`~napari_masam.training.TrainProgress` (with time left)."""
    left = f", {format_duration(progress.eta_s)} left" if progress.eta_s is not None else ""
    if progress.stage == "train":
        return (
            f"\repoch {progress.epoch}/{progress.epochs} step {progress.step}/"
            f"{progress.total_steps} loss {progress.loss:.4f} lr {progress.lr:.2e}{left}   "
        )
    dice = ", ".join(f"{k} {v:.3f}" for k, v in (progress.val_dice or {}).items())
    return (
        f"\nepoch {progress.epoch}: mean loss {progress.loss:.4f}, validation Dice "
        f"{dice} (mean {progress.val_mean_dice:.3f}, best {progress.best_mean_dice:.3f}){left}\n"
    )
