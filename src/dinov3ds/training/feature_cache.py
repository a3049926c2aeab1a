"""Fast linear probing: backbone features computed once, cached on disk, reused by every epoch and run.

The cache key covers everything the features depend on: the backbone's identity (variant, weight hash,
overrides, dtype), the dataset's files (path, size, mtime), the transform and the pooling/taps. Change
any of them and the features are computed again; otherwise an epoch costs no backbone forward at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from dinov3ds.config import Config
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


def cache_key(model, dataset: Dataset, config: Config) -> str:
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


def cached_features(model, dataset: Dataset, config: Config) -> TensorDataset:
    """Features for `dataset`, from the cache when the key matches, else computed and stored."""
    path = cache_dir() / "features" / f"{cache_key(model, dataset, config)}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("feature cache hit: %s", path)
        return TensorDataset(stored["features"], stored["labels"])
    features, labels = extract_features(model, dataset, config)
    atomic_torch_save({"features": features, "labels": labels}, path)
    logger.info("feature cache written: %s (%d samples)", path, len(labels))
    return TensorDataset(features, labels)
