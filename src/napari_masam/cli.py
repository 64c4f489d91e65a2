"""``napari-masam``: headless batch segmentation, model/device info, the quick-start demo.

Subcommands
-----------
``segment INPUT... -o OUTDIR``
    Segment NIfTI volumes, videos and TIFF stacks (files or folders) with the same
    :class:`~napari_masam.session.SegmentationSession` code the napari widget uses. Sequential by
    default; ``--dask-scheduler ADDRESS`` (or ``local``/``--workers N``) runs one task per input on
    Dask distributed. See :mod:`napari_masam.batch` for the output layout, resume rule and
    provenance sidecar.
``precompute INPUT... [--cache-dir DIR]``
    Encode every slice of volumes/TIFF stacks once into the on-disk embedding cache.
``boxes IN OUT [--to napari|table]``
    Convert box files between napari's Shapes CSV and the ``segment --boxes`` table.
``info [--cache-dir DIR]``
    Models, backends, devices, the embedding cache (location, entries, size), versions.
``demo``
    Segments the bundled sample volume (or a synthetic phantom) with the embedded default model
    from automatically derived boxes (:mod:`napari_masam.demo`); writes a NIfTI and its sidecar.
    No network.
``train``
    Fine-tuning (:mod:`napari_masam.training`).

Exit codes: 0 all inputs done or up to date, 1 at least one input failed, 2 a usage or
configuration error found before any work (unknown --model/--preset/--backend values, an
unusable box file, conflicting model files), 130 interrupted.
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

from . import batch, demo
from .demo import (  # noqa: F401 - the demo's names, importable from here as before
    DEMO_SAMPLE_BOXES,
    DEMO_SAMPLE_SHA256,
    PHANTOM_DEMO_OBJECTS,
    PHANTOM_SHAPE_ZYX,
    PHANTOM_SPACING_ZYX,
    derive_demo_boxes,
    keyframe_boxes,
    otsu_threshold,
    sample_volume_path,
    write_boxes_json,
    write_phantom,
)

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

BOXES_HELP = """\
box files (--boxes): one file for every input, or a folder with <stem>.json / <stem>.csv per
input (case01.nii.gz -> case01.json). Two formats:
  table (JSON or CSV): object,slice,x0,y0,x1,y1[,last_slice] -- object id (whole number >= 1),
    slice (volume, display orientation as napari shows it) or frame (video) index from 0, and
    x0 y0 x1 y1 in pixel indices of that slice (x = column, y = row, max edge inclusive);
  napari Shapes CSV: what File > Save Selected Layers writes for a Shapes layer of 3-D
    rectangles drawn over the image (ellipses/polygons: their bounding box); one object per
    shape unless an "object" column says otherwise.
