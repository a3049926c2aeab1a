"""Sample order and augmentation randomness as pure functions of (seed, epoch, position): exact resume.

A resumed run must see the same batches, augmented the same way, as a run that never stopped, also when it
stops mid-epoch and whatever the number of loader workers. So the sampler draws each epoch's order and one
seed per position from a generator seeded by (seed, epoch), shards the order over the ranks of a
distributed run itself, and can start an epoch part-way (`resume_at`); `SeededSamples` augments each
sample under its own seed, so no worker's RNG history matters. `ForegroundOversampling` draws a share of the
samples onto a structure of a class chosen uniformly (nnU-Net's forced foreground), under the same seeds.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields (dataset index, augmentation seed) pairs for this rank.

    Args:
        length: dataset size.
        seed: the run's seed.
        shuffle: a new permutation each epoch (training) or the dataset's order (evaluation).
        even: every rank gets the same count (training under DDP needs equal step counts; the few samples
            left over are dropped, as DistributedSampler(drop_last=True) does). Evaluation shards unevenly and
            drops nothing, so every sample is scored exactly once.
    """

    def __init__(self, length: int, seed: int, *, shuffle: bool, even: bool) -> None:
        self.length, self.seed, self.shuffle, self.even = length, seed, shuffle, even
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already seen in it)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch; a resume point holds only for its own epoch."""
        if epoch != self.epoch:
            self._resume = None
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Continue `epoch` after its first `samples_done` samples, as the interrupted run trained them. The
        epoch is set here too: Lightning iterates a resumed loader before it calls set_epoch (and again after)."""
        self.epoch = epoch
        self._resume = (epoch, samples_done)

    def _positions(self) -> range:
        rank, world = _rank_and_world()
        if world == 1:
            return range(self.length)
        stop = self.length - self.length % world if self.even else self.length
        return range(rank, stop, world)

    def __len__(self) -> int:
        return len(self._positions())

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator) if self.shuffle else torch.arange(self.length)
        seeds = torch.randint(0, 2**62, (self.length,), generator=generator)
        positions = list(self._positions())
        if self._resume is not None and self._resume[0] == self.epoch:
            positions = positions[self._resume[1] :]
        for position in positions:
            yield int(order[position]), int(seeds[position])


class SeededSamples(Dataset):
    """Reads `dataset[index]` with torch, NumPy and Python's RNGs seeded by the sampler's per-position seed,
    restoring the caller's RNG state afterwards (in the main process it is also the model's)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class ForegroundOversampling(Dataset):
    """nnU-Net's forced foreground: a share of the training samples (nnU-Net: one third) is drawn onto a
    structure instead of the index the sampler gave: a class uniformly among those the training slices hold,
    then uniformly a slice holding it, then a crop around one of its pixels (the transform's `focus`). So a
    class in 2 % of the slices is trained on as often as one in all of them. Draws come from torch's RNG, which
    `SeededSamples` seeds per position: a resumed run draws the same.

    Args:
        dataset: the training slices; its items are `(image, mask)` through `transform`.
        transform: the dataset's `SegmentationTrainTransform` (its `focus` is set around each forced item).
        presence: bool [len(dataset), num_classes]: which classes each item's label holds.
        share: the probability that an item is forced.
    """

    def __init__(self, dataset: Dataset, transform, presence: np.ndarray, share: float) -> None:
        self.dataset, self.transform, self.share = dataset, transform, share
        self.items_of = {c: np.flatnonzero(presence[:, c]) for c in range(1, presence.shape[1]) if presence[:, c].any()}
        self.classes = sorted(self.items_of)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if not self.classes or torch.rand(()).item() >= self.share:
            return self.dataset[index]
        chosen = self.classes[int(torch.randint(len(self.classes), ()).item())]
        items = self.items_of[chosen]
        self.transform.focus = chosen
        try:
            return self.dataset[int(items[int(torch.randint(len(items), ()).item())])]
        finally:
            self.transform.focus = None


def class_presence(labels: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    """bool [items, num_classes] from each item's class-index label (values >= num_classes, e.g. the ignore
    index, count for no class)."""
    rows = [np.bincount(label[label < num_classes].ravel(), minlength=num_classes)[:num_classes] > 0 for label in labels]
    return np.stack(rows) if rows else np.zeros((0, num_classes), bool)
