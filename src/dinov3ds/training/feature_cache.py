"""The feature store: backbone features for linear probing, extracted once, kept in shards, read from disk.

    <cache>/features/<key>/settings.json            what the features are of (backbone, files, transform, ...)
    <cache>/features/<key>/shard-00000.safetensors  rows [0, S): cls [S, B, D], mean [S, D], labels [S]
    <cache>/features/<key>/index.json               written last, once every shard is complete: each shard's
                                                    name, size and SHA-256, checked before the store is used

Each row holds the CLS tokens of the last B blocks (4, or more when `head.last_blocks` asks) and the patch
mean of the last block, in `cache.dtype` (float16 by default): every pooling and block count a linear probe
reads comes from one extraction, as DINOv3's linear evaluation does. The key covers what the features
depend on: the backbone (variant, weight hash, overrides, dtype), the files (path and size + mtime, or
their bytes with `cache.fingerprint: content`), their labels, the transform, the stored blocks and dtype.

Processes started by torchrun (RANK / WORLD_SIZE) split the shards, shard i to rank i mod N, and rank 0
writes the index once all are there: the folder must be one every rank sees. Rank 0 holds the folder's lock
(`run_folder.folder_lock`) while the launch writes, so a second run never writes into it: alone, it extracts
without the store (one warning naming the writer); as a multi-process launch, it stops with that line. A
killed extraction resumes from the shards on disk; a finished store that fails its check (an edited index,
a shard missing, altered, linked twice or outside the folder) is rebuilt with one warning. Rows are read
with `os.pread`, so memory does not grow with the number of rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

from dinov3ds.config import Config, cache_dir
from dinov3ds.data.feature_shards import (
    checked_shards,
    claim_settings,
    shard_count,
    shard_is_complete,
    shard_path,
    write_index,
    write_shard,
)
from dinov3ds.errors import DataWarning, UserError
from dinov3ds.models.tasks import TORCH_DTYPES
from dinov3ds.training.run_folder import folder_lock

logger = logging.getLogger("dinov3ds")
STORE_FORMAT = "dinov3ds-feature-store/1"
PROBE_BLOCKS = 4  # DINOv3's linear evaluation reads the CLS tokens of the last 1 or 4 blocks
RANK_WAIT_S = 120.0  # how long rank 0 waits for every other rank to show up in the store's folder


def _file_fingerprint(path: str, mode: str) -> list:
    if mode == "content":
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return [str(Path(path).resolve()), digest.hexdigest()]
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def stored_blocks(model) -> list[int]:
    """The blocks whose CLS tokens the store keeps: the last four, and any other the model reads."""
    depth = model.backbone.depth
    return sorted(set(range(max(depth - PROBE_BLOCKS, 0), depth)) | set(model.layers))


def store_settings(model, dataset: Dataset, config: Config) -> dict:
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise TypeError(f"{type(dataset).__name__} has no 'samples' list to fingerprint")
    mode = config.cache.fingerprint
    return {
        "format": STORE_FORMAT,
        "backbone": model.backbone.identity,
        "backbone_dtype": str(model.backbone.dtype),  # resolved: `auto` may mean either
        "files": [[*_file_fingerprint(path, mode), int(label)] for path, label in samples],
        "fingerprint": mode,
        "transform": repr(getattr(dataset, "transform", None)),
        "blocks": stored_blocks(model),
        "dtype": config.cache.dtype,
        "shard_size": config.cache.shard_size,
    }


def store_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _loader(dataset: Dataset, config: Config) -> DataLoader:
    return DataLoader(dataset, batch_size=config.data.eval_batch_size or config.data.batch_size,
                      num_workers=config.data.num_workers, shuffle=False, pin_memory=torch.cuda.is_available())  # fmt: skip


@torch.inference_mode()
def _extract_rows(model, dataset: Dataset, config: Config, blocks: list[int], desc: str) -> dict[str, torch.Tensor]:
    """cls [N, B, D], mean [N, D] (patch mean of the last block) and labels [N] of `dataset`, in order."""
    dtype = TORCH_DTYPES[config.cache.dtype]
    cls, mean, labels = [], [], []
    for images, target in tqdm(_loader(dataset, config), desc=desc, disable=not config.trainer.progress_bar):
        taps = model.backbone.get_intermediate_layers(images.to(model.device, non_blocking=True), blocks, norm=True)
        cls.append(torch.stack([token for _, token in taps], dim=1).to("cpu", dtype))
        mean.append(taps[-1][0].mean(dim=(-2, -1)).to("cpu", dtype))
        labels.append(target.long())
    return {"cls": torch.cat(cls), "mean": torch.cat(mean), "labels": torch.cat(labels)}


def _vector(model, blocks: list[int], cls: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The model's input vector from stored rows: CLS of its blocks, then the patch mean (Classifier.features)."""
    parts = [cls[:, blocks.index(layer)] for layer in model.layers] if model.pooling in ("cls", "cls+avg") else []
    if model.pooling in ("avg", "cls+avg"):
        parts.append(mean)
    return torch.cat(parts, dim=1).float()