Boxes of one object on several keyframes are interpolated linearly in between, as in the widget
(with --propagate they are keyframes of the model's propagation; last_slice bounds the walk).
Empty files, files without boxes, non-integral ids/slices and boxes outside the image are
errors. `napari-masam boxes IN OUT` converts between the formats. Schema: napari_masam.io.boxes.
"""


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
        help="auto (prompt-free classes) or boxes; default: boxes when --boxes is given, else "
        "auto if the model supports it",
    )
    seg.add_argument("--boxes", metavar="FILE_OR_FOLDER", help="box prompts (see below)")
    seg.add_argument(
        "--propagate",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="boxes mode: treat the boxes as keyframes and let the model propagate each object "
        "through the slices/frames (an object's last_slice bounds its walk); default: boxes "
        "interpolated between keyframes",
    )
    seg.add_argument(
        "--preset",
        choices=_preset_names(),
        help="intensity preset; default: the model's",
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
    info.add_argument(
        "--cache-dir", metavar="DIR", default=None, help="embedding cache folder to describe"
    )
    info.set_defaults(func=cmd_info)

    pre = sub.add_parser(
        "precompute",
        help="fill the on-disk embedding cache for volumes/TIFF stacks",
        description="Encode every slice of each input once and keep the image embeddings in "
        "the on-disk cache, keyed by content, model and preprocessing: napari-masam (widget "
        "or CLI) then needs only the decoder for box prompts on these images.",
    )
    pre.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/TIFF files or folders")
    pre.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help=f"cache folder (default: {default_cache_dir()})",
    )
    pre.add_argument(
        "--cache-max-gb",
        type=_positive_float,
        default=None,
        help="size bound of the cache folder in GiB; the least recently used entries go first "
        "(default: the cache's own bound, 20 GiB)",
    )
    _add_model_arguments(pre)
    pre.add_argument("--preset", choices=_preset_names(), help="intensity preset")
    pre.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pre.set_defaults(func=cmd_precompute)

    boxes = sub.add_parser(
        "boxes",
        help="convert box files (napari Shapes CSV <-> the segment --boxes table)",
        description="Read a box file (the JSON/CSV table of `segment --boxes` or a CSV saved "
        "from a napari Shapes layer) and write it as napari's Shapes CSV (open it in napari "
        "with File > Open) or as the table.",
    )
    boxes.add_argument("source", metavar="IN", help="box file to read")
    boxes.add_argument("target", metavar="OUT", help="file to write")
    boxes.add_argument(
        "--to",
        choices=("napari", "table"),
        default="napari",
        help="napari: napari's Shapes CSV with an object column (default); table: the "
        "object/slice/x0/y0/x1/y1 table (JSON or CSV by OUT's suffix)",
    )
    boxes.set_defaults(func=cmd_boxes)

    demo = sub.add_parser(
        "demo",
        help="segment the whole brain of the bundled sample with the embedded model (no network)",
        description="Segment the bundled sample volume (a synthetic phantom if none is "
        "bundled) with the embedded default model: propagate from one box (the phantom: a few "
        "keyframe boxes per organ) through every slice the object spans; write a NIfTI and its "
        "provenance sidecar and print slices/s.",
    )
    demo.add_argument(
        "-o", "--output", default="napari-masam-demo", help="output folder (napari-masam-demo)"
    )
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    demo.add_argument(
        "--backend",
        type=_backend_argument,
        default="auto",
        help="inference backend (auto, torch, onnxruntime, openvino; see `segment --help`)",
    )
    demo.add_argument("--overwrite", action="store_true", help="redo even if up to date")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    demo.set_defaults(func=cmd_demo)

    _add_train_parser(sub)
    return parser


def _preset_names() -> tuple[str, ...]:
    from .preprocess import INTENSITY_PRESETS

    return tuple(INTENSITY_PRESETS)


def _backend_argument(value: str) -> str:
    from .model.runtime import check_backend

    try:
        return check_backend(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _model_argument(value: str) -> str:
    """``--model``: a registry name or an existing file, else an argparse error (exit 2)."""
    from .model.registry import MODEL_REGISTRY

    if value in MODEL_REGISTRY or Path(value).expanduser().is_file():
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither a known model ({', '.join(MODEL_REGISTRY)}) nor an existing "
        "checkpoint file"
    )


def _model_spec(args: argparse.Namespace) -> batch.ModelSpec:
    """The model of ``segment``/``precompute``, parsed once (:class:`batch.ModelSpec`).

    Raises
    ------
    UsageError
        Conflicting or missing files; a SAM checkpoint without the authors' MA-SAM file (its
        MA-SAM parts would be untrained: nothing worth segmenting with).
    """
    try:
        spec = batch.ModelSpec(
            model=args.model,
            checkpoint=args.checkpoint,
            sam_checkpoint=args.sam_checkpoint,
            masam_checkpoint=args.masam_checkpoint,
            device=args.device,
            backend=args.backend,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    if args.sam_checkpoint and not args.masam_checkpoint:
        raise UsageError(
            "--sam-checkpoint alone has no trained MA-SAM parts; give the authors' MA-SAM file "
            "too (--masam-checkpoint), or one napari-masam checkpoint (--checkpoint)"
        )
    return spec


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (default: the embedded LiteMedSAM)")
    group.add_argument(
        "--model",
        type=_model_argument,
        help="registry name (see `napari-masam info`) or a .safetensors file; with "
        "--sam-checkpoint only masam_vit_b|l|h (the backbone is checked)",
    )
    group.add_argument("--checkpoint", metavar="PATH", help="napari-masam single-file checkpoint")
    group.add_argument("--sam-checkpoint", metavar="PATH", help="SAM backbone checkpoint (.pth)")
    group.add_argument(
        "--masam-checkpoint", metavar="PATH", help="MA-SAM fine-tuned parts (with --sam-checkpoint)"
    )
    group.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")
    group.add_argument(
        "--backend",
        type=_backend_argument,
        default="auto",
        help="inference backend: auto (a verified ONNX Runtime/OpenVINO export of LiteMedSAM on "
        "the CPU when installed, else torch), torch, onnxruntime, openvino",
    )


def _add_train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``train``: the parser of :mod:`napari_masam.training` (its errors exit 2 as usage errors)."""
    from .training import add_train_parser

    before = set(sub.choices)
    add_train_parser(sub)
    for name in set(sub.choices) - before:
        sub.choices[name].set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from . import training

    try:
        code = training.run_train(args)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    return int(code or 0)


