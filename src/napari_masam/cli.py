"""``napari-masam``: headless batch segmentation, model/device info, the quick-start demo.

Subcommands
-----------
``segment INPUT... -o OUTDIR``
    Segment NIfTI volumes, videos and TIFF stacks (files or folders) with the same
    :class:`~napari_masam.session.SegmentationSession` code the napari widget uses. Sequential by
    default; ``--dask-scheduler ADDRESS`` (or ``local``/``--workers N``) runs one task per input on
    Dask distributed. See :mod:`napari_masam.batch` for the output layout, resume rule and
    provenance sidecar.
``info``
    Models, devices, cache location, software versions.
``demo``
    Segments the bundled sample volume (or a synthetic phantom) with the embedded default model
    from automatically derived boxes; writes a NIfTI and its sidecar. No network.
``train``
    Fine-tuning, provided by :mod:`napari_masam.training` when it is installed.

Exit codes: 0 all inputs done or up to date, 1 at least one input failed, 2 a usage or
configuration error (nothing ran), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import batch

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

BOXES_HELP = """\
box files (--boxes): one file for every input, or a folder with <stem>.json / <stem>.csv per
input (case01.nii.gz -> case01.json). Each box is an object id, a slice (volume, display
orientation as napari shows it) or frame (video) index from 0, and x0 y0 x1 y1 in pixel indices
of that slice (x = column, y = row, max edge inclusive). Boxes of one object on several
keyframes are interpolated linearly in between, as in the widget. Schema:
napari_masam.prompts.load_boxes_file.
"""


#: Demo prompts for the bundled Colin27 T1 sample (``data/colin27_t1_2mm.nii.gz``, identified by
#: its sha256): the brain, as the bounding boxes (XYXY, display slice pixels, inclusive) of the
#: same subject's brain mask (mricron's ``ch2bet.nii.gz`` taken to the sample's 2 mm grid by the
#: sample's own recipe) on three keyframes; slices 39 and 41 are interpolated.
DEMO_SAMPLE_SHA256 = "10421d0bd493c3121c4a7a509d56a30a9e57f9f44cf64634450afcadc932fd64"
DEMO_SAMPLE_BOXES: dict[int, dict[int, tuple[float, float, float, float]]] = {
    1: {38: (10, 10, 80, 98), 40: (11, 10, 79, 97), 42: (11, 11, 79, 97)}
}


class UsageError(Exception):
    """A problem with the command line or configuration: exit code 2, nothing processed."""


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------
def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-masam`` argument parser (subcommands segment, info, demo, train)."""
    parser = argparse.ArgumentParser(
        prog="napari-masam",
        description="MA-SAM segmentation of CT, MRI and video, headless.",
    )
    parser.add_argument("--version", action="version", version=f"napari-masam {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log messages (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    seg = sub.add_parser(
        "segment",
        help="segment volumes, videos and TIFF stacks",
        description="Segment NIfTI volumes, videos and TIFF stacks, files or folders.",
        epilog=BOXES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seg.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    seg.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    _add_model_arguments(seg)
    seg.add_argument(
        "--mode",
        choices=batch.MODE_CHOICES,
        default=None,
        help="auto (prompt-free classes) or boxes; default: auto if the model supports it, "
        "else boxes",
    )
    seg.add_argument("--boxes", metavar="FILE_OR_FOLDER", help="box prompts (see below)")
    seg.add_argument(
        "--preset",
        help="intensity preset (ct_abdomen, ct_pancreas, mri, minmax, rgb); default: the model's",
    )
    seg.add_argument("--stride", type=int, default=1, help="step between slice windows (1)")
    seg.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    seg.add_argument(
        "--format",
        dest="output_format",
        choices=batch.FORMAT_CHOICES,
        default="auto",
        help="output of videos/TIFF stacks: png (folder), tiff, mp4-overlay; NIfTI inputs "
        "always give NIfTI with the input's header (default auto: png for videos, tiff for "
        "TIFF stacks)",
    )
    seg.add_argument(
        "--chunk-frames",
        type=int,
        default=64,
        help="frames per streamed video chunk (memory does not grow with video length)",
    )
    seg.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (per worker with Dask; default: torch's own, or cores / workers "
        "for a LocalCluster); 1 is fastest on a busy shared machine",
    )
    seg.add_argument("--overwrite", action="store_true", help="redo inputs already done")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    seg.add_argument(
        "--json", action="store_true", help="print a machine-readable summary on stdout"
    )
    dask = seg.add_argument_group("scale-out (needs the [distributed] extra)")
    dask.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        help="run one task per input on this Dask scheduler (tcp://host:8786), or 'local' for "
        "a LocalCluster on this machine",
    )
    dask.add_argument(
        "--workers", type=int, default=None, help="LocalCluster workers (implies local)"
    )
    dask.add_argument(
        "--dask-processes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LocalCluster workers as processes (default) or as threads of this process",
    )
    seg.set_defaults(func=cmd_segment)

    info = sub.add_parser("info", help="models, devices, cache location, versions")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser(
        "demo",
        help="segment the bundled sample volume with the embedded model (no network)",
        description="Segment the bundled sample volume (a synthetic phantom if none is "
        "bundled) with the embedded default model, from boxes derived automatically; write a "
        "NIfTI and its provenance sidecar.",
    )
    demo.add_argument(
        "-o", "--output", default="napari-masam-demo", help="output folder (napari-masam-demo)"
    )
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    demo.add_argument("--overwrite", action="store_true", help="redo even if up to date")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    demo.set_defaults(func=cmd_demo)

    _add_train_parser(sub)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (default: the embedded LiteMedSAM)")
    group.add_argument(
        "--model", help="registry name (see `napari-masam info`) or a .safetensors file"
    )
    group.add_argument("--checkpoint", metavar="PATH", help="napari-masam single-file checkpoint")
    group.add_argument("--sam-checkpoint", metavar="PATH", help="SAM backbone checkpoint (.pth)")
    group.add_argument(
        "--masam-checkpoint", metavar="PATH", help="MA-SAM fine-tuned parts (with --sam-checkpoint)"
    )
    group.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")


