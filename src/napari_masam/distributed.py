"""Scale a batch out on Dask distributed: one task per input, the model loaded once per worker.

``distributed`` is the optional extra ``napari-masam[distributed]`` and is imported only when a
function here runs. Each worker gets a :class:`ModelPlugin` (a Dask ``WorkerPlugin``) holding a
:class:`~napari_masam.batch.SessionHolder`: the first task on a worker loads the model, later
tasks reuse it. Tasks run :func:`napari_masam.batch.run_job`, exactly the sequential code: the
workers read the inputs and write the outputs and sidecars themselves (so the output folder must be
on a file system the workers share), and return a small :class:`~napari_masam.batch.JobResult`.
A task that dies (a worker crash, an import error) is reported as a failed input; the others go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from .batch import BatchConfig, BatchInput, JobResult, ModelSpec, SessionHolder, run_job

logger = logging.getLogger(__name__)

_EXTRA_HINT = "pip install 'napari-masam[distributed]'"


class DistributedUnavailable(ImportError):
    """Dask distributed is not installed (the ``[distributed]`` extra)."""


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise DistributedUnavailable(
            f"Dask scale-out needs the 'distributed' package: {_EXTRA_HINT} ({exc})"
        ) from exc
    return distributed


def plugin_name(spec: ModelSpec) -> str:
    """Name of the worker plugin of a model source (one model per source per worker)."""
    key = json.dumps([repr(spec.model_source), spec.device])
    return "napari-masam-model-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class ModelPlugin:
    """Worker plugin that owns one :class:`SessionHolder` per worker.

    Registered through :func:`make_plugin` (which mixes in Dask's ``WorkerPlugin`` lazily, so
    this module imports without ``distributed``).

    Parameters
    ----------
    spec : ModelSpec
    torch_threads : int or None
        ``torch.set_num_threads`` on the worker before loading (None: leave torch's default).
    """

    #: registering the same model again (a second batch on one client) keeps the loaded one
    idempotent = True

    def __init__(self, spec: ModelSpec, torch_threads: int | None = None) -> None:
        self.spec = spec
        self.torch_threads = torch_threads
        self.name = plugin_name(spec)
        self.holder: SessionHolder | None = None

    def setup(self, worker: Any) -> None:
        """Create the holder; the model itself loads with the first task that needs it."""
        self.holder = SessionHolder(self.spec, torch_threads=self.torch_threads)

    def teardown(self, worker: Any) -> None:
        """Drop the model."""
        self.holder = None


_PLUGIN_CLASS: type | None = None


def _plugin_class() -> type:
    """:class:`ModelPlugin` mixed with Dask's ``WorkerPlugin`` (created on first use)."""
    global _PLUGIN_CLASS
    if _PLUGIN_CLASS is None:
        distributed = _import_distributed()
        _PLUGIN_CLASS = type(
            "NapariMasamModelPlugin",
            (ModelPlugin, distributed.WorkerPlugin),
            {"__module__": __name__, "__doc__": ModelPlugin.__doc__},
        )
    return _PLUGIN_CLASS


def __getattr__(name: str) -> Any:
    # pickle finds the plugin class by name on the workers; build it there on demand
    if name == "NapariMasamModelPlugin":
        return _plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_plugin(spec: ModelSpec, torch_threads: int | None = None) -> Any:
    """A ``distributed.WorkerPlugin`` instance of :class:`ModelPlugin`."""
    return _plugin_class()(spec, torch_threads)


def worker_holder(name: str, spec: ModelSpec) -> SessionHolder:
    """The :class:`SessionHolder` of the current worker (its plugin's, or a fallback)."""
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, ModelPlugin) or plugin.holder is None:
        # plugin missing (e.g. a worker that joined oddly): keep one holder on the worker object
        holders = worker.__dict__.setdefault("_napari_masam_holders", {})
        return holders.setdefault(name, SessionHolder(spec))
    return plugin.holder


def run_task(item: BatchInput, config: BatchConfig, name: str) -> JobResult:
    """The task each input becomes: :func:`napari_masam.batch.run_job` on the worker."""
    holder = worker_holder(name, config.model)
    return run_job(item, config, holder)


def default_threads(n_workers: int) -> int:
    """torch threads per worker so that workers together use the machine's cores once."""
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))


def run_distributed(
    items: Sequence[BatchInput],
    config: BatchConfig,
    *,
    scheduler: str | None = None,
    client: Any = None,
    n_workers: int | None = None,
    processes: bool = True,
    threads_per_worker: int | None = None,
    on_result: Callable[[BatchInput, JobResult], None] | None = None,
) -> list[JobResult]:
    """Run one task per input on a Dask cluster and collect the results.

    Parameters
    ----------
    items : sequence of BatchInput
    config : BatchConfig
    scheduler : str or None
        Address of a running scheduler (``tcp://host:8786``); None: a ``LocalCluster`` on this
        machine (closed again at the end).
    client : distributed.Client or None
        Use this client instead (``scheduler`` and the LocalCluster options are ignored).
    n_workers : int or None
        LocalCluster workers (default 2).
    processes : bool
        LocalCluster workers as processes (True) or threads of this process.
    threads_per_worker : int or None
        torch threads per worker; default: cores // workers for a LocalCluster, torch's
        default on an existing cluster.
    on_result : callable or None
        Called as each input finishes (in completion order).

    Returns
    -------
    list of JobResult
        In the order of ``items``.

    Raises
    ------
    DistributedUnavailable
        If ``distributed`` is not installed.
    """
    distributed = _import_distributed()
    own: list[Any] = []
    torch_threads = threads_per_worker
    try:
        if client is None:
            if scheduler:
                client = distributed.Client(scheduler)
            else:
                n = n_workers or 2
                if processes and torch_threads is None:
                    # thread counts are per process: only set them in worker processes of our own
                    torch_threads = default_threads(n)
                cluster = distributed.LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=processes,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
                own.append(cluster)
                client = distributed.Client(cluster)
            own.insert(0, client)
        plugin = make_plugin(config.model, torch_threads)
        client.register_plugin(plugin, name=plugin.name)
        futures = {}
        for index, item in enumerate(items):
            future = client.submit(
                run_task,
                item,
                config,
                plugin.name,
                key=f"napari-masam-{item.stem}-{index}-{os.getpid()}-{id(items)}",
                pure=False,
            )
            futures[future] = index
        results: list[JobResult | None] = [None] * len(items)
        for future in distributed.as_completed(futures):
            index = futures[future]
            item = items[index]
            try:
                result = future.result()
            except Exception as exc:  # the task itself died: a worker crash, a lost worker
                result = JobResult(
                    str(item.path),
                    "failed",
                    error=f"{item.path.name}: task failed on the cluster: "
                    f"{type(exc).__name__}: {exc}",
                )
            results[index] = result
            if on_result is not None:
                on_result(item, result)
        return [r for r in results if r is not None]
    finally:
        for resource in own:
            try:
                resource.close()
            except Exception:  # closing must not hide the batch's own outcome
                logger.debug("closing %r failed", resource, exc_info=True)
