"""DDP on CPU (gloo, two processes) gives the same model and metrics as one process with the same global batch.

Full-batch SGD on cached features makes the comparison exact up to float rounding: each rank holds half the
batch and DDP averages the gradients, which equals one process's gradient over the whole batch. Validation
metrics are reduced from summed per-rank counts, so they must match too.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.models.checkpoints import read_checkpoint

COMMON = [
    "backbone.weights=random", "backbone.overrides={depth: 1}", "data.image_size=32", "data.num_workers=0",
    "data.augment=false", "optim.optimizer=sgd", "optim.momentum=0", "optim.scheduler=constant",
    "optim.weight_decay=0", "optim.lr=0.05", "trainer.max_epochs=2", "trainer.progress_bar=false",
    "trainer.accelerator=cpu",
]  # fmt: skip


def _train(tmp_path, output: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DINOV3DS_CACHE": str(tmp_path / f"cache_{output}"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dinov3ds", "train", *COMMON, f"data.root={tmp_path / 'data'}",
               f"output_dir={tmp_path / output}", *extra]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _last_validation(folder) -> dict[str, float]:
    with open(folder / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/loss")]
    return {key: float(value) for key, value in rows[-1].items() if key.startswith("val/") and value}


def test_two_process_ddp_matches_one_process(tmp_path):
    make_classification_folder(tmp_path / "data", num_classes=4, train_per_class=8, val_per_class=5, size=32)
    single = _train(tmp_path, "single", "data.batch_size=32")
    double = _train(tmp_path, "ddp", "data.batch_size=16", "trainer.devices=2", "trainer.strategy=ddp")

    one = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt").head_state_dict
    two = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt").head_state_dict
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=0)

    metrics_one, metrics_two = _last_validation(tmp_path / "single"), _last_validation(tmp_path / "ddp")
    assert metrics_one.keys() == metrics_two.keys() and "val/top1" in metrics_one
    for key in metrics_one:
        assert abs(metrics_one[key] - metrics_two[key]) <= 1e-4, (key, metrics_one[key], metrics_two[key])
    # metrics.csv holds what Lightning logged, in float32: 0.65 there reads 0.6499999762
    assert json.loads((tmp_path / "ddp" / "val_metrics.json").read_text())["top1"] == pytest.approx(metrics_two["val/top1"], abs=1e-7)

    # Only rank 0 wrote: one report on stdout, one set of files, no per-rank duplicates.
    assert double.stdout.count("best checkpoint:") == 1, double.stdout
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert single.stdout.count("best checkpoint:") == 1


def _communicate_or_kill_the_group(launch: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """torchrun's workers outlive a killed launcher and hold its pipes (a CI run then waits on them for
    hours): past the timeout the whole process group goes."""
    try:
        return launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        out, err = launch.communicate()
        raise AssertionError(f"torchrun node ran over {timeout}s: {err[-2000:]}") from None


def test_the_readmes_two_node_torchrun_command_trains_once_and_splits_the_feature_store(tmp_path):
    """The README's multi-node command, as two `torchrun` launches (node 0 and node 1) on 127.0.0.1 with gloo:
    both ranks extract their part of the feature store into the one shared folder, one set of checkpoints and
    metrics is written, and the model equals a one-process run's."""
    make_classification_folder(tmp_path / "data", num_classes=4, train_per_class=8, val_per_class=5, size=32)
    single = _train(tmp_path, "single", "data.batch_size=32", "cache.shard_size=8")
    env = {**os.environ, "DINOV3DS_CACHE": str(tmp_path / "shared_cache"), "OMP_NUM_THREADS": "1"}
    port = 29400 + os.getpid() % 500
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "dinov3ds", "train", *COMMON, f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'nodes'}",
             "data.batch_size=16", "cache.shard_size=8", "trainer.num_nodes=2", "trainer.devices=1",
             "trainer.strategy=ddp"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [_communicate_or_kill_the_group(launch, timeout=300) for launch in launches]
    assert all(launch.returncode == 0 for launch in launches), [err[-2000:] for _, err in outputs]
    one = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt").head_state_dict
    two = read_checkpoint(tmp_path / "nodes" / "checkpoints" / "last.ckpt").head_state_dict
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=0)
    assert sum(out.count("best checkpoint:") for out, _ in outputs) == 1 and single.returncode == 0
    assert sorted(p.name for p in (tmp_path / "nodes" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    stores = [p.parent for p in (tmp_path / "shared_cache" / "features").glob("*/index.json")]
    assert len(stores) == 2  # train and val
    for store in stores:
        assert sorted(p.name for p in store.glob("rank-*.started")) == ["rank-0.started", "rank-1.started"]