def _add_train_parser(sub: Any) -> None:
    """Let :mod:`napari_masam.training` add ``train`` if it provides the hook."""
    try:
        from . import training
    except ImportError as exc:
        logger.debug("training is not available: %s", exc)
        training = None
    add = getattr(training, "add_train_parser", None)
    run = getattr(training, "run_train", None)
    if callable(add) and callable(run):
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(func=_run_train)
        return
    train = sub.add_parser("train", help="fine-tune a model (not available in this install)")
    train.set_defaults(func=_train_unavailable)


def _run_train(args: argparse.Namespace) -> int:
    from . import training

    try:
        code = training.run_train(args)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    return int(code or 0)


def _train_unavailable(args: argparse.Namespace) -> int:
    raise UsageError(
        "training is not available: napari_masam.training does not provide "
        "add_train_parser/run_train in this install"
    )


# ----------------------------------------------------------------------------------------------
# output helpers
# ----------------------------------------------------------------------------------------------
def _bar(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


def _write(message: str, stream: TextIO = sys.stderr) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=stream)


def _print_human_summary(summary: dict[str, Any], output: Path, stream: TextIO) -> None:
    print(
        f"{summary['done']} done, {summary['skipped']} up to date, {summary['failed']} failed "
        f"({summary['frames']} slices/frames in {summary['elapsed_s']:.1f} s) -> {output}",
        file=stream,
    )