def _process_rank() -> tuple[int, int]:
    """(rank, world size) of a torchrun-style launch; (0, 1) otherwise (Lightning starts its other processes
    after this point, and they find the store complete)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _launch_id() -> str:
    """Tells this launch's rank markers from a killed launch's (torchrun's run id, else the master's address)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"


def _claim(folder: Path, settings: dict) -> None:
    """Rank 0, holding the lock: keep the folder's shards when they are of these settings (a resume; a finished
    store that failed its check keeps only the shards that match their record), else start it afresh. Where
    `dinov3ds features --out` refuses a folder of other settings, a cache entry is simply replaced. The rank
    markers of earlier launches go: the other ranks start once this launch's rank 0 has written its own."""
    try:
        claim_settings(folder, settings, overwrite=False)
    except UserError:
        claim_settings(folder, settings, overwrite=True)
    for marker in folder.glob("rank-*.started"):
        marker.unlink()


def _rank_started(folder: Path, rank: int) -> bool:
    marker = folder / f"rank-{rank}.started"
    return marker.is_file() and marker.read_text() == _launch_id()


def _wait_for_ranks(folder: Path, ranks: list[int]) -> None:
    """Until every rank in `ranks` has its marker in `folder`; a one-line error after RANK_WAIT_S (a node that
    sees another folder would otherwise wait forever)."""
    deadline = time.monotonic() + RANK_WAIT_S
    while missing := [rank for rank in ranks if not _rank_started(folder, rank)]:
        if time.monotonic() > deadline:
            raise UserError(f"feature store {folder}: rank(s) {missing} never appeared there; every node must see "
                            "one folder: point DINOV3DS_CACHE at a shared file system")  # fmt: skip
        time.sleep(0.5)


def build_store(model, dataset: Dataset, config: Config, folder: Path, settings: dict) -> None:
    """Extract the shards of this rank that are missing, then (rank 0) the index once every shard is there.
    Rank 0 holds the folder's lock (cached_features takes it); the others write only after its marker."""
    rank, world = _process_rank()
    rows, size = len(dataset), settings["shard_size"]
    paths = [path for path, _ in dataset.samples]
    images = [paths[i * size : (i + 1) * size] for i in range(shard_count(rows, size))]  # each shard's images
    if rank == 0:
        _claim(folder, settings)
    else:
        _wait_for_ranks(folder, [0])
    (folder / f"rank-{rank}.started").write_text(_launch_id())
    for index in range(rank, len(images), world):
        path = shard_path(folder, index)
        if shard_is_complete(path, images[index]):
            continue  # written before a kill: resume from it
        start = index * size
        arrays = _extract_rows(model, Subset(dataset, range(start, start + len(images[index]))), config,
                               settings["blocks"], f"features {index + 1}/{len(images)}")  # fmt: skip
        write_shard(path, arrays, images[index])
    if rank == 0:
        _wait_for_ranks(folder, list(range(world)))
        while not all(shard_is_complete(shard_path(folder, i), shard) for i, shard in enumerate(images)):
            time.sleep(0.5)
        write_index(folder, paths, size)
    else:
        while not (folder / "index.json").is_file():
            time.sleep(0.5)


class ShardRows:
    """Rows of one array across the shards, read on demand with os.pread (no memory map to grow the RSS)."""

    def __init__(self, shards: list[Path], name: str, shard_size: int) -> None:
        self.locations, self.shard_size = [], shard_size
        for path in shards:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if length > path.stat().st_size - 8:
                    raise ValueError(f"{path} is not a safetensors file")
                header = json.loads(handle.read(length))
            entry = header[name]
            dtype = {"F16": np.float16, "F32": np.float32, "I64": np.int64}[entry["dtype"]]
            shape = entry["shape"]
            self.locations.append((path, 8 + length + entry["data_offsets"][0], dtype, tuple(shape[1:])))
        self.handles: dict[int, int] = {}

    def __getstate__(self) -> dict:  # file descriptors stay in their process; workers open their own
        return {**self.__dict__, "handles": {}}

    def read(self, rows: list[int]) -> np.ndarray:
        """Rows [len(rows), ...] in the order asked, one pread per row into one buffer."""
        _, _, dtype, shape = self.locations[0]
        width = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        out = np.empty((len(rows), *shape), dtype=dtype)
        buffer = out.reshape(len(rows), -1).view(np.uint8)
        for position, row in enumerate(rows):
            shard, offset = divmod(row, self.shard_size)
            path, start = self.locations[shard][:2]
            if shard not in self.handles:
                self.handles[shard] = os.open(path, os.O_RDONLY)
            if os.preadv(self.handles[shard], [buffer[position]], start + offset * width) != width:
                raise OSError(f"{path} is shorter than its header says")
        return out


