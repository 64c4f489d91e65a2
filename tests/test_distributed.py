"""Dask scale-out: one task per input on a 2-worker LocalCluster equals the sequential batch."""

from __future__ import annotations

import json
from pathlib import Path

import distributed  # the [distributed] extra; part of [testing]
import nibabel as nib
import numpy as np
import pytest
import torch

from napari_masam import batch, cli
from napari_masam import distributed as dist


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_masam.checkpoints import save_checkpoint
    from napari_masam.model.masam import build_masam

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(build_masam("tiny", num_classes=2), path)
    return path


def _write_volume(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 12), indexing="ij")
    blob = np.exp(-((x - rng.uniform(-0.5, 0.5)) ** 2 + y**2) * 5)
    data = (800 * blob[..., None] * np.ones(3) + rng.normal(0, 30, (16, 12, 3))).astype(np.float32)
    affine = np.diag([1.0 + seed / 10, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> list[batch.BatchInput]:
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in range(4):
        _write_volume(folder / f"case{seed}.nii.gz", seed)
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8bnot gzip at all" * 8)
    items, problems = batch.discover_inputs([folder])
    assert not problems and len(items) == 5
    return items


def _labels(result: batch.JobResult) -> np.ndarray:
    return np.asarray(nib.load(result.outputs[0]).dataobj)


@pytest.fixture
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_local_cluster_matches_sequential(
    tmp_path: Path, inputs: list[batch.BatchInput], tiny_checkpoint: Path, client
) -> None:
    spec = batch.ModelSpec(checkpoint=str(tiny_checkpoint), device="cpu")
    seq_config = batch.BatchConfig(model=spec, output_dir=tmp_path / "seq")
    dask_config = batch.BatchConfig(model=spec, output_dir=tmp_path / "dask")
    sequential = batch.run_batch(inputs, seq_config)
    seen: list[str] = []
    parallel = dist.run_distributed(
        inputs, dask_config, client=client, on_result=lambda item, r: seen.append(item.stem)
    )
    assert [Path(r.input).name for r in parallel] == [i.path.name for i in inputs]
    assert sorted(seen) == sorted(i.stem for i in inputs)
    for s, p in zip(sequential, parallel):
        assert s.status == p.status
        if s.status == "failed":
            assert "corrupt.nii.gz" in p.error
            continue
        assert p.status == "done", p.error
        assert Path(p.outputs[0]).parent == tmp_path / "dask"  # written by the workers
        np.testing.assert_array_equal(_labels(p), _labels(s))
        side = json.loads(Path(p.sidecar).read_text())
        assert side["match"] == json.loads(Path(s.sidecar).read_text())["match"]
    assert sum(r.status == "done" for r in parallel) == 4

    # each worker loaded the model at most once for its tasks
    name = dist.plugin_name(spec)
    loads = client.run(lambda dask_worker: dask_worker.plugins[name].holder.loads)
    assert len(loads) == 2 and all(n <= 1 for n in loads.values()) and sum(loads.values()) >= 1

    # resume works the same on the cluster: everything up to date
    again = dist.run_distributed(inputs, dask_config, client=client)
    assert [r.status for r in again] == [
        "skipped" if s.status == "done" else "failed" for s in sequential
    ]
    # a second batch on the same client reuses the workers' models (no reload)
    redo = batch.BatchConfig(model=spec, output_dir=tmp_path / "dask2")
    assert sum(r.status == "done" for r in dist.run_distributed(inputs, redo, client=client)) == 4
    after = client.run(lambda dask_worker: dask_worker.plugins[name].holder.loads)
    assert all(n <= 1 for n in after.values()), after  # a reload would count 2


def test_cli_local_cluster(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, inputs, tiny_checkpoint: Path
) -> None:
    two = [inputs[0].path, inputs[1].path]
    code = cli.main(
        [
            "segment",
            *map(str, two),
            "-o",
            str(tmp_path / "out"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--dask-scheduler",
            "local",
            "--workers",
            "2",
            "--no-dask-processes",
            "--json",
            "--quiet",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["done"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz")) == [
        "case0_seg.nii.gz",
        "case1_seg.nii.gz",
    ]


def test_missing_distributed_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "distributed":
            raise ImportError("No module named 'distributed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(dist.DistributedUnavailable, match=r"napari-masam\[distributed\]"):
        dist.run_distributed([], batch.BatchConfig(batch.ModelSpec(), Path(".")))
