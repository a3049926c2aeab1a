"""Sample order and augmentation randomness as pure functions of (seed, epoch, position): exact resume.

A resumed run must see the same batches, augmented the same way, as a run that never stopped, also when it
stops mid-epoch and whatever the number of loader workers. So the sampler draws each epoch's order and one
seed per position from a generator seeded by (seed, epoch), shards the order over the ranks of a
distributed run itself, and can start an epoch part-way (`resume_at`); `SeededSamples` augments each
sample under its own seed, so no worker's RNG history matters.
"""

from __future__ import annotations

import random

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