class StoredFeatures(Dataset):
    """(feature vector float32, label) per row of a finished store, in the model's pooling and blocks."""

    def __init__(self, folder: Path, model, settings: dict) -> None:
        """The store of `settings` in `folder`, its index and shards checked first (ShardFault, a ValueError)."""
        self.rows, size = len(settings["files"]), settings["shard_size"]
        shards = checked_shards(folder, json.loads((folder / "index.json").read_text()), self.rows, size)
        self.arrays = {name: ShardRows(shards, name, size) for name in ("cls", "mean", "labels")}
        self.model, self.blocks = model, settings["blocks"]

    def __len__(self) -> int:
        return self.rows

    def rows_of(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature vectors [n, F] float32 and labels [n] of `rows`."""
        cls, mean, labels = (torch.from_numpy(self.arrays[k].read(rows)) for k in ("cls", "mean", "labels"))
        return _vector(self.model, self.blocks, cls, mean), labels

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = self.rows_of([row])
        return features[0], labels[0]

    def __getitems__(self, rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch in one call (the DataLoader asks so): no per-row tensor work in Python."""
        features, labels = self.rows_of(list(rows))
        return list(zip(features, labels))

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row at once (k-NN compares each query with all of them)."""
        return self.rows_of(list(range(self.rows)))


def _checked_store(folder: Path, model, settings: dict) -> StoredFeatures | None:
    """The finished store in `folder`, or None (one warning naming what is off; rank 0 then rebuilds it)."""
    try:
        if json.loads((folder / "settings.json").read_text()) != settings:
            raise ValueError("settings.json differs")
        return StoredFeatures(folder, model, settings)  # every shard's size and SHA-256 checked before a row is read
    except (OSError, ValueError, KeyError, TypeError) as fault:
        warnings.warn(f"feature store {folder} ({fault}) is incomplete, corrupt or from another version; extracting again",
                      DataWarning, stacklevel=3)  # fmt: skip
        return None


def extract_features(model, dataset: Dataset, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Features straight from the backbone, stored nowhere: what the store must hand back."""
    blocks = stored_blocks(model)
    arrays = _extract_rows(model, dataset, config, blocks, "features")
    return _vector(model, blocks, arrays["cls"], arrays["mean"]), arrays["labels"]


def cached_features(model, dataset: Dataset, config: Config) -> Dataset:
    """`dataset`'s feature vectors from the store, extracting them first when the store lacks them."""
    settings = store_settings(model, dataset, config)
    folder = cache_dir() / "features" / store_key(settings)
    if (folder / "index.json").is_file() and (store := _checked_store(folder, model, settings)) is not None:
        logger.info("feature store hit: %s", folder)
        return store
    # The extraction's loader draws seeds from the global RNG; forked, so a run that fills the store trains
    # on the same shuffles as one that finds it full.
    rank, world = _process_rank()
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as held:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                if rank == 0:
                    held.enter_context(folder_lock(folder, "DINOV3DS_CACHE"))
            except UserError as busy:  # another run is writing this store
                if world > 1:
                    raise  # the ranks of one launch must read the same rows: it stops instead
                return _unstored(model, dataset, config, str(busy))
            build_store(model, dataset, config, folder, settings)
        except OSError as error:  # a read-only mount, no permission, a full disk
            return _unstored(model, dataset, config, f"feature store {folder} cannot be written ({error.strerror})")
    logger.info("feature store written: %s (%d rows)", folder, len(dataset))
    return StoredFeatures(folder, model, settings)


def _unstored(model, dataset: Dataset, config: Config, reason: str) -> Dataset:
    """The features extracted in memory when the store cannot be written (or another run is writing it)."""
    warnings.warn(f"{reason}; training without it", DataWarning, stacklevel=3)
    return TensorDataset(*extract_features(model, dataset, config))
