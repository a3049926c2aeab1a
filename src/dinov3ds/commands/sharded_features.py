"""`dinov3ds features photos/ --out feats/`: features of a large folder as shards (`data/feature_shards.py`),
split over processes and resumable.

    dinov3ds features photos/ --out feats/ --devices 4                         # 4 GPUs of this machine
    torchrun --nproc_per_node 8 -m dinov3ds features photos/ --out feats/      # any launcher that sets RANK
    dinov3ds features photos/ --out feats/                                     # again after a kill: resumes

Process r of N computes shards r, r + N, r + 2N, ...; a shard already complete on disk is skipped. With
`--devices N` this command starts the N processes itself (one per GPU, or N CPU processes with
`--device cpu`); under torchrun or SLURM each process is one rank and they meet at two barriers (torch.distributed,
gloo): after rank 0 has claimed the folder and before it writes the index. The folder is held by one run (a
lock file, `run_folder.folder_lock`, taken by the process that claims it, never by its own ranks), and a write
that fails (a full disk) is one line: the shards already written stay, and the same command resumes from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dinov3ds.commands.features import features_of, image_paths
from dinov3ds.data import feature_shards
from dinov3ds.errors import UserError
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.hardware import resolve_device
from dinov3ds.models.variants import get_spec
from dinov3ds.models.weights import find_source, weights_digest
from dinov3ds.training.run_folder import folder_lock

logger = logging.getLogger("dinov3ds")


@dataclass(frozen=True)
class ShardJob:
    """Everything one process needs (picklable: it crosses to spawned processes)."""

    backbone: str
    weights: str | None
    dtype: torch.dtype
    device: str
    paths: tuple[Path, ...]
    folder: Path
    image_size: int
    batch_size: int
    workers: int
    patches: bool
    shard_size: int
    overrides: tuple[tuple[str, object], ...] = ()

    def settings(self, identity: dict) -> dict:
        """What the folder's features are of: a resume must match it exactly."""
        return {"backbone": identity, "image_size": self.image_size, "patches": self.patches,
                "shard_size": self.shard_size, "dtype": str(self.dtype), "paths": [str(p) for p in self.paths]}  # fmt: skip


def run_rank(job: ShardJob, rank: int, world: int) -> int:
    """Compute this rank's missing shards; returns how many it wrote."""
    device = torch.device(job.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    backbone = load_backbone(job.backbone, job.weights, dtype=job.dtype, device=device, **dict(job.overrides))
    rows, written = len(job.paths), 0
    for shard in range(rank, feature_shards.shard_count(rows, job.shard_size), world):
        start = shard * job.shard_size
        chunk = list(job.paths[start : start + job.shard_size])
        path = feature_shards.shard_path(job.folder, shard)
        if feature_shards.shard_is_complete(path, chunk):
            continue
        tensors = features_of(backbone, chunk, image_size=job.image_size, batch_size=job.batch_size,
                              num_workers=job.workers, patches=job.patches, progress=False)  # fmt: skip
        with _writing(job.folder):
            feature_shards.write_shard(path, tensors, chunk)
        written += 1
        logger.info("rank %d: wrote %s (%d images)", rank, path.name, len(chunk))
    return written


def _spawned(rank: int, job: ShardJob, world: int) -> None:
    if job.device == "cpu":  # N processes share the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    run_rank(job, rank, world)


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """A write into --out that fails is one line; the complete shards stay for the next run to resume from."""
    try:
        yield
    except OSError as error:
        raise UserError(f"--out {folder}: cannot write there ({error.strerror}); free disk space (or fix the folder's "
                        "permissions) and run the same command again: it resumes from the shards written") from None  # fmt: skip


@contextlib.contextmanager
def _holding(job: ShardJob, overwrite: bool) -> Iterator[None]:
    """Lock --out for this run (its ranks write inside it) and claim it for the job's settings."""
    settings = job.settings(_identity(job))
    with _writing(job.folder):
        job.folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(job.folder, "--out"):
        with _writing(job.folder):
            feature_shards.claim_settings(job.folder, settings, overwrite)
        yield


def _write_index(job: ShardJob) -> dict:
    with _writing(job.folder):
        return feature_shards.write_index(job.folder, job.paths, job.shard_size)


def _identity(job: ShardJob) -> dict:
    """Which weights the features come from (their SHA-256), read from the file without building the model."""
    if job.weights == "random":
        return {"name": get_spec(job.backbone).name, "weights": "random", "overrides": dict(job.overrides)}
    source = find_source(get_spec(job.backbone), job.weights)
    return {"name": get_spec(job.backbone).name, "weights": source.label, "sha256": weights_digest(source.path),
            "overrides": dict(job.overrides)}  # fmt: skip


def extract_shards(job: ShardJob, devices: int = 1, overwrite: bool = False) -> dict:
    """Run `job` over `devices` processes (or as one rank of a torchrun/SLURM launch) and write the index."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        return _as_launched_rank(job, world, overwrite)
    with _holding(job, overwrite):
        if devices > 1:
            try:
                torch.multiprocessing.spawn(_spawned, args=(job, devices), nprocs=devices, join=True)
            except torch.multiprocessing.ProcessRaisedException as error:
                last = str(error).strip().splitlines()[-1]  # the rank's own one line, after its traceback
                if "UserError: " not in last:
                    raise
                raise UserError(last.split("UserError: ", 1)[1]) from None
        else:
            run_rank(job, 0, 1)
        return _write_index(job)


def _as_launched_rank(job: ShardJob, world: int, overwrite: bool) -> dict:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    try:
        with _holding(job, overwrite) if rank == 0 else contextlib.nullcontext():
            dist.barrier()
            run_rank(job, rank, world)
            dist.barrier()
            index = _write_index(job) if rank == 0 else {}
            dist.barrier()
            return index
    finally:
        dist.destroy_process_group()


def job_from_arguments(inputs: list[str], out: Path, *, backbone: str, weights: str | None, dtype: torch.dtype,
                       device: str, image_size: int, batch_size: int, workers: int, patches: bool,
                       shard_size: int) -> ShardJob:  # fmt: skip
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: give 1 or more images per shard")
    if out.suffix:
        raise UserError(f"--out {out}: sharded features go to a folder; name one without a suffix (or a .npz file)")
    return ShardJob(backbone, weights, dtype, str(resolve_device(device)), tuple(image_paths(inputs)), out,
                    image_size, batch_size, workers, patches, shard_size)  # fmt: skip
