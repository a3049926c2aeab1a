"""Fast linear probing: backbone features computed once, cached on disk, reused by every epoch and run.

The cache key covers everything the features depend on: the backbone's identity (variant, weight hash,
overrides, dtype), the dataset's files (path, size, mtime), the transform and the pooling/taps. Change
any of them and the features are computed again; otherwise an epoch costs no backbone forward at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from dinov3ds.config import Config
from dinov3ds.errors import DataWarning
from dinov3ds.models.checkpoints import atomic_torch_save
from dinov3ds.models.weights import cache_dir

logger = logging.getLogger("dinov3ds")


def _dataset_fingerprint(dataset: Dataset) -> list:
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise TypeError(f"{type(dataset).__name__} has no 'samples' list to fingerprint")
    fingerprint = []
    for path, label in samples:
        stat = Path(path).stat()
        fingerprint.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, int(label)])
    return fingerprint


def cache_key(model, dataset: Dataset) -> str:
    description = {
        "backbone": model.backbone.identity,
        "dtype": str(model.backbone.dtype),  # resolved: `auto` may mean either
        "files": _dataset_fingerprint(dataset),
        "transform": repr(getattr(dataset, "transform", None)),
        "pooling": model.pooling,
        "layers": model.layers,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.inference_mode()
def extract_features(model, dataset: Dataset, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the frozen backbone over `dataset`: pooled feature vectors and labels."""
    loader = DataLoader(dataset, batch_size=config.data.eval_batch_size or config.data.batch_size,
                        num_workers=config.data.num_workers, shuffle=False, pin_memory=torch.cuda.is_available())  # fmt: skip
    features, labels = [], []
    for images, target in tqdm(loader, desc="caching features", disable=not config.trainer.progress_bar):
        features.append(model.features(images.to(model.device, non_blocking=True)).float().cpu())
        labels.append(target)
    return torch.cat(features), torch.cat(labels)


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A cache entry's (features, labels), or None (with one warning) when it is truncated, corrupt or holds
    anything but tensors: it is then rebuilt. `weights_only=True`: a planted pickle is refused, never run."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features, labels = stored["features"], stored["labels"]
        if isinstance(features, torch.Tensor) and isinstance(labels, torch.Tensor) and len(features) == len(labels):
            return features, labels
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        pass
    warnings.warn(f"feature cache entry {path} is unreadable or not features; computing it again", DataWarning, stacklevel=3)
    return None


def cached_features(model, dataset: Dataset, config: Config) -> TensorDataset:
    """Features for `dataset`, from the cache when the key matches, else computed and stored."""
    path = cache_dir() / "features" / f"{cache_key(model, dataset)}.pt"
    if path.is_file():
        stored = _read(path)
        if stored is not None:
            logger.info("feature cache hit: %s", path)
            return TensorDataset(*stored)
    # The extraction's loader draws seeds from the global RNG; forked, so a run that fills the cache trains
    # on the same shuffles as one that finds it full.
    with torch.random.fork_rng(devices=[]):
        features, labels = extract_features(model, dataset, config)
    atomic_torch_save({"features": features, "labels": labels}, path)
    logger.info("feature cache written: %s (%d samples)", path, len(labels))
    return TensorDataset(features, labels)