# ----------------------------------------------------------------------------------------------
# output helpers
# ----------------------------------------------------------------------------------------------
def _bar(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


def _write(message: str, stream: TextIO | None = None) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=stream or sys.stderr)  # sys.stderr now, not at import


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
        spec = _model_spec(args)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.mode == "boxes" and not args.boxes:
            raise ValueError(
                "--mode boxes needs --boxes FILE_OR_FOLDER (see `napari-masam segment --help`)"
            )
        boxes = Path(args.boxes).expanduser().absolute() if args.boxes else None
        box_file = None
        if boxes is not None and boxes.is_file():
            from .io.boxes import read_box_file

            box_file = read_box_file(boxes)  # parsed once, here: unusable files exit 2
        return batch.BatchConfig(
            model=spec,
            output_dir=Path(args.output).expanduser().absolute(),
            mode=args.mode,
            boxes=boxes,
            box_file=box_file,
            preset=args.preset,
            stride=args.stride,
            batch_size=args.batch_size,
            output_format=args.output_format,
            overwrite=args.overwrite,
            chunk_frames=args.chunk_frames,
            propagate=args.propagate,
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
def default_cache_dir() -> Path:
    """The embedding cache folder used when ``--cache-dir`` is not given (per user)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-masam")) / "embeddings"


def cache_location() -> Path:
    """On-disk embedding cache folder of ``precompute`` and ``info`` (the default one)."""
    return default_cache_dir()


def cache_summary(directory: Path) -> dict[str, Any]:
    """Location, entries and bytes of an on-disk embedding cache folder."""
    from .cache import DEFAULT_MAX_DISK_BYTES

    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    return {
        "directory": str(directory),
        "exists": directory.is_dir(),
        "entries": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "default_max_bytes": DEFAULT_MAX_DISK_BYTES,
    }


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
        from .model.runtime import available_backends

        info["backends"] = available_backends()
    except Exception as exc:  # info must work even where torch is broken
        info["backends"] = [f"unavailable ({type(exc).__name__}: {exc})"]
    try:
        from .devices import available_devices, resolve_device

        info["devices"] = {"available": available_devices(), "auto": str(resolve_device("auto"))}
    except Exception as exc:  # info must work even where torch is broken
        info["devices"] = {"error": f"{type(exc).__name__}: {exc}"}
    info["cache"] = cache_summary(cache_location())
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
    if args.cache_dir:
        info["cache"] = cache_summary(Path(args.cache_dir).expanduser().absolute())
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
    cache = info["cache"]
    print(
        f"Embedding cache: {cache['directory']} ({cache['entries']} entries, "
        f"{cache['bytes'] / 2**20:.1f} MiB of at most "
        f"{cache['default_max_bytes'] / 2**30:.0f} GiB"
        f"{'' if cache['exists'] else '; not created yet'}; "
        "fill it with `napari-masam precompute`)",
        file=out,
    )
    print(f"Backends (--backend): {', '.join(info['backends'])}", file=out)
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
def cmd_precompute(args: argparse.Namespace) -> int:
    """``napari-masam precompute``: encode every slice of each input into the disk cache.

    The box run of the widget and of ``segment`` looks the embeddings up under the same keys
    (content, model, preprocessing, window), so it then runs only the decoder. Videos are not
    precomputed (they are streamed in chunks; their embeddings would not fit a cache).
    """
    from .cache import EmbeddingCache
    from .devices import resolve_device
    from .session import SegmentationSession

    spec = _model_spec(args)
    directory = Path(args.cache_dir).expanduser().absolute() if args.cache_dir else cache_location()
    items, problems = batch.discover_inputs(args.inputs)
    videos = [i for i in items if i.kind == "video"]
    items = [i for i in items if i.kind != "video"]
    problems += [
        batch.JobResult(
            str(v.path),
            "failed",
            error=f"{v.path.name}: videos are streamed, not precomputed; precompute volumes "
            "and TIFF stacks",
        )
        for v in videos
    ]
    for problem in problems:
        _write(f"error: {problem.error}")
    if not items:
        raise UsageError(f"no NIfTI or TIFF inputs found in {' '.join(args.inputs)}")
    device = resolve_device(spec.device)
    max_disk = None if args.cache_max_gb is None else int(args.cache_max_gb * 2**30)
    # disk only (every slice is encoded once), bounded: least recently used entries go first
    cache = EmbeddingCache(max_bytes=0, directory=directory, max_disk_bytes=max_disk)
    session = SegmentationSession(spec.load(device), device, cache=cache)
    failed = len(problems)
    for item in items:
        try:
            stack, _, _ = batch.read_stack(item)
            depth, height, width = (int(n) for n in stack.shape[:3])
            # one whole-slice box per slice: the box run's own windows and cache keys
            whole = {1: {z: (0, 0, width - 1, height - 1) for z in range(depth)}}
            bar = _bar(total=depth, unit="slice", desc=item.path.name, disable=args.quiet)
            try:
                batch.drain(
                    session.iter_boxes(stack, whole, preset=args.preset),
                    lambda p, bar=bar: bar.update(max(0, int(p.done) - bar.n)),
                )
            finally:
                bar.close()
            if not args.quiet:
                _write(f"{item.path.name}: {depth} slices cached")
        except (ValueError, TypeError, OSError) as exc:
            failed += 1
            _write(f"error: {item.path.name}: {exc}")
    summary = cache_summary(directory)
    if not args.quiet:
        print(
            f"Embedding cache {summary['directory']}: {summary['entries']} entries, "
            f"{summary['bytes'] / 2**20:.1f} MiB",
            file=sys.stdout,
        )
    return EXIT_FAILED if failed else EXIT_OK


def cmd_boxes(args: argparse.Namespace) -> int:
    """``napari-masam boxes IN OUT``: convert a box file (napari Shapes CSV <-> table)."""
    from .io.boxes import read_box_file, save_boxes_file, save_napari_shapes_csv

    try:
        box_file = read_box_file(Path(args.source).expanduser())
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    target = Path(args.target).expanduser()
    keyframes = box_file.keyframes
    if args.to == "napari":
        if target.suffix.lower() != ".csv":
            raise UsageError(f"{target}: napari's Shapes CSV needs a .csv name")
        save_napari_shapes_csv(keyframes, target)
    else:
        save_boxes_file(keyframes, target)
    n = sum(len(frames) for frames in keyframes.values())
    print(f"{n} boxes of {len(keyframes)} objects -> {target}", file=sys.stdout)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``napari-masam demo``: the README quick start (propagation from the demo's keyframes)."""
    import numpy as np

    from .model.registry import DEFAULT_MODEL

    out = Path(args.output).expanduser().absolute()
    prepared = demo.prepare_demo(out)
    sample, source, boxes_path = prepared.sample, prepared.source, prepared.boxes_path
    boxes = prepared.boxes
    stem = batch.input_stem(sample)
    config = batch.BatchConfig(
        model=batch.ModelSpec(model=DEFAULT_MODEL, device=args.device, backend=args.backend),
        output_dir=out,
        mode="boxes",
        boxes=boxes_path,
        overwrite=args.overwrite,
        propagate=True,
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
    labelled = int(np.count_nonzero(labels.reshape(labels.shape[0], -1).any(axis=1)))
    # the segmentation's own time (model load/export, reading and writing excluded), from the
    # sidecar: also right when this run was skipped as up to date
    sidecar = json.loads(Path(result.sidecar).read_text()) if result.sidecar else {}
    timings = sidecar.get("timings", {})
    segment_s = float(timings.get("segment_s") or 0.0)
    backend = (sidecar.get("model") or {}).get("backend") or {}
    summary.update(
        voxels_per_label=counts,
        slices=int(labels.shape[0]),
        slices_labelled=labelled,
        segment_seconds=round(segment_s, 3),
        slices_per_second=round(labelled / segment_s, 3) if segment_s > 0 else None,
        backend=backend.get("backend", args.backend) if isinstance(backend, dict) else backend,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        state = "up to date" if result.status == "skipped" else f"{result.seconds:.1f} s"
        print(f"napari-masam demo ({source}: {sample.name}, model {DEFAULT_MODEL}, {state})")
        print(f"  boxes:      {boxes_path} ({len(boxes)} objects, propagated)")
        print(f"  labels:     {result.outputs[0]}")
        print(f"  provenance: {result.sidecar}")
        for label, n in counts.items():
            print(f"  object {label}: {n} voxels")
        rate = summary["slices_per_second"]
        speed = f", {rate:.2f} slices/s" if rate else ""
        print(
            f"  {labelled} of {labels.shape[0]} slices labelled in {segment_s:.1f} s"
            f"{speed} (backend {summary['backend']})"
        )
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors exit 2 at parse time; --help/--version exit 0
        if exc.code in (0, None):
            raise
        return EXIT_USAGE
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