# ----------------------------------------------------------------------------------------------
# segment
# ----------------------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace) -> batch.BatchConfig:
    """Build the :class:`~napari_masam.batch.BatchConfig` of ``segment`` arguments."""
    try:
        model, checkpoint = args.model, args.checkpoint
        if model is not None and Path(model).is_file() and checkpoint is None:
            # `--model best.safetensors` (what `train` suggests) means our single file
            model, checkpoint = None, model
        spec = batch.ModelSpec(
            model=model,
            checkpoint=checkpoint,
            sam_checkpoint=args.sam_checkpoint,
            masam_checkpoint=args.masam_checkpoint,
            device=args.device,
        )
        if model is not None:
            from .model.registry import MODEL_REGISTRY

            if model not in MODEL_REGISTRY:
                raise ValueError(
                    f"--model {model!r} is neither a known model ({', '.join(MODEL_REGISTRY)}) "
                    "nor an existing checkpoint file"
                )
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.mode == "boxes" and not args.boxes:
            raise ValueError(
                "--mode boxes needs --boxes FILE_OR_FOLDER (see `napari-masam segment --help`)"
            )
        return batch.BatchConfig(
            model=spec,
            output_dir=Path(args.output).expanduser().absolute(),
            mode=args.mode,
            boxes=Path(args.boxes).expanduser().absolute() if args.boxes else None,
            preset=args.preset,
            stride=args.stride,
            batch_size=args.batch_size,
            output_format=args.output_format,
            overwrite=args.overwrite,
            chunk_frames=args.chunk_frames,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc


def cmd_segment(args: argparse.Namespace) -> int:
    """``napari-masam segment``: returns the exit code."""
    config = config_from_args(args)
    items, problems = batch.discover_inputs(args.inputs)
    if not items and not problems:
        raise UsageError(f"no NIfTI, video or TIFF inputs found in {' '.join(args.inputs)}")
    quiet = args.quiet
    for problem in problems:
        _write(f"error: {problem.error}")

    start = time.perf_counter()
    use_dask = args.dask_scheduler is not None or args.workers is not None
    if use_dask:
        results = _segment_dask(args, items, config, quiet)
    else:
        results = _segment_sequential(items, config, quiet, args.threads)
    elapsed = time.perf_counter() - start
    results = problems + results
    summary = batch.summarize(results, elapsed)
    summary["output_dir"] = str(config.output_dir)
    if args.json:
        print(json.dumps(summary, indent=2), file=sys.stdout)
    elif not quiet:
        _print_human_summary(summary, config.output_dir, sys.stdout)
    return EXIT_FAILED if summary["failed"] else EXIT_OK


def _report(result: batch.JobResult, quiet: bool) -> None:
    name = Path(result.input).name
    if result.status == "failed":
        _write(f"error: {result.error}")
    elif not quiet:
        verb = "up to date" if result.status == "skipped" else f"done in {result.seconds:.1f} s"
        _write(f"{name}: {verb} -> {', '.join(Path(o).name for o in result.outputs)}")


def _segment_sequential(
    items: Sequence[batch.BatchInput],
    config: batch.BatchConfig,
    quiet: bool,
    threads: int | None = None,
) -> list[batch.JobResult]:
    holder = batch.SessionHolder(config.model, torch_threads=threads)
    overall = _bar(total=len(items), unit="file", desc="files", position=0, disable=quiet)
    current: dict[str, Any] = {}

    def on_start(item: batch.BatchInput) -> batch.ProgressCallback:
        bar = _bar(
            total=0, unit="frame", desc=item.path.name, position=1, leave=False, disable=quiet
        )
        current["bar"] = bar

        def progress(done: int, total: int) -> None:
            if total and bar.total != total:
                bar.total = total
            bar.update(max(0, done - bar.n))

        return progress

    def on_result(item: batch.BatchInput, result: batch.JobResult) -> None:
        bar = current.pop("bar", None)
        if bar is not None:
            bar.close()
        overall.update(1)
        _report(result, quiet)

    try:
        _check_mode_early(holder, config)
        return batch.run_batch(items, config, holder=holder, on_start=on_start, on_result=on_result)
    finally:
        bar = current.pop("bar", None)
        if bar is not None:
            bar.close()
        overall.close()


def _check_mode_early(holder: batch.SessionHolder, config: batch.BatchConfig) -> None:
    """Fail before the first input when the model cannot run in the requested/default mode.

    Only loads the model when the answer depends on it (no --boxes, or --mode auto).
    """
    if config.mode == "boxes" and config.boxes is not None:
        return
    if config.mode is None and config.boxes is not None:
        return
    try:
        model = batch.session_model(holder.get())
        batch.resolve_mode(config.mode, model, config.boxes is not None)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc


def _segment_dask(
    args: argparse.Namespace,
    items: Sequence[batch.BatchInput],
    config: batch.BatchConfig,
    quiet: bool,
) -> list[batch.JobResult]:
    try:
        from . import distributed as dist
    except ImportError as exc:  # pragma: no cover - the module itself imports lazily
        raise UsageError(str(exc)) from exc
    scheduler = args.dask_scheduler
    if scheduler in (None, "local"):
        scheduler = None
    overall = _bar(total=len(items), unit="file", desc="files", disable=quiet)

    def on_result(item: batch.BatchInput, result: batch.JobResult) -> None:
        overall.update(1)
        _report(result, quiet)

    try:
        return dist.run_distributed(
            items,
            config,
            scheduler=scheduler,
            n_workers=args.workers,
            processes=args.dask_processes,
            threads_per_worker=args.threads,
            on_result=on_result,
        )
    except dist.DistributedUnavailable as exc:
        raise UsageError(str(exc)) from exc
    finally:
        overall.close()


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------
def cache_location() -> Path | None:
    """On-disk embedding cache folder, if :mod:`napari_masam.cache` defines a default one.

    None: embeddings are cached in memory per session only (the current default).
    """
    try:
        from . import cache
    except ImportError:
        return None
    for name in ("default_cache_dir", "cache_dir", "default_directory"):
        func = getattr(cache, name, None)
        if callable(func):
            return Path(func())
    return None


def gather_info() -> dict[str, Any]:
    """Everything ``napari-masam info`` shows, JSON-able."""
    from .model.registry import DEFAULT_MODEL, MODEL_REGISTRY

    info: dict[str, Any] = {"version": _version()}
    info["models"] = [
        {
            "name": preset.name,
            "description": preset.description,
            "needs_weights": preset.needs_weights,
            "default": preset.name == DEFAULT_MODEL,
        }
        for preset in MODEL_REGISTRY.values()
    ]
    try:
        from .devices import available_devices, resolve_device

        info["devices"] = {"available": available_devices(), "auto": str(resolve_device("auto"))}
    except Exception as exc:  # info must work even where torch is broken
        info["devices"] = {"error": f"{type(exc).__name__}: {exc}"}
    location = cache_location()
    info["cache"] = str(location) if location else "memory (per session; no disk cache)"
    try:
        from .weights import litemedsam_weights_path

        info["embedded_weights"] = str(litemedsam_weights_path())
    except Exception as exc:
        info["embedded_weights"] = f"unavailable ({type(exc).__name__}: {exc})"
    sample = sample_volume_path()
    info["sample_data"] = str(sample) if sample else None
    try:
        import distributed  # noqa: F401

        info["distributed"] = True
    except ImportError:
        info["distributed"] = False
    info["software"] = batch.software_versions()
    return info


def cmd_info(args: argparse.Namespace) -> int:
    """``napari-masam info``."""
    info = gather_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    out = sys.stdout
    print(f"napari-masam {info['version']}", file=out)
    print("\nModels (--model):", file=out)
    width = max(len(m["name"]) for m in info["models"])
    for m in info["models"]:
        mark = "*" if m["default"] else " "
        print(f"  {mark} {m['name']:<{width}}  {m['description']}", file=out)
    print("  (* default)", file=out)
    devices = info["devices"]
    if "error" in devices:
        print(f"\nDevices: unavailable ({devices['error']})", file=out)
    else:
        print(f"\nDevices: {', '.join(devices['available'])} (auto -> {devices['auto']})", file=out)
    print(f"Cache: {info['cache']}", file=out)
    print(f"Embedded weights: {info['embedded_weights']}", file=out)
    print(f"Sample data: {info['sample_data'] or 'not bundled (demo uses a phantom)'}", file=out)
    print(
        f"Dask distributed: {'yes' if info['distributed'] else 'no (pip install napari-masam[distributed])'}",
        file=out,
    )
    print("\nSoftware:", file=out)
    for name, version in info["software"].items():
        print(f"  {name}: {version or '-'}", file=out)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------
def sample_volume_path() -> Path | None:
    """The bundled sample NIfTI volume (``napari_masam/data``), or None."""
    data = Path(__file__).parent / "data"
    if not data.is_dir():
        return None
    candidates = sorted(p for p in data.iterdir() if batch.input_kind(p) == "nifti")
    volumes = [p for p in candidates if not _looks_like_labels(p.name)]
    return (volumes or candidates or [None])[0]


def _looks_like_labels(name: str) -> bool:
    lower = name.lower()
    return any(token in lower for token in ("seg", "label", "mask", "atlas"))


#: Grid of the demo's CT phantom (small, so the demo stays quick on a CPU): (Z, Y, X), mm.
PHANTOM_SHAPE_ZYX = (20, 64, 80)
PHANTOM_SPACING_ZYX = (10.0, 5.0, 5.0)
#: Phantom organs the demo puts boxes on (label values of io.sample_data.PHANTOM_CLASSES).
PHANTOM_DEMO_OBJECTS = (1, 2)  # liver, spleen


def write_phantom(path: Path, phantom: Any = None) -> Path:
    """Write the synthetic abdominal CT of :func:`napari_masam.io.sample_data.make_ct_phantom`
    (HU, int16) as a RAS NIfTI whose displayed volume is ``phantom.image_hu``.

    ``phantom`` defaults to ``make_ct_phantom(PHANTOM_SHAPE_ZYX, PHANTOM_SPACING_ZYX)``.
    """
    from .io.nifti import write_nifti
    from .io.sample_data import make_ct_phantom

    if phantom is None:
        phantom = make_ct_phantom(PHANTOM_SHAPE_ZYX, PHANTOM_SPACING_ZYX)
    return write_nifti(
        path,
        phantom.image_hu,
        is_labels=False,
        spacing_zyx=phantom.spacing_zyx,
        translate_zyx=phantom.translate_zyx,
    )


def otsu_threshold(values: Any, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample: the cut maximising the between-class variance."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    total = weight[-1]
    mean_low = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = mean_low / weight
        mu1 = (mean_low[-1] - mean_low) / (total - weight)
        between = weight * (total - weight) * (mu0 - mu1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[1:][int(np.argmax(between))])


def derive_demo_boxes(
    volume_zyx: Any, n_objects: int = 2, n_keyframes: int = 3
) -> dict[int, dict[int, tuple[float, float, float, float]]]:
    """Boxes around the brightest structures of a volume, on a few keyframes each.

    Otsu's threshold gives a mask of bright structures (applied a second time within the
    mask when the first cut only separated the body from the air, i.e. kept > 25 % of the
    voxels); its ``n_objects`` largest 3-D connected
    blobs become objects 1..n. Each gets ``n_keyframes`` slices evenly spread over the middle
    60 % of its extent, with the blob's bounding box there padded by 3 pixels (XYXY pixel
    indices of the displayed slice, max edge inclusive) -- the demo's stand-in for boxes a user
    draws.

    Returns
    -------
    dict
        ``{object_id: {slice: (x0, y0, x1, y1)}}``.

    Raises
    ------
    ValueError
        If nothing stands out of the background.
    """
    import numpy as np
    from scipy import ndimage

    volume = np.asarray(volume_zyx, dtype=np.float32)
    bright = volume > otsu_threshold(volume)
    if bright.mean() > 0.25:  # that cut separated air from the body: cut again inside
        bright = volume > otsu_threshold(volume[bright])
    blobs, count = ndimage.label(bright)
    if count == 0:
        raise ValueError("demo: the sample volume has no bright structure to put a box on")
    sizes = ndimage.sum_labels(np.ones_like(blobs), blobs, index=np.arange(1, count + 1))
    order = np.argsort(sizes)[::-1][:n_objects] + 1
    return keyframe_boxes(blobs, [int(b) for b in order], n_keyframes)


def keyframe_boxes(
    labels_zyx: Any, label_ids: Sequence[int], n_keyframes: int = 3
) -> dict[int, dict[int, tuple[float, float, float, float]]]:
    """Boxes of the given labels of a ``(Z, Y, X)`` label volume on a few keyframes each.

    Label ``label_ids[i]`` becomes object ``i + 1`` (labels absent from the volume are
    skipped). Each gets ``n_keyframes`` slices evenly spread over the middle 60 % of its
    extent, with its bounding box there padded by 3 pixels (XYXY pixel indices of the displayed
    slice, max edge inclusive).
    """
    import numpy as np

    blobs = np.asarray(labels_zyx)
    boxes: dict[int, dict[int, tuple[float, float, float, float]]] = {}
    _, height, width = blobs.shape
    for blob in label_ids:
        zs = np.flatnonzero((blobs == blob).any(axis=(1, 2)))
        if zs.size == 0:
            continue
        lo, hi = int(zs[0]), int(zs[-1])
        span = hi - lo
        picks = np.unique(
            np.round(np.linspace(lo + 0.2 * span, hi - 0.2 * span, n_keyframes)).astype(int)
        )
        frames: dict[int, tuple[float, float, float, float]] = {}
        for z in picks:
            rows, cols = np.nonzero(blobs[z] == blob)
            if rows.size == 0:
                continue
            frames[int(z)] = (
                float(max(cols.min() - 3, 0)),
                float(max(rows.min() - 3, 0)),
                float(min(cols.max() + 3, width - 1)),
                float(min(rows.max() + 3, height - 1)),
            )
        if frames:
            boxes[len(boxes) + 1] = frames
    return boxes


def write_boxes_json(path: Path, boxes: dict[int, dict[int, tuple[float, ...]]]) -> Path:
    """Write keyframe boxes in the box-file schema of ``segment --boxes`` (JSON, atomically)."""
    rows = [
        {
            "object": int(obj),
            "slice": int(z),
            "x0": float(xyxy[0]),
            "y0": float(xyxy[1]),
            "x1": float(xyxy[2]),
            "y1": float(xyxy[3]),
        }
        for obj, frames in sorted(boxes.items())
        for z, xyxy in sorted(frames.items())
    ]
    batch.write_json_atomic(path, {"boxes": rows})
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    """``napari-masam demo``: the README quick start."""
    import numpy as np

    from .io.nifti import read_nifti
    from .model.registry import DEFAULT_MODEL

    out = Path(args.output).expanduser().absolute()
    sample = sample_volume_path()
    source = "bundled sample"
    phantom_boxes = None
    if sample is None:
        from .io.sample_data import make_ct_phantom

        phantom = make_ct_phantom(PHANTOM_SHAPE_ZYX, PHANTOM_SPACING_ZYX)
        sample = write_phantom(out / "inputs" / "phantom.nii.gz", phantom)
        source = "synthetic phantom"
        phantom_boxes = keyframe_boxes(phantom.labels, PHANTOM_DEMO_OBJECTS)
    if phantom_boxes is not None:
        boxes = phantom_boxes  # the phantom's exact organs
    elif batch.file_sha256(sample) == DEMO_SAMPLE_SHA256:
        boxes = DEMO_SAMPLE_BOXES
    else:
        boxes = derive_demo_boxes(np.asarray(read_nifti(sample).data))
    stem = batch.input_stem(sample)
    boxes_path = write_boxes_json(out / "boxes" / f"{stem}.json", boxes)
    config = batch.BatchConfig(
        model=batch.ModelSpec(model=DEFAULT_MODEL, device=args.device),
        output_dir=out,
        mode="boxes",
        boxes=boxes_path,
        overwrite=args.overwrite,
    )
    item = batch.BatchInput(sample, "nifti", stem)
    holder = batch.SessionHolder(config.model)
    bar = _bar(total=0, unit="slice", desc=sample.name, disable=args.quiet)

    def progress(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(max(0, done - bar.n))

    try:
        result = batch.run_job(item, config, holder, progress)
    finally:
        bar.close()
    summary: dict[str, Any] = {
        "input": str(sample),
        "input_source": source,
        "model": DEFAULT_MODEL,
        "boxes": str(boxes_path),
        **result.to_dict(),
    }
    if result.status == "failed":
        _write(f"error: {result.error}")
        if args.json:
            print(json.dumps(summary, indent=2))
        return EXIT_FAILED
    from .io.nifti import read_nifti as _read

    labels = np.asarray(_read(result.outputs[0]).data)
    counts = {int(v): int(n) for v, n in zip(*np.unique(labels, return_counts=True)) if v}
    summary["voxels_per_label"] = counts
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        state = "up to date" if result.status == "skipped" else f"{result.seconds:.1f} s"
        print(f"napari-masam demo ({source}: {sample.name}, model {DEFAULT_MODEL}, {state})")
        print(f"  boxes:      {boxes_path} ({len(boxes)} objects)")
        print(f"  labels:     {result.outputs[0]}")
        print(f"  provenance: {result.sidecar}")
        for label, n in counts.items():
            print(f"  object {label}: {n} voxels")
        print(f"Open in napari: napari {sample} {result.outputs[0]}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def _attach_log_handler(verbosity: int) -> tuple[logging.Handler, int]:
    """Show napari_masam's log on stderr for this run (undone by :func:`main`)."""
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    package_logger = logging.getLogger("napari_masam")
    package_logger.addHandler(handler)
    old_level = package_logger.level
    if verbosity:
        package_logger.setLevel(level)
    return handler, old_level


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``napari-masam`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler, old_level = _attach_log_handler(args.verbose)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"napari-masam {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "napari-masam: interrupted; finished outputs are kept, none is half-written",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        package_logger = logging.getLogger("napari_masam")
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
